"""Bad arguments refused with an error that names the layer (or function), the argument and
the value: the checks no other test reached (found with a coverage run of the suite)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import engines, gradcheck, initializers
from nets.autoencoder import autoencoder, stack_encoders
from nets.engines import curvature_diagonal
from nets.losses import Loss
from training import augment, data, optim, procedures

KEY = jax.random.key(0)


def plain_squared_error() -> Loss:
    """A loss with a value and a gradient but no curvature, as a user might write one."""
    return Loss("plain_squared_error", lambda o, t: 0.5 * jnp.sum((o - t) ** 2),
                lambda o, t: o - t, None)


TINY = (nets.serial(nets.Dense(2, name="out"), name="tiny"),
        nets.Objective(nets.mean_squared_error(), 0.0))
TINY_PARAMS = TINY[0].init(KEY, (8, 3))[1]
TINY_DATA = (jnp.ones((8, 3), jnp.float32), jnp.zeros((8, 2), jnp.float32))
TWO_LAYERS = nets.serial(nets.Dense(4, name="a"), nets.Tanh(name="act"),
                         nets.Dense(2, name="b"), name="two")
TWO_LAYERS_PARAMS = TWO_LAYERS.init(KEY, (8, 3))[1]

REFUSED = {
    "Embedding init without a batch axis": (
        lambda: nets.Embedding(10, 4, name="embed").init(KEY, ()),
        ValueError, "embed: input_shape () must be (batch, ...)"),
    "serial of nothing": (
        lambda: nets.serial(name="empty"), ValueError, "empty: needs at least one layer"),
    "channel_groups with no groups": (
        lambda: nets.channel_groups(nets.Tanh(), 0, name="grouped"),
        ValueError, "grouped: groups must be >= 1, got 0"),
    "channel_groups init over channels that do not split": (
        lambda: nets.channel_groups(nets.Tanh(), 2, name="grouped").init(KEY, (4, 5)),
        ValueError, "grouped: input_shape (4, 5), expected a last axis divisible by 2 groups"),
    "Flatten init of a batch axis alone": (
        lambda: nets.Flatten(name="flat").init(KEY, (8,)),
        ValueError, "flat: input_shape (8,), expected (batch, ...) with known sizes"),
    "Flatten init with an empty axis": (
        lambda: nets.Flatten(name="flat").init(KEY, (8, 0, 3)),
        ValueError, "flat: input_shape (8, 0, 3), expected (batch, ...)"),
    "Flatten of a vector": (
        lambda: nets.Flatten(name="flat").forward((), jnp.zeros(5)),
        ValueError, "flat: input x has shape (5,), expected (batch, ...)"),
    "PositionalEmbedding without positions": (
        lambda: nets.PositionalEmbedding(0, 8, name="positions"),
        ValueError, "positions: context must be >= 1, got 0"),
    "PositionalEmbedding without features": (
        lambda: nets.PositionalEmbedding(16, 0, name="positions"),
        ValueError, "positions: features must be >= 1, got 0"),
    "transformer_lm without a vocabulary": (
        lambda: nets.transformer_lm(0, 16, name="lm"),
        ValueError, "lm: vocabulary must be >= 1, got 0"),
    "transformer_lm with fewer than no blocks": (
        lambda: nets.transformer_lm(27, 16, blocks=-1, name="lm"),
        ValueError, "lm: blocks must be >= 0, got -1"),
    "mlp without inputs": (
        lambda: nets.build_mlp(0, 10), ValueError, "mlp: input_dim must be >= 1, got 0"),
    "mlp without classes": (
        lambda: nets.build_mlp(64, 0), ValueError, "mlp: num_classes must be >= 1, got 0"),
    "autoencoder without a code": (
        lambda: autoencoder(64, 0), ValueError,
        "autoencoder: input_dim (64) and hidden_units (0) must be >= 1"),
    "LeCun's diagonal for a loss without curvature": (
        lambda: curvature_diagonal(nets.serial(nets.Dense(3), name="net"),
                                   nets.Objective(plain_squared_error(), 0.0)),
        ValueError, "plain_squared_error: this loss defines no curvature"),
    "random_shifts by a negative amount": (
        lambda: augment.random_shifts(-1, -1.0), ValueError,
        "random_shifts: max_shift must be >= 0, got -1"),
    "one_hot of float labels": (
        lambda: data.one_hot(np.array([0.0, 1.0]), 10), ValueError,
        "labels must be a 1-d integer array, got float64 (2,)"),
    "split of images and labels of different lengths": (
        lambda: data.split(np.zeros((5, 2)), np.zeros(4, np.int64), (0.5, 0.5), seed=0),
        ValueError, "images and labels differ in length: 5 != 4"),
    "full_batch with an empty stopping window": (
        lambda: procedures.full_batch(*TINY, optim.gradient_descent(0.1), *TINY_DATA,
                                      stop_window=0).init(TINY_PARAMS, KEY),
        ValueError, "stopping rule: stop_window must be >= 1, got 0"),
    "Conv2D padded with NaN": (  # every border window's output was NaN
        lambda: nets.Conv2D(4, 3, padding="SAME", pad_value=float("nan"), name="conv"),
        ValueError, "conv: pad_value must be a finite number, got nan"),
    "Conv2D padded with a str": (
        lambda: nets.Conv2D(4, 3, padding="SAME", pad_value="-1", name="conv"),
        ValueError, "conv: pad_value must be a finite number, got '-1'"),
    "LeakyRelu of a str slope": (  # a raw TypeError of np.isfinite
        lambda: nets.LeakyRelu("a", name="act"),
        ValueError, "act: negative_slope must be a finite number > 0, got 'a'"),
    "LayerNorm of a str eps": (  # a raw TypeError of >
        lambda: nets.LayerNorm(4, eps="a", name="norm"),
        ValueError, "norm: eps must be a finite number > 0, got 'a'"),
    "LayerNorm of an infinite eps": (  # every output was its bias
        lambda: nets.LayerNorm(4, eps=float("inf"), name="norm"),
        ValueError, "norm: eps must be a finite number > 0, got inf"),
    "BatchNorm of an infinite eps": (
        lambda: nets.BatchNorm(4, eps=float("inf"), name="norm"),
        ValueError, "norm: eps must be a finite number > 0, got inf"),
    "stochastic_passes with batches larger than the data": (
        lambda: procedures.stochastic_passes(*TINY, optim.gradient_descent(0.1), *TINY_DATA,
                                             batch_size=9),
        ValueError, "stochastic_passes: batch_size must be in [1, 8], got 9"),
    "named_parameters of params for fewer layers": (  # zip cut them short silently
        lambda: list(gradcheck.named_parameters(TWO_LAYERS, TWO_LAYERS_PARAMS[:1])),
        ValueError, "two: params must hold 3 layer entries, got 1"),
    "parameter of params for more layers": (
        lambda: gradcheck.parameter(TWO_LAYERS, TWO_LAYERS_PARAMS + ({},), "a", "w"),
        ValueError, "two: params must hold 3 layer entries, got 4"),
    "sigmoid_cross_entropy from_logits of a str": (  # "no" was read as true
        lambda: nets.sigmoid_cross_entropy(from_logits="no"),
        ValueError, "sigmoid_cross_entropy: from_logits must be True or False, got 'no'"),
    "lecun1998_map of a str j": (  # a raw TypeError of >
        lambda: nets.lecun1998_map(j="a"),
        ValueError, "lecun1998_map: j must be > 0, got 'a'"),
    "mlp of a str hidden_factor": (  # a raw TypeError of <=
        lambda: nets.build_mlp(4, 2, hidden_factor="3"),
        ValueError, "mlp: hidden_factor must lie in [3, 4] (STEP 0), got '3'"),
    "mlp initialised for another input dimension": (  # a net of 32 inputs, silently
        lambda: nets.build_mlp(64, 10).init(KEY, (-1, 32)),
        ValueError, "mlp1x192_sigmoid: input_shape (-1, 32), expected (batch, 64): mlp was "
                    "built with input_dim=64"),
    "residual_mlp initialised for another input dimension": (
        lambda: nets.residual_mlp(64, 10, width=8, blocks=1).init(KEY, (-1, 32)),
        ValueError, "residual_mlp1x8_relu: input_shape (-1, 32), expected (batch, 64): "
                    "residual_mlp was built with input_dim=64"),
    "accumulated of a scalar x": (  # a raw IndexError
        lambda: engines.accumulated(engines.manual, 2)(*TINY)(
            TINY_PARAMS, jnp.float64(1.0), TINY_DATA[1]),
        ValueError, "accumulated: x has shape (), expected (batch, ...)"),
    "accumulated of scalar targets": (
        lambda: engines.accumulated(engines.manual, 2)(*TINY)(
            TINY_PARAMS, TINY_DATA[0], jnp.float64(0.0)),
        ValueError, "accumulated: targets has shape (), expected (batch, ...)"),
    "stack_encoders of an autoencoder's whole params": (  # a raw unpack error
        lambda: stack_encoders(nets.build_mlp(3, 2, hidden_units=4).init(KEY, (-1, 3))[1],
                               [autoencoder(3, 4).init(KEY, (-1, 3))[1]]),
        ValueError, "stack_encoders: encoder 1 must be the params of `encoder`"),
}

# an Objective built directly is not checked by its NamedTuple: each engine refuses its l2
# when it is built (the first l2_penalty refused it inside the first call)
ENGINE_BUILDERS = {
    "manual": engines.manual,
    "autodiff": engines.autodiff,
    "manual_vjp": engines.manual_vjp,
    "accumulated": engines.accumulated(engines.manual, 2),
    "curvature_diagonal": engines.curvature_diagonal,
    "gauss_newton_product": engines.gauss_newton_product,
    "hessian_product": engines.hessian_product,
    "structurally_damped_product": lambda model, objective: (
        engines.structurally_damped_product(model, objective, 1)),
}
for engine_name, build_engine in ENGINE_BUILDERS.items():
    for bad_l2 in (float("nan"), float("inf"), -0.5, np.float32(-1.0)):
        REFUSED[f"{engine_name} of an Objective with l2={bad_l2!r}"] = (
            lambda build_engine=build_engine, bad_l2=bad_l2: build_engine(
                TINY[0], nets.Objective(nets.softmax_cross_entropy(), bad_l2)),
            ValueError, f"{engine_name}: the L2 coefficient lambda must be >= 0, got "
                        f"{bad_l2!r}")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_arguments_are_refused_by_name(case):
    build, error, message = REFUSED[case]
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_a_parameter_the_model_does_not_have_is_refused_with_the_names_it_has():
    model = nets.serial(nets.Dense(3, name="hidden"), nets.Tanh(name="act"),
                        nets.Dense(2, name="out"), name="net")
    _, params = model.init(KEY, (4, 5))
    assert gradcheck.parameter(model, params, "out", "w").shape == (3, 2)
    with pytest.raises(KeyError, match=re.escape(
            "net: no parameter output.w; it has hidden.b, hidden.w, out.b, out.w")):
        gradcheck.parameter(model, params, "output", "w")
    twins = nets.serial(nets.Dense(3), nets.Tanh(), nets.Dense(2), name="twins")
    _, twin_params = twins.init(KEY, (4, 5))
    with pytest.raises(KeyError, match="twins: 2 layers are named 'Dense'; name them apart"):
        gradcheck.parameter(twins, twin_params, "Dense", "w")  # was the last one, silently


@pytest.mark.parametrize("shape, expected", [((), (1, 1)), ((7,), (1, 7)), ((5, 3), (5, 3)),
                                             ((5, 5, 2, 6), (50, 150))])
def test_fans_of_vectors_matrices_and_kernels(shape, expected):
    """A kernel (kh, kw, C_in, C_out) has fan-in kh kw C_in and fan-out kh kw C_out; a vector of
    n (a bias) counts as n outputs of one input."""
    assert initializers.fans(shape) == expected


def test_random_shifts_of_zero_return_the_images_unchanged():
    x = jax.random.normal(KEY, (3, 16, 16, 1))
    assert augment.random_shifts(0, -1.0)(jax.random.key(1), x) is x


def translated(x, dy, dx, fill):
    """NumPy: x (batch, height, width, channels) moved down by dy and right by dx, the pixels
    moved in from outside equal to fill."""
    height, width = x.shape[1:3]
    out = np.full_like(x, fill)
    out[:, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        x[:, max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def test_random_shifts_translate_each_image_by_one_of_every_offset_with_the_fill():
    """random_shifts(2, fill=-1) on 400 random 6 x 7 images of 2 channels: each output is
    exactly one of the 25 NumPy translations of its image by (dy, dx) in [-2, 2]^2 with -1
    moved in, and every one of the 25 offsets occurs (each has probability 1/25: at 400
    images the chance that one is missing is below 1e-5, and the key is fixed). Fails if the
    offsets miss a row or column of the range, or if rows and columns move together."""
    x = np.asarray(jax.random.normal(KEY, (400, 6, 7, 2), jnp.float32))
    out = np.asarray(augment.random_shifts(2, -1.0)(jax.random.key(1), jnp.asarray(x)))
    offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    matches = np.stack([np.all(out == translated(x, dy, dx, -1.0), axis=(1, 2, 3))
                        for dy, dx in offsets])  # (25 offsets, 400 images)
    np.testing.assert_array_equal(matches.sum(axis=0), 1)
    assert np.all(matches.any(axis=1))


def _one_layer(layer, input_shape, dtype=jnp.float64):
    """(params, residuals, y) of layer's init and forward on a random x (params cast to dtype)."""
    _, params = layer.init(KEY, input_shape)
    params = jax.tree.map(lambda leaf: leaf.astype(dtype), params)
    y, residuals = layer.forward(params, jax.random.normal(KEY, input_shape, dtype))
    return params, residuals, y


