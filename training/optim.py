"""Update rules as `optax.GradientTransformation`s.

Any optax optimiser works with either gradient engine, since both return the same pytree;
this module adds the rule of the lecture, LeCun's diagonal second-order steps and
Kronecker-factored ones (K-FAC).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nets.kronecker import DiagonalBlock, KroneckerBlock, block_shape, identity_blocks, is_block

__all__ = ["gradient_descent", "diagonal_levenberg_marquardt", "DiagonalLevenbergMarquardtState",
           "lecun1998_schedule", "scale_by_kronecker_factors", "KroneckerFactoredState",
           "DampedFactors", "DampedDiagonal", "kfac", "kfac_adaptive", "AdaptiveKroneckerState"]


def _is_positive_finite(value: Any) -> bool:
    """Whether value is a number > 0 and finite; a bool is not a number here. A traced value
    passes: `optax.inject_hyperparams` rebuilds the rule with traced hyperparameters in each
    jitted update, after its init has checked them concretely."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, jax.core.Tracer):
        return True
    try:
        return value > 0 and math.isfinite(value)
    except TypeError:  # not a number at all
        return False


def _is_fraction(value: Any, low_open: bool = False) -> bool:
    """Whether value is a number in [0, 1) ((0, 1) with low_open); a bool or a str is not (a
    str such as "0.5" was a bare comparison TypeError). A traced value passes, as in
    `_is_positive_finite`."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, jax.core.Tracer):
        return True
    try:
        return bool(0 < value < 1) if low_open else bool(0 <= value < 1)
    except (TypeError, ValueError):  # not a number, or an array of several
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
    as `update(grads, state, params, curvature=h)`; between estimates the last one is kept,
    in the state's dtypes (the params', from init), whatever the estimate's dtype.
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
        h = _curvature_like(updates, state.curvature, "the state's curvature (from init)")
        if curvature is not None:
            # kept in the state's dtypes (init's: the params'), so that a float64 estimate
            # for float32 params neither promotes the state nor changes a lax.scan's carry
            h = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype),
                             _curvature_like(updates, curvature, "curvature"), h)
        steps = jax.tree.map(lambda g, hk: (-eta * g / (mu + hk)).astype(g.dtype), updates, h)
        return steps, DiagonalLevenbergMarquardtState(h, state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def _curvature_like(updates: Any, h: Any, what: str) -> Any:
    """h checked against the gradients: their tree structure and each leaf's shape, else a
    ValueError naming the first leaf that differs (a (1,) or (n, 1) h would broadcast into the
    step). Where `optax.masked` masked a gradient out (`optax.MaskedNode`) h's leaf is
    dropped, so that the whole tree's h can be passed to a masked rule."""
    def masked(node):
        return isinstance(node, optax.MaskedNode)

    expected, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=masked)
    try:
        given = treedef.flatten_up_to(h)
    except (ValueError, TypeError):
        raise ValueError(f"diagonal_levenberg_marquardt: {what} does not have the gradients' "
                         f"tree structure (made for other params?): expected "
                         f"{jax.tree.structure(updates)}, got {jax.tree.structure(h)}"
                         ) from None
    for (path, gradient), leaf in zip(expected, given):
        if not masked(gradient) and np.shape(leaf) != np.shape(gradient):
            raise ValueError(f"diagonal_levenberg_marquardt: {what} at "
                             f"{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, "
                             f"expected the gradient's {np.shape(gradient)}")
    return treedef.unflatten([gradient if masked(gradient) else leaf
                              for (_, gradient), leaf in zip(expected, given)])


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


class KroneckerFactoredState(NamedTuple):
    """The running averages of each leaf's Kronecker blocks (`nets.kronecker.KroneckerBlock`
    in place of every leaf; identities until the first estimate), the inverses of their
    damped A and G (`DampedFactors`, computed when the blocks change), and how many
    estimates the averages hold."""

    blocks: Any
    damped: Any
    estimates: jax.Array


class DampedFactors(NamedTuple):
    """The inverses of one leaf's A + pi sqrt(gamma) I (K, K) and G + sqrt(gamma) / pi I
    (C, C), and its mask (K, C)."""

    a: jax.Array
    g: jax.Array
    mask: jax.Array


class DampedDiagonal(NamedTuple):
    """The inverse of a leaf's damped diagonal block, 1 / (d + gamma), the leaf's shape."""

    inverse: jax.Array


def _identity_block(path: tuple[Any, ...], leaf: jax.Array) -> KroneckerBlock:
    k, c = block_shape(path, leaf.shape)
    return KroneckerBlock(jnp.eye(k, dtype=leaf.dtype), jnp.eye(c, dtype=leaf.dtype),
                          jnp.ones((k, c), leaf.dtype), jnp.zeros((), leaf.dtype))


