"""nets.models: shapes, the 1989 net against an independent NumPy forward, the manual engine
against jax.grad for every model, the scaled tanh and the channel-group combinator."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import conv, engines, models, pooling
from nets.gradcheck import relative_error
from nets.layers import Dense
from tests.helpers import F64, assert_close_tree, tolerance


def init_shapes(model, input_shape):
    """(output_shape, params as ShapeDtypeStructs) from model.init, allocating nothing."""
    found = {}

    def init_params(key):
        found["output_shape"], params = model.init(key, input_shape)
        return params

    params = jax.eval_shape(init_params, jax.random.key(0))
    return tuple(found["output_shape"]), params


def numpy_params(shapes, dtype, seed=0):
    """He-scaled N(0, 2 / fan_in) weights and N(0, 0.1^2) biases, from NumPy (compiling
    jax.random for every shape would cost seconds). Masked table entries are nonzero too: the
    model must ignore them."""
    rng = np.random.default_rng(seed)

    def leaf(path, struct):
        shape = struct.shape
        if jax.tree_util.keystr(path).endswith("['w']") and len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1]))
            return jnp.asarray(rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), dtype)
        return jnp.asarray(0.1 * rng.standard_normal(shape), dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_inputs(shape, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), dtype)


def targets_for(batch, classes, dtype, plus_minus_one=False, seed=2):
    labels = np.random.default_rng(seed).integers(0, classes, batch)
    one_hot = np.eye(classes)[labels]
    return jnp.asarray(2 * one_hot - 1 if plus_minus_one else one_hot, dtype)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("build, input_shape, output_shape", [
    (lambda: models.lenet1989(), (3, 16, 16, 1), (3, 10)),
    (lambda: models.lenet1989(scaled_tanh=True), (3, 16, 16, 1), (3, 10)),
    (lambda: models.lenet1989_modern(), (3, 16, 16, 1), (3, 10)),
    (lambda: models.lenet5(), (3, 32, 32, 1), (3, 10)),
], ids=["lenet1989", "lenet1989_scaled", "lenet1989_modern", "lenet5"])
def test_small_model_shapes(build, input_shape, output_shape):
    """Shapes only (values are checked against NumPy and jax.grad below)."""
    model = build()
    init_output, params = init_shapes(model, (-1, *input_shape[1:]))
    assert init_output == (-1, *output_shape[1:])
    y = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    assert y.shape == output_shape and y.dtype == jnp.float32


def test_lenet1989_modern_widths_set_the_layer_sizes():
    """h1_maps, h2_maps, h3_units set each layer's kernel and bias shapes (distinct sizes, so a
    swapped pair shows); the parameter count is worked out by hand, and the defaults are the
    1989 sizes."""
    model = models.lenet1989_modern(h1_maps=4, h2_maps=6, h3_units=7)
    output_shape, params = init_shapes(model, (-1, 16, 16, 1))
    assert output_shape == (-1, 10)
    shapes = {layer.name: {k: v.shape for k, v in p.items()}
              for layer, p in zip(model.sublayers, params) if p}
    assert shapes == {"H1": {"w": (5, 5, 1, 4), "b": (4,)}, "H2": {"w": (5, 5, 4, 6), "b": (6,)},
                      "H3": {"w": (6 * 4 * 4, 7), "b": (7,)}, "output": {"w": (7, 10), "b": (10,)}}
    hand_count = (25 * 1 * 4 + 4) + (25 * 4 * 6 + 6) + (96 * 7 + 7) + (7 * 10 + 10)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == hand_count == 1_469
    y = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((3, 16, 16, 1), jnp.float32))
    assert y.shape == (3, 10)
    default = init_shapes(models.lenet1989_modern(), (-1, 16, 16, 1))[1]
    assert sum(leaf.size for leaf in jax.tree.leaves(default)) == (
        (25 * 12 + 12) + (25 * 12 * 12 + 12) + (192 * 30 + 30) + (30 * 10 + 10))
    assert not models.lenet1989_modern().stochastic
    dropped = models.lenet1989_modern(h1_maps=4, h2_maps=6, h3_units=7, dropout_rate=0.5)
    assert dropped.stochastic
    assert [layer.name for layer in dropped.sublayers][-3:] == ["H3_act", "H3_dropout",
                                                                "output"]


@pytest.mark.parametrize("towers", [1, 2])
def test_alexnet_shapes_by_eval_shape(towers):
    """227x227x3 -> 1000 logits, and the paper's Figure 2 map sizes, without running it."""
    model = models.alexnet(towers=towers)
    output_shape, params = init_shapes(model, (-1, 227, 227, 3))
    assert output_shape == (-1, 1000)
    y = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((2, 227, 227, 3), jnp.float32))
    assert y.shape == (2, 1000)
    names = [layer.name for layer in model.sublayers]
    expected = {"conv1": (55, 55, 96), "conv1_pool": (27, 27, 96), "conv2": (27, 27, 256),
                "conv2_pool": (13, 13, 256), "conv3": (13, 13, 384), "conv4": (13, 13, 384),
                "conv5": (13, 13, 256), "conv5_pool": (6, 6, 256), "flatten": (9216,)}
    shape = (-1, 227, 227, 3)
    for layer, name in zip(model.sublayers, names):
        shape, _ = init_shapes(layer, shape)
        if name in expected:
            assert shape[1:] == expected[name], name
    # Grouped kernels: each tower's conv2 maps see 48 of conv1's 96 maps.
    assert params[names.index("conv2")]["w"].shape == (5, 5, 96 // towers, 256)
    assert params[names.index("conv3")]["w"].shape == (3, 3, 256, 384)


def test_alexnet_rejects_inputs_too_small_for_its_pools():
    with pytest.raises(ValueError, match="conv5_pool"):
        init_shapes(models.alexnet(), (-1, 63, 63, 3))
    assert init_shapes(models.alexnet(), (-1, 67, 67, 3))[0] == (-1, 1000)


def test_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="towers"):
        models.alexnet(towers=3)
    with pytest.raises(ValueError, match="activation"):
        models.lenet5(activation="softsign")
    with pytest.raises(ValueError, match="lenet5: output 'softmax'; choose one of"):
        models.lenet5(output="softmax")
    with pytest.raises(ValueError, match="scaled_tanh"):
        models.lenet1989(activation="relu", scaled_tanh=True)
    with pytest.raises(ValueError, match="h2_maps"):
        models.lenet1989_modern(h2_maps=0)
    for rate in (-0.5, float("nan"), 1.0):  # -0.5 and NaN used to build a net without dropout
        with pytest.raises(ValueError, match=rf"lenet1989_modern: dropout_rate must lie in "
                                             rf"\[0, 1\), got {rate}"):
            models.lenet1989_modern(dropout_rate=rate)