GRADIENT_LAYERS = {
    "Dense": (lambda: nets.Dense(3, name="hidden"), (4, 5)),
    "Tanh": (lambda: nets.Tanh(name="act"), (4, 5)),
    "EuclideanRBF": (lambda: nets.EuclideanRBF(np.eye(3, 5), name="rbf"), (4, 5)),
    "Conv2D": (lambda: nets.Conv2D(4, 3, name="conv"), (2, 6, 6, 3)),
    "Conv2D patches": (lambda: nets.Conv2D(4, 3, implementation="patches", name="conv"),
                       (2, 6, 6, 3)),
    "AvgPool": (lambda: nets.AvgPool(2, name="pool"), (2, 6, 6, 3)),
    "MaxPool": (lambda: nets.MaxPool(2, name="pool"), (2, 6, 6, 3)),
    "Subsampling": (lambda: nets.Subsampling(2, name="S2"), (2, 6, 6, 3)),
    "Flatten": (lambda: nets.Flatten(name="flat"), (2, 3, 3, 2)),
    "LocalResponseNorm": (lambda: nets.LocalResponseNorm(name="lrn"), (2, 3, 3, 4)),
    "LayerNorm": (lambda: nets.LayerNorm(5, name="norm"), (4, 5)),
    "BatchNorm": (lambda: nets.BatchNorm(5, name="norm"), (4, 5)),
    "LastStep": (lambda: nets.LastStep(name="last"), (2, 4, 3)),
    "FinalStates": (lambda: nets.FinalStates(1, name="final"), (2, 4, 3)),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_LAYERS))
