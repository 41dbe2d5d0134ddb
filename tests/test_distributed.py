"""training.distributed: settings, the slice each process holds, and real multi-process runs.

The multi-process tests launch `experiments.multihost_demo` as separate CPU processes on
127.0.0.1 (gloo collectives), each with one device, and bound every wait: the initialisation
timeout inside, a subprocess timeout outside.
"""
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
import pytest

from experiments import multihost_demo
from nets.gradcheck import relative_error
from training import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOAT32 = 1e-5  # the float32 tolerance of nets.gradcheck.TOLERANCES


def subprocess_environment():
    # one CPU device per process; unoptimised machine code compiles faster and is as exact
    return {"PYTHONPATH": str(ROOT), "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_backend_optimization_level=0"}


# --- settings and slices (no processes started) ----------------------------------------------

@pytest.fixture
def recorded_initialize(monkeypatch):
    """Replace jax.distributed.initialize by a recorder (nothing is connected)."""
    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        if "coordinator_address" not in kwargs:
            raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", record)
    for variable in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                     distributed.ENV_PROCESS_ID, distributed.ENV_INIT_TIMEOUT):
        monkeypatch.delenv(variable, raising=False)
    return calls


def test_settings_come_from_arguments_then_environment(recorded_initialize, monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    monkeypatch.setenv(distributed.ENV_INIT_TIMEOUT, "7")
    distributed.initialize(process_id=2)
    assert recorded_initialize == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                    "process_id": 2, "initialization_timeout": 17}]


def test_no_settings_defer_to_cluster_detection_else_one_process(recorded_initialize):
    info = distributed.initialize()
    # called without a coordinator, so that JAX's SLURM/TPU detection can fill it in; it
    # found none (the recorder raised as JAX does) and the run is one process
    assert list(recorded_initialize[0]) == ["initialization_timeout"]
    assert info == distributed.ProcessInfo(0, 1, None) and info.is_main


def test_one_process_initialises_nothing(recorded_initialize):
    assert distributed.initialize("127.0.0.1:1", 1, 0) == distributed.ProcessInfo(0, 1, None)
    assert recorded_initialize == []
    assert distributed.is_main_process()


def test_bad_settings_are_clear_errors(recorded_initialize, monkeypatch):
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
        distributed.initialize("127.0.0.1:1", 2, 2)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="NETS_NUM_PROCESSES='two'"):
        distributed.initialize()
    assert recorded_initialize == []


def test_process_slices_tile_the_global_batch():
    slices = [distributed.process_slice(12, index, 3) for index in range(3)]
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 8), (8, 12)]
    assert distributed.process_slice(12) == slice(0, 12)  # this test is one process
    x, y = np.arange(12), np.arange(12) * 2
    np.testing.assert_array_equal(distributed.local_part((x, y))[1], y)
    with pytest.raises(ValueError, match="batch of 10 examples .* 3 processes"):
        distributed.process_slice(10, 0, 3)
    with pytest.raises(ValueError, match="different batch sizes"):
        distributed.local_part((x, y[:6]))


# --- real processes --------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["shard_map", "explicit"])
def test_two_processes_end_with_the_single_process_parameters(tmp_path, form):
    """Two processes of one CPU device each, the demo's default form and Explicit mesh axes
    (every value typed by its layout across both processes)."""
    steps = 5
    command = [sys.executable, "-m", "experiments.multihost_demo", "--workdir", str(tmp_path),
               "--steps", str(steps), "--dump-params", "--form", form]
    finished = distributed.launch_local(command, 2, timeout=150, init_timeout=60,
                                        env=subprocess_environment())
    for index, process in enumerate(finished):
        assert process.returncode == 0, f"process {index}:\n{process.stderr[-3000:]}"
    # each process held its own half of the batch, and only process 0 wrote the results
    assert "process 0 of 2: examples [0, 32) of 64" in finished[0].stdout
    assert "process 1 of 2: examples [32, 64) of 64" in finished[1].stdout
    assert "results in" in finished[0].stdout and "results in" not in finished[1].stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["metrics"]["processes"] == 2 and report["metrics"]["devices"] == 2

    config = multihost_demo.Config(steps=steps)
    reference, _ = multihost_demo.single_device_run(config)
    initial = multihost_demo.problem(config)[2]
    expected = multihost_demo._flat(reference)
    assert max(relative_error(expected[name], np.asarray(leaf)) for name, leaf in
               multihost_demo._flat(initial).items()) > 1e-2  # training moved the params
    for index in range(2):
        with np.load(tmp_path / f"params_process{index}.npz") as saved:
            assert sorted(saved.files) == sorted(expected)
            for name in expected:
                assert saved[name].dtype == np.float32
                error = relative_error(saved[name], expected[name])
                assert error <= FLOAT32, f"process {index} {name}: rel err {error:.2e}"


