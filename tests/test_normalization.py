"""LayerNorm and BatchNorm: backward against jax.vjp, invariances, curvature against jax's
Jacobian, accounting and errors."""
import functools
import re

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import engines, gradcheck, layers, losses
from nets.normalization import BatchNorm, LayerNorm
from tests.helpers import assert_close_tree, backward_and_vjp


def random_norm(builder, shape, dtype, seed=0, eps=1e-5):
    """A LayerNorm or BatchNorm (builder) of shape[-1] features with g, b away from 1, 0; x
    scaled and shifted."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {"g": 1 + 0.5 * jax.random.normal(keys[0], (shape[-1],), dtype),
              "b": jax.random.normal(keys[1], (shape[-1],), dtype)}
    x = 3 + 2 * jax.random.normal(keys[2], shape, dtype)
    return builder(shape[-1], eps=eps), params, x


def random_layer_norm(shape, dtype, seed=0, eps=1e-5):
    return random_norm(LayerNorm, shape, dtype, seed, eps)


def random_batch_norm(shape, dtype, seed=0, eps=1e-5):
    return random_norm(BatchNorm, shape, dtype, seed, eps)


def x_curvature_and_exact(layer, params, x, d2y, exact):
    """layer.curvature's d2x from the forward's residuals, and the reference exact(params, x,
    d2y), compiled as one program."""

    @jax.jit
    def run(params, x, d2y):
        _, residuals = layer.forward(params, x)
        return layer.curvature(params, residuals, d2y)[1], exact(params, x, d2y)

    return run(params, x, d2y)


# BatchNorm has no group of 2 values here: there dx vanishes as eps -> 0
# (test_batch_norm_hand_computed_column), and its relative error would measure the rounding of
# that cancellation, not the backward pass.
@pytest.mark.parametrize("builder, shape", [
    *((LayerNorm, shape) for shape in [(1, 1), (4, 3), (7, 16), (2, 4, 4, 6), (3, 5, 7)]),
    *((BatchNorm, shape) for shape in [(3, 1), (4, 3), (7, 16), (1, 3, 1, 2), (2, 4, 4, 6),
                                       (3, 5, 7)])])
def test_backward_matches_vjp(builder, shape, dtype):
    layer, params, x = random_norm(builder, shape, dtype)
    dy = jax.random.normal(jax.random.key(9), shape, dtype)
    manual, reference = backward_and_vjp(layer, params, x, dy)
    assert_close_tree(manual, reference, dtype, f"{layer.name}{shape}")


def test_rows_are_normalised_and_dx_is_blind_to_shift_and_scale():
    """With g = 1, b = 0: each row has mean 0 and variance var / (var + eps). Since y does not
    change when a row is shifted or scaled, every row of dx sums to 0 and is orthogonal to
    the row's xhat (exactly so only as eps -> 0: eps here is 1e-30, below the rounding of
    the variance)."""
    layer = LayerNorm(6, eps=1e-30)
    _, params = layer.init(jax.random.key(0), (-1, 6))
    params = gradcheck.astype(params, jnp.float64)
    x = 5 + 3 * jax.random.normal(jax.random.key(1), (4, 6), jnp.float64)
    y, residuals = layer.forward(params, x)
    np.testing.assert_allclose(jnp.mean(y, axis=-1), 0, atol=1e-14)
    np.testing.assert_allclose(jnp.var(y, axis=-1), 1, rtol=1e-10)
    dy = jax.random.normal(jax.random.key(2), (4, 6), jnp.float64)
    _, dx = layer.backward(params, residuals, dy)
    xhat = residuals[0]
    np.testing.assert_allclose(jnp.sum(dx, axis=-1), 0, atol=1e-13)
    np.testing.assert_allclose(jnp.sum(dx * xhat, axis=-1), 0, atol=1e-13)


def test_hand_computed_row():
    """x = (1, 3), eps -> 0: xhat = (-1, 1), y = g xhat + b, and y ignores x, so dx = 0."""
    layer = LayerNorm(2, eps=1e-12)
    params = {"g": jnp.array([2.0, 3.0], jnp.float64), "b": jnp.array([0.5, -1.0], jnp.float64)}
    y, residuals = layer.forward(params, jnp.array([[1.0, 3.0]], jnp.float64))
    np.testing.assert_allclose(y, [[-1.5, 2.0]], rtol=1e-10)
    dparams, dx = layer.backward(params, residuals, jnp.array([[1.0, 10.0]], jnp.float64))
    np.testing.assert_allclose(dparams["g"], [-1.0, 10.0], rtol=1e-10)
    np.testing.assert_allclose(dparams["b"], [1.0, 10.0])
    np.testing.assert_allclose(dx, 0, atol=1e-10)


@pytest.mark.parametrize("shape", [(3, 1), (3, 5), (2, 3, 3, 4)])
def test_curvature_of_x_is_the_squared_jacobian_against_d2y(shape):
    """d2x_i = sum_j (dy_j/dx_i)^2 d2y_j, with the Jacobian from jax.jacobian."""
    layer, params, x = random_layer_norm(shape, jnp.float64, seed=3)
    d2y = jax.random.uniform(jax.random.key(4), shape, jnp.float64)

    def squared_jacobians_of_rows(params, x, d2y):
        """sum_j (dy_j/dx_i)^2 d2y_j within each row, (rows, features)."""
        rows = x.reshape(-1, shape[-1])
        jacobians = jax.vmap(jax.jacobian(lambda row: layer.apply(params, row[None])[0]))(rows)
        return jnp.einsum("rji,rj->ri", jacobians**2, d2y.reshape(-1, shape[-1]))

    d2x, expected = x_curvature_and_exact(layer, params, x, d2y, squared_jacobians_of_rows)
    assert_close_tree(d2x.reshape(-1, shape[-1]), expected, jnp.float64, "d2x")


@pytest.mark.parametrize("norm, convolutional", [("layer", False), ("batch", False),
                                                  ("layer", True), ("batch", True)])
def test_curvature_of_g_and_b_is_the_exact_gauss_newton_diagonal_at_the_outputs(
        norm, convolutional):
    """LayerNorm or BatchNorm as the last layer under the squared error, after a Dense or (NHWC)
    a convolution: g_j and b_j reach the outputs of feature j alone (one output per row for
    LayerNorm, one per example and position for BatchNorm), each through its own xhat or 1,
    and the loss's curvature is diagonal, so the backpropagated diagonal equals jax's exact
    Gauss-Newton diagonal."""
    builder, random_norm = {"layer": (LayerNorm, random_layer_norm),
                            "batch": (BatchNorm, random_batch_norm)}[norm]
    first = (nets.Conv2D(5, 3, padding="SAME", name="conv") if convolutional
             else layers.Dense(5, name="dense"))
    model = layers.serial(first, builder(5, name="norm"),
                          *([nets.Flatten(name="flat")] if convolutional else []))
    x_shape = (6, 4, 4, 3) if convolutional else (6, 3)
    _, params = model.init(jax.random.key(0), (-1, *x_shape[1:]))
    params = gradcheck.astype(params, jnp.float64)
    params = (params[0], random_norm((1, 5), jnp.float64, seed=1)[1], *params[2:])
    x = jax.random.normal(jax.random.key(2), x_shape, jnp.float64)
    y = jax.random.normal(jax.random.key(3), (6, 4 * 4 * 5 if convolutional else 5),
                          jnp.float64)
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    backpropagated = jax.jit(engines.curvature_diagonal(model, objective))(params, x, y)
    exact = gradcheck.gauss_newton_diagonal(model, objective, params, x, y)
    assert_close_tree(backpropagated[1], exact[1], jnp.float64, f"{norm} norm g, b")


def report_layers(model, objective, params, x, targets, except_for=()):
    """The layers of the gradient report (float64 and float32), asserting that every check
    passed but those of the (layer, param) pairs in except_for."""
    for dtype in (jnp.float64, jnp.float32):
        report = gradcheck.gradient_report(model, objective, params, x, targets, dtype=dtype)
        failed = [(row["layer"], row["param"]) for row in report if not row["passed"]
                  and (row["layer"], row["param"]) not in except_for]
        assert not failed, (jnp.dtype(dtype).name, failed)
    return {row["layer"] for row in report}


def test_in_a_net_every_gradient_passes_the_report():
    """Dense, LayerNorm, tanh, residual block with LayerNorm inside, readout: the manual
    engine against jax.grad (float64 and float32) and finite differences."""
    block = layers.serial(LayerNorm(8, name="norm2"), layers.Dense(8, name="inner"),
                          layers.Tanh(name="t2"))
    model = layers.serial(layers.Dense(8, name="in"), LayerNorm(8, name="norm1"),
                          layers.Tanh(name="t1"), layers.residual(block, name="res"),
                          layers.Dense(3, name="out"))
    _, params = model.init(jax.random.key(0), (-1, 4))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    params = unravel(flat + 0.3 * jax.random.normal(jax.random.key(1), flat.shape, flat.dtype))
    x = jax.random.normal(jax.random.key(2), (10, 4))
    targets = jax.nn.one_hot(jnp.arange(10) % 3, 3)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    assert report_layers(model, objective, params, x, targets) >= {"norm1", "norm2"}


@pytest.mark.parametrize("builder", [LayerNorm, BatchNorm])
def test_accounting_counts_the_gain_and_bias_but_no_neurons(builder):
    count = nets.count_model(layers.serial(layers.Dense(5, name="d"), builder(5)), (-1, 3))
    assert (count.neurons, count.params, count.connections, count.macs) == (5, 20 + 10, 20, 15)


@pytest.mark.parametrize("builder", [LayerNorm, BatchNorm])
def test_bad_sizes_and_shapes_are_named(builder):
    with pytest.raises(ValueError, match="norm: features must be an int >= 1, got 0"):
        builder(0, name="norm")
    for not_a_count in (True, 2.0):  # True built a 1-feature layer
        with pytest.raises(ValueError, match=f"norm: features must be an int >= 1, got "
                                             f"{not_a_count!r}"):
            builder(not_a_count, name="norm")
    with pytest.raises(ValueError, match="norm: eps must be > 0, got 0"):
        builder(4, eps=0, name="norm")
    layer = builder(4, name="norm")
    with pytest.raises(ValueError, match=r"norm: input_shape has shape \(-1, 5\), expected "
                                         r"\(batch, ..., 4\)"):
        layer.init(jax.random.key(0), (-1, 5))
    _, params = layer.init(jax.random.key(0), (-1, 4))
    with pytest.raises(ValueError, match=r"norm: input x has shape \(4,\), expected"):
        layer.apply(params, jnp.ones(4))
    with pytest.raises(ValueError, match=r"norm: input x has shape \(2, 3, 5\), expected"):
        layer.apply(params, jnp.ones((2, 3, 5)))


def test_batch_norm_refuses_a_single_value_per_feature():
    layer = BatchNorm(4, name="bn")
    _, params = layer.init(jax.random.key(0), (-1, 4))
    with pytest.raises(ValueError, match=r"bn: input x has shape \(1, 4\): 1 value per "
                                         r"feature, expected at least 2"):
        layer.apply(params, jnp.ones((1, 4), jnp.float32))
    two_positions = jnp.ones((1, 2, 1, 4), jnp.float32)
    assert layer.apply(params, two_positions).shape == (1, 2, 1, 4)


# --- BatchNorm ------------------------------------------------------------------------------

def test_batch_norm_standardises_each_feature_over_batch_and_positions():
    """With g = 1, b = 0, eps -> 0: each channel of an NHWC batch has mean 0 and variance 1
    over (batch, H, W), while single examples do not; dx of each channel sums to 0 and is
    orthogonal to its xhat (y ignores a channel's shift and scale)."""
    layer = BatchNorm(3, eps=1e-30)
    _, params = layer.init(jax.random.key(0), (-1, 2, 2, 3))
    params = gradcheck.astype(params, jnp.float64)
    shift, scale = jnp.array([[[[5.0, -2.0, 0.5]]]]), jnp.array([[[[3.0, 0.1, 7.0]]]])
    x = shift + scale * jax.random.normal(jax.random.key(1), (4, 2, 2, 3), jnp.float64)
    y, residuals = layer.forward(params, x)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0, atol=1e-14)
    np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1, rtol=1e-10)
    assert float(jnp.max(jnp.abs(jnp.mean(y, axis=(1, 2))))) > 0.1
    dy = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
    _, dx = layer.backward(params, residuals, dy)
    xhat = residuals[0]
    np.testing.assert_allclose(jnp.sum(dx, axis=(0, 1, 2)), 0, atol=1e-13)
    np.testing.assert_allclose(jnp.sum(dx * xhat, axis=(0, 1, 2)), 0, atol=1e-13)