@pytest.mark.parametrize("wrong", ["one example", "axes reversed"])
def test_a_gradient_not_shaped_as_the_output_is_refused_by_name(case, wrong):
    """backward (and curvature) with a dy that is not the output's shape: a batch of one, which
    the products broadcast (Dense clamped its outer products' index past the batch, Tanh and
    the norms broadcast it), or the output's axes reversed, which Flatten reshaped silently,
    and the convolutions and pools met with raw reshape and dot_general errors."""
    build, input_shape = GRADIENT_LAYERS[case]
    layer = build()
    params, residuals, y = _one_layer(layer, input_shape)
    dy = jnp.ones((1, *y.shape[1:]) if wrong == "one example" else y.shape[::-1])
    expected = re.escape(f"{layer.name}: dy has shape {dy.shape}, expected the output's "
                         f"{y.shape}")
    with pytest.raises(ValueError, match=expected):
        layer.backward(params, residuals, dy)
    if layer.curvature is not None:
        with pytest.raises(ValueError, match=f"{layer.name}: d2?y has shape"):
            layer.curvature(params, residuals, dy)


def test_dense_backward_with_a_short_batch_is_refused_not_clamped():
    """A dy of 3 rows for 4 examples: weight_gradient's outer products read dy[3], which JAX
    clamps to dy[2], and returned a dw and a dx of 3 rows without a word."""
    layer = nets.Dense(3, name="hidden")
    params, x, _ = _one_layer(layer, (4, 5))
    with pytest.raises(ValueError, match=re.escape(
            "hidden: dy has shape (3, 3), expected the output's (4, 3)")):
        layer.backward(params, x, jnp.ones((3, 3)))


