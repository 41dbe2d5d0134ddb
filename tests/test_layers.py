"""Each layer's hand-written backward against jax.vjp of its forward, on random shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import gradcheck, initializers, layers
from tests.helpers import F64, assert_close_tree, backward_and_vjp

SHAPES = [(1, 1, 1), (3, 5, 2), (17, 8, 13), (64, 33, 10)]  # (batch, in, out)


def output_shape_of(layer, params, x):
    """The shape of layer.apply(params, x), traced only (nothing run)."""
    return jax.eval_shape(layer.apply, params, x).shape


@pytest.mark.parametrize("batch,features_in,features_out", SHAPES)
def test_dense_backward_matches_vjp(batch, features_in, features_out, dtype):
    layer = layers.Dense(features_out)
    keys = jax.random.split(jax.random.key(batch * 100 + features_in), 3)
    _, params = layer.init(keys[0], (-1, features_in))
    params = gradcheck.astype(params, dtype)
    params["b"] = jax.random.normal(keys[2], params["b"].shape, dtype)
    x = jax.random.normal(keys[1], (batch, features_in), dtype)
    dy = jax.random.normal(keys[2], output_shape_of(layer, params, x), dtype)
    manual, reference = backward_and_vjp(layer, params, x, dy)
    assert_close_tree(manual, reference, dtype, "Dense")


ACTIVATION_LAYERS = [layers.Sigmoid, layers.Tanh, layers.Relu, layers.Identity,
                     lambda: layers.LeakyRelu(0.2), layers.Elu, lambda: layers.Elu(0.5),
                     layers.Softplus, layers.Silu, layers.Gelu,
                     lambda: layers.Gelu(approximate=True)]


@pytest.mark.parametrize("make_layer", ACTIVATION_LAYERS)
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (32, 50)])
def test_activation_backward_matches_vjp(make_layer, shape, dtype):
    layer = make_layer()
    x_key, dy_key = jax.random.split(jax.random.key(shape[1]))
    x = 3 * jax.random.normal(x_key, shape, dtype)
    dy = jax.random.normal(dy_key, output_shape_of(layer, (), x), dtype)
    (dparams, dx), (_, reference) = backward_and_vjp(layer, (), x, dy)
    assert dparams == ()
    assert_close_tree(dx, reference, dtype, layer.name)


@pytest.mark.parametrize("make_layer", ACTIVATION_LAYERS)
def test_activation_backward_at_kinks_and_far_out_matches_vjp(make_layer):
    """x = 0 exactly (ReLU's and LeakyRelu's kink, where jax takes 0 and 1; ELU's joint),
    tiny and large |x| (softplus's -expm1(-y), GELU's tails), float64."""
    layer = make_layer()
    x = jnp.array([[-40.0, -8.0, -1e-3, -1e-12, 0.0, 1e-12, 1e-3, 8.0, 40.0]], jnp.float64)
    dy = jnp.linspace(0.5, 1.5, x.shape[1], dtype=jnp.float64)[None]
    (_, dx), (_, reference) = backward_and_vjp(layer, (), x, dy)
    np.testing.assert_allclose(dx, reference, rtol=F64, atol=0, err_msg=layer.name)


def test_new_activations_by_hand():
    """Values and derivatives worked out by hand: Phi(1) = 0.8413447460685429 and
    phi(1) = 0.24197072451914337, so GELU(1) = Phi(1) and GELU'(1) = Phi(1) + phi(1);
    sigmoid(1) = 0.7310585786300049, so SiLU'(1) = s (2 - s) and SiLU'(-1) = (1 - s)^2; at 0
    GELU', SiLU' and softplus' are 1/2, ELU' is alpha (jax's lower branch) and LeakyRelu' 1;
    ELU'(-1) = alpha e^-1; LeakyRelu'(-2) = the slope. Phi(-2) = 0.022750131948179195,
    phi(2) = 0.05399096651318806, sigmoid(-2) = 0.11920292202211755."""
    point = jnp.array([[1.0, 0.0, -1.0, -2.0]], jnp.float64)
    cdf, density, s = 0.8413447460685429, 0.24197072451914337, 0.7310585786300049
    expected = {  # layer: (y, dy/dx) at the four points
        layers.Gelu(): ([cdf, 0, -(1 - cdf), -2 * 0.022750131948179195],
                        [cdf + density, 0.5, (1 - cdf) - density,
                         0.022750131948179195 - 2 * 0.05399096651318806]),
        layers.Silu(): ([s, 0, -(1 - s), -2 * 0.11920292202211755],
                        [s * (2 - s), 0.5, (1 - s) ** 2,
                         0.11920292202211755 * (1 - 2 * (1 - 0.11920292202211755))]),
        layers.Softplus(): ([np.log1p(np.e), np.log(2), np.log1p(np.exp(-1)),
                             np.log1p(np.exp(-2))],
                            [s, 0.5, 1 - s, 0.11920292202211755]),
        layers.Elu(2.0): ([1, 0, 2 * (np.exp(-1) - 1), 2 * (np.exp(-2) - 1)],
                          [1, 2, 2 * np.exp(-1), 2 * np.exp(-2)]),
        layers.LeakyRelu(0.1): ([1, 0, -0.1, -0.2], [1, 1, 0.1, 0.1]),
    }
    for layer, (value, slope) in expected.items():
        y, residuals = layer.forward((), point)
        _, dx = layer.backward((), residuals, jnp.ones_like(point))
        np.testing.assert_allclose(y[0], value, rtol=1e-14, atol=1e-16, err_msg=layer.name)
        np.testing.assert_allclose(dx[0], slope, rtol=1e-14, atol=1e-16, err_msg=layer.name)


def mish_slope(x):
    """d/dx x tanh(softplus(x)) = t + x (1 - t^2) sigmoid(x), t = tanh(softplus(x))."""
    t = jnp.tanh(jax.nn.softplus(x))
    return t + x * (1 - t * t) * jax.nn.sigmoid(x)


def x_curvature_and_squared_jacobian(layer, x, d2y):
    """A parameter-free layer's d2x from its forward's residuals, and sum_j (dy_j/dx_i)^2 d2y_j
    with jax.jacobian's dy/dx (the exact Gauss-Newton diagonal), compiled as one program."""

    @jax.jit
    def run(x, d2y):
        _, residuals = layer.forward((), x)
        jacobian = jax.jacobian(layer.apply, argnums=1)((), x)
        return layer.curvature((), residuals, d2y)[1], jnp.tensordot(d2y, jacobian**2, axes=2)

    return run(x, d2y)


def test_an_activation_of_ones_own_from_elementwise(dtype):
    """Mish (Misra 2019) built with nets.elementwise from its slope worked out by hand, kept
    input: backward against jax.vjp, curvature against jax.jacobian squared (float64)."""
    mish = layers.elementwise(lambda x: x * jnp.tanh(jax.nn.softplus(x)), mish_slope,
                              of="input", name="mish")
    x = 3 * jax.random.normal(jax.random.key(0), (6, 9), dtype)
    y, kept = mish.forward((), x)
    assert kept is x
    dy = jax.random.normal(jax.random.key(1), y.shape, dtype)
    (_, dx), (_, reference) = backward_and_vjp(mish, (), x, dy)
    assert_close_tree(dx, reference, dtype, "mish")
    if dtype == "float64":
        d2y = jax.random.uniform(jax.random.key(2), y.shape, jnp.float64)
        d2x, expected = x_curvature_and_squared_jacobian(mish, x, d2y)
        np.testing.assert_allclose(d2x, expected, rtol=F64)
    with pytest.raises(ValueError, match="mish: of must be 'output' or 'input', got 'x'"):
        layers.elementwise(jnp.tanh, mish_slope, of="x", name="mish")


@pytest.mark.parametrize("make_layer, argument", [
    (lambda: layers.LeakyRelu(0.0, name="act"), "negative_slope"),
    (lambda: layers.LeakyRelu(-0.1, name="act"), "negative_slope"),
    (lambda: layers.Elu(0.0, name="act"), "alpha"),
    (lambda: layers.Elu(float("nan"), name="act"), "alpha"),
])
def test_activation_parameters_out_of_range_are_refused(make_layer, argument):
    with pytest.raises(ValueError, match=f"act: {argument} must be a finite number > 0"):
        make_layer()


def test_gelu_refuses_a_form_that_is_not_a_bool():
    """"tanh" would be truthy and silently pick the approximate form."""
    with pytest.raises(ValueError, match="act: approximate must be True or False, got 'tanh'"):
        layers.Gelu(approximate="tanh", name="act")


def test_sigmoid_backward_is_the_lectures_derivative():
    """dx = dy * s (1 - s), checked against a hand-computed value at x = 0 (s = 1/2)."""
    layer = layers.Sigmoid()
    y, residuals = layer.forward((), jnp.zeros((1, 3), jnp.float64))
    _, dx = layer.backward((), residuals, jnp.ones((1, 3), jnp.float64))
    np.testing.assert_allclose(y, 0.5)
    np.testing.assert_allclose(dx, 0.25)


def test_serial_backward_matches_vjp_and_runs_right_to_left(dtype):
    model = layers.serial(layers.Dense(6, name="a"), layers.Tanh(name="t"),
                          layers.Dense(4, name="b"), layers.Sigmoid(name="s"))
    output_shape, params = model.init(jax.random.key(0), (-1, 5))
    assert output_shape == (-1, 4)
    params = gradcheck.astype(params, dtype)
    x = jax.random.normal(jax.random.key(1), (9, 5), dtype)
    dy = jax.random.normal(jax.random.key(2), output_shape_of(model, params, x), dtype)
    manual, reference = backward_and_vjp(model, params, x, dy)
    assert_close_tree(manual, reference, dtype, "serial")


def test_serial_of_serials_equals_flat_serial():
    inner = layers.serial(layers.Dense(3, name="a"), layers.Relu(name="r"))
    nested = layers.serial(inner, layers.Dense(2, name="b"))
    flat = layers.serial(layers.Dense(3, name="a"), layers.Relu(name="r"),
                         layers.Dense(2, name="b"))
    _, nested_params = nested.init(jax.random.key(0), (-1, 4))
    flat_params = (nested_params[0][0], nested_params[0][1], nested_params[1])
    x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float32)
    np.testing.assert_array_equal(nested.apply(nested_params, x), flat.apply(flat_params, x))


def test_dense_init_shapes_dtype_and_fan_in_bounds():
    output_shape, params = layers.Dense(300).init(jax.random.key(0), (-1, 25))
    assert output_shape == (-1, 300)
    assert params["w"].shape == (25, 300) and params["b"].shape == (300,)
    assert params["w"].dtype == jnp.float32
    assert float(jnp.max(jnp.abs(params["w"]))) <= 2.4 / 5
    np.testing.assert_array_equal(params["b"], 0)


def test_initializer_statistics():
    """Sample moments against the distributions' closed forms (7,500 draws: ~2% error)."""
    key = jax.random.key(0)
    shape = (300, 25)
    uniform = initializers.fan_in_uniform()(key, shape)
    np.testing.assert_allclose(jnp.var(uniform), (2.4 / np.sqrt(300)) ** 2 / 3, rtol=0.05)
    glorot = initializers.glorot_uniform()(key, shape)
    np.testing.assert_allclose(jnp.var(glorot), 6 / 325 / 3, rtol=0.05)
    he = initializers.he_normal()(key, shape)
    np.testing.assert_allclose(jnp.std(he), np.sqrt(2 / 300), rtol=0.05)
    assert initializers.fans((5, 5, 3, 16)) == (75, 400)


@pytest.mark.parametrize("bad_shape", [(8, 4), (8,), (2, 8, 5)])
def test_dense_rejects_wrong_input_shape_naming_layer_and_shapes(bad_shape):
    layer = layers.Dense(3, name="hidden7")
    _, params = layer.init(jax.random.key(0), (-1, 5))
    with pytest.raises(ValueError, match=r"hidden7.*shape \(.*\).*expected \(batch, 5\)"):
        layer.forward(params, jnp.zeros(bad_shape))


def test_serial_rejects_wrong_params():
    model = layers.serial(layers.Dense(3), layers.Sigmoid(), name="net")
    with pytest.raises(ValueError, match="net: params must hold 2 layer entries, got 1"):
        model.forward(({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)},), jnp.zeros((1, 2)))


