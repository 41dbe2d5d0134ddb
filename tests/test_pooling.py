"""Pooling, subsampling, flatten, LRN and dropout: backward against jax.vjp, values by hand and
against NumPy loops, and shape errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import engines, gradcheck, layers, losses, pooling
from nets.conv import Conv2D, lenet5_c3_table
from nets.gradcheck import relative_error
from tests.helpers import F64, assert_close_tree, tolerance


def tie_free(shape, dtype, seed=0):
    """A random permutation of distinct values 0.1 k - 1 (distinct in float32 as well)."""
    rng = np.random.default_rng(seed)
    values = 0.1 * rng.permutation(int(np.prod(shape))) - 1.0
    return jnp.asarray(values.reshape(shape), dtype)


def normal(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def vjp_reference(apply, params, x, dy):
    """(dparams, dx) from jax.vjp of apply: the autodiff reference."""
    _, pullback = jax.vjp(apply, params, x)
    return pullback(dy)


def forward_and_backward(layer, params, x, dy):
    """y and the hand-written (dparams, dx) from the forward's residuals, compiled as one
    program."""

    @jax.jit
    def run(params, x, dy):
        y, residuals = layer.forward(params, x)
        return y, layer.backward(params, residuals, dy)

    return run(params, x, dy)


def forward_backward_and_curvature(layer, params, x, dy, d2y):
    """y, the hand-written (dparams, dx) for dy and (d2params, d2x) for d2y, both from the
    forward's residuals, compiled as one program."""

    @jax.jit
    def run(params, x, dy, d2y):
        y, residuals = layer.forward(params, x)
        return y, layer.backward(params, residuals, dy), layer.curvature(params, residuals, d2y)

    return run(params, x, dy, d2y)


def forward_backward_and_vjp(layer, params, x, dy, key=None):
    """y, the hand-written (dparams, dx) from the forward's residuals, and jax.vjp's (dparams,
    dx) of layer.apply, all with `key` (None: no key), compiled as one program (run op by op,
    each test compiled some hundred single operations)."""

    @jax.jit
    def run(params, x, dy, key):
        y, residuals = layers.forward_with_key(layer, params, x, key)
        reference = vjp_reference(lambda p, x: layer.apply(p, x, key), params, x, dy)
        return y, layer.backward(params, residuals, dy), reference

    return run(params, x, dy, key)


def curvature_and_squared_jacobian(layer, params, x, d2y, key):
    """The hand-written d2params from the forward's residuals with `key`, and the exact
    Gauss-Newton diagonal of the layer alone, sum (dy/dparams)^2 d2y with jax.jacobian's
    dy/dparams at the same key, compiled as one program."""

    @jax.jit
    def run(params, x, d2y, key):
        _, residuals = layer.forward(params, x, key=key)
        jacobian = jax.jacobian(lambda p: layer.apply(p, x, key))(params)
        exact = jax.tree.map(lambda j: jnp.tensordot(d2y, j ** 2, axes=2), jacobian)
        return layer.curvature(params, residuals, d2y)[0], exact

    return run(params, x, d2y, key)


def squared_output_input_gradients(apply, params, x):
    """Each example's d/dx1 sum(apply(params, x1[None])^2), jax.grad under jax.vmap, jitted."""
    return jax.jit(jax.vmap(jax.grad(lambda x1: jnp.sum(apply(params, x1[None]) ** 2))))(x)


