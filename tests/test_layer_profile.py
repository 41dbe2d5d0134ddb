"""experiments.layer_profile: one row per layer, chained shapes, the issue's parameter counts,
residual bytes by hand, and a wrong backward caught by its relative error."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import bench, layer_profile
from nets.gradcheck import TOLERANCES


def test_smallest_run_profiles_every_layer(tmp_path):
    metrics = layer_profile.main(["--workdir", str(tmp_path), "--size", "smallest",
                                  "--repeats", "2",
                                  "--models", "lenet5,transformer,lstm,gru_reset_after"])
    document = json.loads((tmp_path / "results.json").read_text())
    rows = document["layers"]
    lenet5 = [r for r in rows if r["model"] == "lenet5"]
    assert [r["layer"] for r in lenet5] == [
        "C1", "C1_act", "S2", "S2_act", "C3", "C3_act", "S4", "S4_act", "C5", "C5_act",
        "flatten", "F6", "F6_act", "output"]
    for before, after in zip(rows, rows[1:]):
        if before["model"] == after["model"]:
            assert before["output_shape"] == after["input_shape"]
    batch = lenet5[0]["input_shape"][0]
    assert lenet5[0]["input_shape"] == [batch, 32, 32, 1] and lenet5[-1]["output_shape"] == [
        batch, 10]
    # LeCun et al. 1998's trainable parameters per layer (the issue's table).
    params = {r["layer"]: r["parameters"] for r in lenet5}
    assert [params[name] for name in ("C1", "S2", "C3", "S4", "C5", "F6")] == [
        156, 12, 1516, 32, 48120, 10164]
    # What the backward keeps, by hand (float32): the tanh its output, S2 its window sums, the
    # flatten nothing but the shape.
    kept = {r["layer"]: r["manual_residual_bytes"] for r in lenet5}
    assert kept["C1_act"] == batch * 28 * 28 * 6 * 4
    assert kept["S2"] == batch * 14 * 14 * 6 * 4
    assert kept["flatten"] == 0
    assert metrics["layers"] == len(rows) == 14 + 8 + 3 + 3
    lstm = next(r for r in rows if r["model"] == "lstm")
    assert lstm["layer"] == "lstm_0" and lstm["parameters"] == (32 + 8) * 32 + 32  # F 32, H 8
    gru = next(r for r in rows if r["model"] == "gru_reset_after")
    assert gru["parameters"] == (32 + 8) * 24 + 24 + 8  # w, b, and b_hn of the candidate
    assert metrics["max_rel_err"] <= TOLERANCES["float32"]["vs_autodiff"]
    assert all(r["manual_backward_s"] > 0 and r["autodiff_backward_s"] > 0 for r in rows)
    assert {t["model"] for t in document["models"]} == {"lenet5", "transformer", "lstm",
                                                        "gru_reset_after"}
    assert (tmp_path / "layer_profile.png").stat().st_size > 10_000
    assert "| lenet5 | S2 |" in (tmp_path / "results.md").read_text()


def test_a_wrong_backward_shows_in_the_relative_error():
    dense = nets.Dense(3)
    _, params = dense.init(jax.random.key(0), (-1, 4))
    wrong = dense._replace(backward=lambda p, x, dy: jax.tree.map(
        lambda g: 2 * g, dense.backward(p, x, dy)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
    dy = jnp.ones((5, 3), jnp.float32)
    assert layer_profile.profile_layer(dense, params, x, dy, 2)["max_rel_err"] <= 1e-6
    assert abs(layer_profile.profile_layer(wrong, params, x, dy, 2)["max_rel_err"] - 0.5) < 1e-6


def test_alexnet_is_profiled_at_full_size_or_the_smallest_its_strides_allow():
    full = layer_profile.model_cases(bench.Sizes())["alexnet"]
    small = layer_profile.model_cases(bench.SMALLEST)["alexnet"]
    assert (full[3], full[4]) == ((227, 227, 3), 2) and (small[3], small[4]) == ((67, 67, 3), 1)
    counted = nets.count_model(full[1], (-1, *full[3]))  # shapes only, nothing allocated
    assert tuple(counted.layers[-1].output_shape)[1:] == (10,)


def test_a_backward_of_the_wrong_structure_is_refused():
    dense = nets.Dense(3)
    _, params = dense.init(jax.random.key(0), (-1, 4))
    no_bias = dense._replace(backward=lambda p, x, dy: (
        {"w": dense.backward(p, x, dy)[0]["w"]}, dense.backward(p, x, dy)[1]))
    x = jnp.ones((5, 4), jnp.float32)
    with pytest.raises(ValueError, match="layer_profile: the hand-written backward returned"):
        layer_profile.profile_layer(no_bias, params, x, jnp.ones((5, 3), jnp.float32), 2)


def test_batch_overrides_every_models_batch_and_label():
    cases = layer_profile.model_cases(bench.SMALLEST)
    case = layer_profile.with_batch(cases["lenet5"], 64)
    assert case[0] == "lenet5/b64" and case[4] == 64 and case[1] is cases["lenet5"][1]
    assert layer_profile.with_batch(cases["alexnet"], 3)[0] == "alexnet_67x67/b3"


def test_every_model_name_picks_its_own_case():
    """"mlp" the plain MLP and "mlp_batchnorm" the one with BatchNorm (whose label also
    starts with the plain one's), each model once."""
    cases = layer_profile.model_cases(bench.SMALLEST)
    assert set(cases) == set(layer_profile.MODELS)
    assert "_batchnorm/" not in cases["mlp"][0] and "_batchnorm/" in cases["mlp_batchnorm"][0]
    assert nets.batch_coupled_layers(cases["mlp_batchnorm"][1]) == ["norm1", "norm2"]
    assert len({id(case[1]) for case in cases.values()}) == len(cases)