def test_dense_rejects_bad_sizes():
    with pytest.raises(ValueError, match="out_features must be an int >= 1, got 0"):
        layers.Dense(0)
    for not_a_count in (2.5, True, "3"):
        with pytest.raises(ValueError, match=rf"out_features must be an int >= 1, got "
                                             rf"{not_a_count!r}"):
            layers.Dense(not_a_count)
    with pytest.raises(ValueError, match="must be \\(batch, features\\)"):
        layers.Dense(3).init(jax.random.key(0), (2, 3, 4))


def test_fan_in_uniform_exponent_is_checked_and_applied():
    """U(+-2.4/F^e): with e = 1 (LeCun et al. 1989's text) the largest of 7,500 draws lies just
    under 2.4/300; a negative exponent is refused by name."""
    weights = initializers.fan_in_uniform(2.4, 1.0)(jax.random.key(1), (300, 25))
    assert 0.99 * 2.4 / 300 <= float(jnp.max(jnp.abs(weights))) <= 2.4 / 300
    with pytest.raises(ValueError, match=r"fan_in_uniform: exponent must be >= 0, got -1"):
        initializers.fan_in_uniform(2.4, -1.0)


def random_embedding(ids_shape, vocabulary=5, features=3, dtype=jnp.float64, seed=0):
    """An Embedding, its params in dtype, and ids with every token repeated somewhere."""
    layer = layers.Embedding(vocabulary, features, name="embed")
    _, params = layer.init(jax.random.key(seed), (-1, *ids_shape[1:]))
    ids = jax.random.randint(jax.random.key(seed + 1), ids_shape, 0, vocabulary)
    return layer, gradcheck.astype(params, dtype), ids


