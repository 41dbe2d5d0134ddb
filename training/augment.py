"""Data augmentation as pure functions `augment(key, x) -> x` (jit- and vmap-friendly)."""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

__all__ = ["random_shifts"]


def random_shifts(max_shift: int, fill: float):
    """Translate each image by an independent integer offset in [-max_shift, max_shift]^2.

    x: (batch, height, width, channels) -> same shape; pixels shifted in from outside are
    `fill` (the background: -1 for the zip-code digits). max_shift must be an integer >= 0
    and x four-dimensional (ValueError otherwise).
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, numbers.Integral):
        raise ValueError(f"random_shifts: max_shift must be an integer, got {max_shift!r}")
    if max_shift < 0:
        raise ValueError(f"random_shifts: max_shift must be >= 0, got {max_shift}")

    def augment(key, x):
        if jnp.ndim(x) != 4:
            raise ValueError(f"random_shifts: x has shape {jnp.shape(x)}, expected (batch, "
                             "height, width, channels)")
        if max_shift == 0:
            return x
        pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
        padded = jnp.pad(x, pad, constant_values=fill)
        offsets = jax.random.randint(key, (x.shape[0], 2), 0, 2 * max_shift + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), x.shape[1:])

        return jax.vmap(crop)(padded, offsets)

    return augment
