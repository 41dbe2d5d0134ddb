"""The gradient report: its error measures, finite differences, and that it can fail."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import gradcheck, layers, losses
from tests.helpers import F64, assert_close_tree, random_batch, scale_layer
from tests.test_engines import broken_dense


def test_relative_error_and_cosine_by_hand():
    assert gradcheck.relative_error([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert gradcheck.relative_error([3.0, 4.0], [0.0, 0.0]) == 1.0
    np.testing.assert_allclose(gradcheck.relative_error([1.0, 0.0], [0.0, 1.0]),
                               np.sqrt(2), rtol=1e-15)
    assert gradcheck.relative_error(np.zeros(3), np.zeros(3)) == 0.0
    np.testing.assert_allclose(gradcheck.cosine_similarity([1.0, 1.0], [1.0, 0.0]),
                               1 / np.sqrt(2), rtol=1e-15)
    assert gradcheck.cosine_similarity(np.zeros(2), np.zeros(2)) == 1.0
    assert gradcheck.cosine_similarity(np.zeros(2), np.ones(2)) == 0.0
    # a gradient of the wrong sign reads -1, an orthogonal one 0
    assert gradcheck.cosine_similarity([3.0, -4.0], [-3.0, 4.0]) == -1.0
    assert gradcheck.cosine_similarity([1.0, 1.0], [1.0, -1.0]) == 0.0


def test_finite_differences_of_a_known_function():
    """E = sum(w^3) has gradient 3 w^2; central differences are exact up to h^2 w."""
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.1]], jnp.float64)}
    path = (jax.tree_util.DictKey("w"),)
    with jax.enable_x64(True):
        fd = gradcheck.finite_difference_grad(
            lambda p: jnp.sum(p["w"] ** 3), params, path, np.arange(4), 1e-5
        )
    np.testing.assert_allclose(fd, 3 * np.ravel(params["w"]) ** 2, rtol=1e-8)


def test_report_passes_for_an_mlp_with_every_row_checked():
    model = nets.build_mlp(6, 3, hidden_layers=2, hidden_units=8)
    _, params = model.init(jax.random.key(0), (-1, 6))
    x, targets = random_batch(jax.random.key(1), 10, 6, 3, jnp.float64)
    rows = gradcheck.gradient_report(model, losses.lecture_objective(1.0), params, x, targets,
                                     jnp.float64, max_fd_coordinates=20)
    assert [(r["layer"], r["param"]) for r in rows] == [
        ("hidden1", "b"), ("hidden1", "w"), ("hidden2", "b"), ("hidden2", "w"),
        ("output", "b"), ("output", "w")]
    assert all(r["passed"] for r in rows)
    assert all(r["rel_err_vs_autodiff"] <= F64 for r in rows)
    assert all(r["rel_err_vs_finite_diff"] <= 1e-6 for r in rows)
    assert [r["fd_coordinates"] for r in rows] == [8, 20, 8, 20, 3, 20]


def test_moved_parameters_move_each_tensor_by_half_its_rms():
    """Entry by entry p + 0.5 rms(p) N(0, 1): the spread of the moves over a large tensor,
    measured against its own rms; an all-zero one by 0.5 * 0.2; integers and scale 0 stay."""
    params = {"w": 3.0 * jax.random.normal(jax.random.key(0), (200, 100), jnp.float32),
              "g": jnp.ones(20_000, jnp.float64), "b": jnp.zeros(20_000, jnp.float64),
              "ids": jnp.arange(5)}
    moved = gradcheck.moved_parameters(jax.random.key(1), params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), moved) == jax.tree.map(
        lambda a: (a.shape, a.dtype), params)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(params["w"].astype(jnp.float64)))))
    # the sample sd of 20,000 normals is within 1.5% of 1 but with odds of about 1e-11
    np.testing.assert_allclose(float(jnp.std(moved["w"] - params["w"])) / rms, 0.5, rtol=0.015)
    np.testing.assert_allclose(float(jnp.std(moved["g"] - 1)), 0.5, rtol=0.015)
    np.testing.assert_allclose(float(jnp.std(moved["b"])), 0.1, rtol=0.015)
    assert abs(float(jnp.mean(moved["b"]))) < 0.005  # 7 standard errors
    assert (moved["ids"] == params["ids"]).all()
    unmoved = gradcheck.moved_parameters(jax.random.key(1), params, 0.0)
    assert all((a == b).all() for a, b in zip(jax.tree.leaves(unmoved), jax.tree.leaves(params)))


@pytest.mark.parametrize("scale", [-0.5, float("nan"), "0.5", True])
def test_moved_parameters_refuse_a_scale_not_finite_and_at_least_0(scale):
    with pytest.raises(ValueError, match=re.escape(
            f"moved_parameters: scale must be a finite number >= 0, got {scale!r}")):
        gradcheck.moved_parameters(jax.random.key(0), {"w": jnp.ones(3)}, scale)


def layer_norm_dividing_by_its_gain(features):
    """A LayerNorm whose backward passes dy / g, not dy g, back through its standardisation:
    the same gradient wherever the gain is 1, as it is at init."""
    good = nets.LayerNorm(features)

    def backward(params, residuals, dy):
        return good.backward({**params, "g": 1 / params["g"]}, residuals, dy)

    return good._replace(backward=backward)


def test_the_report_catches_a_backward_dividing_by_a_gain_only_at_moved_parameters():
    """At init (gain 1) the wrong LayerNorm agrees with jax.grad; moved, its input's gradient
    is wrong, and so is every gradient below it."""
    model = layers.serial(layers.Dense(6, name="below"), layer_norm_dividing_by_its_gain(6),
                          layers.Tanh(), layers.Dense(3, name="out"))
    _, initial = model.init(jax.random.key(0), (-1, 5))
    x, targets = random_batch(jax.random.key(1), 7, 5, 3, jnp.float64)

    def verdicts(params):
        rows = gradcheck.gradient_report(model, losses.lecture_objective(0.0), params, x,
                                         targets, jnp.float64, max_fd_coordinates=10)
        return {(r["layer"], r["param"]): r["passed"] for r in rows}

    assert all(verdicts(initial).values())
    moved = verdicts(gradcheck.moved_parameters(jax.random.key(2), initial))
    assert moved == {("below", "b"): False, ("below", "w"): False, ("LayerNorm", "b"): True,
                     ("LayerNorm", "g"): True, ("out", "b"): True, ("out", "w"): True}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_report_fails_for_a_wrong_backward(dtype):
    model = layers.serial(broken_dense(4, "bad"), layers.Sigmoid(), layers.Dense(3, name="ok"))
    _, params = model.init(jax.random.key(0), (-1, 5))
    x, targets = random_batch(jax.random.key(1), 7, 5, 3, jnp.float64)
    rows = gradcheck.gradient_report(model, losses.lecture_objective(0.0), params, x, targets,
                                     dtype)
    verdict = {(r["layer"], r["param"]): r["passed"] for r in rows}
    assert verdict == {("bad", "b"): True, ("bad", "w"): False, ("ok", "b"): True,
                       ("ok", "w"): True}
    bad = next(r for r in rows if r["layer"] == "bad" and r["param"] == "w")
    np.testing.assert_allclose(bad["rel_err_vs_autodiff"], 0.5, rtol=1e-5)  # |2g - g| / |2g|


def test_report_rejects_unsupported_dtype():
    model = nets.build_mlp(2, 2, hidden_units=6)
    _, params = model.init(jax.random.key(0), (-1, 2))
    with pytest.raises(ValueError, match="dtype float16"):
        gradcheck.gradient_report(model, losses.lecture_objective(), params, jnp.zeros((1, 2)),
                                  jnp.zeros((1, 2)), jnp.float16)


def kinked_relu_net(offset):
    """One Dense unit then ReLU, MSE; example 0's pre-activation is `offset` above zero, so a
    step h > offset of the bias crosses the ReLU's kink."""
    model = layers.serial(layers.Dense(1, name="unit"), layers.Relu(name="relu"))
    x = jnp.array([[1.0, 0.0], [0.3, 2.0], [-0.5, 1.0]], jnp.float64)
    params = ({"w": jnp.array([[0.7], [0.4]], jnp.float64),
               "b": jnp.array([-0.7 + offset], jnp.float64)}, ())
    return model, params, x, jnp.full((3, 1), 2.0, jnp.float64)


