"""Update rules as `optax.GradientTransformation`s.

Any optax optimiser works with either gradient engine, since both return the same pytree;
this module adds the rules of the lecture (and, later, LeCun's diagonal second-order steps).
"""
from __future__ import annotations

import jax
import optax

__all__ = ["gradient_descent"]


def gradient_descent(learning_rate: float) -> optax.GradientTransformation:
    """The lecture's rule w <- w - eta * dE/dw, with no state.

    Args:
      learning_rate: eta > 0.
    Returns:
      A stateless `optax.GradientTransformation`; `optax.apply_updates(params, updates)`
      performs the step. Equal to `optax.sgd(eta)` without momentum.
    """
    if not learning_rate > 0:
        raise ValueError(f"gradient_descent: learning_rate must be > 0, got {learning_rate}")

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: -learning_rate * g, updates), state

    return optax.GradientTransformation(init, update)
