"""Layer and batch normalisation with hand-written backward passes.

Both standardise x over some axes and then scale and shift each feature:

    mu = mean(x),  s = sqrt(mean((x - mu)^2) + eps),  xhat = (x - mu) / s,  y = g xhat + b,

`LayerNorm` (Ba, Kiros and Hinton 2016) over the last axis of x, of length n, row by row (an
MLP's features, an NHWC map's channels at each position, a sequence's features at each step);
`BatchNorm` (Ioffe and Szegedy 2015) over every other axis, feature by feature: the n values of
one feature across the batch (and across the positions of an NHWC map), so that an example's
output depends on the other examples of its batch.

Backward, with dxhat = dy g, the means over the same n values:

    dg = sum of dy xhat,   db = sum of dy,
    dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) / s,

from the Jacobian J[j, i] = dy_j / dx_i = (g_j / s) (delta_ij - (1 + xhat_i xhat_j) / n) within
one group of n (zero across groups). Curvature (Gauss-Newton diagonal, `nets.layers`): d2g and
d2b as dg and db with xhat^2 and 1 in place of xhat and dy, and d2x_i = sum_j J[j, i]^2 d2y_j,
which expands to

    d2x_i = a_i (1 - 2 (1 + xhat_i^2) / n) + (A_0 + 2 xhat_i A_1 + xhat_i^2 A_2) / n^2,
    a_j = g_j^2 d2y_j / s^2,   A_k = sum_j a_j xhat_j^k,

O(n) a group although J is a dense n x n block.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from nets.layers import Layer

__all__ = ["LayerNorm", "BatchNorm", "batch_coupled_layers"]


def _standardise(x, axes, eps):
    """(xhat, s): x minus its mean over `axes`, over s = sqrt(variance + eps); s keeps the
    reduced axes as size 1."""
    centred = x - jnp.mean(x, axis=axes, keepdims=True)
    s = jnp.sqrt(jnp.mean(centred * centred, axis=axes, keepdims=True) + eps)
    return centred / s, s


def _standardise_backward(xhat, s, dxhat, axes):
    """dx of xhat = (x - mean(x)) / s over `axes`, given dxhat (module docstring)."""
    def mean(values):
        return jnp.mean(values, axis=axes, keepdims=True)

    return (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / s


def _standardise_curvature(xhat, a, axes, n):
    """d2x_i = sum_j J[j, i]^2 d2y_j over groups of n along `axes`, with a = g^2 d2y / s^2
    (module docstring)."""
    a0, a1, a2 = (jnp.sum(a * xhat**k, axis=axes, keepdims=True) for k in range(3))
    return a * (1 - 2 * (1 + xhat * xhat) / n) + (a0 + 2 * xhat * a1 + xhat * xhat * a2) / n**2


def _along_features(vector, ndim):
    """(features,) -> (1, ..., 1, features), so that it multiplies x without rank promotion."""
    return vector.reshape((1,) * (ndim - 1) + vector.shape)


def _check_arguments(name, features, eps):
    if features < 1:
        raise ValueError(f"{name}: features must be >= 1, got {features}")
    if not eps > 0:
        raise ValueError(f"{name}: eps must be > 0, got {eps}")


def _shape_check(name, features):
    def check(shape, what="input x"):
        if len(shape) < 2 or shape[-1] != features:
            raise ValueError(f"{name}: {what} has shape {tuple(shape)}, expected "
                             f"(batch, ..., {features})")
    return check


def _gain_and_bias_init(check, features):
    def init(key, input_shape):
        del key
        check(input_shape, "input_shape")
        return tuple(input_shape), {"g": jnp.ones((features,), jnp.float32),
                                     "b": jnp.zeros((features,), jnp.float32)}
    return init


def LayerNorm(features: int, eps: float = 1e-5, name: str = "LayerNorm") -> Layer:
    """Normalise each row of the last axis to mean 0 and variance 1, then scale and shift.

    Shapes: x (batch, ..., features), g and b (features,), y like x. g starts at 1 and b at
    0; they are named "g" and "b", so the lecture's L2 penalty (on "w") leaves them alone.
    The module docstring gives the math of the forward, backward and curvature passes.
    """
    _check_arguments(name, features, eps)
    check = _shape_check(name, features)

    def over_rows(values):
        return jnp.sum(values.reshape(-1, features), axis=0)

    def forward(params, x):
        check(x.shape)
        xhat, s = _standardise(x, -1, eps)
        y = _along_features(params["g"], x.ndim) * xhat + _along_features(params["b"], x.ndim)
        return y, (xhat, s)

    def backward(params, residuals, dy):
        xhat, s = residuals
        dx = _standardise_backward(xhat, s, dy * _along_features(params["g"], dy.ndim), -1)
        return {"g": over_rows(dy * xhat), "b": over_rows(dy)}, dx

    def curvature(params, residuals, d2y):
        xhat, s = residuals
        a = _along_features(params["g"], d2y.ndim) ** 2 * d2y / (s * s)
        d2x = _standardise_curvature(xhat, a, -1, features)
        return {"g": over_rows(d2y * xhat * xhat), "b": over_rows(d2y)}, d2x

    return Layer(name, init=_gain_and_bias_init(check, features), forward=forward,
                 backward=backward, curvature=curvature)


def BatchNorm(features: int, eps: float = 1e-5, name: str = "BatchNorm") -> Layer:
    """Normalise each feature over the batch to mean 0 and variance 1, then scale and shift.

    Shapes: x (batch, ..., features), g and b (features,), y like x. Each feature is
    standardised over all the other axes: the batch of an MLP's (batch, features), the batch
    and the positions of an NHWC map (the convolutional form of Ioffe and Szegedy 2015,
    section 3.2). g starts at 1 and b at 0, named so that the lecture's L2 penalty (on "w")
    leaves them alone. The module docstring gives the math of the three passes; the sums of
    dg and db run over the same axes.

    The statistics are always the batch's own, in training and in evaluation alike (as
    `jax.example_libraries.stax.BatchNorm`): there are no running averages, no state and no
    modes, so that the layer stays a pure function of (params, x). Evaluated on a whole test
    set at once, a net is normalised with that set's statistics, not the training set's:
    measure with large batches, and say so. Because one example's output depends on the rest
    of its batch, per-example gradients are not defined (`batch_coupled_layers`,
    `training.parallel.per_example_value_and_grad` refuses such a model), and over devices
    each shard is normalised with its own statistics (PyTorch's BatchNorm under
    DistributedDataParallel, not SyncBatchNorm). A group of fewer than 2 values (a batch of
    one example without positions) has no spread: ValueError.
    """
    _check_arguments(name, features, eps)
    check = _shape_check(name, features)

    def batch_axes(x):
        axes = tuple(range(x.ndim - 1))
        group = math.prod(x.shape[:-1])
        if group < 2:
            raise ValueError(f"{name}: input x has shape {tuple(x.shape)}: {group} value per "
                             "feature, expected at least 2 to normalise over (batch x "
                             "positions >= 2)")
        return axes, group

    def forward(params, x):
        check(x.shape)
        axes, _ = batch_axes(x)
        xhat, s = _standardise(x, axes, eps)
        y = _along_features(params["g"], x.ndim) * xhat + _along_features(params["b"], x.ndim)
        return y, (xhat, s)

    def backward(params, residuals, dy):
        xhat, s = residuals
        axes, _ = batch_axes(xhat)
        dx = _standardise_backward(xhat, s, dy * _along_features(params["g"], dy.ndim), axes)
        return {"g": jnp.sum(dy * xhat, axis=axes), "b": jnp.sum(dy, axis=axes)}, dx

    def curvature(params, residuals, d2y):
        xhat, s = residuals
        axes, group = batch_axes(xhat)
        a = _along_features(params["g"], d2y.ndim) ** 2 * d2y / (s * s)
        d2x = _standardise_curvature(xhat, a, axes, group)
        return {"g": jnp.sum(d2y * xhat * xhat, axis=axes), "b": jnp.sum(d2y, axis=axes)}, d2x

    return Layer(name, init=_gain_and_bias_init(check, features), forward=forward,
                 backward=backward, curvature=curvature)


def batch_coupled_layers(model: Layer) -> list[str]:
    """The names of the layers of `model` (itself or any sublayer, depth first) whose output
    for one example depends on the other examples of the batch: those made by `BatchNorm`."""
    own = [model.name] if model.forward.__qualname__.startswith("BatchNorm.") else []
    return own + [name for layer in model.sublayers for name in batch_coupled_layers(layer)]