def test_serial_backward_with_residuals_of_fewer_layers_is_refused():
    """zip stopped at the shorter: the gradient of the first layer alone, for a net of two."""
    model = nets.serial(nets.Dense(3, name="hidden"), nets.Tanh(name="act"), name="net")
    params, residuals, y = _one_layer(model, (4, 5))
    with pytest.raises(ValueError, match="net: residuals must hold 2 layer entries, got 1"):
        model.backward(params, residuals[:1], jnp.ones(y.shape))
    with pytest.raises(ValueError, match="net: params must hold 2 layer entries, got 1"):
        model.backward(params[:1], residuals, jnp.ones(y.shape))


PARAMETER_CASES = {
    "Dense bias of one": (
        lambda: nets.Dense(3, name="hidden"), (4, 5), "b", (1,),
        "hidden: params 'b' has shape (1,), expected (3,)"),
    "Conv2D kernel of another size": (
        lambda: nets.Conv2D(4, 3, name="conv"), (2, 6, 6, 3), "w", (5, 5, 3, 4),
        "conv: params 'w' has shape (5, 5, 3, 4), expected (3, 3, channels / groups, 4)"),
    "Conv2D bias of one": (
        lambda: nets.Conv2D(4, 3, name="conv"), (2, 6, 6, 3), "b", (1,),
        "conv: params 'b' has shape (1,), expected (4,)"),
    "Conv2D unshared bias of another width": (
        lambda: nets.Conv2D(4, 3, unshared_bias=True, name="conv"), (2, 6, 6, 3), "b",
        (4, 4, 1), "conv: params 'b' has shape (4, 4, 1), expected (out_h, out_w, 4)"),
    "Subsampling bias of one": (
        lambda: nets.Subsampling(2, name="S2"), (2, 6, 6, 3), "b", (1,),
        "S2: params 'b' has shape (1,), expected (3,)"),
    "LayerNorm gain of one": (
        lambda: nets.LayerNorm(5, name="norm"), (4, 5), "g", (1,),
        "norm: params 'g' has shape (1,), expected (5,)"),
    "BatchNorm bias of one": (
        lambda: nets.BatchNorm(5, name="norm"), (4, 5), "b", (1,),
        "norm: params 'b' has shape (1,), expected (5,)"),
}