def test_a_kink_within_the_step_is_left_out_of_the_finite_difference_comparison():
    """At a pre-activation 0.4 h from the ReLU's kink the bias's central difference is off by
    (h - 0.4 h) / 2h of the derivative's jump; the report leaves that coordinate out (and the
    bias has no other), says so, and still compares the weights."""
    h = gradcheck.FINITE_DIFFERENCE_STEP
    model, params, x, targets = kinked_relu_net(0.4 * h)
    objective = losses.Objective(losses.mean_squared_error())
    with jax.enable_x64(True):
        energy = lambda p: objective.value(p, model.apply(p, x), targets)  # noqa: E731
        bias = (jax.tree_util.SequenceKey(0), jax.tree_util.DictKey("b"))
        fd = gradcheck.finite_difference_grad(energy, params, bias, np.array([0]), h)
        exact = jax.grad(energy)(params)[0]["b"]
    assert abs(fd[0] - exact[0]) > 0.1 * abs(exact[0])  # the kink spoils the difference
    rows = {r["param"]: r for r in gradcheck.gradient_report(model, objective, params, x,
                                                               targets, jnp.float64)}
    assert rows["b"]["fd_kinks"] == 1 and rows["b"]["fd_coordinates"] == 0
    assert not rows["b"]["passed"]  # more than half of its coordinates left out
    assert rows["w"]["fd_kinks"] == 1 and rows["w"]["fd_coordinates"] == 1
    model, params, x, targets = kinked_relu_net(100 * h)
    rows = gradcheck.gradient_report(model, objective, params, x, targets, jnp.float64)
    assert all(r["passed"] and r["fd_kinks"] == 0 for r in rows)


