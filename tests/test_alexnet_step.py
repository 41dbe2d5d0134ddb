"""experiments.alexnet_step: AlexNet's full-size training step, its gradient check and files."""

import numpy as np

from experiments import alexnet_step

# The full-size step on the CPU (batch 1, 3 steps: the gradient checks at 227x227, the loss
# falling, the files) is checked by tests/test_device_check.py, whose AlexNet stage runs it.


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