def test_batch_norm_hand_computed_column():
    """Two examples, features (1, 10) and (3, 30), eps -> 0: xhat = (-1, 1) per feature, so
    y = g xhat + b; dg = sum dy xhat, db = sum dy, and dx = 0 since y ignores x."""
    layer = BatchNorm(2, eps=1e-12)
    params = {"g": jnp.array([2.0, 3.0], jnp.float64), "b": jnp.array([0.5, -1.0], jnp.float64)}
    y, residuals = layer.forward(params, jnp.array([[1.0, 10.0], [3.0, 30.0]], jnp.float64))
    np.testing.assert_allclose(y, [[-1.5, -4.0], [2.5, 2.0]], rtol=1e-10)
    dy = jnp.array([[1.0, 10.0], [4.0, -2.0]], jnp.float64)
    dparams, dx = layer.backward(params, residuals, dy)
    np.testing.assert_allclose(dparams["g"], [3.0, -12.0], rtol=1e-10)
    np.testing.assert_allclose(dparams["b"], [5.0, 8.0])
    np.testing.assert_allclose(dx, 0, atol=1e-10)


def test_batch_norm_dx_by_hand_with_three_examples():
    """One feature, x = (0, 1, 5), g = 1, eps -> 0, dy = (1, 0, 0): mean 2, variance 14/3,
    s = sqrt(14/3), xhat = (-2, -1, 3) / s, and dx_i = (dy_i - 1/3 - xhat_i xhat_1 / 3) / s:
    dx = ((1 - 1/3 - 4/14)/s, (-1/3 - 2/14)/s, (-1/3 + 6/14)/s), worked out on paper."""
    layer = BatchNorm(1, eps=1e-30)
    params = {"g": jnp.ones(1, jnp.float64), "b": jnp.zeros(1, jnp.float64)}
    _, residuals = layer.forward(params, jnp.array([[0.0], [1.0], [5.0]], jnp.float64))
    _, dx = layer.backward(params, residuals, jnp.array([[1.0], [0.0], [0.0]], jnp.float64))
    s = np.sqrt(14 / 3)
    np.testing.assert_allclose(dx[:, 0], [(1 - 1 / 3 - 4 / 14) / s, (-1 / 3 - 2 / 14) / s,
                                          (-1 / 3 + 6 / 14) / s], rtol=1e-12)