# (layer, input shape): windows that do and do not divide H and W, overlapping 3x3 stride 2.
CASES = [
    (lambda: pooling.AvgPool(2), (2, 6, 5, 3)),
    (lambda: pooling.AvgPool((3, 2), stride=(2, 3)), (2, 8, 7, 2)),
    (lambda: pooling.MaxPool(2), (2, 6, 5, 3)),
    (lambda: pooling.MaxPool(3, stride=2), (2, 8, 7, 2)),
    (lambda: pooling.MaxPool((2, 3)), (2, 6, 7, 3)),
    (lambda: pooling.MaxPool((3, 2), stride=(2, 1)), (2, 7, 6, 2)),
    (lambda: pooling.Subsampling(2), (2, 7, 6, 3)),
    (lambda: pooling.Flatten(), (2, 3, 4, 5)),
    (lambda: pooling.LocalResponseNorm(5, k=1.0, alpha=0.3, beta=0.75), (2, 3, 2, 7)),
    (lambda: pooling.LocalResponseNorm(3, alpha=0.5, beta=1.5), (1, 2, 3, 2)),
]
CASE_IDS = ["avg2", "avg3x2_stride2x3", "max2", "max3_stride2", "max2x3", "max3x2_stride2x1",
            "subsampling", "flatten", "lrn5", "lrn3_few_channels"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_vjp(case, dtype):
    make_layer, input_shape = case
    layer = make_layer()
    output_shape, params = layer.init(jax.random.key(0), input_shape)
    if params:
        params = {"w": normal(params["w"].shape, dtype, 1),
                  "b": normal(params["b"].shape, dtype, 2)}
    x = tie_free(input_shape, dtype)
    dy = normal(jax.eval_shape(layer.apply, params, x).shape, dtype, 3)
    y, manual, reference = forward_backward_and_vjp(layer, params, x, dy)
    assert y.shape == tuple(output_shape) and y.dtype == jnp.dtype(dtype)
    assert_close_tree(manual, reference, dtype, layer.name)
    assert float(jnp.linalg.norm(manual[1])) > 0


def test_dropout_backward_matches_vjp(dtype):
    layer = pooling.Dropout(0.5)
    key = jax.random.key(7)
    x, dy = normal((4, 3, 5), dtype, 0), normal((4, 3, 5), dtype, 1)
    _, manual, reference = forward_backward_and_vjp(layer, (), x, dy, key)
    assert_close_tree(manual, reference, dtype, "Dropout")
    assert relative_error(manual[1], dy) > 0.1  # the mask did something


def image(rows):
    """(1, H, W, 1) float64 from a nested list."""
    return jnp.asarray(rows, jnp.float64)[None, :, :, None]


def test_avg_pool_by_hand():
    """x = 0..15 in a 4x4 grid; the 2x2 means are (0+1+4+5)/4 = 2.5, 4.5, 10.5, 12.5."""
    layer = pooling.AvgPool(2)
    y, (_, dx) = forward_and_backward(layer, (), image(np.arange(16.0).reshape(4, 4)),
                                      image([[4, 8], [12, 16]]))
    np.testing.assert_array_equal(y[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 1, 2, 2], [1, 1, 2, 2],
                                                   [3, 3, 4, 4], [3, 3, 4, 4]])


