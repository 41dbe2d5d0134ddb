"""training/augment.py: the arguments random_shifts refuses, by name."""
import re

import jax
import jax.numpy as jnp
import pytest

from training import augment


@pytest.mark.parametrize("max_shift", [1.5, 2.0, float("nan"), True])
def test_random_shifts_refuse_a_shift_that_is_not_an_integer(max_shift):
    """1.5 and 2.0 failed inside jnp.pad at the first batch ('`pad_width` must be of integral
    type'), nan passed the check (nan < 0 is false), True shifted by one pixel."""
    with pytest.raises(ValueError, match=re.escape(
            f"random_shifts: max_shift must be an integer, got {max_shift!r}")):
        augment.random_shifts(max_shift, -1.0)


@pytest.mark.parametrize("shape", [(3, 8, 8), (8, 8), (2, 3, 8, 8, 1)])
def test_random_shifts_refuse_images_that_are_not_four_dimensional(shape):
    """Images without a channel axis were a jnp.pad error ('pad_width with nd=3 has
    unsupported shape (4, 2)') that named neither random_shifts nor x; with max_shift 0 they
    passed through unchecked."""
    for max_shift in (2, 0):
        with pytest.raises(ValueError, match=re.escape(
                f"random_shifts: x has shape {shape}, expected (batch, height, width, "
                "channels)")):
            augment.random_shifts(max_shift, -1.0)(jax.random.key(0), jnp.zeros(shape))
