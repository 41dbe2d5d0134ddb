"""Timing for benchmarks: compile time apart, warm-up, repetitions, interleaved comparisons.

`compile_jitted(function, *args)` compiles once (timed); `time_calls` warms up, then times
`repeats` calls with `block_until_ready`, returning median, 10th and 90th percentiles.
`compare` times two
callables alternately, A B A B ..., so that a slow drift of the machine (another process,
thermal limits) affects both alike; ratios are only ever taken between two things measured
this way in one process. Each timed call follows `settle` untimed calls of the same callable,
so that both sides are timed in their steady state, as a training loop runs them: the first
call after switching pays for the other side's footprint (caches, freed buffers, thread pools
gone to sleep; LeNet-5's batch-128 step took 8.8 ms back to back but 12.1 ms right after
the autodiff step). A callable faster than `MIN_SAMPLE_S` is timed over several blocked
calls per sample, as many as make a sample last that long (from its warm-up time), and the
sample is their mean: one LeNet-1989 example's step (about 0.1 ms) otherwise gave
manual/autodiff ratios from 0.83 to 1.22 across runs of the same code, most of a single
call's time being the scheduler's jitter. Results are `Measurement`s, written as the
`benchmarks` rows of experiments/bench.py.

`reuse_freed_memory()` keeps glibc's malloc from handing large blocks back to the system:
XLA:CPU allocates each call's temporaries as one block, and glibc serves a block over 32 MB
by a fresh mmap, so every call of a step with more temporaries than that page-faults all of
them in again. The scan LSTM of `make bench` (61 MB of temporaries, batch 64, T 100, hidden
256) took 14,908 page faults a step and 88.1 ms; after the call, 6 faults and 73.8-75.2 ms
(reset-after GRU, 47.5 MB: 80.3 against 67.8-67.9 ms; LeNet-5's 11.3 MB step 7.66 against
7.28-7.30 ms; 2-core CPU, 2026-12-05, separate processes). PyTorch allocates through the same
malloc, and its `nn.LSTM` step gained as much (63.7 against 53.4 ms), so the setting is one
of the process, recorded with every run (`thread_settings`) and off by default.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np

__all__ = ["Measurement", "MIN_SAMPLE_S", "compile_jitted", "time_calls", "time_chained",
           "compare", "thread_settings", "reuse_freed_memory"]

MIN_SAMPLE_S = 2e-3

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_REUSE = {"applied": False}


@dataclasses.dataclass
class Measurement:
    """Wall times of one callable: per-call percentiles over `repeats` samples (each the mean
    of `calls_per_sample` blocked calls), and compile."""

    median_s: float
    p10_s: float
    p90_s: float
    compile_s: float | None
    repeats: int
    calls_per_sample: int = 1

    @classmethod
    def from_samples(cls, samples, compile_s=None, calls_per_sample=1):
        samples = np.asarray(samples, np.float64)
        if not samples.size:  # np.percentile would raise a bare IndexError
            raise ValueError("benchmark: no timed samples; repeats must be >= 1")
        return cls(float(np.median(samples)), float(np.percentile(samples, 10)),
                   float(np.percentile(samples, 90)), compile_s, int(samples.size),
                   calls_per_sample)


def compile_jitted(function: Callable, *args: Any, donate_argnums: tuple[int, ...] = (),
                   compiler_options: dict[str, Any] | None = None) -> tuple[Callable, float]:
    """(compiled function, seconds to lower and compile it for these arguments); the
    arguments at `donate_argnums` are donated (`jax.jit`): their buffers may hold the
    results, and a call leaves them unusable. `compiler_options`: XLA options by name (those
    of XLA_FLAGS without the dashes), for this program only."""
    start = time.perf_counter()
    compiled = jax.jit(function, donate_argnums=donate_argnums).lower(*args).compile(
        compiler_options=compiler_options)
    return compiled, time.perf_counter() - start


def _call(function, args):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - start


def _sample(function, args, calls):
    """Mean seconds of `calls` calls, each waited for."""
    start = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(function(*args))
    return (time.perf_counter() - start) / calls


def _warm_up(function, args, warmup):
    """Run `warmup` untimed calls (at least one, which also times a call); the calls per
    sample that make a sample last MIN_SAMPLE_S."""
    seconds = min(_call(function, args) for _ in range(max(warmup, 1)))
    return max(1, math.ceil(MIN_SAMPLE_S / max(seconds, 1e-9)))


def time_calls(function: Callable, args: tuple, repeats: int = 10, warmup: int = 2,
               compile_s: float | None = None) -> Measurement:
    """Median/p10/p90 of `repeats` samples after `warmup` untimed calls."""
    calls = _warm_up(function, args, warmup)
    return Measurement.from_samples([_sample(function, args, calls) for _ in range(repeats)],
                                    compile_s, calls)


def time_chained(step: Callable, state: tuple, args: tuple, repeats: int = 10, warmup: int = 1,
                 compile_s: float | None = None) -> tuple[Measurement, tuple, list]:
    """Time `step(*state, *args) -> (*state, extra)` as a training loop runs it: each call
    takes the state the previous one returned, so a step compiled with the state donated
    (`compile_jitted(..., donate_argnums=...)`) updates it in place. `warmup` untimed calls,
    then `repeats` timed ones, each its own sample. Returns (the measurement, the final
    state, the `extra` of every timed call)."""
    for _ in range(warmup):
        *state, _ = jax.block_until_ready(step(*state, *args))
    samples, extras = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        *state, extra = jax.block_until_ready(step(*state, *args))
        samples.append(time.perf_counter() - start)
        extras.append(extra)
    return Measurement.from_samples(samples, compile_s), tuple(state), extras


def compare(a: Callable, a_args: tuple, b: Callable, b_args: tuple, repeats: int = 10,
            warmup: int = 2, settle: int = 1) -> tuple[Measurement, Measurement]:
    """Time a and b alternately (a, b, a, b, ...) after warming both up; each timed call
    comes after `settle` untimed calls of the same callable (see the module docstring)."""
    calls_a, calls_b = _warm_up(a, a_args, warmup), _warm_up(b, b_args, warmup)
    samples_a, samples_b = [], []
    for _ in range(repeats):
        for function, args, calls, samples in ((a, a_args, calls_a, samples_a),
                                               (b, b_args, calls_b, samples_b)):
            for _ in range(settle):
                _call(function, args)
            samples.append(_sample(function, args, calls))
    return (Measurement.from_samples(samples_a, calls_per_sample=calls_a),
            Measurement.from_samples(samples_b, calls_per_sample=calls_b))


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse in this process (module docstring):
    blocks up to 1 GiB come from the heap instead of their own mmap, and the heap is not
    trimmed. True where it took effect; False where malloc is not glibc's (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _REUSE["applied"] = _REUSE["applied"] or applied
    return applied


def thread_settings() -> dict:
    """The thread counts and allocator settings both sides run with (recorded with every
    benchmark run): `reuse_freed_memory` applied or not, and any MALLOC_* variables."""
    settings = {"cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "reuse_freed_memory": _REUSE["applied"],
                "malloc_environment": {name: value for name, value in os.environ.items()
                                       if name.startswith(("MALLOC_", "GLIBC_TUNABLES"))}}
    try:
        import torch

        settings["torch_threads"] = torch.get_num_threads()
        settings["torch_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:
        pass
    return settings