# ------------------------------------------------------- the 1989 net against NumPy


def numpy_lenet1989_conv(x, w, b, table=None):
    """5x5 kernels at stride 2 over x padded by 2 with -1, one bias per unit (b: (oh, ow, O)),
    each output map o summing only over the input maps c with table[c, o]; explicit loops."""
    xp = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    batch, height, width, channels = xp.shape
    out_h, out_w, out_channels = (height - 5) // 2 + 1, (width - 5) // 2 + 1, w.shape[-1]
    y = np.zeros((batch, out_h, out_w, out_channels))
    for i in range(out_h):
        for j in range(out_w):
            patch = xp[:, 2 * i:2 * i + 5, 2 * j:2 * j + 5, :]
            for o in range(out_channels):
                seen = range(channels) if table is None else np.flatnonzero(table[:, o])
                for c in seen:
                    y[:, i, j, o] += np.sum(patch[:, :, :, c] * w[:, :, c, o], axis=(1, 2))
    return y + b[None]


def numpy_lenet1989(params, x, squash):
    h1, _, h2, _, _, h3, _, output, _ = [jax.tree.map(np.asarray, p) for p in params]
    a = squash(numpy_lenet1989_conv(x, h1["w"], h1["b"]))
    a = squash(numpy_lenet1989_conv(a, h2["w"], h2["b"], conv.lenet1989_h2_table()))
    a = squash(a.reshape(a.shape[0], -1) @ h3["w"] + h3["b"])
    return squash(a @ output["w"] + output["b"])


@pytest.mark.parametrize("scaled", [False, True], ids=["tanh", "scaled_tanh"])
def test_lenet1989_forward_matches_numpy(scaled):
    model = models.lenet1989(scaled_tanh=scaled)
    _, shapes = init_shapes(model, (-1, 16, 16, 1))
    params = numpy_params(shapes, jnp.float64)
    h2_w = params[2]["w"]
    mask = conv.lenet1989_h2_table()
    assert h2_w.shape == (5, 5, 12, 12) and params[0]["b"].shape == (8, 8, 12)
    assert float(jnp.min(jnp.abs(h2_w[:, :, ~mask]))) > 0  # masked entries hold garbage
    x = random_inputs((4, 16, 16, 1), jnp.float64)
    if scaled:
        def squash(a):
            return 1.7159 * np.tanh(2.0 * a / 3.0)
    else:
        squash = np.tanh
    expected = numpy_lenet1989(params, np.asarray(x), squash)
    actual = jax.jit(model.apply)(params, x)
    assert relative_error(actual, expected) <= F64
    # The comparison can fail: without the table (masked kernel entries used) it is far off.
    first = squash(numpy_lenet1989_conv(np.asarray(x), np.asarray(params[0]["w"]),
                                        np.asarray(params[0]["b"])))
    untabled = squash(numpy_lenet1989_conv(first, np.asarray(h2_w), np.asarray(params[2]["b"])))
    tabled = squash(numpy_lenet1989_conv(first, np.asarray(h2_w), np.asarray(params[2]["b"]),
                                         mask))
    assert relative_error(untabled, tabled) > 0.1