@pytest.mark.parametrize("case", sorted(PARAMETER_CASES))
def test_params_of_the_wrong_shape_are_refused_by_name(case):
    """A parameter from another init: a bias or gain of one entry was broadcast over every
    output, and Conv2D's "conv" form ran a 5x5 kernel given to a 3x3 layer, a (2, 2, 2, 4)
    output for (2, 4, 4, 4), all silently."""
    build, input_shape, key, shape, message = PARAMETER_CASES[case]
    layer = build()
    _, params = layer.init(KEY, input_shape)
    params = {**params, key: jnp.ones(shape, jnp.float32)}
    with pytest.raises(ValueError, match=re.escape(message)):
        layer.forward(params, jnp.ones(input_shape, jnp.float32))


@pytest.mark.parametrize("build, message", [
    (lambda: nets.Embedding(2.5, 4, name="embed"), "embed: vocabulary must be an int, got 2.5"),
    (lambda: nets.Embedding(10, "4", name="embed"), "embed: features must be an int, got '4'"),
    (lambda: nets.elman(2.5), "elman_tanh: hidden_size must be an int, got 2.5"),
    (lambda: nets.lstm("8"), "lstm: hidden_size must be an int, got '8'"),
    (lambda: nets.Dense(3, name="hidden").init(KEY, (4, 0)),
     "hidden: input_shape (4, 0) must be (batch, features)"),
])
def test_sizes_that_are_not_whole_numbers_are_refused_by_name(build, message):
    """Embedding(2.5) and elman(2.5) were built (and failed later, inside init); a str
    size was a raw TypeError of `<`; a Dense over 0 features a ZeroDivisionError."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def _directions(params, **replaced):
    """A direction of ones shaped as params, with the named leaves of a layer's params dict
    replaced."""
    ones = jax.tree.map(jnp.ones_like, params)
    if isinstance(ones, dict):
        return {**ones, **replaced}
    return ones


def _tangent_case(layer, input_shape, dparams=None, dx_shape=None, ids=False):
    """A call of layer.tangent on a random x (integer ids for an Embedding) with the given
    dparams (ones shaped as params by default) and a dx of dx_shape (None: no dx)."""
    _, params = layer.init(KEY, input_shape)
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)
    x = (jnp.zeros(input_shape, jnp.int32) if ids
         else jax.random.normal(KEY, input_shape, jnp.float64))
    dparams = _directions(params) if dparams is None else dparams(params)
    dx = None if dx_shape is None else jnp.ones(dx_shape)
    return lambda: layer.tangent(params, x, dparams, dx)


TANGENT_CASES = {
    "Dense weight direction of one column": (  # a dy of 4 columns from w's 1, broadcast
        lambda: _tangent_case(nets.Dense(4, name="hidden"), (2, 3),
                              lambda p: _directions(p, w=jnp.ones((3, 1)))),
        "hidden: dparams['w'] has shape (3, 1), expected params['w']'s (3, 4)"),
    "Dense weight direction of another layer": (
        lambda: _tangent_case(nets.Dense(4, name="hidden"), (2, 3),
                              lambda p: _directions(p, w=jnp.ones((5, 4)))),
        "hidden: dparams['w'] has shape (5, 4), expected params['w']'s (3, 4)"),
    "Dense bias direction of one": (
        lambda: _tangent_case(nets.Dense(4, name="hidden"), (2, 3),
                              lambda p: _directions(p, b=jnp.ones(1))),
        "hidden: dparams['b'] has shape (1,), expected params['b']'s (4,)"),
    "Dense dx of one example": (  # broadcast over the batch
        lambda: _tangent_case(nets.Dense(4, name="hidden"), (2, 3), dx_shape=(1, 3)),
        "hidden: dx has shape (1, 3), expected x's (2, 3)"),
    "Tanh dx of one row": (
        lambda: _tangent_case(nets.Tanh(name="act"), (2, 3), dx_shape=(3,)),
        "act: dx has shape (3,), expected x's (2, 3)"),
    "EuclideanRBF dx of one example": (
        lambda: _tangent_case(nets.EuclideanRBF(np.eye(3), name="rbf"), (2, 3),
                              dx_shape=(1, 3)),
        "rbf: dx has shape (1, 3), expected x's (2, 3)"),
    "Embedding direction of one feature": (  # gave a dy of one feature
        lambda: _tangent_case(nets.Embedding(10, 4, name="embed"), (2, 3),
                              lambda p: _directions(p, w=jnp.ones((10, 1))), ids=True),
        "embed: dparams['w'] has shape (10, 1), expected params['w']'s (10, 4)"),
    "serial directions of fewer layers": (  # zip stopped: the first layer's y and dy alone
        lambda: _tangent_case(nets.serial(nets.Dense(4, name="hidden"), nets.Tanh(name="act"),
                                          name="net"), (2, 3), lambda p: _directions(p)[:1]),
        "net: dparams must hold 2 layer entries, got 1"),
    "parallel directions of fewer branches": (  # a (2, 2) dy for a (2, 4) output
        lambda: _tangent_case(nets.parallel(nets.Dense(2, name="a"), nets.Dense(2, name="b"),
                                            name="both"), (2, 3),
                              lambda p: _directions(p)[:1]),
        "both: dparams must hold 2 layer entries, got 1"),
    "a convolution's bias direction of one, inside serial": (
        lambda: _tangent_case(nets.serial(nets.Conv2D(4, 3, name="conv"), name="net"),
                              (2, 5, 5, 3),
                              lambda p: ({**_directions(p[0]), "b": jnp.ones(1)},)),
        "conv: dparams['b'] has shape (1,), expected params['b']'s (4,)"),
}


@pytest.mark.parametrize("case", sorted(TANGENT_CASES))
def test_tangent_directions_not_shaped_as_their_primals_are_refused_by_name(case):
    """layer.tangent(params, x, dparams, dx) with a direction of another shape than its
    primal: each of these returned a y and a dy without a word (a dy of the wrong width, or
    one example's direction spread over the batch)."""
    build, message = TANGENT_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        build()()


def test_backward_tangent_directions_and_gradients_are_checked():
    """Dense's R-operator read a v_x of one example as the first of its outer products (the
    rest dropped); an activation's broadcast an R{dy} of one example over the batch."""
    dense = nets.Dense(4, name="hidden")
    params, x, y = _one_layer(dense, (2, 3))
    ones = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match=re.escape("hidden: v_x has shape (1, 3), expected "
                                                   "x's (2, 3)")):
        dense.backward_tangent(params, x, ones, jnp.ones((1, 3)), jnp.ones(y.shape),
                               jnp.ones(y.shape))
    act = nets.Tanh(name="act")
    with pytest.raises(ValueError, match=re.escape("act: R{dy} has shape (1, 3), expected the "
                                                   "output's (2, 3)")):
        act.backward_tangent((), x, (), None, jnp.ones((2, 3)), jnp.ones((1, 3)))


