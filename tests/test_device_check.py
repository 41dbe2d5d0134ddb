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


@pytest.mark.slow
def test_device_check_stages_run_and_write_their_files(tmp_path):
    # the stages' own limits are sized for the GPU's full-size runs; on CI's two loaded
    # cores the small AlexNet stage alone took 34-53 s of its 130, so they are raised here
    # and the run's timeout below still catches a hang
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
                   "DEVICE_CHECK_SMALL": "1", "ALEXNET_LIMIT": "500", "CHAR_RNN_LIMIT": "500"}
    environment.pop("XLA_FLAGS", None)
    finished = subprocess.run(["bash", str(ROOT / ".ci" / "device-check"),
                               "alexnet char_rnn memory_tradeoffs"],
                              env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert all(f"{stage}: exit 0" in finished.stdout
               for stage in ("alexnet", "char_rnn", "memory_tradeoffs"))
    assert "jax" in (tmp_path / "versions.txt").read_text()
    alexnet = json.loads((tmp_path / "alexnet.json").read_text())
    assert alexnet["metrics"]["float64_passed"] is True
    assert {"float32_autodiff_one_ulp", "float32_joint_manual_vs_autodiff"} <= set(
        alexnet["gradient_errors"][0])
    char_rnn = json.loads((tmp_path / "char_rnn.json").read_text())
    assert char_rnn["config"]["hidden"] == 8 and len(char_rnn["history"]) == 1
    tradeoffs = json.loads((tmp_path / "memory_tradeoffs.json").read_text())
    assert set(tradeoffs["metrics"]) == {"recompute", "remat", "accumulate"}


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