def _initial_blocks(params: Any, model) -> Any:
    """Identity blocks of the kinds `nets.kronecker.kronecker_factors(model, ...)` gives, or
    Kronecker ones for every leaf without a model."""
    if model is None:
        return jax.tree_util.tree_map_with_path(_identity_block, params)
    return identity_blocks(model, params)


def _averaged(old: Any, new: Any, first: jax.Array, decay: float) -> Any:
    """The blocks' running averages, A <- decay A + (1 - decay) A_new (G and a diagonal
    alike; the new one whole on the first estimate), with the new masks and penalties."""
    def mix(past, fresh):
        return jnp.where(first, fresh, decay * past + (1 - decay) * fresh).astype(past.dtype)

    def average(o, n):
        if type(o) is not type(n):
            raise ValueError(f"K-FAC: a {type(n).__name__} arrived for a leaf the optimiser "
                             f"holds a {type(o).__name__} for: give the optimiser the model "
                             "(`model=`) so that it starts from the blocks' own kinds")
        penalty = jnp.asarray(n.penalty, o.penalty.dtype)
        if isinstance(o, DiagonalBlock):
            return DiagonalBlock(mix(o.diagonal, n.diagonal), penalty)
        return KroneckerBlock(mix(o.a, n.a), mix(o.g, n.g), n.mask.astype(o.mask.dtype),
                              penalty)

    return jax.tree.map(average, old, new, is_leaf=is_block)


def _damped(block: KroneckerBlock | DiagonalBlock, damping: float, relative: bool
            ) -> DampedFactors | DampedDiagonal:
    """A block damped and inverted: `_damped_factors` for a Kronecker one; 1 / (d + gamma)
    for a diagonal one, gamma = damping (times mean(d) if relative) + its L2 share."""
    if isinstance(block, KroneckerBlock):
        return _damped_factors(block, damping, relative)
    scale = jnp.maximum(jnp.mean(block.diagonal), jnp.finfo(block.diagonal.dtype).tiny)
    gamma = damping * (scale if relative else 1) + block.penalty
    return DampedDiagonal(1 / (block.diagonal + gamma))


def _damped_factors(block: KroneckerBlock, damping: float, relative: bool) -> DampedFactors:
    """Factored Tikhonov damping (Martens and Grosse 2015, section 6.3): A + pi sqrt(gamma) I
    and G + sqrt(gamma) / pi I, gamma = damping (times the block's scale (tr A / K)(tr G / C)
    if relative) + the block's L2 share, pi^2 = (tr A / K) / (tr G / C), the ratio that makes
    each added term as large relative to its factor; both inverted by their Cholesky factors
    (a step then costs two products per leaf: on XLA:CPU two triangular solves per factor
    took longer than the gradient itself)."""
    k, c = block.mask.shape
    tiny = jnp.finfo(block.a.dtype).tiny
    scale_a = jnp.maximum(jnp.trace(block.a) / k, tiny)
    scale_g = jnp.maximum(jnp.trace(block.g) / c, tiny)
    gamma = damping * (scale_a * scale_g if relative else 1) + block.penalty
    pi = jnp.sqrt(scale_a / scale_g)
    a = block.a + pi * jnp.sqrt(gamma) * jnp.eye(k, dtype=block.a.dtype)
    g = block.g + jnp.sqrt(gamma) / pi * jnp.eye(c, dtype=block.g.dtype)
    return DampedFactors(_spd_inverse(a), _spd_inverse(g), block.mask)


def _spd_inverse(matrix: jax.Array) -> jax.Array:
    identity = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(matrix, lower=True), identity)


def _solve(damped: DampedFactors | DampedDiagonal, gradient: jax.Array) -> jax.Array:
    """(A + pi sqrt(gamma) I)^-1 V (G + sqrt(gamma) / pi I)^-1, masked, for the leaf's gradient
    read as V (K, C); a diagonal block's gradient / (d + gamma)."""
    if isinstance(damped, DampedDiagonal):
        return (gradient * damped.inverse).astype(gradient.dtype)
    k, c = damped.mask.shape
    solved = damped.a @ gradient.reshape(k, c) @ damped.g
    return (solved * damped.mask).reshape(gradient.shape).astype(gradient.dtype)