def test_a_tied_models_direction_holding_the_target_is_refused():
    """A direction of the untied model's entries: the target's own direction was overwritten
    with the source's, silently."""
    model = nets.tie(nets.serial(nets.Dense(3, name="a"), nets.Dense(3, name="b"), name="net"),
                     ("a", "w"), ("b", "w"))
    _, params = model.init(KEY, (2, 3))
    x = jnp.ones((2, 3), jnp.float32)
    untied = (params[0], {**params[1], "w": jnp.ones((3, 3), jnp.float32)})
    with pytest.raises(ValueError, match="net: dparams holds b.w, which is tied to a.w"):
        model.tangent(params, x, untied, None)
    y, dy = model.tangent(params, x, params, None)  # the tied entries alone pass
    assert y.shape == dy.shape == (2, 3)


def test_a_tied_models_params_holding_the_target_are_refused():
    """tie's forward, backward and curvature filled the target in from the source over a
    value left in params (the untied model's params, say), which was ignored silently; its
    tangent already refused such a direction."""
    model = nets.tie(nets.serial(nets.Dense(3, name="a"), nets.Dense(3, name="b"), name="net"),
                     ("a", "w"), ("b", "w"))
    _, params = model.init(KEY, (2, 3))
    x = jnp.ones((2, 3), jnp.float32)
    untied = (params[0], {**params[1], "w": jnp.ones((3, 3), jnp.float32)})
    message = "net: params holds b.w, which is tied to a.w"
    with pytest.raises(ValueError, match=message):
        model.forward(untied, x)
    y, residuals = model.forward(params, x)  # the tied entries alone pass
    for method in ("backward", "curvature"):
        with pytest.raises(ValueError, match=message):
            getattr(model, method)(untied, residuals, jnp.ones(y.shape))
    with pytest.raises(ValueError, match=message):
        model.tangent(untied, x, params, None)
    with pytest.raises(ValueError, match=message):
        model.backward_tangent(untied, x, params, None, jnp.ones(y.shape), jnp.ones(y.shape))