@pytest.mark.parametrize("window, stride, size", [
    ((2, 2), (2, 2), (7, 6)),  # tiles, the last row covered by no window (strided slices)
    ((3, 2), (3, 2), (6, 5)),  # tiles of another shape, the last column uncovered
    ((3, 2), (2, 3), (8, 7)),  # overlapping and gapped windows (XLA's reduce_window)
])
def test_window_sum_and_its_transpose_against_numpy_loops(window, stride, size):
    """s from a NumPy loop over windows, and dx = the loop's transpose: each ds added back over
    its window, 0 where no window reads."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, *size, 3))
    (kh, kw), (sh, sw) = window, stride
    out_h, out_w = (size[0] - kh) // sh + 1, (size[1] - kw) // sw + 1
    ds = rng.standard_normal((2, out_h, out_w, 3))
    expected_s, expected_dx = np.zeros_like(ds), np.zeros_like(x)
    for i in range(out_h):
        for j in range(out_w):
            rows, cols = slice(sh * i, sh * i + kh), slice(sw * j, sw * j + kw)
            expected_s[:, i, j] = x[:, rows, cols].sum(axis=(1, 2))
            expected_dx[:, rows, cols] += ds[:, i, j][:, None, None]
    s = pooling.window_sum(jnp.asarray(x), window, stride)
    dx = pooling.window_sum_transpose(jnp.asarray(ds), window, stride, size)
    assert relative_error(s, expected_s) <= F64
    assert relative_error(dx, expected_dx) <= F64


def test_max_pool_routes_gradient_only_to_the_max():
    """Overlapping 3x3 stride 2 on 5x5: the 9 at the centre is the max of all four windows."""
    x = image([[1, 0, 2, 0, 3],
               [0, 0, 0, 0, 0],
               [4, 0, 9, 0, 5],
               [0, 0, 0, 0, 0],
               [6, 0, 7, 0, 8]])
    layer = pooling.MaxPool(3, stride=2)
    y, (_, dx) = forward_and_backward(layer, (), x, image([[1, 2], [3, 4]]))
    np.testing.assert_array_equal(y[0, :, :, 0], [[9, 9], [9, 9]])
    expected = np.zeros((5, 5))
    expected[2, 2] = 1 + 2 + 3 + 4
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)
    # Non-overlapping 2x2 on 4x5: each dy goes to its window's max; the last column is unused.
    x = image([[1, 5, 0, 2, 9], [3, 2, 7, 1, 9], [0, 0, 1, 2, 9], [8, 1, 3, 4, 9]])
    y, (_, dx) = forward_and_backward(pooling.MaxPool(2), (), x, image([[10, 20], [30, 40]]))
    np.testing.assert_array_equal(y[0, :, :, 0], [[5, 7], [8, 4]])
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 10, 0, 0, 0], [0, 0, 20, 0, 0],
                                                   [0, 0, 0, 0, 0], [30, 0, 0, 40, 0]])


def test_max_pool_splits_a_tie_evenly_by_hand():
    """2x2 windows of [[3, 3], [1, 3]] (three maxima), [[0, 0], [0, 0]] (four) and a single
    max: dy = 12 gives 4 to each of the three 3s, 3 to each zero, 12 to the lone max."""
    x = image([[3, 3, 0, 0, 5, 1],
               [1, 3, 0, 0, 2, 4]])
    layer = pooling.MaxPool(2)
    twelves = image([[12, 12, 12]])
    y, (_, dx), (_, d2x) = forward_backward_and_curvature(layer, (), x, twelves, twelves)
    np.testing.assert_array_equal(y[0, :, :, 0], [[3, 0, 5]])
    np.testing.assert_array_equal(dx[0, :, :, 0], [[4, 4, 3, 3, 12, 0],
                                                  [0, 4, 3, 3, 0, 0]])
    # the Gauss-Newton diagonal squares the Jacobian's 1/k: 12/9, 12/16, 12
    np.testing.assert_allclose(d2x[0, :, :, 0], [[12 / 9, 12 / 9, 0.75, 0.75, 12, 0],
                                                 [0, 12 / 9, 0.75, 0.75, 0, 0]], rtol=1e-15)


def test_max_pool_with_a_nan_gives_nan_and_routes_the_rest_as_before():
    """The window holding the NaN outputs NaN and passes its dy to no input (documented in
    MaxPool); the other window is unaffected."""
    x = image([[1.0, 2.0, 3.0, 4.0], [5.0, np.nan, 7.0, 8.0]])
    y, (_, dx) = forward_and_backward(pooling.MaxPool(2), (), x, image([[1.0, 1.0]]))
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 1, 0] == 8.0
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 0, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize("window,stride", [((2, 2), (2, 2)), ((3, 3), (2, 2)),
                                           ((2, 3), (2, 3)), ((3, 2), (2, 1))])
def test_max_pool_backward_matches_vjp_with_ties(window, stride, dtype):
    """Inputs of a ReLU layer (many zeros) with repeated positive values: every window that
    ties, overlapping or not, square or not, against jax.vjp (which splits ties evenly as
    well)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.integers(-3, 3, (2, 9, 8, 3)), 0), dtype)
    layer = pooling.MaxPool(window, stride)
    dy = normal(jax.eval_shape(layer.apply, (), x).shape, dtype, 1)
    y, manual, reference = forward_backward_and_vjp(layer, (), x, dy)
    assert_close_tree(manual, reference, dtype, "MaxPool")
    # the comparison can fail: routing each tie to its first position is far off
    winner = np.argmax(np.stack(pooling._window_views(
        np.asarray(x), window, stride, y.shape[1:3])), axis=0)
    first_only = np.zeros(x.shape)
    (kh, kw), (sh, sw) = window, stride
    for offset in range(kh * kw):
        a, b = divmod(offset, kw)
        sliced = first_only[:, a:a + (y.shape[1] - 1) * sh + 1:sh,
                            b:b + (y.shape[2] - 1) * sw + 1:sw]
        sliced += np.where(winner == offset, np.asarray(dy), 0.0)
    assert relative_error(first_only, manual[1]) > 0.1


