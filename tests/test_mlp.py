"""The lecture's network: STEP 0 defaults, and its objective and recursion in plain NumPy."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import engines, losses
from nets.gradcheck import astype, relative_error
from tests.helpers import F64


def test_step0_defaults():
    model = nets.build_mlp(64, 10)
    output_shape, params = model.init(jax.random.key(0), (-1, 64))
    assert output_shape == (-1, 10)
    assert [p["w"].shape for p in params if p] == [(64, 192), (192, 10)]
    deep = nets.build_mlp(20, 3, hidden_layers=3, hidden_factor=4)
    _, params = deep.init(jax.random.key(0), (-1, 20))
    assert [p["w"].shape for p in params if p] == [(20, 80), (80, 80), (80, 80), (80, 3)]
    assert [layer.name for layer in deep.sublayers][:2] == ["hidden1", "act1"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden_factor=2.0), "hidden_factor must lie in \\[3, 4\\]"),
    (dict(activation="swish"), "activation='swish'"),
    (dict(hidden_layers=-1), "hidden_layers must be >= 0"),
    # 0 used to fall back to STEP 0's width, as None does
    (dict(hidden_units=0), r"mlp: hidden_units must be an int >= 1 \(or None for STEP 0's\), "
                           r"got 0"),
    (dict(hidden_units=2.5), r"hidden_units must be an int >= 1 .*, got 2.5"),
])
def test_mlp_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nets.build_mlp(4, 2, **kwargs)


def numpy_sigmoid_net(params, x):
    """The lecture's forward pass: s^0 = x, s^l = sigmoid(s^(l-1) w^l + b^l) for every l."""
    activations = [np.asarray(x, np.float64)]
    for layer in params:
        if layer:
            z = activations[-1] @ np.asarray(layer["w"]) + np.asarray(layer["b"])
            activations.append(1 / (1 + np.exp(-z)))
    return activations


def numpy_lecture_objective(params, x, y, l2):
    s = numpy_sigmoid_net(params, x)[-1]
    m = x.shape[0]
    weights = sum(np.sum(np.asarray(layer["w"]) ** 2) for layer in params if layer)
    return -np.sum(y * np.log(s) + (1 - y) * np.log(1 - s)) / m + l2 / (2 * m) * weights


def numpy_lecture_recursion(params, x, y, l2):
    """The lecture's backward equations, written out literally in NumPy:

    dE/ds^L = (-y/s + (1-y)/(1-s))/m;
    dE/ds^l_j = sum_p dE/ds^(l+1)_p s^(l+1)_p (1 - s^(l+1)_p) w^(l+1)_jp;
    dE/dw^l_ij = sum_examples dE/ds^l_j s^l_j (1 - s^l_j) s^(l-1)_i + (lambda/m) w^l_ij.
    """
    m = x.shape[0]
    activations = numpy_sigmoid_net(params, x)
    weights = [np.asarray(layer["w"]) for layer in params if layer]
    d_s = (-y / activations[-1] + (1 - y) / (1 - activations[-1])) / m
    grads = []
    for level in range(len(weights), 0, -1):
        s, s_below = activations[level], activations[level - 1]
        delta = d_s * s * (1 - s)
        grads.append({"w": s_below.T @ delta + l2 / m * weights[level - 1],
                      "b": delta.sum(axis=0)})
        d_s = delta @ weights[level - 1].T
    return grads[::-1]


@pytest.fixture
def sigmoid_net():
    model = nets.build_mlp(6, 4, hidden_layers=2, hidden_units=7, output_activation="sigmoid")
    _, params = model.init(jax.random.key(0), (-1, 6))
    params = astype(params, jnp.float64)
    x = np.asarray(jax.random.normal(jax.random.key(1), (11, 6), jnp.float64))
    y = np.asarray(jax.random.bernoulli(jax.random.key(2), 0.4, (11, 4)), np.float64)
    return model, params, x, y


def test_lecture_objective_matches_numpy(sigmoid_net):
    model, params, x, y = sigmoid_net
    objective = losses.lecture_objective(0.8, from_logits=False)
    value = objective.value(params, model.apply(params, x), y)
    np.testing.assert_allclose(value, numpy_lecture_objective(params, x, y, 0.8), rtol=F64)
    # the logits form of the same objective gives the same number
    logits_model = nets.serial(*model.sublayers[:-1])
    logits_value = losses.lecture_objective(0.8).value(
        params[:-1], logits_model.apply(params[:-1], x), y)
    np.testing.assert_allclose(logits_value, value, rtol=F64)