@pytest.mark.parametrize("shape", [(3, 1), (5, 3), (2, 3, 3, 4)])
def test_batch_norm_curvature_of_x_is_the_squared_jacobian_against_d2y(shape):
    """d2x_i = sum_j (dy_j/dx_i)^2 d2y_j over the whole batch, the Jacobian (which couples the
    examples) from jax.jacobian."""
    layer, params, x = random_batch_norm(shape, jnp.float64, seed=3)
    d2y = jax.random.uniform(jax.random.key(4), shape, jnp.float64)

    def squared_jacobian_of_the_batch(params, x, d2y):
        """sum_j (dy_j/dx_i)^2 d2y_j over the whole batch, flat."""
        jacobian = jax.jacobian(lambda x: layer.apply(params, x))(x).reshape(x.size, x.size)
        return (jacobian**2).T @ d2y.reshape(-1)

    d2x, expected = x_curvature_and_exact(layer, params, x, d2y,
                                          squared_jacobian_of_the_batch)
    assert_close_tree(d2x.reshape(-1), expected, jnp.float64, "d2x")


@pytest.mark.parametrize("convolutional", [False, True])
def test_batch_norm_in_a_net_every_gradient_passes_the_report(convolutional):
    """An MLP with BatchNorm between Dense and sigmoid (`build_mlp(batch_norm=True)`), and a
    conv net with BatchNorm over (batch, H, W) per channel: the manual engine against jax.grad
    (float64 and float32) and finite differences. The biases just before a BatchNorm have no
    effect (it removes any shift), so their gradient is exactly 0 and its relative error
    only compares two roundings: both engines must give 0 to 1e-12 of the weights' gradient."""
    if convolutional:
        model = layers.serial(nets.Conv2D(4, (3, 3), name="conv"), BatchNorm(4, name="bn"),
                              layers.Relu(name="relu"), nets.Flatten(name="flat"),
                              layers.Dense(3, name="out"))
        input_shape = (6, 6, 2)
    else:
        model = nets.build_mlp(5, 3, hidden_layers=2, hidden_units=6, batch_norm=True)
        input_shape = (5,)
    assert nets.batch_coupled_layers(model) == (["bn"] if convolutional else ["norm1", "norm2"])
    _, params = model.init(jax.random.key(0), (-1, *input_shape))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    params = unravel(flat + 0.3 * jax.random.normal(jax.random.key(1), flat.shape, flat.dtype))
    x = jax.random.normal(jax.random.key(2), (8, *input_shape))
    targets = jax.nn.one_hot(jnp.arange(8) % 3, 3)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    before_norm = {("conv", "b")} if convolutional else {("hidden1", "b"), ("hidden2", "b")}
    checked = report_layers(model, objective, params, x, targets, except_for=before_norm)
    assert checked >= ({"bn"} if convolutional else {"norm1", "norm2"})
    params64, x64 = gradcheck.astype(params, jnp.float64), x.astype(jnp.float64)
    targets64 = targets.astype(jnp.float64)
    for engine in (engines.manual, engines.autodiff):
        _, grads = jax.jit(engine(model, objective))(params64, x64, targets64)
        weight_norm = float(jnp.linalg.norm(grads[0]["w"]))
        for index in ([0] if convolutional else [0, 3]):
            assert float(jnp.max(jnp.abs(grads[index]["b"]))) <= 1e-12 * weight_norm