def test_lenet1989_pads_with_minus_one():
    """A blank image (all -1, the background) gives the same H1 response at every position
    whose window lies in the image or the border: the padding is -1, not 0."""
    model = models.lenet1989()
    _, shapes = init_shapes(model, (-1, 16, 16, 1))
    params = numpy_params(shapes, jnp.float64)
    h1 = model.sublayers[0]
    y = h1.apply(params[0], -jnp.ones((1, 16, 16, 1), jnp.float64)) - params[0]["b"][None]
    np.testing.assert_allclose(y, jnp.broadcast_to(y[:, :1, :1], y.shape), rtol=1e-12)


# ------------------------------------------------------ manual engine vs jax.grad

GRADIENT_CASES = {
    "lenet1989": (lambda: models.lenet1989(), (3, 16, 16, 1), "mse"),
    "lenet1989_scaled": (lambda: models.lenet1989(scaled_tanh=True), (3, 16, 16, 1), "mse"),
    "lenet1989_modern": (lambda: models.lenet1989_modern(), (3, 16, 16, 1), "softmax"),
    "lenet1989_modern_widths": (lambda: models.lenet1989_modern(4, 6, 7), (3, 16, 16, 1),
                                "softmax"),
    "lenet5": (lambda: models.lenet5(), (3, 32, 32, 1), "softmax"),
    "lenet5_rbf": (lambda: models.lenet5(output="rbf"), (3, 32, 32, 1), "map"),
}


def gradients(model, input_shape, loss, dtype, classes=10, params=None, key=None):
    """(params, manual (E, grad), autodiff (E, grad)) on a random batch, with the L2 term;
    params default to `numpy_params`. loss: "mse" (+-1 targets), "softmax" or "map" (LeCun
    et al. 1998's criterion on RBF scores; one-hot targets); key:
    for a model with dropout, the same in both engines."""
    if params is None:
        params = numpy_params(init_shapes(model, (-1, *input_shape[1:]))[1], dtype)
    if loss == "mse":
        objective = nets.Objective(nets.mean_squared_error(), 0.5)
        targets = targets_for(input_shape[0], classes, dtype, plus_minus_one=True)
    else:
        loss_function = nets.softmax_cross_entropy() if loss == "softmax" else nets.lecun1998_map()
        objective = nets.Objective(loss_function, 0.5)
        targets = targets_for(input_shape[0], classes, dtype)
    x = random_inputs(input_shape, dtype)

    @jax.jit  # one program
    def both(params, x, targets, key):
        return (engines.manual(model, objective)(params, x, targets, key),
                engines.autodiff(model, objective)(params, x, targets, key))

    return params, *both(params, x, targets, key)


TABLES = {"lenet1989": (2, conv.lenet1989_h2_table()),
          "lenet1989_scaled": (2, conv.lenet1989_h2_table()),
          "lenet5": (4, conv.lenet5_c3_table())}


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_manual_gradient_matches_jax_grad(case, dtype):
    build, input_shape, loss = GRADIENT_CASES[case]
    model = build()
    params, (value, manual), (reference_value, autodiff) = gradients(
        model, input_shape, loss, dtype)
    assert relative_error(value, reference_value) <= tolerance(dtype)
    assert_close_tree(manual, autodiff, dtype, case)
    for leaf in jax.tree.leaves(manual):
        assert leaf.dtype == jnp.dtype(dtype) and float(jnp.linalg.norm(leaf)) > 0
    if case in TABLES:
        # The backward gives kernel entries a connection table masks out (nonzero garbage in
        # these params; init makes them 0, so the L2 term leaves them alone) exactly zero
        # gradient, and every other entry some.
        index, table = TABLES[case]

        def backward(params, x):
            y, residuals = model.forward(params, x)
            return model.backward(params, residuals, jnp.ones_like(y))[0][index]["w"]

        dw = jax.jit(backward)(params, random_inputs(input_shape, dtype))
        assert float(jnp.max(jnp.abs(dw[:, :, ~table]))) == 0.0
        assert float(jnp.min(jnp.abs(dw[:, :, table]))) > 0.0