def test_manual_engine_is_the_lectures_recursion(sigmoid_net):
    model, params, x, y = sigmoid_net
    _, grads = engines.manual(model, losses.lecture_objective(0.8, from_logits=False))(
        params, x, y)
    expected = numpy_lecture_recursion(params, x, y, 0.8)
    dense_grads = [g for g in grads if g]
    assert len(dense_grads) == len(expected) == 3
    for got, want in zip(dense_grads, expected):
        assert relative_error(got["w"], want["w"]) <= F64
        assert relative_error(got["b"], want["b"]) <= F64


def numpy_residual_mlp(params, x, eps=1e-5):
    """The pre-norm residual MLP in NumPy: embed, x + W2 relu(W1 norm(x)) per block, norm,
    output."""
    def dense(p, h):
        return h @ np.asarray(p["w"]) + np.asarray(p["b"])

    def norm(p, h):
        centred = h - h.mean(axis=-1, keepdims=True)
        s = np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps)
        return np.asarray(p["g"]) * centred / s + np.asarray(p["b"])

    embed, *blocks, final_norm, output = params
    h = dense(embed, np.asarray(x, np.float64))
    for (_, (norm_p, inner, _, outer)) in blocks:
        h = h + dense(outer, np.maximum(dense(inner, norm(norm_p, h)), 0))
    return dense(output, norm(final_norm, h))


def test_residual_mlp_matches_numpy_and_counts_its_parameters():
    model = nets.residual_mlp(6, 3, width=8, blocks=2)
    output_shape, params = model.init(jax.random.key(0), (-1, 6))
    assert output_shape == (-1, 3)
    flat, unravel = jax.flatten_util.ravel_pytree(astype(params, jnp.float64))
    params = unravel(flat + 0.3 * jax.random.normal(jax.random.key(1), flat.shape, jnp.float64))
    x = jax.random.normal(jax.random.key(2), (5, 6), jnp.float64)
    np.testing.assert_allclose(model.apply(params, x), numpy_residual_mlp(params, x),
                               rtol=1e-12, atol=1e-12)
    # embed 6*8+8, two blocks of (norm 16 + 2 x Dense 72), final norm 16, output 8*3+3
    assert nets.count_model(model, (-1, 6)).params == 56 + 2 * (16 + 144) + 16 + 27
    assert [layer.name for layer in model.sublayers] == [
        "embed", "block1", "block2", "final_norm", "output"]


def test_residual_mlp_with_remat_blocks_has_the_plain_params_outputs_and_gradients():
    """remat=True: the same params and names, the same outputs (NumPy's), and the manual
    gradient equal to jax.grad's and to the plain model's (float64, L2 on)."""
    plain, model = (nets.residual_mlp(6, 3, width=8, blocks=2, remat=remat)
                    for remat in (False, True))
    params = astype(model.init(jax.random.key(0), (-1, 6))[1], jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    params = unravel(flat + 0.3 * jax.random.normal(jax.random.key(1), flat.shape, jnp.float64))
    assert jax.tree.structure(params) == jax.tree.structure(
        plain.init(jax.random.key(0), (-1, 6))[1])
    assert [layer.name for layer in model.sublayers] == [
        "embed", "block1", "block2", "final_norm", "output"]
    x = jax.random.normal(jax.random.key(2), (5, 6), jnp.float64)
    targets = jax.nn.one_hot(jnp.arange(5) % 3, 3, dtype=jnp.float64)
    np.testing.assert_allclose(model.apply(params, x), numpy_residual_mlp(params, x),
                               rtol=1e-12, atol=1e-12)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.2)
    manual, autodiff, unwrapped = (engine(net, objective)(params, x, targets) for engine, net in
                                   ((engines.manual, model), (engines.autodiff, model),
                                    (engines.manual, plain)))
    for other in (autodiff, unwrapped):
        for a, b in zip(jax.tree.leaves(manual), jax.tree.leaves(other)):
            assert relative_error(a, b) <= F64