@pytest.mark.parametrize("ids_shape", [(1,), (7,), (3, 6), (2, 4, 5)])
def test_embedding_backward_matches_vjp_and_gives_ids_no_gradient(ids_shape, dtype):
    """dw, a scatter-add over repeated ids, against jax.vjp in the weights; dx is float0 zeros
    of the ids' shape (what jax.vjp gives an integer input)."""
    layer, params, ids = random_embedding(ids_shape, dtype=dtype)
    dy = jax.random.normal(jax.random.key(9), (*ids_shape, 3), dtype)

    @jax.jit
    def manual_and_references(params, ids, dy):
        """backward's (dparams, dx); jax.vjp's dparams in params alone, and its d(ids)."""
        _, residuals = layer.forward(params, ids)
        _, pullback = jax.vjp(lambda p: layer.apply(p, ids), params)
        _, pullback_both = jax.vjp(layer.apply, params, ids)
        return layer.backward(params, residuals, dy), pullback(dy)[0], pullback_both(dy)[1]

    (dparams, dx), reference, reference_dids = manual_and_references(params, ids, dy)
    assert_close_tree(dparams, reference, dtype, f"Embedding{ids_shape}")
    assert dx.shape == ids.shape and dx.dtype == jax.dtypes.float0
    assert reference_dids.dtype == jax.dtypes.float0