def random_statistics(features, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {"mean": jax.random.normal(keys[0], (features,), dtype),
            "var": 0.5 + jax.random.uniform(keys[1], (features,), dtype)}


@pytest.mark.parametrize("shape", [(1, 4), (5, 3), (2, 3, 3, 4)])
def test_fixed_statistics_backward_matches_vjp_for_x_g_b_mean_and_var(shape, dtype):
    """With "mean" and "var" in params the layer is an affine map of each example alone (one
    example is a batch too), and its backward gives every leaf's gradient."""
    layer, params, x = random_batch_norm(shape, dtype)
    params = {**params, **random_statistics(shape[-1], dtype, seed=5)}
    dy = jax.random.normal(jax.random.key(9), shape, dtype)
    manual, reference = backward_and_vjp(layer, params, x, dy)
    assert set(manual[0]) == {"g", "b", "mean", "var"}
    assert_close_tree(manual, reference, dtype, f"fixed BatchNorm{shape}")


def test_fixed_statistics_by_hand():
    """x = 3, mean 1, var 4 - eps (s = 2), g = 5, b = 1: y = 5 (3 - 1) / 2 + 1 = 6; with
    dy = 1: dx = g / s = 2.5, dg = xhat = 1, db = 1, dmean = -2.5, dvar = -g xhat / (2 s^2)
    = -5 / 8; curvature with d2y = 1: d2x = 6.25, d2mean = 6.25, d2var = 25 / 64."""
    eps = 1e-5
    layer = BatchNorm(1, eps=eps)
    params = {"g": jnp.array([5.0]), "b": jnp.array([1.0]), "mean": jnp.array([1.0]),
              "var": jnp.array([4.0 - eps])}
    params = gradcheck.astype(params, jnp.float64)
    y, residuals = layer.forward(params, jnp.array([[3.0]], jnp.float64))
    np.testing.assert_allclose(y, [[6.0]], rtol=1e-12)
    ones = jnp.ones((1, 1), jnp.float64)
    dparams, dx = layer.backward(params, residuals, ones)
    np.testing.assert_allclose(dx, [[2.5]], rtol=1e-12)
    expected = {"g": 1.0, "b": 1.0, "mean": -2.5, "var": -5 / 8}
    for key, value in expected.items():
        np.testing.assert_allclose(dparams[key], [value], rtol=1e-12, err_msg=key)
    d2params, d2x = layer.curvature(params, residuals, ones)
    np.testing.assert_allclose(d2x, [[6.25]], rtol=1e-12)
    for key, value in {"g": 1.0, "b": 1.0, "mean": 6.25, "var": 25 / 64}.items():
        np.testing.assert_allclose(d2params[key], [value], rtol=1e-12, err_msg=key)


def test_fixed_statistics_curvature_is_the_exact_gauss_newton_diagonal_at_the_outputs():
    """Each of g_j, b_j, mean_j, var_j reaches the outputs of feature j alone, each output
    through one path, so with the squared error the backpropagated diagonal is exact."""
    model = layers.serial(layers.Dense(5, name="dense"), BatchNorm(5, name="norm"))
    _, params = model.init(jax.random.key(0), (-1, 3))
    params = gradcheck.astype(params, jnp.float64)
    params = (params[0], {**random_batch_norm((1, 5), jnp.float64, seed=1)[1],
                          **random_statistics(5, jnp.float64, seed=2)})
    x = jax.random.normal(jax.random.key(2), (6, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(3), (6, 5), jnp.float64)
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    backpropagated = jax.jit(engines.curvature_diagonal(model, objective))(params, x, y)
    exact = gradcheck.gauss_newton_diagonal(model, objective, params, x, y)
    assert_close_tree(backpropagated, exact, jnp.float64, "fixed BatchNorm")


def conv_net_with_batch_norms():
    """Conv, BatchNorm, ReLU, a residual block with a BatchNorm inside, flatten, Dense."""
    block = layers.serial(nets.Conv2D(3, (3, 3), padding="SAME", name="inner_conv"),
                          BatchNorm(3, name="inner_bn"), name="block_layers")
    return layers.serial(nets.Conv2D(3, (3, 3), name="conv"), BatchNorm(3, name="bn"),
                         layers.Relu(name="relu"), layers.residual(block, name="res"),
                         nets.Flatten(name="flat"), layers.Dense(2, name="out"))


def batch_norm_inputs(model, params, x):
    """The inputs of `conv_net_with_batch_norms`' two BatchNorms on x, each (examples *
    positions, 3) in NumPy: the first conv's output, and the inner conv's on the relu's
    output (batch statistics), compiled as one program."""

    @jax.jit
    def run(params, x):
        relu_out = dict(layers.layer_outputs(model, params, x))["relu"]
        return model.sublayers[0].apply(params[0], x), block_conv_apply(model, params, relu_out)

    return tuple(np.asarray(a).reshape(-1, 3) for a in run(params, x))


def test_population_statistics_are_each_batch_norm_inputs_mean_and_variance():
    """The statistics set for the top-level BatchNorm are NumPy's mean and variance of its
    input (the conv's output) over batch and positions; the inner one's, of the relu's output
    through the inner conv; with them the net's output on x is its output with batch
    statistics, and each example alone gives its row of it."""
    model = conv_net_with_batch_norms()
    _, params = model.init(jax.random.key(0), (-1, 6, 6, 2))
    params = gradcheck.astype(params, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 6, 6, 2), jnp.float64)
    assert nets.batch_coupled_layers(model) == ["bn", "inner_bn"]
    fixed = nets.with_population_statistics(model, params, x)
    assert nets.batch_coupled_layers(model, fixed) == []
    conv_out, inner = batch_norm_inputs(model, params, x)
    np.testing.assert_allclose(fixed[1]["mean"], conv_out.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fixed[1]["var"], conv_out.var(0), rtol=1e-12)
    np.testing.assert_allclose(fixed[3][1][1]["mean"], inner.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fixed[3][1][1]["var"], inner.var(0), rtol=1e-12)
    apply = jax.jit(model.apply)
    batch_output = apply(params, x)
    np.testing.assert_allclose(apply(fixed, x), batch_output, rtol=1e-10, atol=1e-12)
    one = apply(fixed, x[3:4])
    np.testing.assert_allclose(one, batch_output[3:4], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 50])
