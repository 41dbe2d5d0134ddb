"""Weight initialisers: `initializer(key, shape, dtype=float32) -> array`.

Fan-in F is the number of inputs feeding one unit: `shape[0]` for a dense kernel
(in, out), and the product of all but the last axis for a convolution kernel
(height, width, in_channels, out_channels). Fan-out is the last axis times the
receptive field.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "Initializer",
    "fan_in_uniform",
    "glorot_uniform",
    "he_normal",
    "normal",
    "zeros",
    "fans",
]

Initializer = Callable[..., jax.Array]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a kernel of the given shape; (1, n) for a vector of length n."""
    if len(shape) < 2:
        return 1, int(shape[0]) if shape else 1
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def _check_scale(function: str, argument: str, value) -> None:
    """A spread must be a finite number >= 0: NaN or inf filled every weight with NaN or inf,
    silently, a negative scale made jax.random.uniform's minval exceed its maxval and every
    weight equal +limit, and a str failed only at the first init."""
    if isinstance(value, (bool, str, bytes)) or not (
            math.isfinite(_as_float(value)) and value >= 0):
        raise ValueError(f"{function}: {argument} must be a finite number >= 0, got {value!r}")


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def fan_in_uniform(scale: float = 2.4, exponent: float = 0.5) -> Initializer:
    """U(-scale/F^exponent, +scale/F^exponent), F the fan-in.

    After LeCun et al. 1989 ("Backpropagation applied to handwritten zip code
    recognition"), whose text reads 2.4/F (exponent=1). The default is the square-root
    form, as common reproductions use: it keeps the pre-activation variance independent of
    F, which is the stated purpose of scaling by the fan-in.
    """
    if not exponent >= 0:
        raise ValueError(f"fan_in_uniform: exponent must be >= 0, got {exponent}")
    _check_scale("fan_in_uniform", "scale", scale)

    def init(key, shape, dtype=jnp.float32):
        limit = scale / fans(shape)[0] ** exponent
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def glorot_uniform() -> Initializer:
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) (Glorot and Bengio 2010, eq. 16)."""

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = fans(shape)
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def he_normal() -> Initializer:
    """N(0, 2 / fan_in) (He et al. 2015, eq. 10), for ReLU nets."""

    def init(key, shape, dtype=jnp.float32):
        std = math.sqrt(2.0 / fans(shape)[0])
        return std * jax.random.normal(key, shape, dtype)

    return init


def normal(std: float) -> Initializer:
    """N(0, std^2)."""
    _check_scale("normal", "std", std)

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)

    return init


def zeros(key, shape, dtype=jnp.float32):
    """All zeros (the default for biases)."""
    del key
    return jnp.zeros(shape, dtype)
