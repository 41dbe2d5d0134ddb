"""Layer normalisation (Ba, Kiros and Hinton 2016) with a hand-written backward pass.

Over the last axis of x, of length n (an MLP's features, an NHWC map's channels at each
position, a sequence's features at each step), row by row:

    mu = mean(x),  s = sqrt(mean((x - mu)^2) + eps),  xhat = (x - mu) / s,  y = g xhat + b.

Backward, with dxhat = dy g:

    dg = sum over rows of dy xhat,   db = sum over rows of dy,
    dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) / s,

from the Jacobian J[j, i] = dy_j / dx_i = (g_j / s) (delta_ij - (1 + xhat_i xhat_j) / n).
Curvature (Gauss-Newton diagonal, `nets.layers`): d2g and d2b as dg and db with xhat^2 and 1
in place of xhat and dy, and d2x_i = sum_j J[j, i]^2 d2y_j, which expands to

    d2x_i = a_i (1 - 2 (1 + xhat_i^2) / n) + (A_0 + 2 xhat_i A_1 + xhat_i^2 A_2) / n^2,
    a_j = g_j^2 d2y_j / s^2,   A_k = sum_j a_j xhat_j^k,

O(n) a row although J is a dense n x n block.
"""
from __future__ import annotations

import jax.numpy as jnp

from nets.layers import Layer

__all__ = ["LayerNorm"]


def LayerNorm(features: int, eps: float = 1e-5, name: str = "LayerNorm") -> Layer:
    """Normalise each row of the last axis to mean 0 and variance 1, then scale and shift.

    Shapes: x (batch, ..., features), g and b (features,), y like x. g starts at 1 and b at
    0; they are named "g" and "b", so the lecture's L2 penalty (on "w") leaves them alone.
    The module docstring gives the math of the forward, backward and curvature passes.
    """
    if features < 1:
        raise ValueError(f"{name}: features must be >= 1, got {features}")
    if not eps > 0:
        raise ValueError(f"{name}: eps must be > 0, got {eps}")

    def check(shape, what="input x"):
        if len(shape) < 2 or shape[-1] != features:
            raise ValueError(f"{name}: {what} has shape {tuple(shape)}, expected "
                             f"(batch, ..., {features})")

    def init(key, input_shape):
        del key
        check(input_shape, "input_shape")
        return tuple(input_shape), {"g": jnp.ones((features,), jnp.float32),
                                     "b": jnp.zeros((features,), jnp.float32)}

    def along_rows(vector, ndim):
        """(features,) -> (1, ..., 1, features), so that it multiplies rows without rank
        promotion."""
        return vector.reshape((1,) * (ndim - 1) + (features,))

    def row_mean(values):
        return jnp.mean(values, axis=-1, keepdims=True)

    def over_rows(values):
        return jnp.sum(values.reshape(-1, features), axis=0)

    def forward(params, x):
        check(x.shape)
        centred = x - row_mean(x)
        s = jnp.sqrt(row_mean(centred * centred) + eps)
        xhat = centred / s
        y = along_rows(params["g"], x.ndim) * xhat + along_rows(params["b"], x.ndim)
        return y, (xhat, s)

    def backward(params, residuals, dy):
        xhat, s = residuals
        dxhat = dy * along_rows(params["g"], dy.ndim)
        dx = (dxhat - row_mean(dxhat) - xhat * row_mean(dxhat * xhat)) / s
        return {"g": over_rows(dy * xhat), "b": over_rows(dy)}, dx

    def curvature(params, residuals, d2y):
        xhat, s = residuals
        a = along_rows(params["g"], d2y.ndim) ** 2 * d2y / (s * s)
        a0, a1, a2 = (jnp.sum(a * xhat**k, axis=-1, keepdims=True) for k in range(3))
        d2x = (a * (1 - 2 * (1 + xhat * xhat) / features)
               + (a0 + 2 * xhat * a1 + xhat * xhat * a2) / features**2)
        return {"g": over_rows(d2y * xhat * xhat), "b": over_rows(d2y)}, d2x

    return Layer(name, init, forward, backward, curvature=curvature)