def test_a_worker_that_never_arrives_is_a_clear_error_not_a_hang(tmp_path):
    command = [sys.executable, "-m", "experiments.multihost_demo", "--workdir", str(tmp_path),
               "--steps", "1"]
    start = time.monotonic()
    # process 0 of 2 alone: process 1 is never started
    (lonely,) = distributed.launch_local(command, 2, process_ids=[0], timeout=90,
                                         init_timeout=5, env=subprocess_environment())
    elapsed = time.monotonic() - start
    assert lonely.returncode == distributed.INIT_TIMEOUT_STATUS, lonely.stderr[-3000:]
    assert "process 0 of 2 waiting at coordinator 127.0.0.1:" in lonely.stderr
    assert "not every process arrived within 5 s" in lonely.stderr
    assert elapsed < 45  # start-up and the 5 s timeout; JAX's own deadline would be 15 s
    assert not (tmp_path / "results.json").exists()


def test_the_environment_reaches_launched_processes(tmp_path):
    probe = ("import os, json; print(json.dumps({k: os.environ.get(k) for k in "
             "('NETS_COORDINATOR', 'NETS_NUM_PROCESSES', 'NETS_PROCESS_ID', "
             "'NETS_INIT_TIMEOUT')}))")
    finished = distributed.launch_local([sys.executable, "-c", probe], 3, timeout=30,
                                        init_timeout=5)
    seen = [json.loads(process.stdout) for process in finished]
    assert [s["NETS_PROCESS_ID"] for s in seen] == ["0", "1", "2"]
    assert {s["NETS_COORDINATOR"] for s in seen} == {seen[0]["NETS_COORDINATOR"]}
    assert seen[0]["NETS_COORDINATOR"].startswith("127.0.0.1:")
    assert {s["NETS_NUM_PROCESSES"] for s in seen} == {"3"}
    assert os.environ.get(distributed.ENV_PROCESS_ID) is None  # the parent's is untouched


def test_a_detected_cluster_that_never_assembles_exits_too(monkeypatch, capfd):
    """With no settings JAX detects the cluster itself (SLURM, ...); a process whose peers
    never arrive is stopped by the same watchdog (exit INIT_TIMEOUT_STATUS after the timeout,
    with the message), where JAX used to abort after its own, longer deadline."""
    import threading

    exited = threading.Event()
    statuses = []

    def fake_exit(status):
        statuses.append(status)
        exited.set()

    def detected_cluster_waits(**kwargs):
        assert "coordinator_address" not in kwargs  # left to JAX's detection
        exited.wait(10)
        raise RuntimeError("the test's stand-in for a process that never returns")

    monkeypatch.setattr(jax.distributed, "initialize", detected_cluster_waits)
    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    for variable in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                     distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(distributed.ENV_INIT_TIMEOUT, "0.5")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="stand-in"):
        distributed.initialize()
    assert statuses == [distributed.INIT_TIMEOUT_STATUS]
    assert time.monotonic() - start < 5
    assert "not every process arrived within 0.5 s" in capfd.readouterr().err


@pytest.mark.parametrize("timeout", ["0", "-3", "inf"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(recorded_initialize, monkeypatch,
                                                             timeout):
    """0 used to be read as unset (300 s), and a negative one would fire at once."""
    monkeypatch.setenv(distributed.ENV_INIT_TIMEOUT, timeout)
    with pytest.raises(ValueError, match=rf"initialization_timeout must be > 0 seconds and "
                                         rf"finite, got {float(timeout)}"):
        distributed.initialize("127.0.0.1:1", 2, 0)
    assert recorded_initialize == []