def test_a_wrong_derivative_shared_by_both_engines_is_not_taken_for_a_kink():
    """y = sin(x) with a derivative of 2 cos(x) in both the custom_jvp (jax.grad) and the
    hand-written backward: the engines agree, the central differences catch them."""

    @jax.custom_jvp
    def wrong_sin(x):
        return jnp.sin(x)

    wrong_sin.defjvp(lambda primals, tangents: (jnp.sin(primals[0]),
                                                2 * jnp.cos(primals[0]) * tangents[0]))

    def forward(params, x):
        del params
        return wrong_sin(x), x

    def backward(params, x, dy):
        del params
        return (), dy * 2 * jnp.cos(x)

    model = layers.serial(layers.Dense(3, name="unit"),
                          layers.Layer("wrong_sin", lambda key, shape: (shape, ()), forward,
                                       backward))
    _, params = model.init(jax.random.key(0), (-1, 4))
    x, targets = random_batch(jax.random.key(1), 6, 4, 3, jnp.float64)
    objective = losses.Objective(losses.mean_squared_error())
    rows = gradcheck.gradient_report(model, objective, params, x, targets, jnp.float64)
    assert all(r["rel_err_vs_autodiff"] <= F64 for r in rows)
    assert all(r["fd_kinks"] == 0 and not r["passed"] for r in rows if r["layer"] == "unit")


def test_a_gradient_both_engines_give_as_zero_is_still_checked_by_finite_differences():
    """y = x * stop_gradient(g): jax.grad and a backward returning dg = 0 agree on a wrong 0.
    The finite-difference bound used to scale by jax.grad's rms alone, which made it ~1e299
    here: the report passed the tensor."""
    def forward(params, x):
        return x * jax.lax.stop_gradient(params["g"])[None, :], x

    def backward(params, x, dy):
        return {"g": jnp.zeros_like(params["g"])}, dy * params["g"][None, :]

    frozen = layers.Layer("frozen", lambda key, shape: (shape, {"g": jnp.full((3,), 1.5)}),
                          forward, backward)
    model = layers.serial(layers.Dense(3, name="unit"), frozen)
    _, params = model.init(jax.random.key(0), (-1, 4))
    x, targets = random_batch(jax.random.key(1), 6, 4, 3, jnp.float64)
    objective = losses.Objective(losses.mean_squared_error())
    rows = {r["layer"]: r for r in gradcheck.gradient_report(model, objective, params, x,
                                                               targets, jnp.float64)}
    assert rows["frozen"]["rel_err_vs_autodiff"] == 0.0
    assert rows["frozen"]["rel_err_vs_finite_diff"] == pytest.approx(1.0)
    assert rows["frozen"]["fd_tolerance"] < 1e-5 and not rows["frozen"]["passed"]
    assert rows["unit"]["passed"]