def test_population_statistics_in_batches_are_those_of_the_whole_set(batch_size):
    """Measured in batches (7 examples: batches of 1 to 7, the last shorter, and one batch
    larger than the set), each BatchNorm's statistics are NumPy's mean and variance of its
    input over all 7 examples and positions, the inner one's through the outer one fixed:
    float64 <= 1e-12; under jit too."""
    model = conv_net_with_batch_norms()
    _, params = model.init(jax.random.key(0), (-1, 6, 6, 2))
    params = gradcheck.astype(params, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 6, 6, 2), jnp.float64) + 3.0
    conv_out, inner = batch_norm_inputs(model, params, x)
    measure = functools.partial(nets.with_population_statistics, model, batch_size=batch_size)
    apply = jax.jit(model.apply)
    for fixed in (measure(params, x), jax.jit(measure)(params, x)):
        for statistics, values in ((fixed[1], conv_out), (fixed[3][1][1], inner)):
            np.testing.assert_allclose(statistics["mean"], values.mean(0), rtol=1e-12)
            np.testing.assert_allclose(statistics["var"], values.var(0), rtol=1e-12)
        np.testing.assert_allclose(apply(fixed, x), apply(params, x), rtol=1e-10, atol=1e-12)


def test_population_statistics_in_float32_batches_keep_float32_accuracy():
    """Features far from zero (mean 100, sd 1) in float32, 1,000 examples in batches of 64:
    the merged mean and variance within 1e-5 of NumPy's in float64 on the same values (the
    pairwise merge has no sum of squares to cancel)."""
    model = layers.serial(layers.Dense(3, name="d"), BatchNorm(3, name="bn"))
    _, params = model.init(jax.random.key(0), (-1, 4))
    params = ({"w": jnp.eye(4, 3, dtype=jnp.float32), "b": jnp.full(3, 100.0, jnp.float32)},
              params[1])
    x = jax.random.normal(jax.random.key(1), (1000, 4), jnp.float32)
    fixed = nets.with_population_statistics(model, params, x, batch_size=64)
    dense_out = np.asarray(model.sublayers[0].apply(params[0], x), np.float64)
    assert fixed[1]["mean"].dtype == fixed[1]["var"].dtype == jnp.float32
    np.testing.assert_allclose(fixed[1]["mean"], dense_out.mean(0), rtol=1e-5)
    np.testing.assert_allclose(fixed[1]["var"], dense_out.var(0), rtol=1e-5)


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True, "8"])
def test_population_statistics_need_a_positive_int_batch_size(batch_size):
    model = layers.serial(layers.Dense(3, name="d"), BatchNorm(3, name="bn"))
    _, params = model.init(jax.random.key(0), (-1, 2))
    expected = re.escape(f"with_population_statistics: batch_size must be a positive int or "
                         f"None, got {batch_size!r}")
    with pytest.raises(ValueError, match=expected):
        nets.with_population_statistics(model, params, jnp.ones((4, 2)), batch_size=batch_size)


