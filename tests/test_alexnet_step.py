"""experiments.alexnet_step: AlexNet's full-size training step, its gradient check and files."""
import json

import numpy as np
import pytest

from experiments import alexnet_step


@pytest.mark.slow
def test_full_size_step_on_the_cpu(tmp_path):
    """227x227, 1000 classes, one example, dropout on: manual vs jax.grad within 1e-10 in
    float64 and 1e-5 in float32 at full size, the loss falls."""
    metrics = alexnet_step.main(["--workdir", str(tmp_path), "--batch", "1", "--steps", "3",
                                 "--repeats", "1"])
    assert metrics["params"] == 60_965_224  # the seed table's count (tests/test_accounting.py)
    assert metrics["batch"] == 1
    assert metrics["float64_passed"] is True and metrics["float64_max_error"] <= 1e-10
    assert metrics["float32_passed"] is True and metrics["float32_max_error"] <= 1e-5
    assert metrics["float32_within_rounding"] is True
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["step_s"] > 0 and metrics["compile_s"] > 0
    document = json.loads((tmp_path / "results.json").read_text())
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
    assert (tmp_path / "loss.png").stat().st_size > 5_000
    assert "float64 manual vs jax.grad" in (tmp_path / "results.md").read_text()


def test_batch_defaults_to_two_on_the_cpu_and_the_papers_128_elsewhere(monkeypatch):
    assert alexnet_step.resolved_batch(alexnet_step.Config()) == 2
    assert alexnet_step.resolved_batch(alexnet_step.Config(batch=5)) == 5
    monkeypatch.setattr(alexnet_step.jax, "default_backend", lambda: "gpu")
    assert alexnet_step.resolved_batch(alexnet_step.Config()) == 128


def test_verdict_fails_on_errors_over_the_tolerances():
    good = {"float64_manual_vs_autodiff": 1e-15, "float32_manual_vs_autodiff": 5e-7,
            "float32_manual_vs_float64": 2e-2, "float32_autodiff_vs_float64": 2e-2,
            "float32_autodiff_one_ulp": 1e-7}
    bad64 = {**good, "float64_manual_vs_autodiff": 1e-8}
    bad32 = {**good, "float32_manual_vs_autodiff": 2e-5}
    rounding = {**bad32, "float32_autodiff_one_ulp": 3e-5}
    assert alexnet_step.gradient_verdict([good])["float64_passed"] is True
    assert alexnet_step.gradient_verdict([good])["float32_passed"] is True
    assert alexnet_step.gradient_verdict([good, bad64])["float64_passed"] is False
    assert alexnet_step.gradient_verdict([good, bad32])["float32_passed"] is False
    assert alexnet_step.gradient_verdict([good, bad32])["float32_within_rounding"] is False
    # over the tolerance but within what one ulp of input moves jax.grad's own gradient: the
    # strict verdict still fails, the rounding one passes
    assert alexnet_step.gradient_verdict([good, rounding])["float32_passed"] is False
    assert alexnet_step.gradient_verdict([good, rounding])["float32_within_rounding"] is True
    assert alexnet_step.gradient_verdict([])["float64_passed"] is None


def test_one_ulp_apart_moves_about_half_the_entries_by_exactly_one_ulp():
    x = alexnet_step.jax.random.normal(alexnet_step.jax.random.key(0), (64, 64))
    nudged = alexnet_step.one_ulp_apart(x, alexnet_step.jax.random.key(1))
    moved = np.asarray(nudged != x)
    assert 0.4 < moved.mean() < 0.6
    np.testing.assert_array_equal(np.asarray(nudged)[moved],
                                  np.nextafter(np.asarray(x)[moved], np.float32(np.inf)))
    assert nudged.dtype == x.dtype