def test_a_gradient_of_another_shape_fails_whatever_its_values():
    """A bias gradient returned as (1, n) for a (n,) bias has the right values flattened: its
    relative error is ~1e-16, and the report fails it by its shape. (The engine's sums
    broadcast it, as JAX's default rank promotion allows; the tests' setting raises.)"""
    dense = layers.Dense(3, name="unit")

    def backward(params, x, dy):
        dparams, dx = dense.backward(params, x, dy)
        return {**dparams, "b": dparams["b"][None, :]}, dx

    model = layers.serial(dense._replace(backward=backward))
    _, params = model.init(jax.random.key(0), (-1, 4))
    x, targets = random_batch(jax.random.key(1), 6, 4, 3, jnp.float64)
    objective = losses.Objective(losses.mean_squared_error())
    with jax.numpy_rank_promotion("allow"):
        rows = {r["param"]: r for r in gradcheck.gradient_report(model, objective, params, x,
                                                                   targets, jnp.float64)}
    assert rows["b"]["rel_err_vs_autodiff"] <= F64
    assert rows["b"]["mismatch"] == "shape (1, 3) against jax.grad's (3,)"
    assert not rows["b"]["passed"]
    assert rows["w"]["passed"] and rows["w"]["mismatch"] is None


def test_the_finite_difference_tolerance_is_ten_times_the_rounding_error_when_above_1e_6():
    """By hand: |E| = 1e4, h = 1e-6 and gradients of root-mean-square 2 (jax.grad's) and 1
    (the differences') give a rounding error of eps 1e4 / (1e-6 x 2) = 1.1e-6 relative, so
    the tolerance is 10 times that, 1.1e-5; at |E| = 1 the rounding (1.1e-10) is far below
    the table's 1e-6, which is then the tolerance. Fails if the factor 10 is dropped or the
    larger root-mean-square is not the one used."""
    eps = np.finfo(np.float64).eps
    tolerance = gradcheck.finite_difference_tolerance(1e4, 1e-6, np.full(4, 2.0), np.ones(4))
    np.testing.assert_allclose(tolerance, 10 * eps * 1e4 / (1e-6 * 2.0), rtol=F64)
    assert gradcheck.finite_difference_tolerance(1.0, 1e-6, np.ones(3)) == 1e-6


def test_a_coordinate_is_taken_for_a_kink_only_when_its_error_is_within_1_percent_of_the_gap():
    """Reference gradient (1, 0, 0, 1), tolerance 1e-6 (rms 0.71, so any error above 7.1e-7
    counts): coordinate 1's error 1.2 is 20% away from its gap 1 and is kept (a real
    disagreement), coordinate 2's 1.005 is within 1% of its gap 1 and is left out (a kink);
    0 and 3 agree with the reference (by hand). Fails if the 1% band is widened (20% would
    then pass for a kink) or if errors within it are kept."""
    fd = np.array([1.0, 1.2, 1.005, 1.0])
    gaps = np.array([0.0, 1.0, 1.0, 0.0])
    reference = np.array([1.0, 0.0, 0.0, 1.0])
    smooth = gradcheck.smooth_coordinates(fd, gaps, reference, 1e-6)
    assert smooth.tolist() == [True, True, False, True]


def feature_scale(dx_gain: bool = True, db_sum: bool = True, dx_uses_dy: bool = True,
                  dx_factor: float = 1.0):
    """The README's FeatureScale, y = x g + b, optionally with its dx missing the gain, its
    dx the local derivative g without the incoming dy (right only where dy is all ones), its
    dx off by the factor dx_factor, or its db one example's instead of the batch's sum."""

    def init(key, input_shape):
        n = input_shape[-1]
        return tuple(input_shape), {"g": jnp.ones((n,)), "b": jnp.zeros((n,))}

    def forward(params, x):
        return x * params["g"][None, :] + params["b"][None, :], x

    def backward(params, x, dy):
        db = jnp.sum(dy, axis=0) if db_sum else dy[0]
        dx = dy * params["g"][None, :] if dx_gain else dy
        if not dx_uses_dy:
            dx = jnp.broadcast_to(params["g"][None, :], dy.shape)
        return {"g": jnp.sum(dy * x, axis=0), "b": db}, dx * dx_factor

    return layers.Layer("scale", init, forward, backward)


@pytest.mark.parametrize("dx_gain, db_sum, dx_uses_dy, failing", [
    (True, True, True, set()), (False, True, True, {"dx"}), (True, False, True, {"b"}),
    (True, True, False, {"dx"})])
