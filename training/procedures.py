"""The lecture's training procedures, each a pure, jit-compatible function of a gradient engine.

A procedure is a pair of pure functions over one `TrainState`:

    init(params, key) -> state
    step(state, index) -> (state, record)

so that a run is a `lax.scan` of `step` (it jits whole and vmaps over random restarts), and the
harness (`training.loop`) can run it in chunks, checkpointing the state between them, with
results bitwise identical to one scan. `run(procedure, params, key, steps)` is that one scan and
returns a `TrainResult`:

    params        the final parameters;
    history       dict of (steps,) arrays: "energy" E(params) after each step (on the
                  procedure's training data), procedure-specific flags and counts, and the
                  scalars returned by `monitor(params)` if one was given;
    stop_step     the step at which the stopping rule fired (`steps` if it never did);
    perturbations how many steps were undone and replaced by a random perturbation.

Stopping rule (the lecture's "no significant decrease"): stop when the best energy so far
decreased by less than `stop_tolerance` (relative) over the last `stop_window` steps. Once a
run has stopped, later steps leave its state unchanged.

Numerical failures: every step checks that the energy and every gradient leaf it is about to
use are finite (a handful of reductions). A non-finite step is rejected (the state stays at the
last good one), the learning rate is multiplied by `Guard.factor`, and after
`Guard.max_failures` consecutive rejections the run is marked failed and frozen, with the step
and the parameter leaf where the gradient first became non-finite recorded for the error
message (`training.loop` raises it). `Guard.nan_steps` injects a NaN into one gradient leaf at
the given steps, to test all of this. `stochastic_passes` and `online` also take guard=None:
no check, every step is taken (as plain SGD elsewhere, PyTorch's included). The check is about
20 small operations a step: with it, a pass of LeNet-1989's one-example recipe took 0.70 s
against 0.52 s on the 2-core CPU (medians, interleaved), so `stochastic_passes` checks once
per pass and repeats only a pass that went wrong, step by step (its docstring);
`experiments.bench`, which compares that recipe with PyTorch's, turns the guard off.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from nets import engines
from nets.kronecker import kronecker_factors
from nets.layers import Layer, is_count
from nets.losses import Objective
from training import optim
from training.metrics import classification_error, predicted_labels, target_labels

__all__ = [
    "Guard",
    "GuardState",
    "StopState",
    "TrainState",
    "Procedure",
    "TrainResult",
    "RestartResult",
    "full_batch",
    "cost_checked",
    "misclassified",
    "stochastic_passes",
    "curvature_on_subset",
    "online",
    "initial_state",
    "guarded_update",
    "run",
    "run_steps",
    "stop_step",
    "full_batch_descent",
    "cost_checked_descent",
    "misclassified_descent",
    "random_restarts",
    "select_best",
    "perturb",
    "conjugate_gradient",
    "ConjugateGradientResult",
    "lanczos",
    "LanczosResult",
    "saddle_free_step",
    "SaddleFreeStep",
    "HessianFreeState",
    "hessian_free",
]

Monitor = Callable[[Any], dict]


@dataclasses.dataclass(frozen=True)
class Guard:
    """How steps with a non-finite energy or gradient are handled (module docstring).

    factor: each rejection multiplies the learning rate by it, in (0, 1); max_failures: the
    consecutive rejections, an int >= 1, after which the run fails; nan_steps, nan_leaf: where
    NaN gradients are injected, for tests (nan_leaf a flat index of the gradient's leaves).
    ValueError for a factor, max_failures or nan_leaf outside those.
    """

    factor: float = 0.5
    max_failures: int = 5
    nan_steps: tuple[int, ...] = ()
    nan_leaf: int = 0

    def __post_init__(self):
        if not 0 < self.factor < 1:  # nan fails both comparisons
            raise ValueError(f"Guard: factor must be in (0, 1), got {self.factor}")
        # 1.5 acted as 2 (a count compared with it), a str was a bare TypeError
        if not is_count(self.max_failures) or not self.max_failures >= 1:
            raise ValueError(f"Guard: max_failures must be an int >= 1, got "
                             f"{self.max_failures!r}")
        if not is_count(self.nan_leaf) or self.nan_leaf < 0:  # -1 read as the last leaf
            raise ValueError(f"Guard: nan_leaf must be an int >= 0 (a flat index of the "
                             f"gradient's leaves), got {self.nan_leaf!r}")


DEFAULT_GUARD = Guard()


class GuardState(NamedTuple):
    lr_scale: jax.Array  # multiplies every update; lowered by Guard.factor on each rejection
    consecutive: jax.Array  # rejections in a row
    rejected: jax.Array  # rejections in all
    failed: jax.Array  # max_failures consecutive rejections happened
    first_bad_step: jax.Array  # step of the first rejection of the current streak (-1: none)
    first_bad_leaf: jax.Array  # flat index of the first non-finite gradient leaf (-1: loss)


class StopState(NamedTuple):
    # (stop_window,) best energy so far after each of the last steps, oldest first; starts
    # with E before the first step, so the rule can fire after exactly stop_window steps.
    best_energies: jax.Array
    stopped: jax.Array
    stop_step: jax.Array  # the step at which the rule fired; -1 while it has not


def stop_step(stop: StopState, steps: int) -> jax.Array:
    """The step at which a run stopped, or `steps` if its rule never fired."""
    return jnp.where(stop.stop_step < 0, steps, stop.stop_step)


class TrainState(NamedTuple):
    """Everything a run needs to continue: checkpointing this resumes the run exactly."""

    params: Any
    opt_state: Any
    energy: jax.Array  # E(params) on the procedure's training data
    grad: Any  # dE/dparams at params (full-batch procedures; zeros otherwise)
    key: jax.Array  # raw uint32 PRNG key data, so that the state serialises as plain arrays
    perturbations: jax.Array
    stop: StopState
    guard: GuardState


class Procedure(NamedTuple):
    init: Callable[[Any, jax.Array], TrainState]
    step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]


class TrainResult(NamedTuple):
    params: Any
    history: dict
    stop_step: jax.Array
    perturbations: jax.Array


class RestartResult(NamedTuple):
    """The restart with the lowest held-out error, and every restart's record."""

    best: TrainResult
    best_index: jax.Array
    held_out_errors: jax.Array
    restarts: TrainResult


def perturb(key: jax.Array, params: Any, scale: float) -> Any:
    """params + scale * N(0, 1) noise, an independent draw for every leaf."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
             for k, leaf in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noisy)


def _select(condition: jax.Array, if_true: Any, if_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), if_true, if_false)


def _key_data(key: jax.Array) -> jax.Array:
    """Raw key data from a typed key (`jax.random.key`) or from raw key data
    (`jax.random.PRNGKey`), of the default implementation, which `_split` wraps it as;
    TypeError naming what arrived otherwise (an int seed, a key of another implementation)."""
    default = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    if hasattr(key, "dtype") and hasattr(key, "shape"):
        data = (jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                else key)
        if data.shape == default.shape and data.dtype == default.dtype:
            return data
    described = (f"{type(key).__name__} {key!r}" if not hasattr(key, "dtype")
                 else f"{key.dtype} array of shape {key.shape}")
    raise TypeError(f"procedure init: key must be one PRNG key of the default implementation, "
                    f"jax.random.key(seed) or its {default.dtype} key data of shape "
                    f"{default.shape}, got {described}")


def _split(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(next key data, a typed key for this step) from raw key data."""
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(key_data))
    return jax.random.key_data(next_key), step_key


