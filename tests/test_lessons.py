"""The lecture's challenges as experiments (issue 8), end to end on tiny settings, and the
hand-written autoencoder of greedy pretraining."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import depth, memory_time, memory_tradeoffs, precision, pretraining
from nets import autoencoder
from nets.gradcheck import relative_error
from tests.helpers import F64, assert_close_tree, tolerance
from training.config import ConfigError

DESIGN_KEYS = {"experiment", "config", "environment", "metrics", "history", "seconds"}


def read_results(workdir, experiment):
    document = json.loads((workdir / "results.json").read_text())
    assert DESIGN_KEYS <= set(document)
    assert document["experiment"] == experiment
    assert {"compile", "run"} <= set(document["seconds"])
    assert (workdir / "results.md").read_text().strip()
    return document


# --- nets/autoencoder.py ----------------------------------------------------------------------

def test_autoencoder_manual_gradient_equals_jax_grad_in_float64():
    model = autoencoder.autoencoder(6, 4)
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    params = nets.gradcheck.astype(model.init(jax.random.key(0), (-1, 6))[1], jnp.float64)
    x = jax.random.uniform(jax.random.key(1), (5, 6), jnp.float64, -1, 1)
    energy, manual = jax.jit(nets.manual(model, objective))(params, x, x)
    reference_energy, reference = jax.jit(nets.autodiff(model, objective))(params, x, x)
    # the two are different computations: the backward pass is not jax's
    assert [layer.name for layer in model.sublayers] == ["encoder", "code", "decoder",
                                                         "reconstruction"]
    assert energy == pytest.approx(float(reference_energy), rel=1e-14)
    assert relative_error(manual[0]["w"], 0 * manual[0]["w"]) == 1.0  # not all zero
    assert_close_tree(manual, reference, "float64", "autoencoder")


def test_encoders_stack_into_the_mlp_and_give_its_first_layers():
    x = jax.random.uniform(jax.random.key(2), (3, 8), jnp.float32, -1, 1)
    mlp = nets.build_mlp(8, 10, hidden_layers=3, hidden_units=5)
    mlp_params = mlp.init(jax.random.key(3), (-1, 8))[1]
    first = autoencoder.encoder_params(autoencoder.autoencoder(8, 5).init(
        jax.random.key(4), (-1, 8))[1])
    second = autoencoder.encoder_params(autoencoder.autoencoder(5, 5).init(
        jax.random.key(5), (-1, 5))[1])
    stacked = autoencoder.stack_encoders(mlp_params, [first, second])
    codes = autoencoder.encoder(5).apply(second, autoencoder.encoder(5).apply(first, x))
    hidden2 = nets.serial(*mlp.sublayers[:4]).apply(stacked[:4], x)
    np.testing.assert_allclose(hidden2, codes, rtol=1e-6)
    assert stacked[4] is mlp_params[4] and stacked[6] is mlp_params[6]  # the rest untouched
    with pytest.raises(ValueError, match="encoder 1 w has shape"):
        autoencoder.stack_encoders(mlp_params, [second])


def test_stacked_encoders_bring_their_biases():
    """An encoder with nonzero biases (b = -0.5 .. 0.5; trained encoders have them, fresh ones
    are zero): the stacked MLP's first hidden layer is sigmoid(x W + b) with the encoder's W
    and b (NumPy, float64, relative 1e-10), the MLP's own first-layer params replaced. Fails
    if the weights are copied but the biases are not."""
    x = jax.random.uniform(jax.random.key(2), (3, 8), jnp.float64, -1, 1)
    mlp = nets.build_mlp(8, 10, hidden_layers=2, hidden_units=5)
    mlp_params = nets.gradcheck.astype(mlp.init(jax.random.key(3), (-1, 8))[1], jnp.float64)
    dense, code = nets.gradcheck.astype(autoencoder.encoder_params(
        autoencoder.autoencoder(8, 5).init(jax.random.key(4), (-1, 8))[1]), jnp.float64)
    bias = np.linspace(-0.5, 0.5, 5)
    first = ({"w": dense["w"], "b": jnp.asarray(bias)}, code)
    stacked = autoencoder.stack_encoders(mlp_params, [first])
    hidden1 = nets.serial(*mlp.sublayers[:2]).apply(stacked[:2], x)
    expected = 1 / (1 + np.exp(-(np.asarray(x) @ np.asarray(dense["w"]) + bias)))
    assert relative_error(hidden1, expected) <= F64
    assert relative_error(hidden1, autoencoder.encoder(5).apply(first, x)) <= F64


# --- experiments ------------------------------------------------------------------------------

def test_precision(tmp_path):
    # jitted: for 16 small programs, faster than the default op-by-op dispatch
    metrics = precision.main(["--workdir", str(tmp_path), "--depths", "2,6", "--width", "16",
                              "--batch", "32", "--activations", "sigmoid", "--jit"])
    document = read_results(tmp_path, "precision")
    layers = document["layers"]
    assert {(r["activation"], r["depth"]) for r in layers} == {("sigmoid", 2), ("sigmoid", 6)}
    # float64: the hand-written backward equals jax.grad at every depth and layer
    float64 = [r for r in layers if r["dtype"] == "float64"]
    assert len(float64) == 3 + 7
    assert all(r["manual_vs_autodiff"] <= F64 for r in float64)
    assert all(r["manual_rel_err"] <= F64 for r in float64)
    assert metrics["float64_manual_vs_autodiff_max"] <= F64
    # float16 loses more than float32 in every layer, and float32 stays within its tolerance
    by_key = {(r["activation"], r["depth"], r["layer"], r["dtype"]): r for r in layers}
    for (activation, depth_, layer, dtype), row in by_key.items():
        if dtype == "float16":
            float32 = by_key[activation, depth_, layer, "float32"]
            assert row["manual_rel_err"] > 10 * float32["manual_rel_err"]
            assert float32["manual_rel_err"] <= 1e-5
    for name in ("precision.png", "norms.png", "engines.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_precision_residual_keeps_the_first_layer_gradient(tmp_path):
    """Eight sigmoid layers: the plain net's first-layer gradient is orders of magnitude
    smaller than the residual net's (identity paths carry it), and equal in float64 across
    engines either way."""
    norms = {}
    for residual in (False, True):
        workdir = tmp_path / str(residual)
        metrics = precision.main(["--workdir", str(workdir), "--depths", "8", "--width", "16",
                                  "--batch", "32", "--activations", "sigmoid",
                                  "--jit", *(["--residual"] if residual else [])])
        assert read_results(workdir, "precision")["config"]["residual"] is residual
        assert metrics["float64_manual_vs_autodiff_max"] <= F64
        norms[residual] = metrics["first_layer_reference_norm_at_deepest"]["sigmoid"]
    assert norms[True] > 100 * norms[False]


@pytest.mark.standard_promotion  # optax.adam
def test_pretraining(tmp_path):
    metrics = pretraining.main([
        "--workdir", str(tmp_path), "--labelled", "50", "--train-examples", "300",
        "--test-examples", "200", "--seeds", "2", "--hidden-layers", "2", "--width", "16",
        "--pretrain-passes", "3", "--finetune-updates", "40", "--records", "2"])
    document = read_results(tmp_path, "pretraining")
    assert set(metrics["test_error"]["50"]) == {"random", "pretrained"}
    for start in ("random", "pretrained"):
        assert 0 <= metrics["test_error"]["50"][start] <= 1
    # the autoencoders learned: reconstruction error fell during pretraining, every layer
    pretrain = [h for h in document["history"] if h["phase"] == "pretrain"]
    for layer in (1, 2):
        mse = [np.mean(h["reconstruction_mse"]) for h in pretrain if h["layer"] == layer]
        assert len(mse) == 3 and mse[-1] < mse[0]
    finetune = [h for h in document["history"] if h["phase"] == "finetune"]
    assert len(finetune) == 2 * 2 and all(len(h["test_error"]) == 2 for h in finetune)
    # the two starts differ, so the comparison compares something
    assert ([h["train_error"] for h in finetune if h["start"] == "random"]
            != [h["train_error"] for h in finetune if h["start"] == "pretrained"])
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_memory_time(tmp_path):
    metrics = memory_time.main(["--workdir", str(tmp_path), "--train-examples", "300",
                                "--test-examples", "100", "--passes", "1", "--hidden-units",
                                "32", "--no-isolate"])
    document = read_results(tmp_path, "memory_time")
    assert [row["method"] for row in document["table"]] == list(memory_time.METHODS)
    for row in document["table"]:
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["train_accuracy"] <= 1
        assert row["train_seconds"] > 0 and row["peak_rss_mb"] >= 0
    assert metrics["test_accuracy"]["knn"] > 0.5  # 300 digits are enough for k-NN
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {method} |" in table for method in memory_time.METHODS)
    assert document["metrics"]["stored_numbers"]["logistic"] == 256 * 10 + 10


@pytest.mark.parametrize("flag, limit, count, other", [
    ("--train-examples", 7292, 7291, "--test-examples"),
    ("--test-examples", 2008, 2007, "--train-examples")])
def test_memory_time_refuses_more_digits_than_there_are(tmp_path, flag, limit, count, other):
    with pytest.raises(ConfigError, match=f"option {flag}: got {limit}; allowed: at most "
                                          f"{count}"):
        memory_time.main(["--workdir", str(tmp_path), flag, str(limit), other, "50",
                          "--methods", "knn", "--no-isolate"])
    assert not (tmp_path / "config.json").exists()


def test_memory_time_measures_in_a_fresh_process():
    config = {"train_examples": 200, "test_examples": 50, "knn_k": 1}
    row = memory_time.measure_isolated("knn", config, memory_time.load(config))
    assert row["method"] == "knn" and 0 <= row["test_accuracy"] <= 1
    assert row["train_accuracy"] == 1.0  # 1-NN recalls its own training set


TRADEOFFS_SMALL = ["--time-steps", "12", "--hidden", "8", "--batch", "4", "--recompute-every",
                   "3,5", "--blocks", "4", "--width", "16", "--block-batch", "64",
                   "--remat-groups", "1,2", "--mlp-width", "32", "--mlp-batch", "64",
                   "--micro-batches", "2,4", "--repeats", "2"]


def test_memory_tradeoffs_measures_every_setting_with_the_plain_gradients(tmp_path):
    """Every family's settings, the plain program first at ratio 1; each setting's gradients
    those of the plain program within float32's tolerance (T = 12 with k = 5: 2 steps kept,
    then 2 segments); the plot and the table written."""
    metrics = memory_tradeoffs.main(["--workdir", str(tmp_path), *TRADEOFFS_SMALL])
    document = read_results(tmp_path, "memory_tradeoffs")
    assert document["metrics"] == json.loads(json.dumps(metrics))
    settings = {family: [row["setting"] for row in rows] for family, rows in metrics.items()}
    assert settings == {
        "recompute": ["plain", "recompute_every=3", "recompute_every=5"],
        "remat": ["plain", "remat of 1 block", "remat of 2 blocks"],
        "accumulate": ["plain", "2 micro-batches", "4 micro-batches"]}
    for rows in metrics.values():
        assert rows[0]["ratio"] == 1.0
        for row in rows:
            assert row["temp_mb"] > 0 and row["seconds"] > 0 and row["ratio"] > 0
            assert row["max_rel_diff"] <= tolerance(jnp.float32)
    assert (tmp_path / "memory_tradeoffs.png").stat().st_size > 0
    assert "| remat of 2 blocks |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("flag, value, message", [
    ("--remat-groups", "3", r"option --remat-groups: \[3\] do not divide 4"),
    ("--micro-batches", "5", r"option --micro-batches: \[5\] do not divide 64"),
    ("--recompute-every", "13", r"option --recompute-every: \[13\] exceed --time-steps 12")])
def test_memory_tradeoffs_refuses_settings_it_cannot_build(tmp_path, flag, value, message):
    with pytest.raises(ConfigError, match=message):
        memory_tradeoffs.main(["--workdir", str(tmp_path), *TRADEOFFS_SMALL, flag, value])
    assert not (tmp_path / "config.json").exists()


@pytest.mark.standard_promotion  # optax.adam
def test_depth_reports_the_updates_it_made(tmp_path):
    """--updates 25 in 2 records of whole passes (one batch of 60 a pass) makes 13 passes a
    record, 26 updates: results.json, results.md and the history say 26."""
    metrics = depth.main(["--workdir", str(tmp_path), "--depths", "1", "--sizes", "30,60",
                          "--width", "8", "--updates", "25", "--seeds", "2", "--records", "2",
                          "--test-examples", "100"])
    assert metrics["updates"] == 26
    assert read_results(tmp_path, "depth")["metrics"]["updates"] == 26
    assert max(h["updates"] for h in read_results(tmp_path, "depth")["history"]) == 26
    assert "after 26 updates (--updates 25, rounded up to whole passes)" in (
        tmp_path / "results.md").read_text()


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize("variant", ["plain", "residual", "batch-norm"])
def test_depth(tmp_path, variant):
    metrics = depth.main(["--workdir", str(tmp_path), "--depths", "1,3", "--sizes", "30,60",
                          "--width", "8", "--updates", "20", "--seeds", "2", "--records", "2",
                          "--test-examples", "100", *([] if variant == "plain" else
                                                      [f"--{variant}"])])
    document = read_results(tmp_path, "depth")
    assert document["config"]["residual"] is (variant == "residual")
    assert document["config"]["batch_norm"] is (variant == "batch-norm")
    assert set(metrics["test_error"]) == {"1", "3"}  # one curve per depth
    assert all(set(curve) == {"30", "60"} for curve in metrics["test_error"].values())
    assert all(0 <= e <= 1 for curve in metrics["test_error"].values() for e in curve.values())
    assert {(h["depth"], h["size"]) for h in document["history"]} == {
        (d, s) for d in (1, 3) for s in (30, 60)}
    assert (tmp_path / "depth.png").stat().st_size > 10_000