def test_layer_report_names_the_wrong_gradient_of_a_layer_alone(dx_gain, db_sum, dx_uses_dy,
                                                                 failing, dtype):
    """At g != 1 a dx without its gain fails the layer's own dx row (inside a net it shows
    in the layers below); a db of one example fails the b row; a dx that leaves out the
    incoming dy fails, as the report's dy is random (it would pass a dy of ones); the right
    layer passes."""
    layer = feature_scale(dx_gain, db_sum, dx_uses_dy)
    params = {"g": jnp.array([0.5, 2.0, -1.5]), "b": jnp.array([0.1, 0.2, 0.3])}
    x = jax.random.normal(jax.random.key(0), (4, 3))
    rows = gradcheck.layer_report(layer, params, x, dtype)
    assert [row["param"] for row in rows] == ["dx", "b", "g"]
    assert {row["param"] for row in rows if not row["passed"]} == failing
    assert all(row["rel_err_vs_vjp"] > 1e-2 for row in rows if row["param"] in failing)
    assert all(row["rel_err_vs_vjp"] <= F64 for row in rows
               if row["param"] not in failing and dtype == "float64")


@pytest.mark.parametrize("dtype_name, off, fails", [
    ("float64", 3e-10, True), ("float64", 3e-11, False),
    ("float32", 3e-5, True), ("float32", 3e-6, False)])
def test_each_dtype_is_held_to_its_own_tolerance_in_both_reports(dtype_name, off, fails):
    """A dx off by the relative amount `off`, 3x above or below the dtype's bound (float64
    1e-10, float32 1e-5, `gradcheck.TOLERANCES`): above, that dtype's rows fail it (the
    layer's own dx row alone; inside a net the rows of the layer below, whose gradients it
    carries), below they pass it, in layer_report and gradient_report. A bound loosened or
    tightened threefold, or one dtype's bound used for the other, fails one of the four."""
    layer = feature_scale(dx_factor=1 + off)
    params = {"g": jnp.array([0.5, 2.0, -1.5]), "b": jnp.array([0.1, 0.2, 0.3])}
    x = jax.random.normal(jax.random.key(0), (4, 3))
    rows = gradcheck.layer_report(layer, params, x, jnp.dtype(dtype_name))
    assert [row["param"] for row in rows if not row["passed"]] == (["dx"] if fails else [])
    np.testing.assert_allclose(rows[0]["rel_err_vs_vjp"], off, rtol=0.1)
    model = layers.serial(layers.Dense(3, name="hidden"), layers.Tanh(), layer,
                          layers.Dense(2, name="out"))
    _, params = model.init(jax.random.key(0), (-1, 5))
    x, targets = random_batch(jax.random.key(1), 6, 5, 2, jnp.float64)
    rows = gradcheck.gradient_report(model, losses.lecture_objective(0.1), params, x, targets,
                                     jnp.dtype(dtype_name))
    assert {row["dtype"] for row in rows} == {dtype_name}
    assert {row["layer"] for row in rows if not row["passed"]} == ({"hidden"} if fails
                                                                   else set())


def dense_scaled_in_float64(name):
    """Dense whose backward multiplies its gradients by a float64 one and casts them back: the
    same values and dtypes, computed in float64 for float32 params under x64 (as `jnp.ones(())`
    would have it)."""
    dense = layers.Dense(3, name=name)

    def backward(params, x, dy):
        dparams, dx = dense.backward(params, x, dy)
        one = jnp.asarray(1.0, jnp.float64)
        return {key: (value * one).astype(value.dtype) for key, value in dparams.items()}, dx

    return dense._replace(backward=backward)


