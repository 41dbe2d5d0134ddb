"""experiments/xor_restarts.py end to end on small settings, checked against numpy."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import xor_restarts
from tests.helpers import tolerance
from training.config import ConfigError

DESIGN_KEYS = {"experiment", "config", "environment", "metrics", "history", "seconds"}
# lr 5: big enough that the cost check undoes steps within 600 steps, so the perturbed runs
# end at parameters different from the plain runs' (at lr 2 they would not yet differ).
SMALL = ["--inits", "20", "--restarts", "5", "--steps", "600", "--lr", "5",
         "--perturbation", "1e-3,1"]


def numpy_logits(params, index):
    """The 2-2-1 net's output logits for the 4 XOR points, in float64 numpy."""
    hidden, output = params["hidden1"], params["output"]
    x = xor_restarts.XOR_INPUTS.astype(np.float64)
    h = 1 / (1 + np.exp(-(x @ np.array(hidden["w"][index]) + np.array(hidden["b"][index]))))
    return (h @ np.array(output["w"][index]) + np.array(output["b"][index]))[:, 0]


def numpy_energy(logits):
    """The lecture's E with lambda = 0: mean over the 4 points of the sigmoid cross-entropy."""
    y = xor_restarts.XOR_TARGETS[:, 0].astype(np.float64)
    return np.mean(np.maximum(logits, 0) - y * logits + np.log1p(np.exp(-np.abs(logits))))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("xor_restarts")
    metrics = xor_restarts.main(["--workdir", str(workdir), *SMALL])
    return workdir, metrics, json.loads((workdir / "results.json").read_text())


def test_writes_the_design_files(small_run):
    workdir, metrics, document = small_run
    assert DESIGN_KEYS <= set(document)
    assert document["experiment"] == "xor_restarts"
    assert document["metrics"] == json.loads(json.dumps(metrics))
    assert {"failure_rate_plain", "failure_rate_perturbed", "failure_rate_restarts",
            "failure_rate_restarts_perturbed"} <= set(metrics)
    assert document["history"][-1]["step"] == 600
    assert set(document["runs"]) == {"plain", "perturbed_0.001", "perturbed_1",
                                     "initial_params"}
    assert (workdir / "results.md").read_text().count("| restarts (R=5)") == 3
    assert (workdir / "histogram.png").stat().st_size > 10_000
    assert (workdir / "curves.png").stat().st_size > 10_000


def test_saved_params_reproduce_the_reported_outcome(small_run):
    """Every run's final parameters, run through numpy, give its reported E and solved flag."""
    _, metrics, document = small_run
    threshold = metrics["threshold"]
    for name in ("plain", "perturbed_0.001", "perturbed_1"):
        record = document["runs"][name]
        energies = np.array(record["final_energy"])
        assert len(energies) == 20
        for index in range(20):
            logits = numpy_logits(record["final_params"], index)
            np.testing.assert_allclose(numpy_energy(logits), energies[index], rtol=1e-4)
            classified = np.all((logits > 0) == (xor_restarts.XOR_TARGETS[:, 0] > 0.5))
            assert classified == record["solved"][index], (name, index)
            if energies[index] <= threshold:  # a success really classifies XOR
                assert classified, (name, index, energies[index])
    # The small run must contain both outcomes and perturbed runs that differ from the plain
    # ones, or the checks here and below prove little.
    plain = np.array(document["runs"]["plain"]["final_energy"])
    assert 0 < metrics["failure_rate_plain"] < 1
    assert metrics["failure_rate_plain"] == np.mean(plain > threshold)
    for name in ("perturbed_0.001", "perturbed_1"):
        assert sum(document["runs"][name]["perturbations"]) > 0
        assert not np.allclose(document["runs"][name]["final_energy"], plain)


def test_restarts_keep_the_lowest_energy_of_each_trial(small_run):
    _, metrics, document = small_run
    threshold = metrics["threshold"]
    for name, key in (("plain", "failure_rate_restarts"),
                      ("perturbed_0.001", "failure_rate_restarts_perturbed")):
        energies = np.array(document["runs"][name]["final_energy"]).reshape(4, 5)
        kept = document["runs"][name]["restart_trials"]["kept_index"]
        assert kept == [5 * trial + int(np.argmin(row)) for trial, row in enumerate(energies)]
        # A trial fails only when all its restarts fail.
        assert metrics[key] == np.mean(np.all(energies > threshold, axis=1))
    assert metrics["failure_rate_restarts"] <= metrics["failure_rate_plain"]
    assert metrics["failure_rate_restarts_perturbed"] <= metrics["failure_rate_perturbed"]


def test_every_procedure_starts_from_the_saved_initial_params(small_run):
    """Re-initialise from the seed: the saved initial params are what the runs started from."""
    _, _, document = small_run
    model = xor_restarts.build_model(2.4)
    key = jax.random.split(jax.random.key(0), 20)[7]
    params = model.init(jax.random.split(key)[0], (-1, 2))[1]
    saved = document["runs"]["initial_params"]
    np.testing.assert_array_equal(np.asarray(params[0]["w"]), saved["hidden1"]["w"][7])
    np.testing.assert_array_equal(np.asarray(params[2]["w"]), saved["output"]["w"][7])
    # A cost-checked run that never undid a step took exactly the plain run's steps, which it
    # can only do from the same initialisation.
    plain = np.array(document["runs"]["plain"]["final_energy"])
    for name in ("perturbed_0.001", "perturbed_1"):
        record = document["runs"][name]
        untouched = np.array(record["perturbations"]) == 0
        assert 0 < untouched.sum() < 20
        np.testing.assert_allclose(np.array(record["final_energy"])[untouched],
                                   plain[untouched], rtol=1e-5)


def test_manual_and_autodiff_engines_train_the_same_run():
    """Both engines from the same inits for 50 steps: equal E curves (float32 tolerance)."""
    model = xor_restarts.build_model(2.4)
    objective = nets.lecture_objective(0.0)
    x, y = jnp.asarray(xor_restarts.XOR_INPUTS), jnp.asarray(xor_restarts.XOR_TARGETS)
    params = model.init(jax.random.key(3), (-1, 2))[1]
    manual = nets.get_engine("manual")(model, objective)
    autodiff = nets.get_engine("autodiff")(model, objective)
    # Different computations: the hand-written backward is not jax.grad's transpose.
    assert str(jax.make_jaxpr(manual)(params, x, y)) != str(jax.make_jaxpr(autodiff)(params, x, y))

    config = {"lr": 2.0, "steps": 50, "stop_window": 50, "stop_tolerance": 0.0}
    keys = jax.random.split(jax.random.key(1), 2)
    curves = {}
    for engine in ("manual", "autodiff"):
        (_, result, _), _ = xor_restarts.train_runs(
            model, objective, keys, config | {"engine": engine})
        assert result.history["energy"].dtype == jnp.float32
        curves[engine] = np.asarray(result.history["energy"], np.float64)
    assert np.all(curves["manual"][:, -1] < curves["manual"][:, 0])  # training moved
    error = np.max(np.abs(curves["manual"] - curves["autodiff"]) / np.abs(curves["autodiff"]))
    assert error <= tolerance("float32")


def test_rejects_inits_not_a_multiple_of_restarts():
    with pytest.raises(ConfigError, match="--inits: got 12; allowed: a multiple of --restarts"):
        xor_restarts.main(["--inits", "12", "--restarts", "5"])
