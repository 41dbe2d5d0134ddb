"""Update rules as `optax.GradientTransformation`s.

Any optax optimiser works with either gradient engine, since both return the same pytree;
this module adds the rule of the lecture and LeCun's diagonal second-order steps.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["gradient_descent", "diagonal_levenberg_marquardt", "DiagonalLevenbergMarquardtState",
           "lecun1998_schedule"]


def _is_positive_finite(value: Any) -> bool:
    """Whether value is a number > 0 and finite; a bool is not a number here."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        return value > 0 and math.isfinite(value)
    except TypeError:  # not a number at all
        return False


def gradient_descent(learning_rate: float) -> optax.GradientTransformation:
    """The lecture's rule w <- w - eta * dE/dw, with no state.

    Args:
      learning_rate: eta > 0 and finite (ValueError otherwise, and for a bool).
    Returns:
      A stateless `optax.GradientTransformation`; `optax.apply_updates(params, updates)`
      performs the step. Equal to `optax.sgd(eta)` without momentum.
    """
    if not _is_positive_finite(learning_rate):
        raise ValueError(f"gradient_descent: learning_rate must be > 0 and finite, got "
                         f"{learning_rate}")

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: -learning_rate * g, updates), state

    return optax.GradientTransformation(init, update)


class DiagonalLevenbergMarquardtState(NamedTuple):
    """The current estimate h of diag(d2E/dw2), one entry per parameter, and the step count."""

    curvature: Any
    count: jax.Array


def diagonal_levenberg_marquardt(
    learning_rate: float | optax.Schedule, mu: float
) -> optax.GradientTransformationExtraArgs:
    """LeCun's per-parameter step sizes from a diagonal second-derivative estimate.

        w_k <- w_k - eta / (mu + h_kk) * dE/dw_k

    (LeCun et al. 1989, section 5; "Efficient BackProp", section 9.1, the stochastic diagonal
    Levenberg-Marquardt method). h is not computed here: pass a fresh estimate (a pytree like
    the params, e.g. from `nets.engines.curvature_diagonal` averaged over a subset of examples)
    as `update(grads, state, params, curvature=h)`; between estimates the last one is kept.
    mu > 0 keeps the step finite where h is near 0.

    Args:
      learning_rate: eta > 0 and finite, or an optax schedule of the update count.
      mu: the damping mu > 0, finite.
    Returns:
      An `optax.GradientTransformationExtraArgs` whose state holds h (zeros until the first
      estimate, which makes the first steps plain descent with step eta / mu).
    Raises:
      ValueError for a learning rate or mu that is not a finite number > 0 (or a bool).
    """
    if not (callable(learning_rate) or _is_positive_finite(learning_rate)):
        raise ValueError(f"diagonal_levenberg_marquardt: learning_rate must be > 0 and finite "
                         f"(or a schedule), got {learning_rate}")
    if not _is_positive_finite(mu):
        raise ValueError(f"diagonal_levenberg_marquardt: mu must be > 0 and finite, got {mu}")

    def init(params):
        return DiagonalLevenbergMarquardtState(jax.tree.map(jnp.zeros_like, params),
                                               jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, curvature=None, **extra_args):
        del params, extra_args
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
        h = state.curvature if curvature is None else curvature
        steps = jax.tree.map(lambda g, hk: (-eta * g / (mu + hk)).astype(g.dtype), updates, h)
        return steps, DiagonalLevenbergMarquardtState(h, state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def lecun1998_schedule(learning_rate: float, updates_per_pass: int) -> optax.Schedule:
    """The step-size schedule of LeCun et al. 1998 (Appendix C) for SDLM, by update count:
    eta for 2 passes, then x0.4, and x0.5 after 5 and 8 passes, x0.2 after 12 (from 5e-4:
    5e-4, 2e-4, 1e-4, 5e-5, 1e-5). ValueError unless learning_rate is > 0 and finite and
    updates_per_pass an integer >= 1 (at 0 or fewer the passes' boundaries collapse)."""
    if not _is_positive_finite(learning_rate):
        raise ValueError(f"lecun1998_schedule: learning_rate must be > 0 and finite, got "
                         f"{learning_rate}")
    if (isinstance(updates_per_pass, (bool, np.bool_))
            or not isinstance(updates_per_pass, numbers.Integral) or updates_per_pass < 1):
        raise ValueError(f"lecun1998_schedule: updates_per_pass must be an integer >= 1, got "
                         f"{updates_per_pass}")
    return optax.piecewise_constant_schedule(learning_rate, {
        2 * updates_per_pass: 0.4, 5 * updates_per_pass: 0.5, 8 * updates_per_pass: 0.5,
        12 * updates_per_pass: 0.2})