@pytest.mark.standard_promotion  # a user's session: x64 on, JAX's standard promotion
def test_a_float32_check_computed_in_float64_fails_both_reports():
    """The float32 rows of a pass that computes in float64 anywhere fail, naming the
    equations (`wider_floats`), though every value and dtype agrees with jax.grad's; the
    float64 rows pass, and so do float32 rows of plain Dense."""
    x, targets = random_batch(jax.random.key(1), 6, 5, 3, jnp.float32)
    for layer, leaks in ((dense_scaled_in_float64("leaky"), True),
                         (layers.Dense(3, name="leaky"), False)):
        model = layers.serial(layer, layers.Tanh(), name="net")
        _, params = model.init(jax.random.key(0), (-1, 5))
        for dtype in (jnp.float32, jnp.float64):
            expected = (["convert_element_type -> float64", "mul -> float64"]
                        if leaks and dtype == jnp.float32 else [])
            report = gradcheck.gradient_report(model, losses.lecture_objective(0.1), params, x,
                                               targets, dtype)
            alone = gradcheck.layer_report(layer, params[0], x, dtype)
            for row in report + alone:
                assert row["wider_floats"] == expected, (row, dtype)
                assert row["passed"] is not bool(expected), (row, dtype)
            assert max(row["rel_err_vs_autodiff"] for row in report) <= (
                gradcheck.TOLERANCES[jnp.dtype(dtype).name]["vs_autodiff"])
    assert gradcheck.wider_floats(lambda a: a * 2.0, jnp.float32, x) == []
    # weakly typed float64 from Python numbers alone, cast: no float32 value met float64
    assert gradcheck.wider_floats(lambda a: a * jnp.where(a > 0, 1.0, 0.5).astype(a.dtype),
                                  jnp.float32, x) == []
    assert gradcheck.wider_floats(lambda a: a.astype(jnp.float64) * 2.0, jnp.float32, x) == [
        "convert_element_type -> float64", "mul -> float64"]


@pytest.mark.parametrize("dtype_name, bound", [("float64", 1e-10), ("float32", 1e-5)])
def test_the_tests_own_comparison_holds_each_dtype_to_its_bound(dtype_name, bound):
    """tests/helpers.py's `assert_close_tree`, which most layer tests compare with: a leaf
    off by 3x its dtype's bound fails, naming the leaf; 3x below passes; leaves of another
    shape, or trees of another structure, fail whatever their values."""
    expected = {"b": np.array([1.0, -2.0]), "w": np.array([[0.5, 3.0], [4.0, -1.0]])}
    assert_close_tree({"b": expected["b"], "w": expected["w"] * (1 + bound / 3)}, expected,
                      dtype_name)
    with pytest.raises(AssertionError, match=r"layer\['w'\]: rel err"):
        assert_close_tree({"b": expected["b"], "w": expected["w"] * (1 + 3 * bound)},
                          expected, dtype_name, "layer")
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close_tree({"b": expected["b"], "w": expected["w"].T.reshape(1, 4)}, expected,
                          dtype_name)
    with pytest.raises(AssertionError, match="tree structures differ"):
        assert_close_tree({"w": expected["w"]}, expected, dtype_name)


def test_layer_report_of_a_net_token_ids_and_a_gradient_of_the_wrong_shape():
    """A serial net's leaves are named by their layers; token ids have no dx row; a
    gradient of another shape is a mismatch, whatever its values."""
    net = layers.serial(layers.Dense(4, name="a"), layers.Gelu(name="act"),
                        layers.Dense(2, name="b"))
    _, params = net.init(jax.random.key(0), (-1, 5))
    rows = gradcheck.layer_report(net, params, jax.random.normal(jax.random.key(1), (3, 5)))
    assert [(row["layer"], row["param"]) for row in rows] == [
        ("serial", "dx"), ("a", "b"), ("a", "w"), ("b", "b"), ("b", "w")]
    assert all(row["passed"] for row in rows)
    embed = layers.Embedding(7, 3, name="embed")
    _, params = embed.init(jax.random.key(0), (-1, 4))
    rows = gradcheck.layer_report(embed, params, jnp.array([[1, 2, 3, 6]]), jnp.float32)
    assert [(row["param"], row["passed"]) for row in rows] == [("w", True)]
    flat = feature_scale()._replace(
        backward=lambda params, x, dy: ({"g": jnp.sum(dy * x, axis=0)[None],
                                         "b": jnp.sum(dy, axis=0)}, dy * params["g"][None, :]))
    rows = gradcheck.layer_report(flat, {"g": jnp.ones(3), "b": jnp.zeros(3)}, jnp.ones((2, 3)))
    assert [row["mismatch"] for row in rows if not row["passed"]] == [
        "shape (1, 3) against jax.vjp's (3,)"]
    with pytest.raises(ValueError, match="layer_report: dtype float16"):
        gradcheck.layer_report(flat, {}, jnp.ones((2, 3)), jnp.float16)