def block_conv_apply(model, params, x):
    """The residual block's inner conv of `conv_net_with_batch_norms` applied to x."""
    block = model.sublayers[3].sublayers[1]
    return block.sublayers[0].apply(params[3][1][0], x)


def test_per_example_gradients_need_fixed_statistics_and_average_to_the_batch_gradient():
    from training import parallel
    model = nets.build_mlp(5, 3, hidden_layers=1, hidden_units=4, batch_norm=True)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    _, params = model.init(jax.random.key(0), (-1, 5))
    params = gradcheck.astype(params, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 5), jnp.float64)
    targets = jax.nn.one_hot(jnp.arange(6) % 3, 3, dtype=jnp.float64)
    per_example = parallel.per_example_value_and_grad(model, objective)
    with pytest.raises(ValueError, match=r"per_example_value_and_grad: mlp1x4_sigmoid_batchnorm:"
                                         r" layers \['norm1'\] normalise with their batch"):
        per_example(params, x, targets)
    fixed = nets.with_population_statistics(model, params, x)

    @jax.jit
    def per_example_and_batch_gradients(params, x, targets):
        """Each example's manual gradient, and jax.grad's of the whole batch."""
        return (per_example(params, x, targets)[1],
                engines.autodiff(model, objective)(params, x, targets)[1])

    grads, batch = per_example_and_batch_gradients(fixed, x, targets)
    assert_close_tree(jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), batch, jnp.float64,
                      "mean of per-example gradients")