def test_embedding_is_the_bias_free_dense_on_one_hot_rows():
    """The forward equals one_hot(ids) @ w exactly, and the backward's dw equals the Dense
    product one_hot^T dy, in float64."""
    layer, params, ids = random_embedding((4, 6), vocabulary=7, features=5)
    one_hot = jax.nn.one_hot(ids, 7, dtype=jnp.float64)
    np.testing.assert_array_equal(layer.apply(params, ids), one_hot @ params["w"])
    dy = jax.random.normal(jax.random.key(3), (4, 6, 5), jnp.float64)
    _, residuals = layer.forward(params, ids)
    dw = layer.backward(params, residuals, dy)[0]["w"]
    expected = one_hot.reshape(-1, 7).T @ dy.reshape(-1, 5)
    np.testing.assert_allclose(dw, expected, rtol=1e-14, atol=1e-14)


def test_embedding_curvature_is_the_exact_gauss_newton_diagonal():
    """d2w against diag(J^T diag(d2y) J), J = dy/dw from jax.jacobian: exact for a lookup."""
    layer, params, ids = random_embedding((3, 4), vocabulary=4, features=2)
    d2y = jax.random.uniform(jax.random.key(5), (3, 4, 2), jnp.float64)

    @jax.jit
    def curvature_and_exact(params, ids, d2y):
        """d2w from the forward's residuals, and diag(J^T diag(d2y) J)."""
        _, residuals = layer.forward(params, ids)
        jacobian = jax.jacobian(lambda w: layer.apply({"w": w}, ids))(params["w"])
        jacobian = jacobian.reshape(24, 8)
        exact = jnp.diag(jacobian.T @ (d2y.reshape(-1)[:, None] * jacobian)).reshape(4, 2)
        return layer.curvature(params, residuals, d2y)[0]["w"], exact

    d2w, exact = curvature_and_exact(params, ids, d2y)
    np.testing.assert_allclose(d2w, exact, rtol=1e-14, atol=0)


def test_embedding_ids_out_of_range_give_nan_rows_and_no_gradient():
    """-1 and the vocabulary size are neither wrapped nor clamped: their outputs are NaN and
    they add nothing to dw; the valid positions are untouched."""
    layer, params, _ = random_embedding((1,), vocabulary=3, features=2)
    ids = jnp.array([[0, -1, 3, 2]])
    y, residuals = layer.forward(params, ids)
    assert np.all(np.isnan(y[0, 1:3])) and not np.any(np.isnan(y[0, [0, 3]]))
    np.testing.assert_array_equal(y[0, [0, 3]], params["w"][jnp.array([0, 2])])
    dw = layer.backward(params, residuals, jnp.ones((1, 4, 2), jnp.float64))[0]["w"]
    np.testing.assert_array_equal(dw, [[1, 1], [0, 0], [1, 1]])


