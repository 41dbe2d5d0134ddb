"""Compile once, then run: wall times with compilation kept apart from execution."""
from __future__ import annotations

import time
from typing import Any, Callable

import jax

__all__ = ["compile_and_run"]


def compile_and_run(function: Callable, *args: Any) -> tuple[Any, dict[str, float]]:
    """Jit-compile `function` for `args`, run it once, and time both phases.

    Returns (output, {"compile": seconds, "run": seconds}); the run time waits for the result
    (`block_until_ready`), so asynchronous dispatch does not hide work.
    """
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*args).compile()
    compiled_at = time.perf_counter()
    output = jax.block_until_ready(compiled(*args))
    done = time.perf_counter()
    return output, {"compile": compiled_at - start, "run": done - compiled_at}
