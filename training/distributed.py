"""Several processes and hosts: start-up, the data each process holds, and who writes files.

Every process runs the same script. Before any other JAX call, each calls

    info = distributed.initialize(coordinator_address, num_processes, process_id)

which connects it to the others through `jax.distributed.initialize`; from then on
`jax.devices()` lists the devices of every process, `training.parallel.batch_mesh()` spans them,
and a data-parallel step (`training.parallel.data_parallel`) averages the gradients over all of
them. Each process holds its own slice of the global batch (`process_slice`, `local_part`),
and files (checkpoints, logs, results) are written by process 0 alone (`is_main_process`).

Where the settings come from, first found wins:
  1. the arguments (an experiment's --coordinator, --num-processes, --process-id flags);
  2. the environment: NETS_COORDINATOR (host:port of process 0), NETS_NUM_PROCESSES,
     NETS_PROCESS_ID, NETS_INIT_TIMEOUT (seconds);
  3. none given: `jax.distributed.initialize()` without arguments, so JAX's own cluster
     detection (SLURM, Open MPI, TPU pods, ...) fills them in; where it detects no cluster the
     run is a single process and nothing is initialised.
A process count of 1 is a single process too (nothing to connect).

On CPUs the processes exchange gradients with the gloo collectives (set here before
initialising). A process that cannot gather all the others within the initialisation timeout
(a worker that never started, a wrong address, a firewall) exits with status
`INIT_TIMEOUT_STATUS` and a message saying which process waited for how many at which
address; it never hangs.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ENV_INIT_TIMEOUT",
    "INIT_TIMEOUT_STATUS",
    "ProcessInfo",
    "initialize",
    "is_main_process",
    "process_slice",
    "local_part",
    "free_port",
    "launch_local",
]

ENV_COORDINATOR = "NETS_COORDINATOR"
ENV_NUM_PROCESSES = "NETS_NUM_PROCESSES"
ENV_PROCESS_ID = "NETS_PROCESS_ID"
ENV_INIT_TIMEOUT = "NETS_INIT_TIMEOUT"
INIT_TIMEOUT_STATUS = 75  # EX_TEMPFAIL: try again once every process is up
DEFAULT_INIT_TIMEOUT = 300
# JAX's own deadline comes this much after ours, so that our message, not an abort from the
# coordination service, reports the failure.
_JAX_DEADLINE_MARGIN = 10


class ProcessInfo(NamedTuple):
    """Which process this is, of how many, and the coordinator (None for a single process)."""

    index: int
    count: int
    coordinator: str | None

    @property
    def is_main(self) -> bool:
        return self.index == 0


def _setting(value: Any, variable: str, kind: type) -> Any:
    if value is not None:
        return value
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{variable}={text!r}: expected {kind.__name__}") from None


def _watchdog(seconds: float, description: str) -> threading.Timer:
    """Exit the process with a clear message if initialisation is still waiting after
    `seconds` (the coordination client waits in C++ with the GIL released, so a thread runs)."""

    def give_up():
        sys.stderr.write(
            f"nets.distributed: {description}: not every process arrived within {seconds:g} s. "
            "Check that all processes were started with the same coordinator address and "
            "process count, each with its own process id, and that the coordinator's port is "
            f"reachable (set {ENV_INIT_TIMEOUT} or initialization_timeout to wait longer).\n")
        sys.stderr.flush()
        os._exit(INIT_TIMEOUT_STATUS)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    return timer


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: float | None = None,
) -> ProcessInfo:
    """Join the other processes of this run (module docstring); call before any JAX work.

    Args:
      coordinator_address: "host:port" of process 0 (default $NETS_COORDINATOR).
      num_processes: how many processes (default $NETS_NUM_PROCESSES).
      process_id: this process, 0 .. num_processes - 1 (default $NETS_PROCESS_ID).
      initialization_timeout: seconds to wait for all processes (default $NETS_INIT_TIMEOUT,
        else 300); after it the process exits with status INIT_TIMEOUT_STATUS.
    Returns:
      ProcessInfo(index, count, coordinator).
    """
    coordinator_address = _setting(coordinator_address, ENV_COORDINATOR, str)
    num_processes = _setting(num_processes, ENV_NUM_PROCESSES, int)
    process_id = _setting(process_id, ENV_PROCESS_ID, int)
    timeout = _setting(initialization_timeout, ENV_INIT_TIMEOUT, float)
    if timeout is None:
        timeout = DEFAULT_INIT_TIMEOUT
    if not (timeout > 0 and math.isfinite(timeout)):  # 0 was read as unset, < 0 fired at once
        raise ValueError(f"distributed: initialization_timeout must be > 0 seconds and finite, "
                         f"got {timeout}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"distributed: num_processes must be >= 1, got {num_processes}")
    if num_processes is not None and process_id is not None and not (
            0 <= process_id < num_processes):
        raise ValueError(f"distributed: process_id must be in [0, {num_processes}), got "
                         f"{process_id}")
    if num_processes == 1:
        return ProcessInfo(0, 1, None)
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU all-reduce
    jax_timeout = math.ceil(timeout) + _JAX_DEADLINE_MARGIN
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        # Let JAX detect a cluster (SLURM, Open MPI, TPU pod); none here means one process.
        # The watchdog covers a detected cluster whose processes do not all arrive.
        watchdog = _watchdog(timeout, "a process of the cluster JAX detected, waiting for the "
                                      "others")
        try:
            jax.distributed.initialize(initialization_timeout=jax_timeout)
        except ValueError as error:
            if "coordinator_address" not in str(error):
                raise
            return ProcessInfo(0, 1, None)
        finally:
            watchdog.cancel()
        return ProcessInfo(jax.process_index(), jax.process_count(), None)

    description = (f"process {given.get('process_id', '?')} of "
                   f"{given.get('num_processes', '?')} waiting at coordinator "
                   f"{given.get('coordinator_address', '(auto-detected)')}")
    watchdog = _watchdog(timeout, description)
    try:
        jax.distributed.initialize(
            **given, initialization_timeout=jax_timeout)
    finally:
        watchdog.cancel()
    return ProcessInfo(jax.process_index(), jax.process_count(),
                       given.get("coordinator_address"))


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes checkpoints, logs and results."""
    return jax.process_index() == 0


