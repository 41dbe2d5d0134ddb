"""One writer for every experiment's results (README, "Experiments").

An experiment's work directory receives `results.json`:

    {"experiment": NAME, "config": {...}, "environment": {"jax": ..., "backend": ...,
     "devices": [...], "cpu": ..., "cpu_count": ...}, "metrics": {...}, "history": [...],
     "seconds": {"compile": s, "run": s}, ...experiment-specific keys}

and `results.md`, the printed table. Results are written before they are printed.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import sys
from typing import Any, Sequence

import jax
import numpy as np

__all__ = [
    "default_workdir",
    "environment",
    "cpu_model",
    "markdown_table",
    "to_jsonable",
    "write_results",
    "read_results",
    "save_test_outputs",
    "load_test_outputs",
    "save_and_print_table",
    "sample_sd",
]


def default_workdir(experiment: str, root: str | os.PathLike = "runs") -> pathlib.Path:
    """runs/<experiment>/<UTC timestamp>/ (not created)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return pathlib.Path(root) / experiment / stamp


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The host processor's name: the first "model name" of `cpuinfo` (Linux), else what
    `platform` knows ("" when nothing). Timings and even float32 roundings move between
    hosts of the same core count, so every result records it."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions, backend and devices of this process, and the host's processor."""
    import jaxlib
    import optax

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "devices": [str(device) for device in jax.devices()],
        "x64": bool(jax.config.read("jax_enable_x64")),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def to_jsonable(value: Any) -> Any:
    """Arrays and NumPy/JAX scalars as plain Python; non-finite floats as strings."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


def sample_sd(values: Any) -> float:
    """The standard deviation of `values` with n - 1 in the denominator (0 for one value):
    the spread over seeds that every results file reports."""
    array = np.asarray(values, np.float64)
    return float(np.std(array, ddof=1)) if array.size > 1 else 0.0


def write_results(
    workdir: str | os.PathLike,
    experiment: str,
    config: dict,
    metrics: dict,
    history: Sequence[dict] = (),
    seconds: dict | None = None,
    **extra: Any,
) -> pathlib.Path:
    """Write `workdir/results.json` (atomically) and return its path (process 0 only).

    A run continued under --force with another config (`training.harness.open_run`) has the
    configs it ran under before in its config.json; results.json repeats them as FORCED, so
    that results made partly, or wholly, under an earlier config do not pass for the new one's.
    """
    workdir = pathlib.Path(workdir)
    if jax.process_index() != 0:
        return workdir / "results.json"
    workdir.mkdir(parents=True, exist_ok=True)
    document = {
        "experiment": experiment,
        "config": config,
        "environment": environment(),
        "metrics": metrics,
        "history": list(history),
        "seconds": seconds or {},
        **_forced_configs(workdir),
        **extra,
    }
    path = workdir / "results.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(to_jsonable(document), indent=2) + "\n")
    os.replace(temporary, path)
    return path


FORCED = "forced"  # config.json's and results.json's list of {"changed", "config"}


def _forced_configs(workdir: pathlib.Path) -> dict:
    """{FORCED: [...]} from workdir/config.json where a --force changed the config, else {}."""
    try:
        saved = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    forced = saved.get(FORCED) if isinstance(saved, dict) else None
    return {FORCED: forced} if forced else {}


def read_results(workdir: str | os.PathLike) -> dict:
    """The results.json of a finished run, refused with the directory named if it has none."""
    path = pathlib.Path(workdir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} has no results.json (not a finished run)")
    return json.loads(path.read_text())


TEST_OUTPUTS = "test_outputs.npz"


def save_test_outputs(workdir: str | os.PathLike, outputs: Any, labels: Any) -> None:
    """The model's outputs on the test set (examples, classes) and the true labels
    (examples,), as `workdir/test_outputs.npz`: what an ensemble of runs needs."""
    np.savez_compressed(pathlib.Path(workdir) / TEST_OUTPUTS,
                        outputs=np.asarray(outputs, np.float32),
                        labels=np.asarray(labels, np.int32))


def load_test_outputs(workdir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """(outputs, labels) saved by `save_test_outputs`, or None if the run saved none."""
    path = pathlib.Path(workdir) / TEST_OUTPUTS
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return saved["outputs"], saved["labels"]


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4f}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `rows` (dicts), one column per key of `columns`."""
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def save_and_print_table(workdir: str | os.PathLike, text: str) -> None:
    """Write `text` to workdir/results.md, then print it (process 0 only)."""
    if jax.process_index() != 0:
        return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.md").write_text(text)
    print(text, end="" if text.endswith("\n") else "\n")
