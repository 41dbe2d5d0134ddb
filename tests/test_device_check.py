"""The prepared GPU command, `.ci/device-check`, run on the CPU at its smallest sizes: a
session lent a GPU has minutes of device time, so a broken stage must show up here first."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def assert_the_char_rnn_stage(out):
    char_rnn = json.loads((out / "char_rnn.json").read_text())
    assert char_rnn["config"]["hidden"] == 8 and len(char_rnn["history"]) == 1


def assert_the_memory_tradeoffs_stage(out):
    tradeoffs = json.loads((out / "memory_tradeoffs.json").read_text())
    assert set(tradeoffs["metrics"]) == {"recompute", "remat", "accumulate"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["alexnet", "char_rnn", "memory_tradeoffs"])
def test_device_check_stage_runs_and_writes_its_files(tmp_path, stage):
    """One stage per test (the test workers share them; AlexNet's is about half the time)."""
    # the stages' own limits are sized for the GPU's full-size runs; on CI's two loaded
    # cores the small AlexNet stage alone took 34-53 s of its 130, so they are raised here
    # and the run's timeout below still catches a hang
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
                   "DEVICE_CHECK_SMALL": "1", "ALEXNET_LIMIT": "500", "CHAR_RNN_LIMIT": "500"}
    # as on the device machine: XLA's own flags and optimisations
    environment.pop("XLA_FLAGS", None)
    environment.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    finished = subprocess.run(["bash", str(ROOT / ".ci" / "device-check"), stage],
                              env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert f"{stage}: exit 0" in finished.stdout
    assert "jax" in (tmp_path / "versions.txt").read_text()
    {"alexnet": assert_the_full_size_alexnet_step_on_the_cpu,
     "char_rnn": assert_the_char_rnn_stage,
     "memory_tradeoffs": assert_the_memory_tradeoffs_stage}[stage](tmp_path)


def assert_the_full_size_alexnet_step_on_the_cpu(out):
    """The AlexNet stage at its smallest is `experiments.alexnet_step` at full size (227x227,
    1000 classes, dropout on), batch 1, 3 steps: manual vs jax.grad within 1e-10 in float64
    and 1e-5 in float32, and the loss falls. Checked here rather than by a second run of the
    same step in tests/test_alexnet_step.py (30 s of the suite's time)."""
    document = json.loads((out / "alexnet.json").read_text())
    metrics = document["metrics"]
    assert metrics["params"] == 60_965_224  # the seed table's count (tests/test_accounting.py)
    assert metrics["batch"] == 1
    assert metrics["float64_passed"] is True and metrics["float64_max_error"] <= 1e-10
    assert metrics["float32_passed"] is True and metrics["float32_max_error"] <= 1e-5
    assert metrics["float32_within_rounding"] is True
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["step_s"] > 0 and metrics["compile_s"] > 0
    errors = document["gradient_errors"]
    assert len(errors) == 16  # w and b of 5 convs and 3 dense layers
    # jax.grad's float32 gradient at inputs one ulp apart: the dense layers' move by
    # rounding's order; a convolution's can move far more where a max-pool window nearly
    # ties and the ulp flips it (9.0e-3 on conv1.w at batch 2; at batch 1 none flipped)
    sensitivity = {e["parameter"]: e["float32_autodiff_one_ulp"] for e in errors}
    assert all(0 < value < 1 for value in sensitivity.values())
    assert max(sensitivity[name] for name in ("fc6.w", "fc7.w", "output.w")) < 1e-5
    # both engines in one program: the same function, so within float32's tolerance here too
    assert max(e["float32_joint_manual_vs_autodiff"] for e in errors) <= 1e-5
    assert all(e["float32_autodiff_joint_vs_alone"] <= 1e-5 for e in errors)
    assert [h["step"] for h in document["history"]] == [0, 1, 2]
    assert (out / "alexnet_loss.png").stat().st_size > 5_000
    assert "float64 manual vs jax.grad" in (out / "alexnet.md").read_text()


def test_device_check_stops_at_once_when_the_experiments_do_not_import(tmp_path):
    """An import error (another jax on the device machine) ends the call before any stage:
    here a python that fails on the experiments' import and runs everything else."""
    python = tmp_path / "python"
    python.write_text('#!/usr/bin/env bash\n'
                      'if [[ "$*" == *"import experiments.bench"* ]]; then\n'
                      '    echo "ImportError: planted" >&2; exit 1\n'
                      'fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    environment = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python)}
    finished = subprocess.run(["bash", str(ROOT / ".ci" / "device-check")], env=environment,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    assert "ImportError: planted" in (tmp_path / "out" / "versions.txt").read_text()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["versions.txt"]


def test_every_stage_the_header_names_is_defined_and_the_script_parses():
    """The header's stage names (lines `#   name` and two spaces) each have a `stage_name()`
    function, and `bash -n` accepts the script: a stage a lease calls by name must exist."""
    script = ROOT / ".ci" / "device-check"
    text = script.read_text()
    named = re.findall(r"^#   ([a-z_]+)  ", text, flags=re.MULTILINE)
    assert {"alexnet", "bench", "tests", "per_example", "tests_rest", "layer_profile",
            "xla_profile", "char_rnn", "memory_tradeoffs"} <= set(named)
    assert [name for name in named if f"stage_{name}() {{" not in text] == []
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
