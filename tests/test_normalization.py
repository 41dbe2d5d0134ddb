"""LayerNorm: backward against jax.vjp, invariances, curvature against jax's Jacobian,
accounting and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import engines, gradcheck, layers, losses
from nets.normalization import LayerNorm
from tests.helpers import assert_close_tree, backward_and_vjp


def random_layer_norm(shape, dtype, seed=0, eps=1e-5):
    """A LayerNorm over shape's last axis with g, b away from 1, 0; x scaled and shifted."""
    keys = jax.random.split(jax.random.key(seed), 4)
    layer = LayerNorm(shape[-1], eps=eps)
    _, params = layer.init(keys[0], (-1, *shape[1:]))
    params = {"g": 1 + 0.5 * jax.random.normal(keys[1], (shape[-1],), dtype),
              "b": jax.random.normal(keys[2], (shape[-1],), dtype)}
    x = 3 + 2 * jax.random.normal(keys[3], shape, dtype)
    return layer, params, x


@pytest.mark.parametrize("shape", [(1, 1), (4, 3), (7, 16), (2, 4, 4, 6), (3, 5, 7)])
def test_backward_matches_vjp(shape, dtype):
    layer, params, x = random_layer_norm(shape, dtype)
    dy = jax.random.normal(jax.random.key(9), shape, dtype)
    manual, reference = backward_and_vjp(layer, params, x, dy)
    assert_close_tree(manual, reference, dtype, f"LayerNorm{shape}")


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
    _, residuals = layer.forward(params, x)
    _, d2x = layer.curvature(params, residuals, d2y)
    rows = x.reshape(-1, shape[-1])
    jacobians = jax.vmap(jax.jacobian(lambda row: layer.apply(params, row[None])[0]))(rows)
    expected = jnp.einsum("rji,rj->ri", jacobians**2, d2y.reshape(-1, shape[-1]))
    assert_close_tree(d2x.reshape(-1, shape[-1]), expected, jnp.float64, "d2x")


def test_curvature_of_g_and_b_is_the_exact_gauss_newton_diagonal_at_the_outputs():
    """LayerNorm as the last layer: g_j and b_j reach output j alone, so the backpropagated
    diagonal equals jax's exact Gauss-Newton diagonal."""
    model = layers.serial(layers.Dense(5, name="dense"), LayerNorm(5, name="norm"))
    _, params = model.init(jax.random.key(0), (-1, 3))
    params = gradcheck.astype(params, jnp.float64)
    params = (params[0], random_layer_norm((1, 5), jnp.float64, seed=1)[1])
    x = jax.random.normal(jax.random.key(2), (6, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(3), (6, 5), jnp.float64)
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    backpropagated = engines.curvature_diagonal(model, objective)(params, x, y)
    exact = gradcheck.gauss_newton_diagonal(model, objective, params, x, y)
    assert_close_tree(backpropagated[1], exact[1], jnp.float64, "LayerNorm g, b")


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
    params = unravel(flat + 0.3 * jax.random.normal(jax.random.key(1), flat.shape))
    x = jax.random.normal(jax.random.key(2), (10, 4))
    targets = jax.nn.one_hot(jnp.arange(10) % 3, 3)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    for dtype in (jnp.float64, jnp.float32):
        report = gradcheck.gradient_report(model, objective, params, x, targets, dtype=dtype)
        failed = [(row["layer"], row["param"]) for row in report if not row["passed"]]
        assert not failed, (jnp.dtype(dtype).name, failed)
    assert {row["layer"] for row in report} >= {"norm1", "norm2"}


def test_accounting_counts_the_gain_and_bias_but_no_neurons():
    count = nets.count_model(layers.serial(layers.Dense(5, name="d"), LayerNorm(5)), (-1, 3))
    assert (count.neurons, count.params, count.connections, count.macs) == (5, 20 + 10, 20, 15)


def test_bad_sizes_and_shapes_are_named():
    with pytest.raises(ValueError, match="norm: features must be >= 1, got 0"):
        LayerNorm(0, name="norm")
    with pytest.raises(ValueError, match="norm: eps must be > 0, got 0"):
        LayerNorm(4, eps=0, name="norm")
    layer = LayerNorm(4, name="norm")
    with pytest.raises(ValueError, match=r"norm: input_shape has shape \(-1, 5\), expected "
                                         r"\(batch, ..., 4\)"):
        layer.init(jax.random.key(0), (-1, 5))
    _, params = layer.init(jax.random.key(0), (-1, 4))
    with pytest.raises(ValueError, match=r"norm: input x has shape \(4,\), expected"):
        layer.apply(params, jnp.ones(4))
    with pytest.raises(ValueError, match=r"norm: input x has shape \(2, 3, 5\), expected"):
        layer.apply(params, jnp.ones((2, 3, 5)))