def scale_by_kronecker_factors(damping: float, decay: float = 0.95, relative: bool = False,
                               *, model=None) -> optax.GradientTransformationExtraArgs:
    """Each leaf's gradient preconditioned by its Kronecker-factored Gauss-Newton block:
    V <- (A + pi sqrt(gamma) I)^-1 V (G + sqrt(gamma)/pi I)^-1 (K-FAC's direction, Martens and
    Grosse 2015, with their factored Tikhonov damping; without their adaptive step and
    momentum, which a chained optax rule supplies). The blocks are not computed here: pass
    fresh ones (`nets.kronecker.kronecker_factors(model, objective)(params, x, targets)`) as
    `update(grads, state, params, blocks=...)`; the state keeps their running average,
    A <- decay A + (1 - decay) A_new (the first estimate taken whole), and the inverses of
    its damped A and G, made when the blocks arrive and used until the next ones (so a step
    between estimates costs two matrix products per leaf).

    Args:
      damping: gamma > 0, finite: the Tikhonov damping, to which each weight's block adds
        its L2 share lambda/m.
      decay: in [0, 1), the running averages' weight on the past.
      relative: damp each block by damping times its own scale (tr A / K)(tr G / C), the
        mean eigenvalue of A (x) G, so that every block is damped as much relative to its
        curvature: in a deep sigmoid net the blocks' scales span 1e-10 to 0.2 (USPS, eight
        hidden layers), and one absolute gamma either swamps the lowest layers' curvature
        (their steps then plain gradient steps of size 1/gamma) or leaves the top ones'
        undamped. A diagonal block (`nets.kronecker.DiagonalBlock`) is damped as d + gamma,
        gamma = damping (times mean(d) if relative) + its L2 share.
      model: the model the blocks come from, when some of its layers get diagonal blocks
        (layers without `factors`: LeNet-5's subsampling, recurrent cells, ...): the state
        then starts from identities of the same kinds (`nets.kronecker.identity_blocks`).
        Without it every leaf starts from a Kronecker identity.
    Returns:
      An `optax.GradientTransformationExtraArgs`; before any estimate the blocks are
      identities (the step is the gradient scaled by 1/(1 + sqrt(gamma))^2, or by
      1/(1 + gamma) on a diagonal block).
    Raises:
      ValueError for a damping that is not a finite number > 0 or a decay outside [0, 1).
    """
    if not _is_positive_finite(damping):
        raise ValueError(f"scale_by_kronecker_factors: damping must be > 0 and finite, got "
                         f"{damping}")
    if not _is_fraction(decay):
        raise ValueError(f"scale_by_kronecker_factors: decay must be in [0, 1), got "
                         f"{decay!r}")

    def factored(blocks):
        return jax.tree.map(lambda block: _damped(block, damping, relative), blocks,
                            is_leaf=is_block)

    # optax's init usually runs outside jit, where the inverses took 40 single programs
    initial_factors = jax.jit(factored)

    def init(params):
        blocks = _initial_blocks(params, model)
        return KroneckerFactoredState(blocks, initial_factors(blocks), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, blocks=None, **extra_args):
        del params, extra_args
        if blocks is not None:
            averages = _averaged(state.blocks, blocks, state.estimates == 0, decay)
            state = KroneckerFactoredState(averages, factored(averages), state.estimates + 1)
        steps = jax.tree.map(lambda g, damped: _solve(damped, g), updates, state.damped)
        return steps, state

    return optax.GradientTransformationExtraArgs(init, update)


def kfac(learning_rate: float | optax.Schedule, damping: float, decay: float = 0.95,
         momentum: float | None = None, relative: bool = False, *, model=None
         ) -> optax.GradientTransformationExtraArgs:
    """K-FAC's steps: `scale_by_kronecker_factors(damping, decay, relative, model=model)` then
    optax's SGD with `learning_rate` (a number or a schedule) and `momentum` (None for none).
    Pass the blocks as `update(grads, state, params, blocks=...)` whenever they are
    re-estimated. ValueError for a learning rate that is not a finite number > 0 (or a
    schedule), and as `scale_by_kronecker_factors`."""
    if not (callable(learning_rate) or _is_positive_finite(learning_rate)):
        raise ValueError(f"kfac: learning_rate must be > 0 and finite (or a schedule), got "
                         f"{learning_rate}")
    return optax.chain(scale_by_kronecker_factors(damping, decay, relative, model=model),
                       optax.sgd(learning_rate, momentum))


class AdaptiveKroneckerState(NamedTuple):
    """`kfac_adaptive`'s state: the blocks' running averages and how many estimates they hold
    (as `KroneckerFactoredState`), the damping lambda, the last step delta (like the params)
    and the last reduction ratio rho (NaN before the first step)."""

    blocks: Any
    estimates: jax.Array
    damping: jax.Array
    previous: Any
    ratio: jax.Array


def _dot(a: Any, b: Any) -> jax.Array:
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _step_coefficients(m11, m12, m22, b1, b2):
    """(alpha, mu) minimising the quadratic model q(alpha d + mu p) = 1/2 [alpha mu] M [alpha
    mu]^T + [b1 b2] [alpha mu]^T over the plane of the proposal d and the last step p; over
    d alone (mu = 0) where p is 0 (the first step) or M is not positive definite."""
    determinant = m11 * m22 - m12 ** 2
    plane = (m22 > 0) & (determinant > 0)
    safe = jnp.where(plane, determinant, 1)
    alpha = jnp.where(plane, (m12 * b2 - m22 * b1) / safe, -b1 / m11)
    mu = jnp.where(plane, (m12 * b1 - m11 * b2) / safe, 0)
    return alpha, mu