def test_subsampling_by_hand():
    """x = 0..15 in a 4x4 grid, w = 0.5, b = 1: window sums 10, 18, 42, 50 -> 6, 10, 22, 26.

    With dy = 1: dw = 10 + 18 + 42 + 50 = 120, db = 4, dx = w = 0.5 everywhere.
    """
    layer = pooling.Subsampling(2)
    output_shape, params = layer.init(jax.random.key(0), (-1, 4, 4, 1))
    assert output_shape == (-1, 2, 2, 1) and params["w"].shape == params["b"].shape == (1,)
    assert float(jnp.abs(params["w"][0])) <= 2.4 / 2  # fan-in 4
    params = {"w": jnp.asarray([0.5], jnp.float64), "b": jnp.asarray([1.0], jnp.float64)}
    y, (dparams, dx) = forward_and_backward(layer, params, image(np.arange(16.0).reshape(4, 4)),
                                            jnp.ones((1, 2, 2, 1), jnp.float64))
    np.testing.assert_array_equal(y[0, :, :, 0], [[6, 10], [22, 26]])
    np.testing.assert_array_equal(dparams["w"], [120])
    np.testing.assert_array_equal(dparams["b"], [4])
    np.testing.assert_array_equal(dx, 0.5)


def test_lrn_against_numpy_loop():
    """AlexNet's formula, one channel at a time, with the window cut at the edges."""
    size, k, alpha, beta = 5, 2.0, 0.05, 0.75
    x = normal((2, 3, 2, 9), jnp.float64, 4)
    y = pooling.LocalResponseNorm(size, k, alpha, beta).apply((), x)
    xs = np.asarray(x)
    expected = np.empty_like(xs)
    channels = xs.shape[-1]
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels - 1, c + size // 2)
        total = np.sum(xs[..., lo:hi + 1] ** 2, axis=-1)
        expected[..., c] = xs[..., c] / (k + alpha * total) ** beta
    assert relative_error(y, expected) <= F64
    assert relative_error(y, xs / k**beta) > 1e-3  # the neighbours matter


def test_flatten_is_row_major_with_channels_fastest():
    x = jnp.arange(24.0).reshape(2, 2, 3, 2)
    layer = pooling.Flatten()
    assert layer.init(None, (-1, 2, 3, 2))[0] == (-1, 12)
    y, residuals = layer.forward((), x)
    np.testing.assert_array_equal(y[1], np.arange(12.0, 24.0))
    np.testing.assert_array_equal(layer.backward((), residuals, y)[1], x)