def test_alexnet_manual_gradient_matches_jax_grad_at_67x67():
    """Two towers in float64 with dropout active (about 5 s on 2 cores; the one-tower net
    differs only in layers tests/test_conv.py and test_pooling.py check): the smallest input
    every pool accepts (67x67: conv1 15x15, pools to 7, 3, 1), 5 classes, the full 4096-unit
    dense layers, both engines given the same key."""
    towers, dtype = 2, "float64"
    model = models.alexnet(towers=towers, num_classes=5)
    input_shape = (2, 67, 67, 3)
    params = numpy_params(init_shapes(model, (-1, 67, 67, 3))[1], dtype)
    key = jax.random.key(3)
    _, (value, manual), (reference_value, autodiff) = gradients(
        model, input_shape, "softmax", dtype, classes=5, params=params, key=key)
    assert relative_error(value, reference_value) <= tolerance(dtype)
    assert_close_tree(manual, autodiff, dtype, f"alexnet{towers}")
    for leaf in jax.tree.leaves(manual):
        assert float(jnp.linalg.norm(leaf)) > 0
    # The masks were drawn: of the fc6 units whose ReLU is on in both examples, about 1/4 are
    # dropped in both; and jax.grad's fc7.w has no data term (only the L2 term's (lambda/m) w,
    # lambda = 0.5, m = 2) in exactly the rows whose input is zero in both examples.
    residuals = jax.jit(model.forward)(params, random_inputs(input_shape, dtype), key=key)[1]
    relu_on, scale = np.asarray(residuals[-6]) > 0, np.asarray(residuals[-5])
    silent = np.all((scale == 0) | ~relu_on, axis=0)
    both_on = np.all(relu_on, axis=0)
    dropped_in_both = np.mean(np.all(scale == 0, axis=0)[both_on])
    assert both_on.sum() > 1000 and 0.2 < dropped_in_both < 0.3, (both_on.sum(),
                                                                   dropped_in_both)
    data_term = np.asarray(autodiff[-4]["w"]) - 0.25 * np.asarray(params[-4]["w"])
    np.testing.assert_array_equal(np.max(np.abs(data_term), axis=1) <= 1e-12, silent)


# ------------------------------------------------------------ layers of models.py


def test_scaled_tanh_values_and_backward_match_jax_vjp(dtype):
    layer = models.ScaledTanh()
    x = jnp.asarray(np.random.default_rng(0).normal(0, 2, (3, 5, 4)), dtype)
    y, residuals = layer.forward((), x)
    np.testing.assert_allclose(y, 1.7159 * np.tanh(2 * np.asarray(x, np.float64) / 3),
                               rtol=1e-6 if dtype == "float32" else 1e-14)
    # The paper's choice of constants: f(+-1) = +-1 (to 1e-4, as 1.7159 is rounded).
    ones = layer.apply((), jnp.asarray([-1.0, 1.0], dtype))
    np.testing.assert_allclose(ones, [-1.0, 1.0], atol=1e-4)
    dy = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), dtype)
    dparams, dx = layer.backward((), residuals, dy)
    _, pullback = jax.vjp(lambda v: layer.apply((), v), x)
    (reference,) = pullback(dy)
    assert dparams == ()
    assert_close_tree(dx, reference, dtype, "ScaledTanh")
    # The comparison can fail: plain tanh's derivative 1 - y^2 is far off.
    assert relative_error(dy * (1 - y * y), reference) > 0.1


def test_channel_groups_backward_matches_jax_vjp(dtype):
    """Two groups of a Dense layer on 8 features: each group's own weights, backward by hand."""
    layer = models.channel_groups(Dense(3, name="dense"), 2, name="towers")
    output_shape, shapes = init_shapes(layer, (-1, 8))
    assert output_shape == (-1, 6) and shapes[0]["w"].shape == (4, 3)
    params = numpy_params(shapes, dtype)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), dtype)
    dy = jnp.asarray(np.random.default_rng(1).standard_normal((5, 6)), dtype)

    @jax.jit  # one program
    def everything(params, x, dy):
        y, residuals = layer.forward(params, x)
        expected = jnp.concatenate([x[:, :4] @ params[0]["w"] + params[0]["b"][None],
                                    x[:, 4:] @ params[1]["w"] + params[1]["b"][None]], axis=-1)
        _, pullback = jax.vjp(layer.apply, params, x)
        return y, expected, layer.backward(params, residuals, dy), pullback(dy)

    y, expected, manual, reference = everything(params, x, dy)
    assert_close_tree(y, expected, dtype, "forward")
    assert_close_tree(manual, reference, dtype, "towers")