def _check_data(name: str, x: jax.Array, targets: jax.Array,
                names: tuple[str, str] = ("x", "targets"),
                objective: Objective | None = None) -> int:
    """The number of examples in x, ValueError unless x has some and targets as many, and
    (given the objective) unless its loss takes the targets' values: the whole set's, checked
    once here where the compiled steps cannot (`nets.Loss.check_targets`)."""
    examples, labelled = x.shape[0], targets.shape[0]
    if examples < 1 or examples != labelled:
        raise ValueError(f"{name}: {names[0]} has shape {x.shape} and {names[1]} "
                         f"{targets.shape}; expected the same number (>= 1) of examples along "
                         "their first axis")
    if objective is not None and objective.loss.check_targets is not None:
        try:
            objective.loss.check_targets(targets)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    return examples


def _is_integer(value: Any) -> bool:
    """Whether value is an integer (a Python, NumPy or concrete JAX one), not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_batch_size(name: str, batch_size: Any) -> None:
    if not _is_integer(batch_size):
        raise ValueError(f"{name}: batch_size must be an integer, got {batch_size!r}")


# --- stopping rule -------------------------------------------------------------------------

def _stop_init(window: int, energy: jax.Array) -> StopState:
    if not _is_integer(window):
        raise ValueError(f"stopping rule: stop_window must be an integer, got {window!r}")
    if window < 1:
        raise ValueError(f"stopping rule: stop_window must be >= 1, got {window}")
    best_energies = jnp.full((window,), jnp.inf, energy.dtype).at[-1].set(energy)
    return StopState(best_energies, jnp.array(False), jnp.array(-1, jnp.int32))


def _stop_update(state: StopState, energy, index, tolerance, extra_stop=False) -> StopState:
    best = jnp.minimum(jnp.min(state.best_energies), energy)
    oldest = state.best_energies[0]
    decrease = (oldest - best) / jnp.abs(oldest)
    stop_now = (jnp.isfinite(oldest) & (decrease < tolerance)) | extra_stop
    return StopState(
        jnp.append(state.best_energies[1:], best),
        state.stopped | stop_now,
        jnp.where(stop_now & ~state.stopped, index + 1, state.stop_step).astype(jnp.int32),
    )


# --- numerical guard -----------------------------------------------------------------------

def _guard_init() -> GuardState:
    int32 = jnp.int32
    return GuardState(jnp.array(1.0, jnp.float32), jnp.array(0, int32), jnp.array(0, int32),
                      jnp.array(False), jnp.array(-1, int32), jnp.array(-1, int32))


def _inject_nan(guard: Guard, grad: Any, index: jax.Array) -> Any:
    if not guard.nan_steps:
        return grad
    poisoned = jnp.any(index == jnp.array(guard.nan_steps, jnp.result_type(index)))
    leaves, treedef = jax.tree.flatten(grad)
    if guard.nan_leaf >= len(leaves):  # was a bare IndexError
        raise ValueError(f"Guard: nan_leaf {guard.nan_leaf} is out of range: the gradient "
                         f"has {len(leaves)} leaves (0 to {len(leaves) - 1})")
    target = leaves[guard.nan_leaf]
    leaves[guard.nan_leaf] = jnp.where(poisoned, jnp.full_like(target, jnp.nan), target)
    return jax.tree.unflatten(treedef, leaves)


def _finite(energy: jax.Array, grad: Any) -> tuple[jax.Array, jax.Array]:
    """(all finite?, flat index of the first non-finite gradient leaf, -1 if only E is)."""
    leaf_ok = jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(grad)])
    ok = jnp.isfinite(energy) & jnp.all(leaf_ok)
    first_bad = jnp.where(jnp.all(leaf_ok), -1, jnp.argmin(leaf_ok))
    return ok, first_bad.astype(jnp.int32)


def _guard_update(guard: Guard, state: GuardState, ok, first_bad_leaf, index) -> GuardState:
    starts_streak = ~ok & (state.consecutive == 0)
    consecutive = jnp.where(ok, 0, state.consecutive + 1)
    return GuardState(
        lr_scale=jnp.where(ok, state.lr_scale, state.lr_scale * guard.factor),
        consecutive=consecutive,
        rejected=state.rejected + (~ok).astype(jnp.int32),
        failed=state.failed | (consecutive >= guard.max_failures),
        first_bad_step=jnp.where(starts_streak, index, jnp.where(ok, -1, state.first_bad_step)),
        first_bad_leaf=jnp.where(starts_streak, first_bad_leaf,
                                 jnp.where(ok, -1, state.first_bad_leaf)),
    )


def _scaled(updates: Any, scale: jax.Array) -> Any:
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)


def _frozen(state: TrainState) -> jax.Array:
    return state.stop.stopped | state.guard.failed


# --- procedures ----------------------------------------------------------------------------

def _energy_function(model: Layer, objective: Objective):
    """(params, x, targets) -> E, compiled as one program. A procedure's init runs where the
    caller runs it, usually outside jit, where op by op it compiled every single operation of
    the forward pass (LeNet-1989's: 58 programs)."""
    return jax.jit(lambda params, x, targets: objective.value(params, model.apply(params, x),
                                                              targets))


def _full_batch_init(value_and_grad, optimizer, x, targets, stop_window):
    value_and_grad = jax.jit(value_and_grad)  # one program, as `_energy_function`

    def init(params, key):
        energy, grad = value_and_grad(params, x, targets)
        return TrainState(params, optimizer.init(params), energy, grad, _key_data(key),
                          jnp.array(0, jnp.int32), _stop_init(stop_window, energy),
                          _guard_init())

    return init


def full_batch(
    model: Layer, objective: Objective, optimizer: optax.GradientTransformation,
    x: jax.Array, targets: jax.Array, *, engine: engines.Engine = engines.manual,
    stop_window: int = 50, stop_tolerance: float = 1e-5, monitor: Monitor | None = None,
    guard: Guard = DEFAULT_GUARD,
) -> Procedure:
    """Plain full-batch descent, every finite step kept: w <- optimizer step from dE/dw.

    The baseline for `cost_checked`. Shapes: x (batch, features), targets (batch, classes):
    the whole training set.
    """
    _check_data("full_batch", x, targets, objective=objective)
    value_and_grad = engine(model, objective)

    def step(state, index):
        updates, new_opt_state = optimizer.update(state.grad, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, _scaled(updates, state.guard.lr_scale))
        new_energy, new_grad = value_and_grad(new_params, x, targets)
        new_grad = _inject_nan(guard, new_grad, index)
        ok, bad_leaf = _finite(new_energy, new_grad)
        accepted = state._replace(params=new_params, opt_state=new_opt_state,
                                  energy=new_energy, grad=new_grad)
        proposal = _select(ok, accepted, state)
        proposal = proposal._replace(
            guard=_guard_update(guard, state.guard, ok, bad_leaf, index))
        return _finish(state, proposal, index, stop_tolerance, monitor, {"rejected": ~ok})

    return Procedure(_full_batch_init(value_and_grad, optimizer, x, targets, stop_window), step)


def cost_checked(
    model: Layer, objective: Objective, optimizer: optax.GradientTransformation,
    x: jax.Array, targets: jax.Array, *, engine: engines.Engine = engines.manual,
    perturbation_scale: float = 1e-3, stop_window: int = 50, stop_tolerance: float = 1e-5,
    monitor: Monitor | None = None, guard: Guard = DEFAULT_GUARD,
) -> Procedure:
    """Full-batch descent that verifies E decreased after every step.

    Each step proposes params' = optimizer step from the gradient at params. If
    E(params') < E(params) the step is kept; otherwise it is undone and the weights are moved
    by a small random perturbation params + perturbation_scale * N(0, 1) instead (the
    lecture's escape from a plateau or an overshoot), and the step is counted in
    `perturbations`. The gradient computed to check E(params') is reused for the next step,
    so each step costs one forward and one backward pass. A non-finite E(params') or gradient
    is a rejection by the guard, not a perturbation.

    Shapes: x (batch, features), targets (batch, classes): the whole training set.
    """
    _check_data("cost_checked", x, targets, objective=objective)
    value_and_grad = engine(model, objective)

    def step(state, index):
        key, perturbation_key = _split(state.key)
        updates, new_opt_state = optimizer.update(state.grad, state.opt_state, state.params)
        candidate = optax.apply_updates(state.params, _scaled(updates, state.guard.lr_scale))
        candidate_energy, candidate_grad = value_and_grad(candidate, x, targets)
        candidate_grad = _inject_nan(guard, candidate_grad, index)
        ok, bad_leaf = _finite(candidate_energy, candidate_grad)
        improved = ok & (candidate_energy < state.energy)

        def keep_step():
            return candidate, new_opt_state, candidate_energy, candidate_grad

        def undo_and_perturb():
            perturbed = perturb(perturbation_key, state.params, perturbation_scale)
            perturbed_energy, perturbed_grad = value_and_grad(perturbed, x, targets)
            return perturbed, state.opt_state, perturbed_energy, perturbed_grad

        params, opt_state, energy, grad = jax.lax.cond(improved, keep_step, undo_and_perturb)
        moved = state._replace(params=params, opt_state=opt_state, energy=energy, grad=grad,
                               perturbations=state.perturbations + (~improved).astype(jnp.int32))
        proposal = _select(ok, moved, state)._replace(
            key=key, guard=_guard_update(guard, state.guard, ok, bad_leaf, index))
        return _finish(state, proposal, index, stop_tolerance, monitor,
                       {"perturbed": ok & ~improved, "rejected": ~ok})

    return Procedure(_full_batch_init(value_and_grad, optimizer, x, targets, stop_window), step)


def misclassified(
    model: Layer, objective: Objective, optimizer: optax.GradientTransformation,
    x: jax.Array, targets: jax.Array, *, batch_size: int,
    engine: engines.Engine = engines.manual, stop_window: int = 50,
    stop_tolerance: float = 1e-4, monitor: Monitor | None = None, guard: Guard = DEFAULT_GUARD,
    pick: Callable[[Any, jax.Array, jax.Array], Any] | None = None,
) -> Procedure:
    """The lecture's stochastic variant: keep updating on misclassified examples.

    Each step classifies the whole training set, draws `batch_size` of the misclassified
    examples (uniformly, with replacement) and takes an optimizer step on them alone. It stops
    when no example is misclassified, or when the cost on the whole set shows no significant
    decrease (module docstring). The L2 term keeps the lecture's lambda/(2m) with m the size
    of the training set: the mini-batch objective uses lambda * batch_size / m, so its weight
    gradient is (lambda/m) w whatever the batch size.

    `pick(params, x, targets) -> indices (batch_size,)` (or `(indices, flags)`, as
    `training.parallel.pick_hardest_misclassified` returns) replaces the uniform draw, e.g.
    to take the misclassified examples with the largest per-example gradient norm.

    A step makes two forward passes over the whole set, one at the params to find the
    misclassified examples and one after the update, so that state.energy is E(state.params)
    and the stopping rule counts updates as in `full_batch` (a window of k steps judges k
    updates), plus a forward and backward pass over the batch. record["energy"] is E on the
    whole set after each step, record["wrong"] the number of misclassified training examples
    after it, and the monitor sees the params after it.
    """
    examples = _check_data("misclassified_descent", x, targets, objective=objective)
    _check_batch_size("misclassified_descent", batch_size)
    if not 1 <= batch_size <= examples:
        raise ValueError(
            f"misclassified_descent: batch_size must be in [1, {examples}], got {batch_size}"
        )
    batch_value_and_grad = engine(model, objective._replace(
        l2=objective.l2 * batch_size / examples))
    true_labels = target_labels(targets)
    energy_of = _energy_function(model, objective)

    def init(params, key):
        energy = energy_of(params, x, targets)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return TrainState(params, optimizer.init(params), energy, zeros, _key_data(key),
                          jnp.array(0, jnp.int32), _stop_init(stop_window, energy),
                          _guard_init())

    def step(state, index):
        key, pick_key = _split(state.key)
        wrong = predicted_labels(model.apply(state.params, x)) != true_labels
        wrong_count = jnp.sum(wrong)
        share = wrong.astype(jnp.float32) / jnp.maximum(wrong_count, 1).astype(jnp.float32)
        weights = jnp.where(wrong_count > 0, share, 1 / examples)
        if pick is None:
            picked = jax.random.choice(pick_key, examples, (batch_size,), p=weights)
        else:
            chosen = pick(state.params, x, targets)
            picked = chosen[0] if isinstance(chosen, tuple) else chosen
        _, grad = batch_value_and_grad(state.params, x[picked], targets[picked])
        grad = _inject_nan(guard, grad, index)
        updates, new_opt_state = optimizer.update(grad, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, _scaled(updates, state.guard.lr_scale))
        new_outputs = model.apply(new_params, x)
        new_energy = objective.value(new_params, new_outputs, targets)
        ok, bad_leaf = _finite(new_energy, grad)
        moves = ok & (wrong_count > 0)
        moved = state._replace(params=new_params, opt_state=new_opt_state, energy=new_energy)
        proposal = _select(moves, moved, state)._replace(
            key=key, guard=_guard_update(guard, state.guard, ok, bad_leaf, index))
        # misclassified at the params the step ends with (a frozen run keeps its own)
        still_wrong = jnp.where(moves & ~_frozen(state),
                                jnp.sum(predicted_labels(new_outputs) != true_labels),
                                wrong_count)
        stop = _stop_update(state.stop, proposal.energy, index, stop_tolerance, still_wrong == 0)
        return _finish(state, proposal._replace(stop=stop), index, None, monitor,
                       {"wrong": still_wrong, "rejected": ~ok})

    return Procedure(init, step)


def _batches(order: jax.Array, batch_size: int) -> jax.Array:
    """`order` (n,) as (ceil(n / b), b) indices; the last batch is completed with the first
    indices of `order`, so every example is used at least once per pass."""
    count = -(-order.shape[0] // batch_size)
    padded = jnp.concatenate([order, order[: count * batch_size - order.shape[0]]])
    return padded.reshape(count, batch_size)


def curvature_on_subset(model: Layer, objective: Objective, x: jax.Array,
                        targets: jax.Array, examples: int) -> Callable[[Any], Any]:
    """`curvature(params) -> h` for `stochastic_passes`: the Gauss-Newton diagonal
    (`engines.curvature_diagonal`) averaged over the first `examples` of x, as LeCun et al.
    1989 re-estimate it on a subset before each pass. examples < 1 or more than x holds is a
    ValueError."""
    if not 1 <= examples <= x.shape[0]:
        raise ValueError(f"curvature_on_subset: examples must be between 1 and the "
                         f"{x.shape[0]} examples of x, got {examples}")
    diagonal = engines.curvature_diagonal(model, objective)
    return lambda params: diagonal(params, x[:examples], targets[:examples])


def stochastic_passes(
    model: Layer, objective: Objective, optimizer: optax.GradientTransformation,
    x: jax.Array, targets: jax.Array, *, batch_size: int = 1, shuffle: bool = False,
    engine: engines.Engine = engines.manual,
    curvature: Callable[[Any], Any] | None = None,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    monitor: Monitor | None = None, guard: Guard | None = DEFAULT_GUARD,
    guard_every_step: bool = False,
    per_batch: Callable[..., dict] | None = None,
) -> Procedure:
    """Stochastic gradient descent in which one step of the procedure is one pass over the data.

    With batch_size=1 and shuffle=False the patterns are presented one at a time in a constant
    order, updating after each, as in LeCun et al. 1989. With shuffle, each pass visits a new
    permutation (from the state's key); the last batch of a pass is completed with the first
    examples of its order. `curvature(params) -> h` (e.g. the Gauss-Newton diagonal averaged
    over a subset) is evaluated once at the start of each pass and handed to the optimizer as
    `update(..., curvature=h)` (`optim.diagonal_levenberg_marquardt`); optimizers that take
    no such argument ignore it. `per_batch(params, x_batch, targets_batch, key, objective)
    -> dict` is evaluated before every batch's update and its entries handed to the
    optimizer as extra arguments (`kfac_passes`: the batch's Kronecker blocks, Gauss-Newton
    product and objective), with a key of its own from the batch's and the objective the
    batch's gradient is of. `augment(key, x_batch) -> x_batch` transforms each batch.
    A model with dropout (`model.stochastic`) gets a new key every batch, from the state's
    key like the order; E after the pass is measured at inference (no dropout).
    The L2 term keeps lambda/(2m) with m the size of the data set (module docstring of
    `misclassified`). Non-finite examples are skipped by the guard (module docstring).

    The guard's checks are deferred to the end of the pass unless `guard_every_step`: the pass
    runs unchecked (updates scaled by the guard's learning-rate factor, as checked steps are),
    and only if an energy, a parameter or the optimizer state came out non-finite is it run
    again from its start with every step checked. A non-finite gradient stays non-finite in
    the parameters or the optimizer state, so the result is the per-step guard's, bit for bit;
    the exception is an update rule that clips or zeroes non-finite values elementwise
    (optax.clip, optax.zero_nans), which needs `guard_every_step=True`. LeNet-1989's pass over
    the 7,291 digits: 0.52 s against 0.70 s checked every step (2-core CPU, medians of 7).

    record: "energy", E on the whole set after the pass, and monitor(params).
    """
    examples = _check_data("stochastic_passes", x, targets, objective=objective)
    _check_batch_size("stochastic_passes", batch_size)
    if not 1 <= batch_size <= examples:
        raise ValueError(
            f"stochastic_passes: batch_size must be in [1, {examples}], got {batch_size}")
    batch_objective = objective._replace(l2=objective.l2 * batch_size / examples)
    value_and_grad = engine(model, batch_objective)
    optimizer = optax.with_extra_args_support(optimizer)
    energy_of = _energy_function(model, objective)

    def init(params, key):
        return initial_state(params, optimizer.init(params), key, energy_of(params, x, targets))

    def step(state, index):
        key, order_key = _split(state.key)
        order = (jax.random.permutation(order_key, examples) if shuffle
                 else jnp.arange(examples))
        batches = _batches(order, batch_size)
        extra = {} if curvature is None else {"curvature": curvature(state.params)}

        def one_batch(step_guard, carry, batch):
            params, opt_state, guard_state, finite, batch_key = carry
            xb = x[batch]
            if augment is not None:  # no key splitting (a loop of its own on CPU) otherwise
                batch_key, augment_key = jax.random.split(batch_key)
                xb = augment(augment_key, xb)
            dropout_key = None
            if model.stochastic:
                batch_key, dropout_key = jax.random.split(batch_key)
            energy, grad = value_and_grad(params, xb, targets[batch], dropout_key)
            batch_extra = extra
            if per_batch is not None:
                batch_key, extra_key = jax.random.split(batch_key)
                batch_extra = {**extra, **per_batch(params, xb, targets[batch], extra_key,
                                                    batch_objective)}
            if guard is not None and step_guard is None:  # guarded_update injects otherwise
                grad = _inject_nan(guard, grad, index)
            params, opt_state, guard_state = guarded_update(
                optimizer, params, opt_state, guard_state, energy, grad, index, step_guard,
                **batch_extra)
            finite = finite & jnp.isfinite(energy)
            return (params, opt_state, guard_state, finite, batch_key), None

        def scan_pass(step_guard):
            """(params, opt_state, guard_state, every energy finite) after the pass."""
            carry = (state.params, state.opt_state, state.guard, jnp.array(True),
                     jax.random.fold_in(jax.random.wrap_key_data(key), 1))
            carry, _ = jax.lax.scan(functools.partial(one_batch, step_guard), carry, batches)
            return carry[:4]

        if guard is None or guard_every_step:
            params, opt_state, guard_state, _ = scan_pass(guard)
        else:
            params, opt_state, guard_state = _checked_after_the_pass(scan_pass, guard)
        energy = objective.value(params, model.apply(params, x), targets)
        proposal = state._replace(params=params, opt_state=opt_state, energy=energy, key=key,
                                  guard=guard_state)
        return _finish(state, proposal, index, None, monitor, {})

    return Procedure(init, step)


def kfac_passes(model: Layer, objective: Objective, x: jax.Array, targets: jax.Array, *,
                batch_size: int, initial_damping: float = 1.0, decay: float = 0.95,
                relative: bool = False, sampled: bool = True, shuffle: bool = True,
                **options: Any) -> Procedure:
    """`stochastic_passes` with Martens and Grosse's K-FAC (`optim.kfac_adaptive`): before
    each batch's update, its Kronecker blocks (`nets.kronecker.kronecker_factors`, one
    sampled curvature column per example unless `sampled=False`), its Gauss-Newton product
    (`nets.engines.gauss_newton_product`) and its objective E are handed to the optimizer,
    which rescales the preconditioned direction by the quadratic model and adapts its
    damping. `options` go to `stochastic_passes` (engine, monitor, guard, ...).
    record: as `stochastic_passes`'."""
    def per_batch(params, x_batch, targets_batch, key, batch_objective):
        def gauss_newton(v):
            return engines.gauss_newton_product(model, batch_objective)(params, x_batch,
                                                                        targets_batch, v)

        def energy(at):
            return batch_objective.value(at, model.apply(at, x_batch), targets_batch)

        blocks = kronecker_factors(model, batch_objective)(
            params, x_batch, targets_batch, sample_key=key if sampled else None)
        return {"blocks": blocks, "gauss_newton": gauss_newton, "batch_energy": energy}

    optimizer = optim.kfac_adaptive(initial_damping, decay, relative, model=model)
    return stochastic_passes(model, objective, optimizer, x, targets, batch_size=batch_size,
                             shuffle=shuffle, per_batch=per_batch, **options)


def _checked_after_the_pass(scan_pass, guard: Guard):
    """`scan_pass(None)`, unchecked, if its energies, parameters and optimizer state are all
    finite (the guard state then as after a pass of accepted steps); otherwise
    `scan_pass(guard)`, every step checked. Returns (params, opt_state, guard_state)."""
    params, opt_state, guard_state, finite = scan_pass(None)
    clean = finite & _all_finite((params, opt_state))
    accepted = guard_state._replace(consecutive=jnp.zeros_like(guard_state.consecutive),
                                    first_bad_step=jnp.full_like(guard_state.first_bad_step, -1),
                                    first_bad_leaf=jnp.full_like(guard_state.first_bad_leaf, -1))
    return jax.lax.cond(clean, lambda: (params, opt_state, accepted),
                        lambda: scan_pass(guard)[:3])


def _all_finite(tree: Any) -> jax.Array:
    """Whether every element of every floating-point leaf of `tree` is finite."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def initial_state(params: Any, opt_state: Any, key: jax.Array, energy: jax.Array | None = None,
                  grad: Any = ()) -> TrainState:
    """A fresh `TrainState` for procedures that keep no gradient between steps (grad ()) and
    have no stopping rule; energy defaults to +inf in the params' dtype."""
    if energy is None:
        energy = jnp.array(jnp.inf, jax.tree.leaves(params)[0].dtype)
    return TrainState(params, opt_state, energy, grad, _key_data(key), jnp.array(0, jnp.int32),
                      _stop_init(1, energy), _guard_init())


def guarded_update(
    optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
    guard_state: GuardState, energy: jax.Array, grad: Any, index: jax.Array,
    guard: Guard | None = DEFAULT_GUARD, **extra_args: Any,
) -> tuple[Any, Any, GuardState]:
    """One optimizer step, taken only if E and every gradient leaf are finite and the run has
    not failed; otherwise params and optimizer state stay and the guard records a rejection
    (module docstring). `index` is the step the guard reports; `extra_args` go to
    `optimizer.update` (e.g. curvature=h). With guard=None the step is always taken (scaled by
    guard_state.lr_scale, as a checked one) and guard_state is returned unchanged.
    Returns (params, opt_state, guard_state)."""
    if guard is None:
        updates, opt_state = optimizer.update(grad, opt_state, params, **extra_args)
        return (optax.apply_updates(params, _scaled(updates, guard_state.lr_scale)), opt_state,
                guard_state)
    index = jnp.asarray(index, jnp.int32)
    grad = _inject_nan(guard, grad, index)
    ok, bad_leaf = _finite(energy, grad)
    updates, new_opt_state = optimizer.update(grad, opt_state, params, **extra_args)
    new_params = optax.apply_updates(params, _scaled(updates, guard_state.lr_scale))
    params, opt_state = _select(ok & ~guard_state.failed, (new_params, new_opt_state),
                                (params, opt_state))
    guard_state = _select(guard_state.failed, guard_state,
                          _guard_update(guard, guard_state, ok, bad_leaf, index))
    return params, opt_state, guard_state


def online(
    model: Layer, objective: Objective, optimizer: optax.GradientTransformation,
    sample: Callable[[jax.Array], tuple[jax.Array, jax.Array]], *, steps_per_record: int,
    engine: engines.Engine = engines.manual, monitor: Monitor | None = None,
    guard: Guard | None = DEFAULT_GUARD, curvature_every: int | None = None,
) -> Procedure:
    """Stochastic descent on fresh data: one step of the procedure is `steps_per_record`
    optimizer steps, each on a new batch `sample(key) -> (x, targets)` (problems that generate
    their data, such as the adding problem). record: "energy", the mean loss of those batches,
    and monitor(params). Non-finite steps are rejected by the guard (`guarded_update`).

    With curvature_every = k (for `optim.diagonal_levenberg_marquardt`), LeCun's diagonal h
    (`engines.curvature_diagonal`) is backpropagated on the step's batch at the first of every
    k updates of a record, handed to the optimizer as curvature=h, and kept in between.
    steps_per_record < 1 is a ValueError."""
    if steps_per_record < 1:
        raise ValueError(f"online: steps_per_record must be >= 1, got {steps_per_record}")
    value_and_grad = engine(model, objective)
    if curvature_every is not None and curvature_every < 1:
        raise ValueError(f"online: curvature_every must be >= 1 (or None), got "
                         f"{curvature_every}")
    diagonal = (None if curvature_every is None
                else engines.curvature_diagonal(model, objective))

    def init(params, key):
        return initial_state(params, optimizer.init(params), key)

    def update(carry, indices):
        update_index, within_record = indices
        params, opt_state, guard_state, key_data, h = carry
        key_data, batch_key = _split(key_data)
        x, targets = sample(batch_key)
        energy, grad = value_and_grad(params, x, targets)
        extra = {}
        if diagonal is not None:
            h = jax.lax.cond(within_record % curvature_every == 0,
                             lambda: diagonal(params, x, targets), lambda: h)
            extra = {"curvature": h}
        params, opt_state, guard_state = guarded_update(
            optimizer, params, opt_state, guard_state, energy, grad, update_index, guard,
            **extra)
        return (params, opt_state, guard_state, key_data, h), energy

    def step(state, index):
        first = index * steps_per_record
        h = () if diagonal is None else jax.tree.map(jnp.zeros_like, state.params)
        carry = (state.params, state.opt_state, state.guard, state.key, h)
        within = jnp.arange(steps_per_record, dtype=jnp.int32)
        (params, opt_state, guard_state, key, _), energies = jax.lax.scan(
            update, carry, (first + within, within))
        energy = jnp.mean(energies).astype(state.energy.dtype)
        new_state = state._replace(params=params, opt_state=opt_state, guard=guard_state,
                                   key=key, energy=energy)
        record = {"energy": energy}
        if monitor is not None:
            record.update(monitor(params))
        return new_state, record

    return Procedure(init, step)


def _finish(state, proposal, index, stop_tolerance, monitor, record):
    """Freeze a stopped or failed run, update the stop rule, and build the step's record."""
    if stop_tolerance is not None:
        proposal = proposal._replace(
            stop=_stop_update(state.stop, proposal.energy, index, stop_tolerance))
    frozen = _frozen(state)
    new_state = _select(frozen, state, proposal)
    # events (boolean flags) do not happen in a frozen run; counts describe its state
    record = {"energy": new_state.energy,
              **{name: value & ~frozen if value.dtype == jnp.bool_ else value
                 for name, value in record.items()}}
    if monitor is not None:
        record.update(monitor(new_state.params))
    return new_state, record


# --- Hessian-free ----------------------------------------------------------------------------

PRECONDITIONERS = ("none", "diagonal")
CURVATURES = ("gauss_newton", "hessian", "saddle_free")


class ConjugateGradientResult(NamedTuple):
    """x, |b - A x| as the iteration updated it, and the iterations taken before it stopped
    (all of them unless a direction of non-positive curvature stopped it)."""

    x: jax.Array
    residual: jax.Array
    iterations: jax.Array


def conjugate_gradient(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, x0: jax.Array,
                       iterations: int, inverse_preconditioner: jax.Array | None = None
                       ) -> ConjugateGradientResult:
    """`iterations` steps of (preconditioned) conjugate gradients on A x = b from x0, A
    symmetric (positive definite for a solve) given as `matvec`, the preconditioner M as the
    vector of its inverse diagonal (None: M = I).

        r = b - A x, z = M^-1 r, p = z;  repeat:  a = r.z / p.A p,  x += a p,  r -= a A p,
        z' = M^-1 r,  p = z' + (r.z' / r.z) p.

    The iteration stops, x staying put from then on, at the first direction with p.A p <= 0:
    on an indefinite A (a Hessian plus lambda I) x is then the last iterate along which the
    quadratic model was convex, the truncated Newton step (Dembo and Steihaug 1983); on a
    positive definite A that happens only once the residual is exactly zero (p = 0). A
    quotient whose denominator is not positive (r.z flushed to zero while p.A p is not, as in
    float32 near convergence) counts as 0, never 0/0.
    """
    scale = jnp.ones_like(b) if inverse_preconditioner is None else inverse_preconditioner

    def safe_divide(numerator, denominator):
        ok = denominator > 0
        return jnp.where(ok, numerator / jnp.where(ok, denominator, 1), 0)

    def step(carry, _):
        x, r, z, p, taken, going = carry
        ap = matvec(p)
        rz, curvature = r @ z, p @ ap
        going = going & (curvature > 0)
        alpha = safe_divide(rz, curvature)
        x, r = jnp.where(going, x + alpha * p, x), jnp.where(going, r - alpha * ap, r)
        z_next = scale * r
        p = jnp.where(going, z_next + safe_divide(r @ z_next, rz) * p, p)
        return (x, r, z_next, p, taken + going.astype(jnp.int32), going), None

    r = b - matvec(x0)
    z = scale * r
    start = (x0, r, z, z, jnp.array(0, jnp.int32), jnp.array(True))
    (x, r, _, _, taken, _), _ = jax.lax.scan(step, start, length=iterations)
    return ConjugateGradientResult(x, jnp.linalg.norm(r), taken)


class LanczosResult(NamedTuple):
    """An orthonormal basis Q (k, n) of the Krylov subspace span{v0, A v0, ..., A^(k-1) v0}
    and T = Q A Q^T (k, k), tridiagonal; `dimension` the basis vectors found before the
    subspace closed (k unless A maps it into itself: the rows of Q after it are zero, and
    so are T's)."""

    basis: jax.Array
    tridiagonal: jax.Array
    dimension: jax.Array


def lanczos(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, iterations: int,
            breakdown: float = 1e-10) -> LanczosResult:
    """`iterations` steps of Lanczos (1950) on A symmetric, given as `matvec`, from v0:

        q_1 = v0 / |v0|;  w = A q_j - alpha_j q_j - beta_(j-1) q_(j-1),  alpha_j = q_j.A q_j,
        w -= Q^T (Q w) (full reorthogonalisation against every q so far),  beta_j = |w|,
        q_(j+1) = w / beta_j.

    T's eigenvalues (the Ritz values) approach A's extreme ones first, and with k = n they
    are all of A's (in exact arithmetic; the reorthogonalisation keeps Q orthonormal in
    floating point, so they come out to rounding). The iteration stops, the later rows of Q
    and T staying zero, at beta_j <= `breakdown` |A q_j|: the subspace is then invariant
    under A, and its Ritz values are eigenvalues of A (v0 = 0: dimension 0, Q and T zero).
    One product A q a step."""
    n = v0.shape[0]
    norm = jnp.linalg.norm(v0)
    q0 = jnp.where(norm > 0, v0 / jnp.where(norm > 0, norm, 1), 0)

    def step(carry, j):
        basis, alphas, betas, q, q_previous, beta_previous, going = carry
        aq = matvec(q)
        alpha = q @ aq
        w = aq - alpha * q - beta_previous * q_previous
        basis = basis.at[j].set(jnp.where(going, q, 0))
        w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        alphas = alphas.at[j].set(jnp.where(going, alpha, 0))
        going_on = going & (beta > breakdown * jnp.linalg.norm(aq))
        betas = betas.at[j].set(jnp.where(going_on, beta, 0))
        q_next = jnp.where(going_on, w / jnp.where(going_on, beta, 1), 0)
        return (basis, alphas, betas, q_next, q, beta, going_on), going.astype(jnp.int32)

    zeros = jnp.zeros((iterations,), v0.dtype)
    start = (jnp.zeros((iterations, n), v0.dtype), zeros, zeros, q0, jnp.zeros_like(q0),
             jnp.zeros((), v0.dtype), norm > 0)
    (basis, alphas, betas, *_), counted = jax.lax.scan(step, start, jnp.arange(iterations))
    off_diagonal = betas[:-1]
    tridiagonal = jnp.diag(alphas) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)
    return LanczosResult(basis, tridiagonal, jnp.sum(counted))


class SaddleFreeStep(NamedTuple):
    """d, q(d) = g.d + d.|H| d / 2 (the model's change of E, negative), T's eigenvalues (the
    Ritz values of H, ascending; k - dimension zeros among them where the subspace closed
    early) and the subspace's dimension."""

    direction: jax.Array
    model_decrease: jax.Array
    ritz_values: jax.Array
    dimension: jax.Array


def saddle_free_step(hessian: Callable[[jax.Array], jax.Array], g: jax.Array, damping,
                     iterations: int) -> SaddleFreeStep:
    """The saddle-free Newton step (Dauphin et al. 2014) in the Krylov subspace of H and g:
    `lanczos` from g gives Q and T = Q H Q^T = U diag(theta) U^T, and

        d = -Q^T U diag(1 / (|theta| + lambda)) U^T Q g,

    the minimiser of g.d + d.(|H| + lambda I) d / 2 over the subspace, |H| = U |diag(theta)|
    U^T there: where Newton's step (H + lambda I)^-1 g climbs along a direction of negative
    curvature theta < 0, this one descends along it as fast as along +|theta|. The subspace
    holds g, so with no curvature (theta = 0) d = -g / lambda; at g = 0, d = 0."""
    found = lanczos(hessian, g, iterations)
    theta, u = jnp.linalg.eigh(found.tridiagonal)
    projected = u.T @ (found.basis @ g)
    coefficients = -projected / (jnp.abs(theta) + damping)
    decrease = projected @ coefficients + 0.5 * jnp.sum(jnp.abs(theta) * coefficients ** 2)
    return SaddleFreeStep(found.basis.T @ (u @ coefficients), decrease, theta, found.dimension)


class HessianFreeState(NamedTuple):
    """The procedure's optimiser state: lambda and the last solution (flat)."""

    damping: jax.Array
    direction: jax.Array


def hessian_free(
    model: Layer, objective: Objective, x: jax.Array, targets: jax.Array, *,
    cg_iterations: int = 50, damping: float = 1.0, decay: float = 0.95,
    curvature_examples: int | None = None, preconditioner: str = "diagonal",
    preconditioner_exponent: float = 0.75, stop_window: int = 50,
    stop_tolerance: float | None = 1e-6, monitor: Monitor | None = None,
    batch_size: int | None = None, structural_damping: float = 0.0,
    structural_layers: int = 1, curvature: str = "gauss_newton",
) -> Procedure:
    """Hessian-free optimisation (Martens 2010): Newton-like steps from Gauss-Newton
    products, full batch on (x, targets) (x (n, ...), targets (n, ...)) or, with
    `batch_size`, on a new mini-batch every step.

    Each step solves the damped Gauss-Newton system (G + lambda I) d = -g by (preconditioned)
    conjugate gradients (`conjugate_gradient`, `cg_iterations` of them), never forming G:
    each product G p is one tangent pass and one backward pass of the net
    (`nets.engines.gauss_newton_product`, all by hand). The step is taken if it lowers E.
    lambda follows the Levenberg-Marquardt rule on the reduction ratio rho = (E(w + d) -
    E(w)) / q(d), q(d) = g.d + d.G d / 2 the quadratic model without damping: lambda * 2/3
    where rho > 3/4 (the model is trusted), * 3/2 where rho < 1/4 or the step was refused.
    Conjugate gradients start from the last step's solution times `decay` (Martens' 0.95:
    successive systems are alike). preconditioner "diagonal": M = (h + lambda)^alpha,
    alpha = `preconditioner_exponent`, h LeCun's backpropagated Gauss-Newton diagonal
    (`nets.engines.curvature_diagonal`; Martens took the empirical Fisher's, alpha 3/4);
    "none": M = I. G (and h) come from the first `curvature_examples` examples (None: all
    n), as E is a mean over examples and so is G (Martens: a fraction of the batch).

    batch_size=B (Martens' and Martens and Sutskever 2011's mini-batches): each step draws B
    of the n examples without replacement (from the state's key), and the gradient, G (on
    the first `curvature_examples` of them), the reduction ratio and the test that the step
    lowers E all use that batch; the recorded energy is then the batch's E after the step
    (the state's grad, its gradient before), and a step refused on its batch keeps the
    params. None: every step on all n examples.

    structural_damping=mu > 0 (Martens and Sutskever 2011, for recurrent nets): the system is
    (G + lambda I + lambda mu S) d = -g, S = J_h^T J_h / m the Gauss-Newton matrix of the
    squared change of the hidden states h, the outputs of the serial model's first
    `structural_layers` sublayers (`nets.engines.hidden_state_product`; for a one-cell
    `sequence_model`, 1: every step's state), on the same examples as G, both in one tangent
    and one backward pass (`nets.engines.structurally_damped_product`). It damps the
    directions that move the hidden states, which G of the outputs alone may let grow.

    curvature="hessian" puts the exact Hessian H in G's place, in the system and in q(d)
    (`nets.engines.hessian_product`, Pearlmutter's R-operator by hand; models whose layers all
    have one): H + lambda I may be indefinite, and conjugate gradients then stop at the first
    direction of non-positive curvature (`conjugate_gradient`), a truncated Newton step.
    Martens (2010, section 4.2) found G the better choice; `experiments.hessian_free` compares
    the two.

    curvature="saddle_free" takes Dauphin et al.'s (2014) saddle-free Newton step in place of
    the conjugate gradients' (`saddle_free_step`): `cg_iterations` Lanczos iterations on H
    from g span a Krylov subspace, in which the step minimises g.d + d.(|H| + lambda I) d / 2,
    |H| H with its eigenvalues' signs dropped, and q(d) uses |H| too: a direction of negative
    curvature is descended rather than climbed or cut off. preconditioner must be "none" (the
    subspace is H's own) and `decay` does not apply (each subspace starts from g); the
    records' cg_iterations count the subspace's dimension and cg_residual is |(H + lambda I)
    d + g| / |g|, how far the step lies from the damped Newton step (one more product).

    A run is a `lax.scan` of steps (`run`); the state checkpoints and resumes as the other
    procedures' do (opt_state: `HessianFreeState`). Records per step: energy, damping (the
    lambda the step used), rho, accepted, cg_residual (|r| / |g| after the conjugate
    gradients), cg_iterations (those taken before a stop at non-positive curvature). The
    stopping rule is the procedures' (module docstring).
    """
    name = "hessian_free"
    if not isinstance(cg_iterations, int) or cg_iterations < 1:
        raise ValueError(f"{name}: cg_iterations must be an int >= 1, got {cg_iterations!r}")
    if not damping > 0:
        raise ValueError(f"{name}: damping must be > 0, got {damping!r}")
    if not 0 <= decay <= 1:
        raise ValueError(f"{name}: decay must be in [0, 1], got {decay!r}")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"{name}: preconditioner must be one of {PRECONDITIONERS}, got "
                         f"{preconditioner!r}")
    n = _check_data(name, x, targets, objective=objective)
    if batch_size is not None and not (isinstance(batch_size, int) and 1 <= batch_size <= n):
        raise ValueError(f"{name}: batch_size must be an int in [1, {n}] (the examples) or "
                         f"None, got {batch_size!r}")
    if not structural_damping >= 0:
        raise ValueError(f"{name}: structural_damping must be >= 0, got {structural_damping!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"{name}: curvature must be one of {CURVATURES}, got {curvature!r}")
    if curvature != "gauss_newton" and structural_damping:
        raise ValueError(f"{name}: structural_damping adds S to the Gauss-Newton matrix; "
                         f"it is not defined with curvature={curvature!r}")
    if curvature == "saddle_free" and preconditioner != "none":
        raise ValueError(f"{name}: preconditioner={preconditioner!r} does not apply to "
                         "curvature='saddle_free' (Lanczos spans H's own Krylov subspace); "
                         "pass preconditioner='none'")
    per_step = n if batch_size is None else batch_size
    if curvature_examples is not None and not 1 <= curvature_examples <= per_step:
        where = "the examples" if batch_size is None else "batch_size"
        raise ValueError(f"{name}: curvature_examples must be in [1, {per_step}] ({where}), "
                         f"got {curvature_examples!r}")
    value_and_grad = engines.manual(model, objective)
    product = (engines.gauss_newton_product if curvature == "gauss_newton"
               else engines.hessian_product)(model, objective)
    diagonal = engines.curvature_diagonal(model, objective)
    damped_product = (engines.structurally_damped_product(model, objective,
                                                          structural_layers)
                      if structural_damping else None)

    def energy_of(params, x, targets):
        return objective.value(params, model.apply(params, x), targets)

    def batch_of(state):
        """(key data, x, targets, E, gradient tree) of this step's examples."""
        if batch_size is None:
            return state.key, x, targets, state.energy, state.grad
        key, batch_key = _split(state.key)
        chosen = jax.random.permutation(batch_key, n)[:batch_size]
        x_batch, targets_batch = x[chosen], targets[chosen]
        energy, grad = value_and_grad(state.params, x_batch, targets_batch)
        return key, x_batch, targets_batch, energy.astype(state.energy.dtype), grad

    initial_value_and_grad = jax.jit(value_and_grad)  # one program, as `_energy_function`

    def init(params, key):
        energy, grad = initial_value_and_grad(params, x, targets)
        flat, _ = jax.flatten_util.ravel_pytree(params)
        state = HessianFreeState(jnp.asarray(damping, flat.dtype), jnp.zeros_like(flat))
        return TrainState(params, state, energy, grad, _key_data(key), jnp.array(0, jnp.int32),
                          _stop_init(stop_window, energy), _guard_init())

    def step(state, index):
        params, hf = state.params, state.opt_state
        key, x_step, targets_step, energy, grad = batch_of(state)
        x_curvature = x_step[:curvature_examples]
        targets_curvature = targets_step[:curvature_examples]
        flat_params, unravel = jax.flatten_util.ravel_pytree(params)
        g = jax.flatten_util.ravel_pytree(grad)[0]

        def times_curvature(v):
            return jax.flatten_util.ravel_pytree(
                product(params, x_curvature, targets_curvature, unravel(v)))[0]

        inverse_preconditioner = None
        if preconditioner == "diagonal":
            h = jax.flatten_util.ravel_pytree(
                diagonal(params, x_curvature, targets_curvature))[0]
            inverse_preconditioner = (h + hf.damping) ** -preconditioner_exponent

        def damped(v):
            if damped_product is None:
                return times_curvature(v) + hf.damping * v
            return jax.flatten_util.ravel_pytree(damped_product(
                params, x_curvature, targets_curvature, unravel(v),
                hf.damping * structural_damping))[0] + hf.damping * v

        if curvature == "saddle_free":
            d, model_decrease, _, cg_taken = saddle_free_step(times_curvature, g, hf.damping,
                                                              cg_iterations)
            residual = jnp.linalg.norm(damped(d) + g)
        else:
            d, residual, cg_taken = conjugate_gradient(damped, -g, decay * hf.direction,
                                                       cg_iterations, inverse_preconditioner)
            model_decrease = g @ d + 0.5 * d @ times_curvature(d)
        new_params = unravel(flat_params + d)
        if batch_size is None:
            new_energy, new_grad = value_and_grad(new_params, x, targets)
        else:  # the next step draws its own batch and gradient
            new_energy, new_grad = energy_of(new_params, x_step, targets_step), grad
        new_energy = new_energy.astype(energy.dtype)
        accepted = jnp.isfinite(new_energy) & (new_energy < energy)
        rho = jnp.where(model_decrease < 0, (new_energy - energy) / model_decrease, -jnp.inf)
        rho = jnp.where(jnp.isfinite(new_energy), rho, -jnp.inf)
        new_damping = jnp.where(rho > 0.75, hf.damping * 2 / 3,
                                jnp.where((rho < 0.25) | ~accepted, hf.damping * 1.5,
                                          hf.damping))
        before = state._replace(energy=energy, grad=grad, key=key)
        taken = before._replace(params=new_params, energy=new_energy, grad=new_grad)
        proposal = _select(accepted, taken, before)._replace(
            opt_state=HessianFreeState(new_damping, d))
        return _finish(state, proposal, index, stop_tolerance, monitor, {
            "damping": hf.damping, "rho": rho, "accepted": accepted,
            "cg_residual": residual / jnp.linalg.norm(g), "cg_iterations": cg_taken})

    return Procedure(init, step)


# --- running ---------------------------------------------------------------------------------

def run_steps(procedure: Procedure, state: TrainState, start, length: int):
    """Steps start .. start + length - 1 as one scan: (state, records of shape (length,)).

    `start` may be traced (one compilation serves every chunk of the same length).
    """
    indices = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    return jax.lax.scan(procedure.step, state, indices)


def run(procedure: Procedure, params: Any, key: jax.Array, steps: int) -> TrainResult:
    """A whole run from params: `steps` (an integer >= 1, else ValueError) steps as one scan."""
    if not _is_integer(steps):
        raise ValueError(f"run: steps must be an integer, got {steps!r}")
    if steps < 1:
        raise ValueError(f"run: steps must be >= 1, got {steps}")
    state, history = run_steps(procedure, procedure.init(params, key), 0, steps)
    return TrainResult(state.params, history, stop_step(state.stop, steps), state.perturbations)


def full_batch_descent(model, objective, optimizer, params, x, targets, *, steps, **options):
    """`run` of `full_batch` (options: engine, stop_window, stop_tolerance, monitor, guard)."""
    procedure = full_batch(model, objective, optimizer, x, targets, **options)
    return run(procedure, params, jax.random.key(0), steps)


def cost_checked_descent(model, objective, optimizer, params, x, targets, *, key, steps,
                         **options):
    """`run` of `cost_checked` (options: engine, perturbation_scale, stop_window,
    stop_tolerance, monitor, guard)."""
    procedure = cost_checked(model, objective, optimizer, x, targets, **options)
    return run(procedure, params, key, steps)


def misclassified_descent(model, objective, optimizer, params, x, targets, *, key, steps,
                          batch_size, **options):
    """`run` of `misclassified` (options: engine, stop_window, stop_tolerance, monitor,
    guard)."""
    procedure = misclassified(model, objective, optimizer, x, targets, batch_size=batch_size,
                              **options)
    return run(procedure, params, key, steps)


def random_restarts(
    init: Callable[[jax.Array], Any],
    train: Callable[[Any, jax.Array], TrainResult],
    keys: jax.Array,
    model: Layer,
    x_held_out: jax.Array,
    targets_held_out: jax.Array,
    *,
    one_at_a_time: bool = False,
) -> RestartResult:
    """Train one run per key and keep the one with the lowest held-out error.

    `init(key) -> params` and `train(params, key) -> TrainResult` must give every restart the
    same shapes, which holds for any fixed architecture. keys: (restarts,) of PRNG keys.
    Ties go to the lowest index.

    The restarts are vmapped, or run one after another with `lax.map` when `one_at_a_time`.
    Under vmap a `lax.cond` in the step (the cost check of `cost_checked`) becomes a select
    that computes both branches at every step: for nets big enough to keep the CPU busy,
    one at a time is faster (experiments.lecture: 9.7 against 18.4 ms a step).
    x_held_out and targets_held_out without examples or of different lengths, or keys that are
    not a (restarts,) batch of keys, are a ValueError.
    """
    _check_data("random_restarts", x_held_out, targets_held_out,
                ("x_held_out", "targets_held_out"))
    default = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    data = (jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
            else keys)
    if data.ndim != 1 + len(default.shape) or data.shape[0] < 1:
        raise ValueError(f"random_restarts: keys must be (restarts,) PRNG keys, restarts >= 1 "
                         f"(jax.random.split(key, restarts)), got {keys.dtype} keys of shape "
                         f"{keys.shape}")

    def one_restart(key):
        init_key, train_key = jax.random.split(key)
        result = train(init(init_key), train_key)
        error = classification_error(model, result.params, x_held_out, targets_held_out)
        return result, error

    if one_at_a_time:
        restarts, errors = jax.lax.map(one_restart, keys)
    else:
        restarts, errors = jax.vmap(one_restart)(keys)
    return select_best(restarts, errors)


def select_best(restarts: TrainResult, held_out_errors: jax.Array) -> RestartResult:
    """The restart (leading axis) with the lowest held-out error; ties to the lowest index."""
    best_index = jnp.argmin(held_out_errors)
    best = jax.tree.map(lambda leaf: leaf[best_index], restarts)
    return RestartResult(best, best_index, held_out_errors, restarts)
