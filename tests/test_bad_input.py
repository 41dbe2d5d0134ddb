"""Bad arguments refused with an error that names the layer (or function), the argument and
the value: the checks no other test reached (found with a coverage run of the suite)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import gradcheck, initializers
from nets.autoencoder import autoencoder
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
TINY_DATA = (jnp.ones((8, 3)), jnp.zeros((8, 2)))

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
    "stochastic_passes with batches larger than the data": (
        lambda: procedures.stochastic_passes(*TINY, optim.gradient_descent(0.1), *TINY_DATA,
                                             batch_size=9),
        ValueError, "stochastic_passes: batch_size must be in [1, 8], got 9"),
}


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