def test_channel_groups_give_each_group_its_own_dropout_mask():
    layer = models.channel_groups(pooling.Dropout(0.5), 2, name="towers")
    assert layer.stochastic
    y = layer.apply(((), ()), jnp.ones((4, 64), jnp.float64), jax.random.key(0))
    assert not np.array_equal(y[:, :32], y[:, 32:])
    np.testing.assert_array_equal(layer.apply(((), ()), jnp.ones((4, 64))), 1.0)


def test_tower_lrn_keeps_towers_apart():
    """Per-tower LRN: tower 0's outputs do not depend on tower 1's inputs; across all maps
    (one tower) the maps at the boundary do."""
    x = jnp.asarray(np.random.default_rng(0).uniform(1, 3, (1, 2, 2, 8)), jnp.float64)
    changed = x.at[..., 4:].multiply(5.0)
    towers = models.channel_groups(pooling.LocalResponseNorm(alpha=0.1), 2)
    params = towers.init(jax.random.key(0), x.shape)[1]
    np.testing.assert_array_equal(towers.apply(params, x)[..., :4],
                                  towers.apply(params, changed)[..., :4])
    single = pooling.LocalResponseNorm(alpha=0.1)
    assert not np.allclose(single.apply((), x)[..., 3], single.apply((), changed)[..., 3])
    with pytest.raises(ValueError, match="divisible"):
        towers.apply(params, x[..., :7])


@pytest.mark.runs_long
def test_alexnet_full_size_forward_on_cpu():
    """One real 227x227 forward pass (not just shapes): 61 M parameters, finite outputs."""
    model = models.alexnet()
    output_shape, params = model.init(jax.random.key(0), (-1, 227, 227, 3))
    assert output_shape == (-1, 1000)
    x = jax.random.normal(jax.random.key(1), (1, 227, 227, 3), jnp.float32)
    logits = jax.jit(model.apply)(params, x)
    assert logits.shape == (1, 1000)
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_lenet1989_init_limits_follow_each_units_fan_in(exponent):
    """U(+-2.4 / F^exponent) with F = 25 (H1), 200 (H2: 8 maps of 5x5), 192 (H3), 30 (output):
    every weight inside its limit and the largest of each layer near it (hand-computed F)."""
    params = models.lenet1989(fan_in_exponent=exponent).init(jax.random.key(3),
                                                              (-1, 16, 16, 1))[1]
    fan_ins = {0: 25, 2: 200, 5: 192, 7: 30}
    for index, fan_in in fan_ins.items():
        weights = np.abs(np.asarray(params[index]["w"]))
        live = weights[weights > 0]  # H2's masked weights are exactly 0
        limit = 2.4 / fan_in**exponent
        assert live.max() <= limit and live.max() >= 0.9 * limit, (index, live.max(), limit)


@pytest.mark.parametrize("amplitude, slope, message", [
    (0.0, 2 / 3, "amplitude must be a finite number other than 0, got 0.0"),
    (float("nan"), 2 / 3, "amplitude must be a finite number other than 0, got nan"),
    ("1.7159", 2 / 3, "amplitude must be a finite number other than 0, got '1.7159'"),
    (1.7159, float("inf"), "slope must be a finite number, got inf"),
])
def test_scaled_tanh_refuses_an_amplitude_of_0_and_constants_that_are_not_finite(amplitude, slope,
                                                                                 message):
    """Its derivative (S/A)(A^2 - y^2) divides by A: 0 was a ZeroDivisionError at the first
    backward, and NaN or inf a NaN gradient that jax.grad did not have."""
    with pytest.raises(ValueError, match=re.escape(f"squash: {message}")):
        models.ScaledTanh(amplitude, slope, name="squash")


@pytest.mark.parametrize("groups", [2.0, True, "2"])
def test_channel_groups_and_alexnet_towers_refuse_counts_that_are_not_whole_numbers(groups):
    """channel_groups(layer, 2.0) was a raw TypeError at init and True one group, silently;
    alexnet(towers=2.0) passed `towers in (1, 2)` to fail as a raw TypeError."""
    with pytest.raises(ValueError, match=re.escape(f"towers: groups must be >= 1, got "
                                                   f"{groups!r}; expected a whole number")):
        models.channel_groups(pooling.LocalResponseNorm(), groups, name="towers")
    if groups != "2":
        with pytest.raises(ValueError, match=re.escape(f"alexnet: towers must be 1 or 2, got "
                                                       f"{groups!r}")):
            models.alexnet(towers=groups)
