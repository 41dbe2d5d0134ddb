"""Metrics computed from a model's outputs."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nets.layers import Layer

__all__ = ["classification_error", "accuracy"]


def classification_error(model: Layer, params: Any, x: jax.Array, targets: jax.Array):
    """Fraction of examples whose largest output is not the target's largest entry.

    Shapes: x (batch, ...), targets (batch, classes) (one-hot, or +-1 codes).
    """
    outputs = model.apply(params, x)
    return jnp.mean(jnp.argmax(outputs, axis=-1) != jnp.argmax(targets, axis=-1))


def accuracy(model: Layer, params: Any, x: jax.Array, targets: jax.Array):
    """1 - classification_error."""
    return 1.0 - classification_error(model, params, x, targets)