def test_relative_error_and_cosine_refuse_arrays_of_different_sizes():
    """An array of one entry was broadcast against the other: relative_error([1, 1, 1], [1])
    was 0.0; cosine_similarity raised a raw matmul error. Same sizes in other shapes are
    still compared flattened (a (1, n) bias gradient, below)."""
    for function in (gradcheck.relative_error, gradcheck.cosine_similarity):
        with pytest.raises(ValueError, match=rf"{function.__name__}: a has shape \(3,\) and b "
                                             r"\(1,\); expected as many entries in each"):
            function(np.ones(3), np.ones(1))
    assert gradcheck.relative_error(np.ones((1, 3)), np.ones(3)) == 0.0


def _small_report_case():
    model = nets.build_mlp(4, 3, hidden_units=3)
    _, params = model.init(jax.random.key(0), (-1, 4))
    x, targets = random_batch(jax.random.key(1), 5, 4, 3, jnp.float64)
    return model, losses.lecture_objective(0.1), params, x, targets


@pytest.mark.parametrize("argument, value, message", [
    ("max_fd_coordinates", 0, "max_fd_coordinates must be a whole number >= 1, got 0"),
    ("max_fd_coordinates", -1, "max_fd_coordinates must be a whole number >= 1, got -1"),
    ("max_fd_coordinates", 2.5, "max_fd_coordinates must be a whole number >= 1, got 2.5"),
    ("fd_step", 0.0, "fd_step must be a finite number > 0, got 0.0"),
    ("fd_step", float("nan"), "fd_step must be a finite number > 0, got nan"),
])
def test_the_report_refuses_no_finite_difference_coordinates_and_a_step_of_0(argument, value,
                                                                              message):
    """max_fd_coordinates=0 passed every tensor with rel_err_vs_finite_diff 0.0 measured on no
    coordinate; -1 and 2.5 were raw NumPy errors; a step of 0 or NaN made every difference
    NaN, the tensors failing with no word of why."""
    with pytest.raises(ValueError, match=re.escape(f"gradient_report: {message}")):
        gradcheck.gradient_report(*_small_report_case(), **{argument: value})


def test_finite_differences_refuse_indices_outside_their_leaf_and_an_unknown_path():
    """Flat index 20 of a (5, 4) leaf, or -1, perturbed a neighbouring leaf's entry (the
    difference was that leaf's derivative, or 0 past the end); 1.7 was read as 1; a path
    params do not have was a KeyError of (None, None)."""
    params = {"u": jnp.array([1.0, 2.0]), "w": jnp.arange(20.0).reshape(5, 4)}

    def energy(p):
        return jnp.sum(p["u"] ** 2) + jnp.sum(p["w"] ** 3)

    path = (jax.tree_util.DictKey("w"),)
    with jax.enable_x64(True):
        params = gradcheck.astype(params, jnp.float64)
        np.testing.assert_allclose(gradcheck.finite_difference_grad(
            energy, params, path, np.array([0, 19]), 1e-5), [0.0, 3 * 19.0**2], atol=1e-4)
        for indices, message in ((np.array([20]), r"must lie in \[0, 20\), got 20 to 20"),
                                 (np.array([-1]), r"must lie in \[0, 20\), got -1 to -1"),
                                 (np.array([1.7]), "must be a 1-d array of integers")):
            with pytest.raises(ValueError, match=r"finite differences: the indices of leaf "
                                                 r"\('w',\) " + message):
                gradcheck.finite_difference_grad(energy, params, path, indices, 1e-5)
        with pytest.raises(ValueError, match=r"params have no leaf at \('v',\); they have "
                                             r"\[\('u',\), \('w',\)\]"):
            gradcheck.finite_difference_grad(energy, params, (jax.tree_util.DictKey("v"),),
                                             np.array([0]), 1e-5)
        assert gradcheck.finite_difference_grads(energy, params, {}, 1e-5) == {}


@pytest.mark.standard_promotion
def test_the_gauss_newton_diagonal_reference_of_float32_params_on_float64_data():
    """float32 params (init's) on float64 data (NumPy arrays under x64) gave float32 Jacobian
    columns, which jax.jvp refused as tangents of the float64 outputs: a raw TypeError. Now
    the reference agrees with the engine's diagonal, in the params' dtypes."""
    model = nets.serial(nets.Dense(3, name="out"), name="net")  # one layer: the rule is exact
    _, params = model.init(jax.random.key(0), (-1, 4))
    x, targets = random_batch(jax.random.key(1), 5, 4, 3, jnp.float64)
    objective = losses.lecture_objective(0.1)
    reference = gradcheck.gauss_newton_diagonal(model, objective, params, x, targets)
    ours = nets.engines.curvature_diagonal(model, objective)(params, x, targets)
    for leaf, expected in zip(jax.tree.leaves(reference), jax.tree.leaves(ours)):
        assert leaf.dtype == jnp.float32
        np.testing.assert_allclose(leaf, expected, rtol=1e-5)