def test_embedding_rejects_bad_sizes_and_non_integer_ids():
    with pytest.raises(ValueError, match="tok: vocabulary must be >= 1, got 0"):
        layers.Embedding(0, 4, name="tok")
    with pytest.raises(ValueError, match="tok: features must be >= 1, got 0"):
        layers.Embedding(4, 0, name="tok")
    layer = layers.Embedding(4, 2, name="tok")
    _, params = layer.init(jax.random.key(0), (-1, 3))
    with pytest.raises(ValueError, match=r"tok: input ids must be integers in \[0, 4\), got "
                                         r"dtype float32 with shape \(2, 3\)"):
        layer.apply(params, jnp.ones((2, 3), jnp.float32))


def random_rbf(batch, features, classes, dtype, seed=0):
    """An RBF layer with N(0, 1) centres (any real centres work, not only +-1) and x."""
    rng = np.random.default_rng(seed)
    layer = layers.EuclideanRBF(rng.normal(size=(classes, features)), name="rbf")
    return layer, jnp.asarray(rng.normal(size=(batch, features)), dtype)


@pytest.mark.parametrize("batch,features,classes", [(1, 1, 1), (3, 5, 2), (16, 84, 10)])
def test_euclidean_rbf_backward_matches_vjp(batch, features, classes, dtype):
    layer, x = random_rbf(batch, features, classes, dtype)
    ds = jax.random.normal(jax.random.key(features), output_shape_of(layer, (), x), dtype)
    (dparams, dx), (_, reference) = backward_and_vjp(layer, (), x, ds)
    assert dparams == () and dx.dtype == jnp.dtype(dtype)
    assert_close_tree(dx, reference, dtype, "EuclideanRBF")


def test_euclidean_rbf_scores_are_minus_squared_distances():
    """By hand: x = (1, 2), centres (1, 1) and (-1, 0): y = (0 + 1, 4 + 4) = (1, 8). And against
    the (batch, classes, features) differences in NumPy on a random problem."""
    layer = layers.EuclideanRBF(np.array([[1.0, 1.0], [-1.0, 0.0]]))
    np.testing.assert_allclose(layer.apply((), jnp.array([[1.0, 2.0]], jnp.float64)),
                               [[-1.0, -8.0]], rtol=1e-15)
    layer, x = random_rbf(7, 12, 4, jnp.float64)
    centres = np.random.default_rng(0).normal(size=(4, 12))
    expected = -((np.asarray(x)[:, None, :] - centres[None]) ** 2).sum(axis=-1)
    np.testing.assert_allclose(layer.apply((), x), expected, rtol=1e-12)
    assert layer.init(jax.random.key(0), (-1, 12)) == ((-1, 4), ())


def test_euclidean_rbf_rejects_bad_centres_and_inputs():
    with pytest.raises(ValueError, match=r"rbf: centres must be a non-empty \(classes, "
                                         r"features\) array, got shape \(84,\)"):
        layers.EuclideanRBF(np.ones(84))
    with pytest.raises(ValueError, match="rbf: centres must be finite"):
        layers.EuclideanRBF(np.full((2, 3), np.nan))
    layer = layers.EuclideanRBF(np.ones((10, 84)), name="output")
    with pytest.raises(ValueError, match=r"output: input x has shape \(2, 83\), expected "
                                         r"\(batch, 84\)"):
        layer.forward((), jnp.zeros((2, 83)))
    with pytest.raises(ValueError, match=r"output: input_shape \(-1, 4, 21\) must be"):
        layer.init(jax.random.key(0), (-1, 4, 21))


@pytest.mark.parametrize("batch", [0, 1, 2, 4, 5, 9])
def test_dense_weight_gradient_is_x_transpose_dy_at_every_batch(batch):
    """Up to OUTER_PRODUCTS_MAX_BATCH examples dw is a sum of outer products, above it one
    product: both x^T dy by NumPy (and zeros for an empty batch)."""
    rng = np.random.default_rng(batch)
    x, dy = rng.standard_normal((batch, 7)), rng.standard_normal((batch, 5))
    dw = layers.weight_gradient(jnp.asarray(x), jnp.asarray(dy))
    assert dw.shape == (7, 5)
    assert gradcheck.relative_error(dw, x.T @ dy) <= F64