IMAGE = (2, 6, 6, 4)
ONE_IMAGE = (1, 6, 6, 4)
DIRECT_LAYERS = {  # built with the name their messages give
    "Conv2D": lambda: nets.Conv2D(3, 3, name="conv"),
    "LayerNorm": lambda: nets.LayerNorm(4, name="ln"),
    "BatchNorm": lambda: nets.BatchNorm(4, name="bn"),
    "AvgPool": lambda: nets.AvgPool(2, name="avg"),
    "MaxPool": lambda: nets.MaxPool(2, name="max"),
    "Subsampling": lambda: nets.Subsampling(2, name="sub"),
    "LocalResponseNorm": lambda: nets.LocalResponseNorm(name="lrn"),
    "Flatten": lambda: nets.Flatten(name="flat"),
    "Dropout": lambda: nets.Dropout(0.5, name="drop"),
}


def _direct_call(layer, method, direction=None, dx_shape=IMAGE, **replaced):
    """layer.tangent(params, x, dparams, dx) or layer.backward_tangent(params, x, v_params,
    v_x, dy, R{dy}) called directly (not through serial), float64, on x of IMAGE; the
    parameter direction is ones shaped as params but for the `replaced` leaves, dx (v_x) ones
    of dx_shape, dy and R{dy} ones shaped as the output (or `direction`'s shape for R{dy})."""
    _, params = layer.init(KEY, IMAGE)
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)
    x = jax.random.normal(KEY, IMAGE, jnp.float64)
    key = {"key": KEY} if layer.stochastic else {}
    dparams = _directions(params, **replaced)
    dx = jnp.ones(dx_shape)
    if method == "tangent":
        return layer.tangent(params, x, dparams, dx, **key)
    y, _ = layer.forward(params, x, **key)
    r_dy = jnp.ones(y.shape if direction is None else direction)
    return layer.backward_tangent(params, x, dparams, dx, jnp.ones(y.shape), r_dy, **key)


@pytest.mark.parametrize("case", sorted(DIRECT_LAYERS))
def test_direct_tangents_refuse_a_direction_of_one_example_by_name(case):
    """Called directly, these layers' tangent and backward_tangent did not check their
    directions (serial and the engines do): a dx or v_x of one example was broadcast over
    the batch (or, for the linear layers' R-operator, ignored), a dy of one example given
    back for Conv2D, the pooling layers and Flatten."""
    layer = DIRECT_LAYERS[case]()
    name = layer.name
    y, dy = _direct_call(layer, "tangent")  # shaped as x: passes
    assert dy.shape == y.shape
    assert [part.shape for part in jax.tree.leaves(
        _direct_call(layer, "backward_tangent")) if part.ndim == 4][-1] == IMAGE
    for method, what in (("tangent", "dx"), ("backward_tangent", "v_x")):
        with pytest.raises(ValueError, match=re.escape(
                f"{name}: {what} has shape {ONE_IMAGE}, expected x's {IMAGE}")):
            _direct_call(layer, method, dx_shape=ONE_IMAGE)