def test_jax_differentiated_names_what_jax_differentiation_wrote():
    """[] for a plain function; jax.grad's program has the reverse pass's transposed jvp,
    jax.jvp's its jvp, also under jit and inside a scan."""
    def energy(w):
        return jnp.sum(jnp.tanh(w) ** 2)

    w = jnp.linspace(-1.0, 1.0, 5)
    assert gradcheck.jax_differentiated(energy, w) == []
    assert gradcheck.jax_differentiated(jax.jit(lambda w: 2 * w + energy(w)), w) == []
    grad_stacks = gradcheck.jax_differentiated(jax.jit(jax.grad(energy)), w)
    assert any(stack.startswith("transpose(jvp(") for stack in grad_stacks)
    tangent = gradcheck.jax_differentiated(lambda w: jax.jvp(energy, (w,), (w,)), w)
    assert tangent and all(stack.startswith("jvp(") for stack in tangent)

    def scanned(w):
        return jax.lax.scan(lambda c, _: (c + jax.grad(energy)(c), None), w, None, length=3)[0]

    assert gradcheck.jax_differentiated(scanned, w) != []


@pytest.mark.parametrize("transform", [
    lambda g: lambda w: jax.linearize(g, w)[1](w), lambda g: jax.jacrev(g),
    lambda g: jax.jacfwd(g), lambda g: jax.hessian(lambda w: jnp.sum(g(w))),
    lambda g: lambda w: jax.vjp(jax.checkpoint(g), w)[1](w)[0],
    lambda g: lambda w: jax.linear_transpose(lambda u: 2.0 * u, w)(w)[0],
    lambda g: jax.vmap(jax.grad(lambda a: jnp.sum(g(a))))],
    ids=["linearize", "jacrev", "jacfwd", "hessian", "vjp_of_checkpoint", "linear_transpose",
         "vmap_of_grad"])
def test_jax_differentiated_sees_every_way_jax_differentiates(transform):
    """Each of JAX's differentiation transformations leaves its marks, so a backward that
    used any of them is caught; the function itself has none."""
    def g(w):
        return jnp.tanh(w) * 2.0

    w = jnp.linspace(-1.0, 1.0, 4)
    assert gradcheck.jax_differentiated(g, w) == []
    assert gradcheck.jax_differentiated(transform(g), w) != []


@pytest.mark.parametrize("differentiate", ["vjp", "linear_transpose", None])
def test_the_reports_fail_a_backward_by_jax_vjp_whose_numbers_agree(differentiate):
    """A backward that is jax.vjp of its forward, or jax.linear_transpose of it (JAX's
    transposition alone, no jvp), agrees with jax.grad to rounding; the reports read its
    program and fail every row, "by_hand" false. Written by hand, all pass."""
    model = nets.serial(nets.Dense(4, name="hidden"), scale_layer(differentiate), nets.Tanh(),
                        nets.Dense(3, name="out"))
    _, params = model.init(jax.random.key(0), (-1, 5))
    x, targets = random_batch(jax.random.key(1), 6, 5, 3, jnp.float64)
    rows = gradcheck.gradient_report(model, losses.lecture_objective(0.1), params, x, targets)
    assert len(rows) == 5 and max(row["rel_err_vs_autodiff"] for row in rows) <= 1e-12
    by_hand = differentiate is None
    assert [(row["by_hand"], row["passed"]) for row in rows] == [(by_hand, by_hand)] * 5
    alone = gradcheck.layer_report(scale_layer(differentiate), {"g": jnp.array([0.5, -2.0])},
                                   jnp.ones((3, 2)))
    assert [row["param"] for row in alone] == ["dx", "g"]
    assert max(row["rel_err_vs_vjp"] for row in alone) <= 1e-12
    assert [(row["by_hand"], row["passed"]) for row in alone] == [(by_hand, by_hand)] * 2