def process_slice(global_batch: int, index: int | None = None,
                  count: int | None = None) -> slice:
    """The examples [start, stop) of a global batch that process `index` of `count` holds
    (default: this process): equal contiguous slices in process order."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if count < 1 or not 0 <= index < count:  # index 2 of 2 was an empty slice, silently
        raise ValueError(f"distributed: process index {index} of {count} processes; expected "
                         f"a count >= 1 and an index in [0, {count})")
    if global_batch % count:
        raise ValueError(f"distributed: a global batch of {global_batch} examples does not "
                         f"split evenly over {count} processes")
    size = global_batch // count
    return slice(index * size, (index + 1) * size)


def local_part(tree: Any) -> Any:
    """This process's slice (`process_slice`) of every array in `tree` (leading batch axis)."""
    leaves = jax.tree.leaves(tree)
    batch = {np.shape(leaf)[0] for leaf in leaves}
    if len(batch) != 1:
        raise ValueError(f"distributed: arrays with different batch sizes {sorted(batch)}")
    part = process_slice(batch.pop())
    return jax.tree.map(lambda leaf: leaf[part], tree)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_local(
    command: Sequence[str],
    num_processes: int,
    *,
    timeout: float,
    process_ids: Sequence[int] | None = None,
    env: dict | None = None,
    init_timeout: float | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run `command` as `num_processes` processes on this machine, coordinated on 127.0.0.1.

    Each process gets NETS_COORDINATOR (a free port), NETS_NUM_PROCESSES and its
    NETS_PROCESS_ID (and NETS_INIT_TIMEOUT if given); `process_ids` starts only some of them
    (a test of a worker that never arrives). Waits at most `timeout` seconds in all, then
    kills those still running (their returncode is then negative). Returns one
    CompletedProcess per started process, with its stdout and stderr.
    """
    process_ids = list(range(num_processes) if process_ids is None else process_ids)
    base = {**os.environ, **(env or {}),
            ENV_COORDINATOR: f"127.0.0.1:{free_port()}",
            ENV_NUM_PROCESSES: str(num_processes)}
    if init_timeout is not None:
        base[ENV_INIT_TIMEOUT] = str(init_timeout)
    started = []
    for index in process_ids:
        stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        started.append((subprocess.Popen(list(command), env={**base, ENV_PROCESS_ID: str(index)},
                                         stdout=stdout, stderr=stderr, text=True),
                        stdout, stderr))
    deadline = time.monotonic() + timeout
    finished = []
    for process, stdout, stderr in started:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        outputs = []
        for stream in (stdout, stderr):
            stream.seek(0)
            outputs.append(stream.read())
            stream.close()
        finished.append(subprocess.CompletedProcess(process.args, process.returncode, *outputs))
    return finished