def test_statistics_must_come_in_pairs_of_the_right_shape():
    layer = BatchNorm(3, name="bn")
    _, params = layer.init(jax.random.key(0), (-1, 3))
    x = jnp.ones((2, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"bn: params hold statistics \{'mean': \(3,\)\}, "
                                         r"expected both 'mean' and 'var' of shape \(3,\)"):
        layer.apply({**params, "mean": jnp.zeros(3, jnp.float32)}, x)
    with pytest.raises(ValueError, match=r"'var': \(4,\)"):
        layer.apply({**params, "mean": jnp.zeros(3, jnp.float32),
                     "var": jnp.ones(4, jnp.float32)}, x)
    model = layers.serial(layers.Dense(3, name="d"), layer)
    _, params = model.init(jax.random.key(0), (-1, 2))
    with pytest.raises(ValueError, match=r"with_population_statistics: bn: input x has shape "
                                         r"\(1, 3\), expected at least 2 values per feature"):
        nets.with_population_statistics(model, params, jnp.ones((1, 2), jnp.float32))
    for x in (jnp.ones((1, 2), jnp.float32), jnp.ones((0, 2), jnp.float32)):
        with pytest.raises(ValueError, match=rf"bn: input x has shape \({x.shape[0]}, 3\), "
                                             r"expected at least 2 values per feature"):
            nets.with_population_statistics(model, params, x, batch_size=4)


def test_batch_norms_behind_wrappers_are_found_and_dropout_after_is_walked():
    """dropout_after(BatchNorm) has no sublayers of its own and TimeDistributed none at all:
    both are found (so per-example gradients are refused); dropout_after's statistics are its
    layer's (dropout passes x on when measuring), while TimeDistributed is a named error."""
    from training import parallel
    wrapped = nets.dropout_after(BatchNorm(4, name="bn"), 0.5, name="bn")
    model = layers.serial(layers.Dense(4, name="d"), wrapped, layers.Dense(3, name="out"))
    _, params = model.init(jax.random.key(0), (-1, 2))
    params = gradcheck.astype(params, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 2), jnp.float64)
    assert nets.batch_coupled_layers(model) == ["bn"]
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    targets = jax.nn.one_hot(jnp.arange(6) % 3, 3, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"layers \['bn'\] normalise with their batch"):
        parallel.per_example_value_and_grad(model, objective)(params, x, targets)
    fixed = nets.with_population_statistics(model, params, x)
    dense_out = np.asarray(x) @ np.asarray(params[0]["w"]) + np.asarray(params[0]["b"])
    np.testing.assert_allclose(fixed[1]["mean"], dense_out.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fixed[1]["var"], dense_out.var(0), rtol=1e-12)
    assert nets.batch_coupled_layers(model, fixed) == []
    np.testing.assert_allclose(model.apply(fixed, x), model.apply(params, x), rtol=1e-10)
    over_time = nets.recurrent.TimeDistributed(
        layers.serial(layers.Dense(4, name="d"), BatchNorm(4, name="bn")), name="per_step")
    _, params = over_time.init(jax.random.key(0), (-1, 5, 2))
    assert nets.batch_coupled_layers(over_time) == ["bn"]
    with pytest.raises(ValueError, match=r"with_population_statistics: 'per_step' holds "
                                         r"BatchNorm layers \['bn'\] inside a combinator"):
        nets.with_population_statistics(over_time, params, jnp.ones((4, 5, 2)))


# --- statistics over a mapped axis (SyncBatchNorm) -------------------------------------------

SHARDS = "shards"


