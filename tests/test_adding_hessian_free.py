"""The experiment that trains recurrent nets on the adding problem by Hessian-free
optimisation and by first-order methods."""
import json

import pytest

from experiments import adding_hessian_free as experiment
from tests.helpers import assert_refused_before_the_run


def test_a_run_is_solved_at_its_first_record_below_the_threshold():
    records = [{"seconds": s, "test_mse": e} for s, e in ((0, 0.2), (1, 0.01), (2, 0.0099),
                                                          (3, 0.001))]
    assert experiment.seconds_to_solve(records) == 2
    assert experiment.seconds_to_solve(records[:2]) is None


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.slow
def test_experiment_writes_every_method_seed_and_record(tmp_path):
    metrics = experiment.main([
        "--workdir", str(tmp_path), "--lengths", "8", "--hidden", "4", "--examples", "60",
        "--test-examples", "30", "--curvature-examples", "20", "--hf-steps", "4",
        "--cg-iterations", "5", "--passes", "2", "--records", "2", "--seeds", "2",
        "--structural-damping", "0.1"])
    assert set(metrics) == {"8"}
    assert all(set(per_length) == set(experiment.DEFAULT_METHODS)
               for per_length in metrics.values())
    document = json.loads((tmp_path / "results.json").read_text())
    history = document["history"]
    assert document["config"]["structural_damping"] == 0.1
    for length in (8,):
        for method, steps in (("hessian_free", [0, 2, 4]), ("sgd", [0, 1, 2]),
                              ("adam", [0, 1, 2]), ("lstm_adam", [0, 1, 2])):
            for seed in (0, 1):
                records = [h for h in history if (h["length"], h["method"], h["seed"]) == (
                    length, method, seed)]
                assert [h["step"] for h in records] == steps
                assert all(0 <= h["within"] <= 1 for h in records)
            assert metrics[str(length)][method]["runs_solving"] in (0, 1, 2)
    hessian_free = [h for h in history if h["method"] == "hessian_free" and h["seed"] == 0
                    and h["length"] == 8]
    assert hessian_free[-1]["train_mse"] < hessian_free[0]["train_mse"]  # steps never raise E
    assert (tmp_path / "adding_hessian_free.png").stat().st_size > 10_000
    assert "lstm_adam" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_hessian_free_with_the_exact_hessian_and_saddle_free_never_raise_e(tmp_path):
    metrics = experiment.main([
        "--workdir", str(tmp_path), "--lengths", "8", "--hidden", "4", "--examples", "60",
        "--test-examples", "30", "--curvature-examples", "20", "--hf-steps", "4",
        "--cg-iterations", "5", "--records", "2", "--methods", "hessian_free_exact,saddle_free"])
    assert set(metrics["8"]) == {"hessian_free_exact", "saddle_free"}
    history = json.loads((tmp_path / "results.json").read_text())["history"]
    for method in ("hessian_free_exact", "saddle_free"):
        records = [h for h in history if h["method"] == method]
        assert [h["step"] for h in records] == [0, 2, 4]
        assert all(0 <= h["mean_cg_iterations"] <= 5 for h in records[1:])
        assert records[-1]["train_mse"] <= records[0]["train_mse"]


@pytest.mark.parametrize("argv, message", [
    (["--examples", "100", "--curvature-examples", "200"],
     "--curvature-examples: got 200; allowed: at most --examples (100)"),
    (["--hf-batch-size", "100", "--curvature-examples", "200"],
     "--curvature-examples: got 200; allowed: at most --hf-batch-size (100)"),
    (["--examples", "100", "--hf-batch-size", "200", "--curvature-examples", "50"],
     "--hf-batch-size: got 200; allowed: at most --examples (100)"),
    (["--methods", "hessian_free_exact", "--structural-damping", "0.1"],
     "--structural-damping: adds S to the Gauss-Newton matrix; not defined for the method "
     "hessian_free_exact"),
    (["--methods", "hessian_free,saddle_free", "--structural-damping", "0.1"],
     "--structural-damping: adds S to the Gauss-Newton matrix; not defined for the method "
     "saddle_free"),
])
def test_options_beyond_the_sequences_are_refused(tmp_path, argv, message):
    assert_refused_before_the_run(experiment.main, tmp_path, argv, message)