def test_dropout_identity_without_key_and_inside_serial():
    layer = pooling.Dropout(0.5)
    x = normal((3, 4), jnp.float64, 0)
    y, residuals = layer.forward((), x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(layer.backward((), residuals, 2 * x)[1], 2 * x)
    model = layers.serial(layers.Identity(), layer)
    np.testing.assert_array_equal(model.apply(((), ()), x), x)


def test_dropout_keeps_a_fraction_and_scales():
    rate = 0.25
    x = jnp.ones((50, 40), jnp.float64)
    y, scale = pooling.Dropout(rate).forward((), x, key=jax.random.key(3))
    kept = np.asarray(y) != 0
    np.testing.assert_array_equal(np.asarray(y)[kept], 1 / (1 - rate))
    # 2000 Bernoulli(0.75) draws: the standard deviation of the mean is about 0.01.
    assert abs(kept.mean() - (1 - rate)) < 0.04
    _, dx = pooling.Dropout(rate).backward((), scale, x)
    np.testing.assert_array_equal(dx, y)  # the same mask


def dropout_mlp():
    """5 -> 7 (ReLU, dropout 0.5) -> 6 (tanh, dropout 0.3) -> 3, in one `serial`."""
    return layers.serial(
        layers.Dense(7, name="h1"), layers.Relu(name="r1"), pooling.Dropout(0.5, name="d1"),
        layers.Dense(6, name="h2"), layers.Tanh(name="t2"), pooling.Dropout(0.3, name="d2"),
        layers.Dense(3, name="out"))


def values_and_gradients(model, objective, params, x, targets, key=None):
    """{engine name: (E, gradient)} of engines.autodiff, manual and manual_vjp, all with `key`
    (None: at inference), compiled as one program."""

    @jax.jit
    def run(params, x, targets, key):
        return {engine.__name__: engine(model, objective)(params, x, targets, key)
                for engine in (engines.autodiff, engines.manual, engines.manual_vjp)}

    return run(params, x, targets, key)


def dropout_problem(dtype):
    model = dropout_mlp()
    params = gradcheck.astype(model.init(jax.random.key(0), (-1, 5))[1], dtype)
    x = normal((4, 5), dtype, 1)
    targets = jax.nn.one_hot(jnp.array([0, 1, 2, 1]), 3, dtype=dtype)
    return model, params, x, targets, losses.Objective(losses.softmax_cross_entropy(), 0.1)


def test_dropout_mask_of_a_key_is_the_same_in_every_dtype_and_x64_mode():
    """A gradient check compares float32 and float64 runs of the same masks."""
    layer, key = pooling.Dropout(0.5), jax.random.key(4)
    masks = [layer.forward((), jnp.ones((6, 50), dtype), key=key)[1] != 0
             for dtype in (jnp.float64, jnp.float32, jnp.bfloat16)]
    with jax.enable_x64(False):
        masks.append(layer.forward((), jnp.ones((6, 50), jnp.float32), key=key)[1] != 0)
    for mask in masks[1:]:
        np.testing.assert_array_equal(mask, masks[0])


def test_serial_gives_each_dropout_its_own_mask_from_the_key():
    model = layers.serial(pooling.Dropout(0.5, name="a"), pooling.Dropout(0.5, name="b"))
    assert model.stochastic and not layers.serial(layers.Relu()).stochastic
    ones = jnp.ones((8, 64), jnp.float64)
    _, (first, second) = model.forward(((), ()), ones, key=jax.random.key(1))
    assert not np.array_equal(first, second)
    _, (again, _) = model.forward(((), ()), ones, key=jax.random.key(1))
    np.testing.assert_array_equal(again, first)
    _, (other, _) = model.forward(((), ()), ones, key=jax.random.key(2))
    assert not np.array_equal(other, first)
    # y = x * m1/p * m2/p: every entry is 0 or 4
    y = model.apply(((), ()), ones, jax.random.key(1))
    assert set(np.unique(np.asarray(y))) <= {0.0, 4.0}


def test_a_key_for_a_model_without_dropout_is_an_error():
    model = layers.serial(layers.Dense(3, name="hidden"), layers.Relu(), name="mlp")
    _, params = model.init(jax.random.key(0), (-1, 2))
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    for engine in (engines.manual, engines.autodiff, engines.manual_vjp):
        with pytest.raises(ValueError, match="mlp: a key was given, but no layer in it draws"):
            engine(model, objective)(params, jnp.ones((1, 2)), jnp.ones((1, 3)),
                                     jax.random.key(0))


def test_engines_agree_with_dropout_active(dtype):
    """With a key, the three engines hold the same masks: manual and manual_vjp against
    jax.grad at the tolerance of dtype, and E differs from E at inference (no key)."""
    model, params, x, targets, objective = dropout_problem(dtype)
    key = jax.random.key(7)
    results = values_and_gradients(model, objective, params, x, targets, key)
    reference_value, reference = results["autodiff"]
    for engine in (engines.manual, engines.manual_vjp):
        value, grads = results[engine.__name__]
        assert relative_error(value, reference_value) <= tolerance(dtype)
        assert_close_tree(grads, reference, dtype, engine.__name__)
    inference_value, _ = jax.jit(engines.autodiff(model, objective))(params, x, targets)
    assert abs(float(inference_value) - float(reference_value)) > 1e-3


def test_dropped_units_get_no_gradient_on_their_incoming_weights():
    """By hand: a unit dropped in every example passes nothing on, so dE/dw of the weights
    into it is zero (here only the L2 term's (lambda/m) w remains: lambda = 0), while kept
    units' weights get a gradient."""
    model, params, _, _, _ = dropout_problem(jnp.float64)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    x = normal((1, 5), jnp.float64, 3)
    targets = jnp.array([[0.0, 1.0, 0.0]], jnp.float64)
    key = jax.random.key(11)

    @jax.jit
    def residuals_and_gradient(params, x, targets, key):
        """The forward's residuals and the manual engine's gradient, both with key."""
        return (model.forward(params, x, key=key)[1],
                engines.manual(model, objective)(params, x, targets, key)[1])

    residuals, grads = residuals_and_gradient(params, x, targets, key)
    kept = np.asarray(residuals[2])[0] != 0  # d1's scale m/p, one example
    assert 0 < kept.sum() < kept.size
    dw = np.asarray(grads[0]["w"])
    np.testing.assert_array_equal(dw[:, ~kept], 0.0)
    active = (np.asarray(residuals[1])[0] > 0) & kept  # ReLU on and kept
    assert np.all(np.abs(dw[:, active]).sum(axis=0) > 0)


def test_gradient_report_with_a_key_passes_finite_differences():
    model, params, x, targets, objective = dropout_problem(jnp.float64)
    rows = gradcheck.gradient_report(model, objective, params, x, targets, jnp.float64,
                                     key=jax.random.key(7))
    assert rows and all(row["passed"] for row in rows)
    assert max(row["rel_err_vs_finite_diff"] for row in rows) < 1e-6


@pytest.mark.parametrize("make_layer,minimum", [
    (lambda: pooling.AvgPool(3, name="pool1"), 3),
    (lambda: pooling.MaxPool(3, 2, name="pool1"), 3),
    (lambda: pooling.LocalResponseNorm(name="pool1"), 1),
])
def test_rejects_bad_input_shapes_naming_layer_and_shapes(make_layer, minimum):
    layer = make_layer()
    with pytest.raises(ValueError, match=rf"pool1: input x has shape \(4, 6, 6\), expected "
                                         rf"\(batch, height >= {minimum}, width >= {minimum}, "
                                         r"channels\)"):
        layer.forward((), jnp.zeros((4, 6, 6)))
    with pytest.raises(ValueError, match=r"pool1: input_shape \(-1, 6, 6\), expected"):
        layer.init(None, (-1, 6, 6))


def test_pool_and_subsampling_reject_small_or_mismatched_inputs():
    with pytest.raises(ValueError, match=r"MaxPool: input x has shape \(1, 2, 5, 1\), expected "
                                         r"\(batch, height >= 3, width >= 3, channels\)"):
        pooling.MaxPool(3).forward((), jnp.zeros((1, 2, 5, 1)))
    layer = pooling.Subsampling(2, name="S2")
    _, params = layer.init(jax.random.key(0), (-1, 28, 28, 6))
    with pytest.raises(ValueError, match=r"S2: input x has shape \(1, 28, 28, 4\), expected "
                                         r"\(batch, height >= 2, width >= 2, 6\)"):
        layer.forward(params, jnp.zeros((1, 28, 28, 4), jnp.float32))
    with pytest.raises(ValueError, match="size must be an odd int >= 1, got 4"):
        pooling.LocalResponseNorm(4)
    for arguments, message in [({"k": 0.0}, "k must be finite and > 0, got 0.0"),
                               ({"alpha": -1e-4}, "alpha must be finite and >= 0, got -0.0001"),
                               ({"beta": float("nan")}, "beta must be finite and >= 0, got nan"),
                               ({"size": 3.0}, "size must be an odd int >= 1, got 3.0")]:
        with pytest.raises(ValueError, match=f"LRN: {message}"):
            pooling.LocalResponseNorm(**arguments, name="LRN")
    with pytest.raises(ValueError, match=r"MaxPool: window must be a positive int or pair, "
                                         r"got True"):
        pooling.MaxPool(True)
    with pytest.raises(ValueError, match="rate must lie in"):
        pooling.Dropout(1.0)
    for rate in ("a", float("nan"), True):  # a raw TypeError, or nan passing as a rate
        with pytest.raises(ValueError, match=rf"drop: rate must lie in \[0, 1\), got {rate!r}"):
            pooling.Dropout(rate, name="drop")
    with pytest.raises(ValueError, match=r"MaxPool: window \(6, 6\) has 36 positions; at most 31"):
        pooling.MaxPool(6)


def test_lenet_like_stack_under_jit_manual_matches_autodiff(dtype):
    """Conv, subsampling, table, LRN, max pool, dropout and flatten in one `serial`, jitted,
    at inference and with a key: the manual engine against jax.grad, and jax.grad through the
    manual VJPs.

    Under jit the window sums must stay differentiable (a traced reduce_window init value is
    not), which the eager tests above cannot see.
    """
    model = layers.serial(
        Conv2D(6, 3, padding="SAME", pad_value=-1.0, name="C1"), layers.Tanh(name="t1"),
        pooling.Subsampling(2, name="S2"), layers.Sigmoid(name="s2"),
        Conv2D(16, 3, connection_table=lenet5_c3_table(), unshared_bias=True, name="C3"),
        layers.Relu(name="r3"), pooling.LocalResponseNorm(3, alpha=0.1, name="lrn"),
        pooling.MaxPool(2, name="pool"), pooling.Dropout(0.5, name="drop"),
        pooling.Flatten(name="flat"), layers.Dense(4, name="out"))
    output_shape, params = model.init(jax.random.key(0), (-1, 10, 10, 1))
    assert output_shape == (-1, 4)
    params = gradcheck.astype(params, dtype)
    x = normal((3, 10, 10, 1), dtype, 5)
    targets = jax.nn.one_hot(jnp.arange(3), 4, dtype=dtype)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.1)
    for key in (None, jax.random.key(8)):
        results = values_and_gradients(model, objective, params, x, targets, key)
        _, reference = results["autodiff"]
        for engine in (engines.manual, engines.manual_vjp):
            _, grads = results[engine.__name__]
            assert_close_tree(grads, reference, dtype, f"{engine.__name__}, key {key}")


