"""The lecture's training procedures, each a pure, jit-compatible function of a gradient engine.

Every procedure runs a fixed number of steps as one `lax.scan` (so that it jits whole and vmaps
over random restarts) and freezes once its stopping rule fires: later steps leave params
unchanged and `stop_step` records when it happened. Each returns a `TrainResult`:

    params        the final parameters;
    history       dict of (steps,) arrays: "energy" E(params) after each step (on the
                  procedure's training data), "perturbed"/"wrong" flags or counts, and the
                  scalars returned by `monitor(params)` if one was given;
    stop_step     the step at which the stopping rule fired (`steps` if it never did);
    perturbations how many steps were undone and replaced by a random perturbation.

Stopping rule (the lecture's "no significant decrease"): stop when the best energy so far
decreased by less than `stop_tolerance` (relative) over the last `stop_window` steps.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nets import engines
from nets.layers import Layer
from nets.losses import Objective
from training.metrics import classification_error, predicted_labels, target_labels

__all__ = [
    "TrainResult",
    "RestartResult",
    "full_batch_descent",
    "cost_checked_descent",
    "misclassified_descent",
    "random_restarts",
    "perturb",
]

Monitor = Callable[[Any], dict]


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
    noisy = [
        leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, noisy)


def _select(condition: jax.Array, if_true: Any, if_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), if_true, if_false)


class _StopState(NamedTuple):
    # (stop_window,) best energy so far after each of the last steps, oldest first; starts
    # with E before the first step, so the rule can fire after exactly stop_window steps.
    best_energies: jax.Array
    stopped: jax.Array
    stop_step: jax.Array


def _stop_init(window: int, energy: jax.Array, steps: int) -> _StopState:
    if window < 1:
        raise ValueError(f"stopping rule: stop_window must be >= 1, got {window}")
    best_energies = jnp.full((window,), jnp.inf, energy.dtype).at[-1].set(energy)
    return _StopState(best_energies, jnp.array(False), jnp.array(steps))


def _stop_update(state: _StopState, energy, step, tolerance, extra_stop=False) -> _StopState:
    best = jnp.minimum(jnp.min(state.best_energies), energy)
    oldest = state.best_energies[0]
    decrease = (oldest - best) / jnp.abs(oldest)
    stop_now = (jnp.isfinite(oldest) & (decrease < tolerance)) | extra_stop
    stopped = state.stopped | stop_now
    return _StopState(
        jnp.append(state.best_energies[1:], best),
        stopped,
        jnp.where(stop_now & ~state.stopped, step + 1, state.stop_step),
    )


def full_batch_descent(
    model: Layer,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    params: Any,
    x: jax.Array,
    targets: jax.Array,
    *,
    steps: int,
    engine: engines.Engine = engines.manual,
    stop_window: int = 50,
    stop_tolerance: float = 1e-5,
    monitor: Monitor | None = None,
) -> TrainResult:
    """Plain full-batch descent, every step kept: w <- optimizer step from dE/dw.

    The baseline for `cost_checked_descent`. history["energy"][t] is E after step t + 1.
    Shapes: x (batch, features), targets (batch, classes): the whole training set.
    """
    value_and_grad = engine(model, objective)
    energy, grad = value_and_grad(params, x, targets)
    stop = _stop_init(stop_window, energy, steps)

    def step(state, index):
        (params, opt_state, energy, grad), stop = state
        updates, new_opt_state = optimizer.update(grad, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_energy, new_grad = value_and_grad(new_params, x, targets)
        carry = _select(stop.stopped, (params, opt_state, energy, grad),
                        (new_params, new_opt_state, new_energy, new_grad))
        new_stop = _stop_update(stop, carry[2], index, stop_tolerance)
        record = {"energy": carry[2]}
        if monitor is not None:
            record.update(monitor(carry[0]))
        return (carry, new_stop), record

    carry = (params, optimizer.init(params), energy, grad)
    (carry, stop), history = jax.lax.scan(step, (carry, stop), jnp.arange(steps))
    return TrainResult(carry[0], history, stop.stop_step, jnp.array(0))


def cost_checked_descent(
    model: Layer,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    params: Any,
    x: jax.Array,
    targets: jax.Array,
    *,
    key: jax.Array,
    steps: int,
    engine: engines.Engine = engines.manual,
    perturbation_scale: float = 1e-3,
    stop_window: int = 50,
    stop_tolerance: float = 1e-5,
    monitor: Monitor | None = None,
) -> TrainResult:
    """Full-batch descent that verifies E decreased after every step.

    Each step proposes params' = optimizer step from the gradient at params. If
    E(params') < E(params) the step is kept; otherwise it is undone and the weights are moved
    by a small random perturbation params + perturbation_scale * N(0, 1) instead (the
    lecture's escape from a plateau or an overshoot), and the step is counted in
    `perturbations`. The gradient computed to check E(params') is reused for the next step,
    so each step costs one forward and one backward pass.

    Shapes: x (batch, features), targets (batch, classes): the whole training set.
    """
    value_and_grad = engine(model, objective)
    energy, grad = value_and_grad(params, x, targets)
    carry = (params, optimizer.init(params), energy, grad, key, jnp.array(0))
    stop = _stop_init(stop_window, energy, steps)

    def step(state, index):
        (params, opt_state, energy, grad, key, perturbations), stop = state
        key, perturbation_key = jax.random.split(key)
        updates, new_opt_state = optimizer.update(grad, opt_state, params)
        candidate = optax.apply_updates(params, updates)
        candidate_energy, candidate_grad = value_and_grad(candidate, x, targets)
        improved = candidate_energy < energy

        def keep_step():
            return candidate, new_opt_state, candidate_energy, candidate_grad

        def undo_and_perturb():
            perturbed = perturb(perturbation_key, params, perturbation_scale)
            perturbed_energy, perturbed_grad = value_and_grad(perturbed, x, targets)
            return perturbed, opt_state, perturbed_energy, perturbed_grad

        new_params, new_opt_state, new_energy, new_grad = jax.lax.cond(
            improved, keep_step, undo_and_perturb
        )
        proposal = (new_params, new_opt_state, new_energy, new_grad, key,
                    perturbations + (~improved).astype(perturbations.dtype))
        current = (params, opt_state, energy, grad, key, perturbations)
        carry = _select(stop.stopped, current, proposal)
        new_stop = _stop_update(stop, carry[2], index, stop_tolerance)
        record = {"energy": carry[2], "perturbed": ~improved & ~stop.stopped}
        if monitor is not None:
            record.update(monitor(carry[0]))
        return (carry, new_stop), record

    (carry, stop), history = jax.lax.scan(step, (carry, stop), jnp.arange(steps))
    return TrainResult(carry[0], history, stop.stop_step, carry[5])


def misclassified_descent(
    model: Layer,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    params: Any,
    x: jax.Array,
    targets: jax.Array,
    *,
    key: jax.Array,
    steps: int,
    batch_size: int,
    engine: engines.Engine = engines.manual,
    stop_window: int = 50,
    stop_tolerance: float = 1e-4,
    monitor: Monitor | None = None,
) -> TrainResult:
    """The lecture's stochastic variant: keep updating on misclassified examples.

    Each step classifies the whole training set, draws `batch_size` of the misclassified
    examples (uniformly, with replacement) and takes an optimizer step on them alone. It stops
    when no example is misclassified, or when the cost on the whole set shows no significant
    decrease (module docstring). The L2 term keeps the lecture's lambda/(2m) with m the size
    of the training set: the mini-batch objective uses lambda * batch_size / m, so its weight
    gradient is (lambda/m) w whatever the batch size.

    history["wrong"] is the number of misclassified training examples before each step.
    """
    examples = x.shape[0]
    if not 1 <= batch_size <= examples:
        raise ValueError(
            f"misclassified_descent: batch_size must be in [1, {examples}], got {batch_size}"
        )
    batch_objective = objective._replace(l2=objective.l2 * batch_size / examples)
    value_and_grad = engine(model, batch_objective)
    outputs = model.apply(params, x)
    stop = _stop_init(stop_window, objective.value(params, outputs, targets), steps)
    true_labels = target_labels(targets)

    def step(state, index):
        (params, opt_state, key), stop = state
        key, pick_key = jax.random.split(key)
        outputs = model.apply(params, x)
        energy = objective.value(params, outputs, targets)
        wrong = predicted_labels(outputs) != true_labels
        wrong_count = jnp.sum(wrong)
        weights = jnp.where(wrong_count > 0, wrong / jnp.maximum(wrong_count, 1), 1 / examples)
        picked = jax.random.choice(pick_key, examples, (batch_size,), p=weights)
        _, grad = value_and_grad(params, x[picked], targets[picked])
        updates, new_opt_state = optimizer.update(grad, opt_state, params)
        new_stop = _stop_update(stop, energy, index, stop_tolerance, wrong_count == 0)
        proposal = (optax.apply_updates(params, updates), new_opt_state, key)
        carry = _select(new_stop.stopped, (params, opt_state, key), proposal)
        record = {"energy": energy, "wrong": wrong_count}
        if monitor is not None:
            record.update(monitor(params))
        return (carry, new_stop), record

    carry = (params, optimizer.init(params), key)
    (carry, stop), history = jax.lax.scan(step, (carry, stop), jnp.arange(steps))
    return TrainResult(carry[0], history, stop.stop_step, jnp.array(0))


def random_restarts(
    init: Callable[[jax.Array], Any],
    train: Callable[[Any, jax.Array], TrainResult],
    keys: jax.Array,
    model: Layer,
    x_held_out: jax.Array,
    targets_held_out: jax.Array,
) -> RestartResult:
    """Train one run per key (vmapped) and keep the one with the lowest held-out error.

    `init(key) -> params` and `train(params, key) -> TrainResult` must give every restart the
    same shapes, which holds for any fixed architecture. keys: (restarts,) of PRNG keys.
    Ties go to the lowest index.
    """

    def one_restart(key):
        init_key, train_key = jax.random.split(key)
        result = train(init(init_key), train_key)
        error = classification_error(model, result.params, x_held_out, targets_held_out)
        return result, error

    restarts, errors = jax.vmap(one_restart)(keys)
    best_index = jnp.argmin(errors)
    best = jax.tree.map(lambda leaf: leaf[best_index], restarts)
    return RestartResult(best, best_index, errors, restarts)
