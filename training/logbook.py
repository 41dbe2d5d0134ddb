"""Metrics that survive a kill, TensorBoard event files, and progress on the terminal.

`MetricsLog` appends one JSON object per step to `metrics.jsonl` (flushed after every write,
so a killed run keeps everything written before the kill) and the same scalars to TensorBoard
event files in `tensorboard/` (tensorboardX). On resume it first drops the lines past the
restored step, so the file always describes one uninterrupted run.

`Progress` shows a tqdm bar with the current loss and rate when stderr, the stream tqdm writes
to, is a terminal and `CI` is not set; otherwise it prints one short line to stdout every
`every` steps.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Any

from tqdm import tqdm

from training.results import to_jsonable

__all__ = ["MetricsLog", "Progress", "read_metrics", "interactive"]

_TENSORBOARD_QUEUE = 100_000  # events held for tensorboardX's writer thread


def interactive() -> bool:
    """Whether to draw progress bars: stderr, where tqdm draws them, is a terminal and CI is
    not set. The one test for every bar (`Progress`, data downloads, layer profiles)."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line, from a kill, is ignored)."""
    records = []
    path = pathlib.Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


class MetricsLog:
    """Append-only per-step metrics: metrics.jsonl and TensorBoard, in one workdir."""

    def __init__(self, workdir: str | os.PathLike, resume_from_step: int = 0,
                 tensorboard: bool = True, enabled: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._stream = self._writer = None
        if not enabled:  # a process other than 0 of a multi-process run writes nothing
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_from_step]
        temporary = self.path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(temporary, self.path)
        self._stream = open(self.path, "a")
        self._writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # an environment without the project's install (a GPU image)
                warnings.warn("tensorboardX is not installed: no TensorBoard event files "
                              f"(metrics.jsonl in {workdir} has every scalar)", stacklevel=2)
                return
            # The default queue of 10 events made every add_scalar wait for tensorboardX's
            # writer thread: 3.3 ms a step for the lecture's 12 scalars, against 0.8 ms.
            self._writer = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"),
                                         purge_step=resume_from_step + 1,
                                         max_queue=_TENSORBOARD_QUEUE)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **to_jsonable(scalars)}
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()
        if self._writer is not None:
            for name, value in scalars.items():
                value = float(value)
                if math.isfinite(value):
                    self._writer.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._writer is not None:
            self._writer.close()


class Progress:
    """A tqdm bar on a terminal; a line every `every` steps elsewhere (or nothing, every=0)."""

    def __init__(self, total: int, initial: int = 0, every: int = 500, description: str = ""):
        self.total, self.every, self.description = total, every, description
        self.step = initial
        self._started = time.perf_counter()
        self._start_step = initial
        self._bar = tqdm(total=total, initial=initial, desc=description, unit="step",
                         dynamic_ncols=True) if interactive() else None

    def update(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self.step)
            self._bar.set_postfix(loss=f"{loss:.4g}")
        elif self.every and (step // self.every > self.step // self.every or step == self.total):
            elapsed = time.perf_counter() - self._started
            rate = (step - self._start_step) / elapsed if elapsed > 0 else float("nan")
            print(f"{self.description} step {step}/{self.total} loss {loss:.4g} "
                  f"({rate:.3g} steps/s)", flush=True)
        self.step = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