@pytest.mark.parametrize("layer, kept", [
    (pooling.AvgPool(2), []),
    (pooling.Flatten(), []),
    (pooling.MaxPool(3, 2), [((2, 3, 3, 4), jnp.int32)]),  # which offsets attained the max
    (pooling.Subsampling(2), [((2, 4, 4, 4), jnp.float32)]),  # the window sums
])
def test_layers_that_need_only_the_input_shape_keep_no_copy_of_the_input(layer, kept):
    """The input's shape is kept as a StaticShape (no leaves): the residuals hold only what
    the backward reads, through jit and through jax.grad of the custom_vjp wrapper."""
    x = normal((2, 8, 8, 4), jnp.float32, 0)
    _, params = layer.init(jax.random.key(0), x.shape)
    residuals = jax.jit(layer.forward)(params, x)[1]
    assert [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(residuals)] == kept
    dy = normal(jax.eval_shape(layer.apply, params, x).shape, jnp.float32, 1)
    expected = jax.jit(lambda *args: vjp_reference(layer.apply, *args))(params, x, dy)
    assert_close_tree(jax.jit(layer.backward)(params, residuals, dy), expected, jnp.float32)
    wrapped = engines.with_manual_vjp(layer)
    per_example = squared_output_input_gradients(wrapped, params, x)
    by_jax = squared_output_input_gradients(layer.apply, params, x)
    assert_close_tree(per_example, by_jax, jnp.float32)