def kfac_adaptive(initial_damping: float = 1.0, decay: float = 0.95, relative: bool = False,
                  omega: float = 19 / 20, *, model=None
                  ) -> optax.GradientTransformationExtraArgs:
    """K-FAC as Martens and Grosse (2015, sections 6-7) step: the preconditioned direction,
    rescaled and given momentum by the exact quadratic model, with Levenberg-Marquardt damping.

    Each update takes, besides the gradient g, this batch's blocks (`blocks=`, as
    `scale_by_kronecker_factors`), its Gauss-Newton product (`gauss_newton=`, v -> G v of
    the batch's E, e.g. `nets.engines.gauss_newton_product`) and its objective
    (`batch_energy=`, params -> E on the batch). With damping lambda:
    1. d = -(A_d^-1 g G_d^-1 per leaf): the blocks' running averages damped with lambda
       (factored Tikhonov, times each block's scale if `relative`);
    2. delta = alpha d + mu p, p the last step, (alpha, mu) minimising the model
       q(delta) = 1/2 delta^T (G + lambda I) delta + g^T delta, two products G d, G p
       (section 7); on the first step mu = 0;
    3. rho = (E(w + delta) - E(w)) / q_0(delta) on the batch, q_0 the model without lambda
       (as Martens 2010 takes it): lambda <- lambda / omega where rho < 1/4, lambda omega
       where rho > 3/4 (section 6.5, every step).
    Returns delta as the update (apply it with `optax.apply_updates`).

    Args:
      initial_damping: lambda at the start, > 0 and finite.
      decay: in [0, 1), the blocks' running averages' weight on the past.
      relative: damp the blocks (step 1) relative to each one's scale.
      omega: in (0, 1), lambda's factor.
      model: as `scale_by_kronecker_factors`' (needed when some blocks are diagonal).
    Raises:
      ValueError for values outside those ranges.
    """
    if not _is_positive_finite(initial_damping):
        raise ValueError(f"kfac_adaptive: initial_damping must be > 0 and finite, got "
                         f"{initial_damping}")
    if not _is_fraction(decay):
        raise ValueError(f"kfac_adaptive: decay must be in [0, 1), got {decay!r}")
    if not _is_fraction(omega, low_open=True):
        raise ValueError(f"kfac_adaptive: omega must be in (0, 1), got {omega!r}")

    def init(params):
        blocks = _initial_blocks(params, model)
        return AdaptiveKroneckerState(blocks, jnp.zeros((), jnp.int32),
                                      jnp.asarray(initial_damping, jnp.float32),
                                      jax.tree.map(jnp.zeros_like, params),
                                      jnp.asarray(jnp.nan, jnp.float32))

    def update(updates, state, params=None, *, blocks, gauss_newton, batch_energy,
               **extra_args):
        del extra_args
        averages = _averaged(state.blocks, blocks, state.estimates == 0, decay)
        damping = state.damping.astype(jax.tree.leaves(updates)[0].dtype)  # kept in float32
        damped = jax.tree.map(lambda block: _damped(block, damping, relative),
                              averages, is_leaf=is_block)
        proposal = jax.tree.map(lambda g, factors: -_solve(factors, g), updates, damped)
        previous = state.previous
        g_proposal, g_previous = gauss_newton(proposal), gauss_newton(previous)
        curvature = (_dot(proposal, g_proposal), _dot(proposal, g_previous),
                     _dot(previous, g_previous))
        m11 = curvature[0] + damping * _dot(proposal, proposal)
        m12 = curvature[1] + damping * _dot(proposal, previous)
        m22 = curvature[2] + damping * _dot(previous, previous)
        b1, b2 = _dot(updates, proposal), _dot(updates, previous)
        alpha, mu = _step_coefficients(m11, m12, m22, b1, b2)
        step = jax.tree.map(lambda d, p: (alpha * d + mu * p).astype(d.dtype), proposal,
                            previous)
        model_change = (alpha ** 2 * curvature[0] + 2 * alpha * mu * curvature[1]
                        + mu ** 2 * curvature[2]) / 2 + alpha * b1 + mu * b2  # undamped
        ratio = ((batch_energy(optax.apply_updates(params, step)) - batch_energy(params))
                 / model_change)
        damping = jnp.where(ratio < 0.25, damping / omega,
                            jnp.where(ratio > 0.75, damping * omega, damping))
        return step, AdaptiveKroneckerState(averages, state.estimates + 1,
                                            damping.astype(jnp.float32), step,
                                            ratio.astype(jnp.float32))

    return optax.GradientTransformationExtraArgs(init, update)