def over_shards(function, mapping, shards, *arrays):
    """function(*slices) on `shards` equal slices of each array's batch axis, under
    `jax.vmap` or `jax.shard_map` over as many CPU devices, both naming the axis SHARDS and
    jitted. Returns function's outputs with the slices' results put back together."""
    if mapping == "vmap":
        split = [a.reshape((shards, a.shape[0] // shards) + a.shape[1:]) for a in arrays]
        outputs = jax.jit(jax.vmap(function, axis_name=SHARDS))(*split)
        return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), outputs)
    mesh = jax.make_mesh((shards,), (SHARDS,), devices=jax.devices()[:shards],
                         axis_types=(jax.sharding.AxisType.Auto,))
    mapped = jax.shard_map(function, mesh=mesh, in_specs=jax.sharding.PartitionSpec(SHARDS),
                           out_specs=jax.sharding.PartitionSpec(SHARDS), check_vma=False)
    return jax.jit(mapped)(*arrays)


@pytest.mark.parametrize("mapping, shards, shape", [
    ("vmap", 3, (6, 4)), ("vmap", 3, (3, 4)), ("vmap", 2, (4, 2, 3, 5)),
    ("shard_map", 2, (6, 4)), ("shard_map", 2, (4, 2, 3, 5))])
def test_synchronised_statistics_give_the_whole_batchs_passes(mapping, shards, shape, dtype):
    """BatchNorm(axis_name=...) on each shard, given its slice of the whole batch's dy and
    d2y, returns its slice of y, dx and d2x of the whole batch under plain BatchNorm (jax's
    output, jax.vjp, and the squared whole-batch jax.jacobian against d2y), and dg, db, d2g,
    d2b summed over the shards are the whole batch's (d2g and d2b from xhat written out in
    NumPy). (3, 4) over 3 shards leaves one value per feature on each: fine, 3 in all."""
    layer, params, x = random_batch_norm(shape, dtype, seed=5)
    synchronised = BatchNorm(shape[-1], axis_name=SHARDS)
    dy = jax.random.normal(jax.random.key(6), shape, dtype)
    d2y = jax.random.uniform(jax.random.key(7), shape, dtype)

    def each_shard(x, dy, d2y):
        y, residuals = synchronised.forward(params, x)
        dparams, dx = synchronised.backward(params, residuals, dy)
        d2params, d2x = synchronised.curvature(params, residuals, d2y)
        # each shard returns the sums over all shards, so the outputs share one layout
        totals = jax.tree.map(lambda a: jax.lax.psum(a, SHARDS)[None], (dparams, d2params))
        return y, dx, d2x, totals

    y, dx, d2x, (dparams, d2params) = over_shards(each_shard, mapping, shards, x, dy, d2y)
    dparams, d2params = jax.tree.map(lambda a: a[0], (dparams, d2params))

    @jax.jit
    def whole_batch(params, x, dy, d2y):
        """Plain BatchNorm on the whole batch: y, jax.vjp's (dparams, dx), and d2x from its
        squared jax.jacobian (in float64) against d2y."""
        expected_y, pullback = jax.vjp(layer.apply, params, x)
        local = gradcheck.astype(params, jnp.float64), x.astype(jnp.float64)
        jacobian = jax.jacobian(lambda x: layer.apply(local[0], x))(local[1])
        jacobian = jacobian.reshape(x.size, x.size)
        expected_d2x = ((jacobian**2).T @ d2y.astype(jnp.float64).reshape(-1)).reshape(shape)
        return expected_y, pullback(dy), expected_d2x

    expected_y, (expected_dparams, expected_dx), expected_d2x = whole_batch(params, x, dy, d2y)
    assert_close_tree((y, dparams, dx), (expected_y, expected_dparams, expected_dx), dtype,
                      f"{mapping}{shape} y, dparams, dx")
    xs = np.asarray(x, np.float64).reshape(-1, shape[-1])
    xhat = (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5)
    d2ys = np.asarray(d2y, np.float64).reshape(-1, shape[-1])
    expected_d2params = {"g": (d2ys * xhat**2).sum(0), "b": d2ys.sum(0)}
    assert_close_tree((d2x, d2params), (expected_d2x.astype(dtype), gradcheck.astype(
        expected_d2params, dtype)), dtype, f"{mapping}{shape} d2x, d2params")


def test_synchronised_statistics_outside_a_mapping_are_the_batchs_own():
    """Where no mapping binds the axis (one device, "jit", with_population_statistics) the
    batch is whole: the layer is plain BatchNorm, bit for bit. A name that is not a str is a
    ValueError."""
    layer, params, x = random_batch_norm((5, 3), jnp.float64)
    synchronised = BatchNorm(3, axis_name=SHARDS)
    dy = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
    def passes(norm):
        residuals = norm.forward(params, x)[1]
        return (norm.apply(params, x), norm.backward(params, residuals, dy),
                norm.curvature(params, residuals, dy * dy))

    for ours, plain in zip(*(jax.tree.leaves(passes(norm)) for norm in (synchronised, layer))):
        np.testing.assert_array_equal(ours, plain)
    with pytest.raises(ValueError, match=r"bn: axis_name must be the name \(a str\) of a "
                                         r"mapped axis or None, got \('a', 'b'\)"):
        BatchNorm(3, name="bn", axis_name=("a", "b"))
    assert nets.batch_coupled_layers(nets.serial(synchronised)) == ["BatchNorm"]