@pytest.mark.parametrize("kwargs,message", [
    (dict(width=0), "residual_mlp: width must be >= 1, got 0"),
    (dict(blocks=-1), "residual_mlp: blocks must be >= 0, got -1"),
    (dict(activation="swish"), "residual_mlp: activation='swish'"),
])
def test_residual_mlp_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nets.residual_mlp(4, 2, **kwargs)


def test_residual_hidden_layers_add_identity_paths_and_no_parameters():
    """h_l = h_(l-1) + sigmoid(h_(l-1) W_l + b_l) for l >= 2, against NumPy, with the plain
    net's parameters."""
    plain = nets.build_mlp(5, 3, hidden_layers=3, hidden_units=6)
    skip = nets.build_mlp(5, 3, hidden_layers=3, hidden_units=6, residual=True)
    _, params = skip.init(jax.random.key(0), (-1, 5))
    params = astype(params, jnp.float64)
    assert nets.count_model(skip, (-1, 5)).params == nets.count_model(plain, (-1, 5)).params
    assert [layer.name for layer in skip.sublayers] == [
        "hidden1", "act1", "block2", "block3", "output", "output_act"]
    x = jax.random.normal(jax.random.key(1), (4, 5), jnp.float64)
    dense = [jax.tree.map(np.asarray, layer)
             for layer in (params[0], params[2][1][0], params[3][1][0], params[4])]
    h = 1 / (1 + np.exp(-(np.asarray(x) @ dense[0]["w"] + dense[0]["b"])))
    for layer in dense[1:3]:
        h = h + 1 / (1 + np.exp(-(h @ layer["w"] + layer["b"])))
    np.testing.assert_allclose(skip.apply(params, x), h @ dense[3]["w"] + dense[3]["b"],
                               rtol=1e-12)


def test_stack_encoders_refuses_more_encoders_than_hidden_layers_and_other_nets():
    """A third encoder for two hidden layers used to replace the output layer's weights."""
    from nets import autoencoder

    mlp_params = nets.build_mlp(5, 5, hidden_layers=2, hidden_units=5).init(
        jax.random.key(0), (-1, 5))[1]
    encoder = autoencoder.encoder_params(autoencoder.autoencoder(5, 5).init(
        jax.random.key(1), (-1, 5))[1])
    with pytest.raises(ValueError, match="stack_encoders: 3 encoders for an MLP of 2 hidden "
                                         "layers"):
        autoencoder.stack_encoders(mlp_params, [encoder] * 3)
    normed = nets.build_mlp(5, 5, hidden_layers=2, hidden_units=5, batch_norm=True).init(
        jax.random.key(0), (-1, 5))[1]
    with pytest.raises(ValueError, match=r"stack_encoders: mlp_params are not those of a plain "
                                         r"`mlp`"):
        autoencoder.stack_encoders(normed, [encoder])
    assert len(autoencoder.stack_encoders(mlp_params, [encoder] * 2)) == len(mlp_params)


@pytest.mark.parametrize("build, message", [
    (lambda: nets.build_mlp(64.5, 10), "mlp: input_dim must be >= 1, got 64.5"),
    (lambda: nets.build_mlp(64, 10.0), "mlp: num_classes must be >= 1, got 10.0"),
    (lambda: nets.build_mlp(64, 10, hidden_layers=2.0), "mlp: hidden_layers must be >= 0, got 2.0"),
    (lambda: nets.build_mlp(64, 10, hidden_layers=True),
     "mlp: hidden_layers must be >= 0, got True"),
    (lambda: nets.residual_mlp(64.5, 10), "residual_mlp: input_dim must be >= 1, got 64.5"),
    (lambda: nets.residual_mlp(64, 10, blocks=2.0), "residual_mlp: blocks must be >= 0, got 2.0"),
    (lambda: nets.residual_mlp(64, 10, blocks=True),
     "residual_mlp: blocks must be >= 0, got True"),
])
def test_mlp_sizes_that_are_not_whole_numbers_are_refused_by_name(build, message):
    """An input_dim of 64.5 gave STEP 0's width round(193.5) = 194 and a hidden_layers of True
    one layer (named mlpTruex192), both silently; 2.0 layers or blocks were a raw TypeError of
    range."""
    with pytest.raises(ValueError, match=re.escape(message + "; expected a whole number")):
        build()
