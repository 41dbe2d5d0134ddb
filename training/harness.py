"""The research harness: one run directory per run, and a training loop that survives kills.

    config, args = training.config.parse(Config, argv, __doc__)
    run = open_run("lecture", config, args)          # config.json, environment.json
    outcome = train(run, advance, state, total_steps=..., checkpoint_every=..., ...)

`open_run` resolves the run directory (default `runs/<experiment>/<UTC timestamp>/`). A
directory that already holds a run is resumed (with or without `--resume`); if that run's
config differs, it refuses unless `--force`, naming the fields that differ. It also turns on
JAX's persistent compilation cache (`use_compilation_cache`), so that a second run of the same
program loads its executables instead of compiling them again.

`train` runs `advance(state, start, length) -> (state, records)` chunk by chunk, each chunk one
jitted call; after every chunk it appends the per-step metrics to `metrics.jsonl` and
TensorBoard and saves a checkpoint (`training.checkpoints`), so a run killed at any point
continues from its newest valid checkpoint and ends bitwise identical, on CPU, to one that was
never interrupted (the same jitted chunks run on the same states). A run whose state reports
a numerical failure (`procedures.GuardState.failed`) stops with a `NonFiniteError` naming the
step, layer and parameter, and its last good checkpoint stays in place.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from training import data, results
from training.checkpoints import Checkpointer
from training.config import ConfigError, HarnessArgs, differences, to_dict
from training.logbook import MetricsLog, Progress, read_metrics

__all__ = ["Run", "NonFiniteError", "TrainOutcome", "open_run", "environment", "train",
           "use_compilation_cache", "prune_compilation_cache", "COMPILATION_CACHE_ENV"]

COMPILATION_CACHE_ENV = "NETS_COMPILATION_CACHE"
_CACHE_OFF = ("off", "0", "false", "no", "none")
COMPILATION_CACHE_MAX_BYTES = 2 * 1024**3


class NonFiniteError(FloatingPointError):
    """A run rejected too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class Run:
    experiment: str
    workdir: pathlib.Path
    config: Any
    resuming: bool


def _git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=pathlib.Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None if completed.returncode == 0 else None


