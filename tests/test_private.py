"""experiments.private: DP-SGD on the zip-code digits, its accounting and its refusals."""
from __future__ import annotations

import json
import math

import pytest

from experiments import private
from tests.helpers import assert_refused_before_the_run

SMALL = ["--train-examples", "512", "--test-examples", "200", "--batch", "64", "--epochs", "2",
         "--noise", "1.0"]


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """The exact delta(epsilon) of one Gaussian mechanism of sensitivity 1 and noise sigma
    (Balle and Wang 2018, Theorem 8): Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma)
    - eps sigma)."""
    def phi(t):
        return 0.5 * math.erfc(-t / math.sqrt(2))

    return phi(0.5 / sigma - epsilon * sigma) - math.exp(epsilon) * phi(-0.5 / sigma
                                                                       - epsilon * sigma)


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The smallest epsilon with gaussian_delta(epsilon) <= delta, by bisection."""
    low, high = 0.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (low, middle) if gaussian_delta(middle, sigma) <= delta else (middle, high)
    return high


@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0])
def test_epsilon_of_one_unsampled_step_lies_between_the_exact_and_the_classic_bound(sigma):
    """With q = 1 and one step the mechanism is one Gaussian: the accountant's epsilon can be
    no smaller than the exact one (Balle and Wang's profile, computed here) and no larger than
    RDP's classic conversion min_alpha alpha / (2 sigma^2) + log(1/delta) / (alpha - 1) over
    the integer orders 2..256 (Mironov 2017, Proposition 3)."""
    delta = 1e-5
    got = private.epsilon(sigma, 1.0, 1, delta)
    exact = exact_gaussian_epsilon(sigma, delta)
    classic = min(alpha / (2 * sigma**2) + math.log(1 / delta) / (alpha - 1)
                  for alpha in range(2, 257))
    assert exact <= got <= classic
    assert got <= 1.5 * exact  # RDP is a bound, but not a loose one here


def test_epsilon_grows_with_steps_and_the_sampling_rate_and_falls_with_noise():
    base = private.epsilon(1.5, 0.035, 560, 1e-5)
    assert private.epsilon(1.5, 0.035, 1120, 1e-5) > base
    assert private.epsilon(1.5, 0.07, 560, 1e-5) > base
    assert private.epsilon(3.0, 0.035, 560, 1e-5) < base
    assert private.epsilon(1.5, 0.035, 0, 1e-5) == 0.0


def test_a_small_run_writes_its_results_and_learns(tmp_path):
    metrics = private.main(["--workdir", str(tmp_path), *SMALL])
    assert set(metrics) == {"sigma_1", "no_noise", "delta"}
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["experiment"] == "private"
    assert [(r["run"], r["epoch"]) for r in document["history"]] == [
        ("sigma_1", 1), ("sigma_1", 2), ("no_noise", 1), ("no_noise", 2)]
    steps = round(512 / 64)
    sigma_1 = metrics["sigma_1"]
    assert sigma_1["steps"] == 2 * steps
    assert sigma_1["epsilon"] == pytest.approx(private.epsilon(1.0, 64 / 512, 2 * steps, 1e-5))
    assert document["metrics"]["no_noise"]["epsilon"] == "inf"
    assert metrics["no_noise"]["test_error"] < 0.5  # ten classes: chance is 0.9
    for record in document["history"]:
        assert 0 < record["mean_drawn"] < 2 * 64
    assert (tmp_path / "private.png").stat().st_size > 0
    assert "sigma_1" in (tmp_path / "results.md").read_text()


def test_a_draw_above_the_padded_batch_stops_the_run(tmp_path, monkeypatch):
    """No drawn digit is ever dropped: with the padded batch shrunk to 2, the first epoch's
    draws exceed it and the run stops with an error naming the run and the epoch."""
    monkeypatch.setattr(private, "capacity", lambda expected: 2)
    with pytest.raises(RuntimeError, match=r"private: sigma_1: epoch 1 drew \d+ digits in one "
                                           r"step, above the padded batch of 2"):
        private.main(["--workdir", str(tmp_path), *SMALL])


def test_an_expected_batch_above_the_training_digits_is_refused(tmp_path):
    assert_refused_before_the_run(private.main, tmp_path,
                                  ["--train-examples", "512", "--batch", "600"],
                                  "option --batch: got 600; allowed: at most the 512 training "
                                  "digits used")