@pytest.mark.parametrize("case, channels", [("Conv2D", 3), ("LayerNorm", 4), ("BatchNorm", 4),
                                            ("Subsampling", 4)])
def test_direct_tangents_refuse_a_bias_direction_of_one_by_name(case, channels):
    """A bias direction of (1,) was broadcast over the channels, silently."""
    layer = DIRECT_LAYERS[case]()
    for method, what in (("tangent", "dparams"), ("backward_tangent", "v_params")):
        with pytest.raises(ValueError, match=re.escape(
                f"{layer.name}: {what}['b'] has shape (1,), expected params['b']'s "
                f"({channels},)")):
            _direct_call(layer, method, b=jnp.ones(1))


@pytest.mark.parametrize("case", ["LayerNorm", "BatchNorm"])
def test_normalisation_backward_tangents_refuse_a_gradient_of_one_example(case):
    """LayerNorm's and BatchNorm's R-operators do not call their backward, which checks dy:
    an R{dy} of one example was broadcast over the batch."""
    layer = DIRECT_LAYERS[case]()
    with pytest.raises(ValueError, match=re.escape(
            f"{layer.name}: R{{dy}} has shape {ONE_IMAGE}, expected the output's {IMAGE}")):
        _direct_call(layer, "backward_tangent", direction=ONE_IMAGE)


def test_dropout_at_inference_refuses_a_gradient_of_one_example():
    """Without a key (no mask) Dropout's backward cannot see x's shape; its R-operator can."""
    layer = nets.Dropout(0.5, name="drop")
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=re.escape(
            "drop: R{dy} has shape (1, 3), expected the output's (2, 3)")):
        layer.backward_tangent((), x, (), None, jnp.ones((2, 3)), jnp.ones((1, 3)))


# nets.initializers: the spread of a distribution (2026-12-07, losses/engines/gradcheck review)
@pytest.mark.parametrize("build, message", [
    (lambda: initializers.normal(float("nan")),
     "normal: std must be a finite number >= 0, got nan"),
    (lambda: initializers.normal(float("inf")),
     "normal: std must be a finite number >= 0, got inf"),
    (lambda: initializers.normal("0.01"), "normal: std must be a finite number >= 0, got '0.01'"),
    (lambda: initializers.fan_in_uniform(-2.4),
     "fan_in_uniform: scale must be a finite number >= 0, got -2.4"),
    (lambda: initializers.fan_in_uniform(float("nan")),
     "fan_in_uniform: scale must be a finite number >= 0, got nan"),
])
def test_initializers_refuse_a_spread_that_is_not_a_finite_number_at_least_0(build, message):
    """NaN or inf filled every weight with NaN or inf, silently (a Dense's params, then its
    outputs and gradients); a negative scale gave jax.random.uniform a minval above its maxval,
    which clamps every draw to +limit: all weights equal. A str failed only at init."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build()
    assert float(jnp.std(initializers.normal(0.5)(KEY, (1000,)))) == pytest.approx(0.5, rel=0.1)


def test_channel_groups_refuse_params_and_directions_for_another_number_of_groups():
    """zip cut a tuple of fewer groups short: with 2 groups and one group's params or
    directions, the forward, backward and tangents gave half the channels, silently."""
    layer = nets.channel_groups(nets.Dense(3, name="dense"), 2, name="towers")
    _, params = layer.init(KEY, (4, 6))
    x = jax.random.normal(KEY, (4, 6), jnp.float32)
    y, residuals = layer.forward(params, x)
    assert y.shape == (4, 6)
    few = "towers: {} must hold 2 group entries, got 1"
    with pytest.raises(ValueError, match=re.escape(few.format("params"))):
        layer.forward(params[:1], x)
    with pytest.raises(ValueError, match=re.escape(few.format("residuals"))):
        layer.backward(params, residuals[:1], y)
    with pytest.raises(ValueError, match=r"towers: dparams is .*, expected params's"):
        layer.tangent(params, x, params[:1], x)
    with pytest.raises(ValueError, match=re.escape(
            "towers: dx has shape (1, 6), expected x's (4, 6)")):
        layer.tangent(params, x, params, x[:1])
    with pytest.raises(ValueError, match=r"towers: v_params is .*, expected params's"):
        layer.backward_tangent(params, x, params[:1], x, y, y)