def environment() -> dict:
    """results.environment() plus library versions, process count, git commit, command."""
    import flax
    import orbax.checkpoint

    return {
        **results.environment(),
        "flax": flax.__version__,
        "orbax_checkpoint": orbax.checkpoint.__version__,
        "process_count": jax.process_count(),
        "git_commit": _git_commit(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }


def use_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache for this process; returns its directory, or
    None when it is off.

    The directory: a `JAX_COMPILATION_CACHE_DIR` the user set (JAX reads it itself), else
    `$NETS_COMPILATION_CACHE` ("off" turns the cache off), else `jax-compilation/` in the
    project's cache directory (`training.data.cache_dir`). Every program is cached however
    short its compilation (JAX's default leaves out those under 1 s: an experiment compiles
    dozens of them, and LeNet-1989's run took 24.7 s with the default against 19.9 s). The
    directory is kept to COMPILATION_CACHE_MAX_BYTES here, once per process
    (`prune_compilation_cache`: the least recently used entries go first), not by JAX's own
    limit (`jax_compilation_cache_max_size`), whose eviction reads every entry on every
    write: with the 7,272 entries (209 MB) this cache had grown to, each new compilation
    took 0.22 s against 0.035 s without the limit, and a small `experiments.kfac` run of
    LeNet-5 spent 199 of its 223 s writing the cache (2-core CPU, jax 0.10.2, 2026-12-06).
    Call it before the first compilation that should be cached. JAX trusts the cache's
    contents: keep it in a directory only you can write to.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    setting = os.environ.get(COMPILATION_CACHE_ENV, "").strip()
    if setting.lower() in _CACHE_OFF:
        return None
    directory = (pathlib.Path(setting).expanduser() if setting
                 else data.cache_dir() / "jax-compilation")
    prune_compilation_cache(directory, COMPILATION_CACHE_MAX_BYTES)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", -1)  # no eviction on each write
    return str(directory)


# JAX's cache files: "<key>-cache" holds an executable; "<key>-atime" the time of its last use,
# written only while JAX's own size limit is on (caches from before `prune_compilation_cache`).
_CACHE_SUFFIX, _USED_SUFFIX = "-cache", "-atime"


def _last_use(entry: pathlib.Path, stat: os.stat_result) -> int:
    """Nanoseconds since the epoch of an entry's last known use: its file's access or
    modification time (access times as the file system keeps them: with `relatime`, at least
    daily), or the time JAX recorded, whichever is latest."""
    used = max(stat.st_atime_ns, stat.st_mtime_ns)
    recorded = entry.with_name(entry.name.removesuffix(_CACHE_SUFFIX) + _USED_SUFFIX)
    try:
        return max(used, int.from_bytes(recorded.read_bytes(), "little"))
    except OSError:
        return used


def prune_compilation_cache(directory: pathlib.Path, max_bytes: int) -> int:
    """Delete the least recently used entries of JAX's compilation cache in `directory` until
    their sizes sum to at most `max_bytes`; returns how many were deleted. Entries that
    another process removes meanwhile are skipped; a missing directory holds none."""
    entries = []
    for entry in pathlib.Path(directory).glob(f"*{_CACHE_SUFFIX}"):
        try:
            stat = entry.stat()
        except OSError:
            continue
        entries.append((_last_use(entry, stat), stat.st_size, entry))
    total = sum(size for _, size, _ in entries)
    deleted = 0
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        entry.unlink(missing_ok=True)
        entry.with_name(entry.name.removesuffix(_CACHE_SUFFIX) + _USED_SUFFIX).unlink(
            missing_ok=True)
        total -= size
        deleted += 1
    return deleted


def _write_json(path: pathlib.Path, document: dict) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(results.to_jsonable(document), indent=2) + "\n")
    os.replace(temporary, path)


def _read_saved_config(path: pathlib.Path, workdir: pathlib.Path) -> dict:
    """config.json of the run in `workdir`, refused as a ConfigError if it is not one."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--workdir {workdir}: {path.name} cannot be read as a run's config "
                          f"({error}); choose another --workdir") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--workdir {workdir}: {path.name} holds a {type(saved).__name__}, "
                          "not a run's config; choose another --workdir")
    return saved


def open_run(experiment: str, config: Any, args: HarnessArgs,
             compilation_cache: bool = True) -> Run:
    """Create or reopen the run directory and write config.json and environment.json, which
    records the compilation cache's directory (`use_compilation_cache`; null when off).
    compilation_cache=False, for a benchmark that times compilation, turns the cache off for
    the process even where the user set one."""
    if compilation_cache:
        cache = use_compilation_cache()
    else:
        cache = None
        jax.config.update("jax_enable_compilation_cache", False)
    workdir = (args.workdir or results.default_workdir(experiment)).absolute()
    config_path = workdir / "config.json"
    resuming = config_path.exists()
    if args.resume and not resuming:
        raise ConfigError(f"option --resume: {workdir} holds no run (no config.json) to resume")
    forced = []  # the configs the run had before each --force that changed one
    if resuming:
        saved = _read_saved_config(config_path, workdir)
        # Compared as config.json stores it: an infinite float is the string "inf" there.
        changed = differences(saved.get("config", {}), results.to_jsonable(to_dict(config)))
        if saved.get("experiment") != experiment:
            changed.insert(0, f"experiment: {saved.get('experiment')!r} -> {experiment!r}")
        if changed and not args.force:
            raise ConfigError(
                f"--workdir {workdir} holds a run with a different config ("
                + "; ".join(changed) + "); pass --force to resume it with the new config, or "
                "choose another --workdir")
        forced = list(saved.get(results.FORCED, []))
        if changed:
            forced.append({"changed": changed, "config": saved.get("config", {})})
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"option --workdir: cannot create {workdir}: {error.strerror}") from None
    if jax.process_index() == 0:  # one writer in a multi-process run
        _write_json(config_path, {"experiment": experiment, "config": to_dict(config),
                                  **({results.FORCED: forced} if forced else {})})
        _write_json(workdir / "environment.json",
                    {**environment(), "compilation_cache": cache})
    return Run(experiment, workdir, config, resuming)


@dataclasses.dataclass
class TrainOutcome:
    state: Any
    history: list[dict]  # one record per step, from metrics.jsonl (the whole run)
    seconds: dict[str, float]  # compile, run, checkpoint: the whole run's (`_seconds_before`)
    resumed_from: int  # the step restored from a checkpoint (0: a fresh start)
    steps_done: int  # the step the run reached


def _default_scalars(records: dict, index: int) -> dict:
    scalars = {}
    for name, values in records.items():
        value = np.asarray(values[index])
        if value.ndim == 0:
            scalars[name] = value.item()
        else:
            scalars.update({f"{name}/{i}": v.item() for i, v in enumerate(value.ravel())})
    return scalars


SECONDS_FILE = "seconds.json"
_PHASES = ("compile", "run", "checkpoint")


def _seconds_before(workdir: pathlib.Path, step: int) -> dict[str, float]:
    """The seconds of each phase the run had spent when it saved its checkpoint at `step`
    (SECONDS_FILE, rewritten after every checkpoint), so that a resumed run reports the whole
    run's time, not only its own; zeros for a fresh start, or where the file is missing or
    was written for another checkpoint."""
    path = workdir / SECONDS_FILE
    saved = json.loads(path.read_text()) if step and path.is_file() else {}
    if saved.get("step") != step:
        return dict.fromkeys(_PHASES, 0.0)
    return {phase: float(saved["seconds"][phase]) for phase in _PHASES}


def _frozen(state) -> bool:
    return bool(jnp.all(state.stop.stopped | state.guard.failed))


def _raise_if_failed(state, leaf_names: Sequence[str]) -> None:
    failed = np.atleast_1d(np.asarray(state.guard.failed))
    if not failed.any():
        return
    run_index = int(np.argmax(failed))
    step = int(np.atleast_1d(np.asarray(state.guard.first_bad_step))[run_index])
    leaf = int(np.atleast_1d(np.asarray(state.guard.first_bad_leaf))[run_index])
    where = "the loss" if leaf < 0 else (
        f"parameter {leaf_names[leaf]}" if leaf < len(leaf_names) else f"gradient leaf {leaf}")
    scale = float(np.atleast_1d(np.asarray(state.guard.lr_scale))[run_index])
    restart = f" (restart {run_index})" if failed.size > 1 else ""
    raise NonFiniteError(
        f"non-finite gradient first at step {step + 1}{restart}, in {where}; the step was "
        f"rejected {int(np.atleast_1d(np.asarray(state.guard.consecutive))[run_index])} times "
        f"in a row with the learning rate lowered to {scale:g} of its value; the last good "
        "checkpoint is kept")


def train(
    run: Run,
    advance: Callable[[Any, jax.Array, int], tuple[Any, dict]],
    initial_state: Any,
    *,
    total_steps: int,
    checkpoint_every: int,
    keep: int = 3,
    leaf_names: Sequence[str] = (),
    scalars: Callable[[dict, int], dict] = _default_scalars,
    loss_name: str = "energy",
    progress_every: int = 500,
    say: Callable[[str], None] = print,
) -> TrainOutcome:
    """Run `advance` from the newest valid checkpoint (or `initial_state`) to total_steps.

    advance(state, start, length) -> (state, records): `length` steps from step `start`
    (a jnp.int32 scalar), records a dict of arrays with a leading axis of `length`; it is
    jitted here, once per distinct length. `scalars(records, i)` flattens step i's records (NumPy
    arrays by then) for the metrics log (default: scalars as they are, vectors as name/0,
    name/1, ...).

    A newest checkpoint past total_steps (a finished run re-run under --force with fewer
    steps) cannot be continued: the run starts again from step 0, its checkpoints deleted,
    and says so. The seconds returned are the whole run's, those spent before the checkpoint
    it resumed from included.
    """
    if checkpoint_every < 1 or total_steps < 1:
        raise ConfigError(f"train: checkpoint_every ({checkpoint_every}) and total_steps "
                          f"({total_steps}) must be >= 1")
    checkpointer = Checkpointer(run.workdir / "checkpoints", keep, say=say)
    start = time.perf_counter()
    restored = checkpointer.restore_latest(initial_state)
    if restored is not None and restored[0] > total_steps:
        say(f"{run.workdir}: the newest checkpoint is at step {restored[0]}, past this run's "
            f"{total_steps} steps; starting again from step 0, its checkpoints deleted")
        shutil.rmtree(checkpointer.directory)
        checkpointer, restored = Checkpointer(run.workdir / "checkpoints", keep, say=say), None
    step, state = (0, initial_state) if restored is None else restored
    seconds = _seconds_before(run.workdir, step)
    seconds["checkpoint"] += time.perf_counter() - start
    if restored is not None:
        say(f"resuming {run.experiment} from the checkpoint at step {step} in {run.workdir}")
    main_process = jax.process_index() == 0  # logs from process 0 only; checkpoints from all
    log = MetricsLog(run.workdir, resume_from_step=step, enabled=main_process)
    progress = Progress(total_steps, step, progress_every if main_process else 0,
                        run.experiment)
    compiled: dict[int, Any] = {}
    try:
        while step < total_steps and not _frozen(state):
            length = min(checkpoint_every - step % checkpoint_every, total_steps - step)
            begin = jnp.asarray(step, jnp.int32)
            if length not in compiled:
                tick = time.perf_counter()
                compiled[length] = jax.jit(advance, static_argnums=2).lower(
                    state, begin, length).compile()
                seconds["compile"] += time.perf_counter() - tick
            tick = time.perf_counter()
            new_state, records = jax.block_until_ready(compiled[length](state, begin))
            seconds["run"] += time.perf_counter() - tick
            records = jax.device_get(records)  # one transfer, not one per step and name
            for index in range(length):
                log.write(step + index + 1, scalars(records, index))
            _raise_if_failed(new_state, leaf_names)
            state, step = new_state, step + length
            tick = time.perf_counter()
            checkpointer.save(step, state)
            seconds["checkpoint"] += time.perf_counter() - tick
            if main_process:
                _write_json(run.workdir / SECONDS_FILE, {"step": step, "seconds": seconds})
            progress.update(step, float(np.mean(np.asarray(records[loss_name])[-1])))
    finally:
        progress.close()
        log.close()
    return TrainOutcome(state, read_metrics(run.workdir / "metrics.jsonl"), seconds,
                        0 if restored is None else restored[0], step)