def test_dropout_after_keeps_the_layers_params_and_its_curvature_is_exact():
    """dropout_after(Dense): the params are the Dense layer's (same init, same pytree); with a
    key the output is the Dense output times the Dropout mask of that key, the backward
    equals jax.vjp of the wrapped apply with that key (float64), and the curvature of a
    single Dense layer is the exact Gauss-Newton diagonal, sum (dy/dw)^2 d2y, from jax's
    Jacobian with the same key (the mask enters squared)."""
    dense = layers.Dense(3, name="dense")
    wrapped = pooling.dropout_after(dense, 0.5)
    assert wrapped.stochastic and wrapped.name == "dense"
    shape, params = wrapped.init(jax.random.key(0), (-1, 4))
    assert (shape, jax.tree.structure(params)) == (
        (-1, 3), jax.tree.structure(dense.init(jax.random.key(0), (-1, 4))[1]))
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
    key = jax.random.key(2)
    y, (_, scale) = wrapped.forward(params, x, key=key)
    expected_y = dense.apply(params, x) * pooling.Dropout(0.5).forward((), jnp.ones((5, 3)),
                                                                      key=key)[0]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected_y))
    assert 0 < int(jnp.sum(scale == 0)) < scale.size
    np.testing.assert_array_equal(np.asarray(wrapped.apply(params, x)),
                                  np.asarray(dense.apply(params, x)))

    dy = jax.random.normal(jax.random.key(3), (5, 3), jnp.float64)
    _, manual, reference = forward_backward_and_vjp(wrapped, params, x, dy, key)
    assert_close_tree(manual, reference, jnp.float64, "dropout_after")

    d2y = jax.random.uniform(jax.random.key(4), (5, 3), jnp.float64)
    curvature, exact = curvature_and_squared_jacobian(wrapped, params, x, d2y, key)
    assert_close_tree(curvature, exact, jnp.float64, "dropout_after curvature")


def test_dropout_after_a_stochastic_layer_draws_two_independent_masks():
    """dropout_after(dropout_after(Identity, 1/2), 1/2) on ones: a unit survives both masks
    with probability 1/4, and the survivors are 1 / (1/2)^2 = 4. Were the outer mask drawn
    with the inner layer's key, the two masks would be equal and half would survive. The
    backward of the pair equals jax.vjp of the apply with the same key (float64)."""
    twice = pooling.dropout_after(pooling.dropout_after(layers.Identity(name="inner"), 0.5),
                                  0.5, name="outer")
    x = jnp.ones((64, 32), jnp.float64)
    key = jax.random.key(5)
    y, residuals = twice.forward((), x, key=key)
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 4.0}
    survivors = float(jnp.mean(y == 4.0))
    assert 0.2 < survivors < 0.3, survivors  # 2,048 units: 0.25 +- 0.0096 (one sd)

    dy = jax.random.normal(jax.random.key(6), x.shape, jnp.float64)
    _, manual_dx = twice.backward((), residuals, dy)
    _, pullback = jax.vjp(lambda x: twice.apply((), x, key), x)
    assert relative_error(manual_dx, pullback(dy)[0]) <= F64
