"""The lecture's procedures: gradient descent, the cost check, picking, restarts, stopping."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets
from nets import engines, losses
from tests.helpers import F64, assert_close_tree, random_batch
from training import metrics, optim, procedures

XOR_X = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], jnp.float32)
XOR_Y = jnp.array([[0.0], [1.0], [1.0], [0.0]], jnp.float32)


def small_problem(hidden_units=8, batch=40, seed=0):
    model = nets.build_mlp(4, 3, hidden_units=hidden_units)
    _, params = model.init(jax.random.key(seed), (-1, 4))
    x, targets = random_batch(jax.random.key(seed + 1), batch, 4, 3, jnp.float32)
    return model, params, x, targets


def test_gradient_descent_is_w_minus_eta_g():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 4.0])}
    rule = optim.gradient_descent(0.1)
    updates, _ = rule.update(grads, rule.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], [0.95, -2.4])
    sgd_updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
    np.testing.assert_allclose(updates["w"], sgd_updates["w"])
    with pytest.raises(ValueError, match="learning_rate must be > 0 and finite, got 0"):
        optim.gradient_descent(0)


def test_full_batch_descent_equals_a_python_loop():
    model, params, x, targets = small_problem()
    objective = losses.lecture_objective(0.5)
    result = jax.jit(lambda p: procedures.full_batch_descent(
        model, objective, optim.gradient_descent(0.3), p, x, targets, steps=5))(params)
    value_and_grad = engines.autodiff(model, objective)
    expected = params
    for _ in range(5):
        _, grad = value_and_grad(expected, x, targets)
        expected = jax.tree.map(lambda w, g: w - 0.3 * g, expected, grad)
    assert_close_tree(result.params, expected, jnp.float32, "5 steps")
    np.testing.assert_allclose(result.history["energy"][-1],
                               value_and_grad(expected, x, targets)[0], rtol=1e-5)


def test_cost_checked_descent_only_accepts_decreases():
    model, params, x, targets = small_problem()
    result = procedures.cost_checked_descent(
        model, losses.lecture_objective(0.1), optim.gradient_descent(0.5), params, x, targets,
        key=jax.random.key(0), steps=60, stop_window=1000)
    energy = np.asarray(result.history["energy"])
    perturbed = np.asarray(result.history["perturbed"])
    accepted = ~perturbed[1:]
    assert np.all(np.diff(energy)[accepted] < 0)
    assert int(result.perturbations) == int(perturbed.sum())


def test_cost_checked_descent_undoes_every_overshooting_step():
    """With eta = 1e4 every step raises E: each is undone, params move only by the noise."""
    model, params, x, targets = small_problem()
    result = procedures.cost_checked_descent(
        model, losses.lecture_objective(0.0), optim.gradient_descent(1e4), params, x, targets,
        key=jax.random.key(0), steps=10, perturbation_scale=1e-4, stop_window=1000)
    assert int(result.perturbations) == 10
    assert bool(jnp.all(result.history["perturbed"]))
    drift = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(result.params), jax.tree.leaves(params)))
    assert 0 < drift < 10 * 1e-4 * np.sqrt(10)


def test_stopping_rule_fires_when_the_energy_stops_decreasing():
    model, params, x, targets = small_problem()
    objective = losses.lecture_objective(0.0)
    result = procedures.full_batch_descent(
        model, objective, optim.gradient_descent(1e-9), params, x, targets, steps=100,
        stop_window=5, stop_tolerance=1e-3)
    assert int(result.stop_step) == 5  # the first step whose window is full
    np.testing.assert_allclose(result.history["energy"][5:], result.history["energy"][4])


def test_misclassified_descent_reaches_zero_errors_and_stops():
    """On a linearly separable set the picking procedure ends with nothing misclassified."""
    key = jax.random.key(3)
    x = jax.random.normal(key, (60, 2), jnp.float32)
    labels = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(jnp.int32)
    targets = jax.nn.one_hot(labels, 2, dtype=jnp.float32)
    model = nets.build_mlp(2, 2, hidden_layers=0)
    _, params = model.init(jax.random.key(0), (-1, 2))
    result = jax.jit(lambda p: procedures.misclassified_descent(
        model, losses.lecture_objective(0.0), optim.gradient_descent(1.0), p, x, targets,
        key=jax.random.key(1), steps=3000, batch_size=4, stop_window=3000))(params)
    stop = int(result.stop_step)
    assert stop < 3000
    assert int(result.history["wrong"][stop - 1]) == 0
    assert int(result.history["wrong"][0]) > 0
    assert float(metrics.classification_error(model, result.params, x, targets)) == 0.0


def test_misclassified_descent_keeps_lambda_over_m_of_the_whole_set():
    """A full-size batch of misclassified picks gives the full-batch gradient's L2 term."""
    model, params, x, targets = small_problem(batch=8)
    objective = losses.lecture_objective(3.0)
    zero_data = procedures.misclassified_descent(
        model, objective._replace(loss=losses.Loss("zero", lambda o, t: 0.0 * jnp.sum(o),
                                                   lambda o, t: jnp.zeros_like(o))),
        optim.gradient_descent(1.0), params, x, targets, key=jax.random.key(0), steps=1,
        batch_size=2, stop_window=10)
    # with the data term zero, one step moves w by -(lambda/m) w with m = 8 (not 2)
    np.testing.assert_allclose(zero_data.params[0]["w"], params[0]["w"] * (1 - 3.0 / 8),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="batch_size must be in \\[1, 8\\], got 9"):
        procedures.misclassified_descent(model, objective, optim.gradient_descent(1.0), params,
                                         x, targets, key=jax.random.key(0), steps=1, batch_size=9)


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_random_restarts_equal_a_loop_over_the_keys(one_at_a_time):
    """Vmapped or mapped, each restart is the run its key gives alone; cost-checked descent
    with a step size that gets steps rejected, so that the cost check's cond matters."""
    model = nets.build_mlp(2, 1, hidden_units=2, w_init=nets.initializers.fan_in_uniform(6.0))
    objective = losses.lecture_objective(0.0)

    def init(key):
        return model.init(key, (-1, 2))[1]

    def train(params, key):
        return procedures.cost_checked_descent(model, objective, optim.gradient_descent(8.0),
                                               params, XOR_X, XOR_Y, key=key, steps=40)

    keys = jax.random.split(jax.random.key(3), 4)
    outcome = jax.jit(lambda k: procedures.random_restarts(
        init, train, k, model, XOR_X, XOR_Y, one_at_a_time=one_at_a_time))(keys)
    assert int(np.sum(outcome.restarts.perturbations)) > 0  # some steps were undone
    train_alone = jax.jit(train)
    for index, key in enumerate(keys):
        init_key, train_key = jax.random.split(key)
        alone = train_alone(init(init_key), train_key)
        assert int(outcome.restarts.perturbations[index]) == int(alone.perturbations)
        assert_close_tree(jax.tree.map(lambda a, i=index: a[i], outcome.restarts.params),
                          alone.params, jnp.float32, f"restart {index}")


def test_random_restarts_keep_the_lowest_held_out_error():
    model = nets.build_mlp(2, 1, hidden_units=2, w_init=nets.initializers.fan_in_uniform(6.0))
    objective = losses.lecture_objective(0.0)

    def init(key):
        return model.init(key, (-1, 2))[1]

    def train(params, key):
        del key
        return procedures.full_batch_descent(model, objective, optim.gradient_descent(2.0),
                                             params, XOR_X, XOR_Y, steps=300)

    keys = jax.random.split(jax.random.key(0), 12)
    outcome = jax.jit(lambda k: procedures.random_restarts(init, train, k, model, XOR_X,
                                                           XOR_Y))(keys)
    errors = np.asarray(outcome.held_out_errors)
    assert errors.shape == (12,)
    assert int(outcome.best_index) == int(np.argmin(errors))
    assert errors.min() < errors.max()  # the restarts really differ
    # each restart's error recomputed independently: one output, logit > 0 means class 1
    for index in range(12):
        restart_params = jax.tree.map(lambda a, i=index: a[i], outcome.restarts.params)
        logits = np.asarray(model.apply(restart_params, XOR_X))[:, 0]
        expected = np.mean((logits > 0) != np.array([0, 1, 1, 0], bool))
        np.testing.assert_allclose(errors[index], expected)
    assert_close_tree(outcome.best.params,
                      jax.tree.map(lambda a: a[int(np.argmin(errors))], outcome.restarts.params),
                      jnp.float32, "best")


def test_binary_metrics_use_the_threshold():
    outputs = jnp.array([[-0.2], [0.3], [0.7]])
    np.testing.assert_array_equal(metrics.predicted_labels(outputs), [0, 1, 1])
    np.testing.assert_array_equal(metrics.predicted_labels(outputs, 0.5), [0, 0, 1])
    np.testing.assert_array_equal(metrics.target_labels(jnp.array([[-1.0], [1.0], [0.0]])),
                                  [0, 1, 0])


@pytest.mark.parametrize("make", [procedures.full_batch, procedures.cost_checked])
def test_a_nan_gradient_is_rejected_and_the_learning_rate_lowered(make):
    """A NaN injected at step 3 leaves step 3's state equal to step 2's and halves eta."""
    model, params, x, targets = small_problem()
    objective = losses.lecture_objective(0.1)
    guard = procedures.Guard(factor=0.5, max_failures=3, nan_steps=(3,), nan_leaf=1)
    poisoned = make(model, objective, optim.gradient_descent(0.2), x, targets,
                    guard=guard, stop_window=100)
    clean = make(model, objective, optim.gradient_descent(0.2), x, targets,
                 stop_window=100)
    key = jax.random.key(0)
    state, records = procedures.run_steps(poisoned, poisoned.init(params, key), 0, 8)
    clean_state, clean_records = procedures.run_steps(clean, clean.init(params, key), 0, 3)
    np.testing.assert_array_equal(records["rejected"], [0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(records["energy"][:3], clean_records["energy"])
    assert float(records["energy"][3]) == float(records["energy"][2])  # rolled back
    assert float(state.guard.lr_scale) == 0.5
    assert int(state.guard.rejected) == 1 and not bool(state.guard.failed)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params))


def test_a_nan_leaf_past_the_gradients_leaves_is_refused_by_name():
    """nan_leaf=4 of an MLP's 4 gradient leaves was a bare IndexError from the traced step."""
    model, params, x, targets = small_problem()
    guard = procedures.Guard(nan_steps=(0,), nan_leaf=4)
    procedure = procedures.full_batch(model, losses.lecture_objective(0.1),
                                      optim.gradient_descent(0.2), x, targets, guard=guard)
    with pytest.raises(ValueError, match=re.escape(
            "Guard: nan_leaf 4 is out of range: the gradient has 4 leaves (0 to 3)")):
        procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)), 0, 1)


def test_consecutive_failures_freeze_the_run_and_name_the_leaf():
    model, params, x, targets = small_problem()
    guard = procedures.Guard(factor=0.5, max_failures=3, nan_steps=(4, 5, 6, 7, 8), nan_leaf=2)
    procedure = procedures.full_batch(model, losses.lecture_objective(0.1),
                                      optim.gradient_descent(0.2), x, targets,
                                      guard=guard, stop_window=100)
    state, records = procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)),
                                          0, 12)
    assert bool(state.guard.failed)
    assert int(state.guard.first_bad_step) == 4
    assert int(state.guard.first_bad_leaf) == 2
    assert int(state.guard.rejected) == 3  # frozen after the third
    np.testing.assert_array_equal(records["energy"][3:], records["energy"][3])
    np.testing.assert_allclose(float(state.guard.lr_scale), 0.125)


def test_stochastic_passes_with_batch_one_is_online_sgd_in_order():
    """One pass = one update per example, in the data's order, as a Python loop does it."""
    model, params, x, targets = small_problem(batch=7)
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    procedure = procedures.stochastic_passes(model, objective, optim.gradient_descent(0.1),
                                             x, targets)
    state, records = procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)),
                                          0, 2)
    value_and_grad = engines.autodiff(model, objective)
    expected = params
    for _ in range(2):
        for i in range(7):
            _, grad = value_and_grad(expected, x[i:i + 1], targets[i:i + 1])
            expected = jax.tree.map(lambda w, g: w - 0.1 * g, expected, grad)
    assert_close_tree(state.params, expected, jnp.float32, "online SGD")
    np.testing.assert_allclose(records["energy"][-1],
                               objective.value(expected, model.apply(expected, x), targets),
                               rtol=1e-5)


def dropout_mlp(rate):
    """4 -> 64 (ReLU, dropout) -> 3."""
    return nets.serial(nets.Dense(64, name="hidden"), nets.Relu(), nets.Dropout(rate),
                       nets.Dense(3, name="output"))


def test_stochastic_passes_train_through_dropout_and_measure_e_without_it():
    """One update on one example: the hidden units its mask dropped keep their incoming
    weights (no gradient reaches them), about half of the active ones; E after the pass is the
    objective at inference. The same state key gives the same run, another key another."""
    model = dropout_mlp(0.5)
    _, params = model.init(jax.random.key(0), (-1, 4))
    x, targets = random_batch(jax.random.key(1), 1, 4, 3, jnp.float32)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    procedure = procedures.stochastic_passes(model, objective, optim.gradient_descent(0.5),
                                             x, targets)

    def one_pass(key):
        return procedures.run_steps(procedure, procedure.init(params, key), 0, 1)

    state, records = one_pass(jax.random.key(2))
    changed = np.any(np.asarray(state.params[0]["w"]) != np.asarray(params[0]["w"]), axis=0)
    active = (np.asarray(x)[0] @ np.asarray(params[0]["w"]) + np.asarray(params[0]["b"])) > 0
    assert not np.any(changed & ~active)  # inactive ReLUs pass nothing back either
    assert 0.3 < changed.sum() / active.sum() < 0.7, (changed.sum(), active.sum())
    np.testing.assert_allclose(records["energy"][-1], objective.value(
        state.params, model.apply(state.params, x), targets), rtol=1e-6)
    again, _ = one_pass(jax.random.key(2))
    assert_close_tree(again.params, state.params, jnp.float32, "same key")
    other, _ = one_pass(jax.random.key(3))
    assert np.any(np.asarray(other.params[0]["w"]) != np.asarray(state.params[0]["w"]))


@pytest.mark.standard_promotion  # optax.adam
def test_stochastic_passes_with_dropout_rate_zero_equal_the_plain_model():
    plain = nets.serial(nets.Dense(64, name="hidden"), nets.Relu(),
                        nets.Dense(3, name="output"))
    _, plain_params = plain.init(jax.random.key(0), (-1, 4))
    x, targets = random_batch(jax.random.key(1), 12, 4, 3, jnp.float32)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    finals = []
    for model, params in ((plain, plain_params),
                          (dropout_mlp(0.0), (plain_params[0], (), (), plain_params[2]))):
        procedure = procedures.stochastic_passes(model, objective, optax.adam(0.01), x,
                                                 targets, batch_size=4, shuffle=True)
        state, _ = procedures.run_steps(procedure, procedure.init(params, jax.random.key(5)),
                                        0, 3)
        finals.append(state.params)
    assert_close_tree(finals[1][3], finals[0][2], jnp.float32, "output layer")
    assert_close_tree(finals[1][0], finals[0][0], jnp.float32, "hidden layer")


def test_shuffled_batches_visit_every_example():
    order = jnp.array([4, 0, 3, 1, 2])
    batches = procedures._batches(order, 2)
    np.testing.assert_array_equal(batches, [[4, 0], [3, 1], [2, 4]])
    assert set(np.asarray(batches).ravel()) == set(range(5))


def loop_sgd_skipping(model, objective, params, x, targets, skipped, lr, passes, factor=0.5):
    """Reference: one-example SGD as a Python loop (jax.grad) that skips the examples in
    `skipped`, multiplying the learning rate by `factor` at each skip, as the guard does."""
    value_and_grad = engines.autodiff(model, objective)
    scale = 1.0
    for _ in range(passes):
        for i in range(x.shape[0]):
            if i in skipped:
                scale *= factor
                continue
            _, grad = value_and_grad(params, x[i:i + 1], targets[i:i + 1])
            step = lr * scale
            params = jax.tree.map(lambda w, g, step=step: w - step * g, params, grad)
    return params


def infinite_on_large_targets(loss):
    """`loss` whose value is +inf on a batch with a target above 100; its gradient is kept:
    a step with a non-finite energy but a finite gradient."""
    def value(o, t):
        return jnp.where(jnp.any(t > 100.0), jnp.inf, loss.value(o, t))

    return loss._replace(value=value)


@pytest.mark.parametrize("guard_every_step", [False, True])
@pytest.mark.parametrize("poison", ["nan_input", "infinite_energy"])
def test_stochastic_passes_reject_non_finite_examples(poison, guard_every_step):
    """Checked after the pass (the default) or at every step: the non-finite example is
    skipped in both passes and the learning rate halved each time, as a Python loop that
    skips it; no other example is lost."""
    model, params, x, targets = small_problem(batch=7)
    loss = losses.mean_squared_error()
    if poison == "nan_input":
        x = x.at[3, 0].set(jnp.nan)
    else:
        loss = infinite_on_large_targets(loss)
        targets = targets.at[3, 0].set(1000.0)
    objective = losses.Objective(loss, 0.0)
    procedure = procedures.stochastic_passes(model, objective, optim.gradient_descent(0.1),
                                             x, targets, guard_every_step=guard_every_step)
    state, records = procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)),
                                          0, 2)
    expected = loop_sgd_skipping(model, objective, params, x, targets, {3}, 0.1, passes=2)
    assert_close_tree(state.params, expected, jnp.float32, f"{poison} skipped")
    assert int(state.guard.rejected) == 2 and not bool(state.guard.failed)
    assert float(state.guard.lr_scale) == 0.25
    assert int(state.guard.consecutive) == 0 and int(state.guard.first_bad_step) == -1


def test_a_pass_after_a_rejected_one_is_unchecked_at_the_lowered_rate():
    """Pass 0: a NaN gradient at each of the 7 examples, all rejected (eta halved 7 times,
    the parameters kept). Pass 1 is clean and runs unchecked at eta 0.1 / 2^7: the parameters
    of one loop pass at that rate, and the guard state of checking every step."""
    model, params, x, targets = small_problem(batch=7)
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    guard = procedures.Guard(max_failures=100, nan_steps=(0,))

    def final_state(guard_every_step):
        procedure = procedures.stochastic_passes(model, objective, optim.gradient_descent(0.1),
                                                 x, targets, guard=guard,
                                                 guard_every_step=guard_every_step)
        return procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)),
                                    0, 2)[0]

    deferred, per_step = final_state(False), final_state(True)
    expected = loop_sgd_skipping(model, objective, params, x, targets, set(), 0.1 / 2**7, 1)
    assert_close_tree(deferred.params, expected, jnp.float32, "pass 1 at eta / 2^7")
    assert_close_tree(per_step.params, expected, jnp.float32, "pass 1 at eta / 2^7")
    assert float(deferred.guard.lr_scale) == 0.5**7 and int(deferred.guard.rejected) == 7
    for field, value in deferred.guard._asdict().items():
        assert value == getattr(per_step.guard, field), field


def test_stochastic_passes_without_a_guard_take_every_step():
    """guard=None: on finite data the same parameters as with the guard (up to float32
    rounding: XLA fuses the update differently); a NaN in the data is taken, not rejected."""
    model, params, x, targets = small_problem(batch=7)
    objective = losses.Objective(losses.mean_squared_error(), 0.0)

    def final_params(x, guard):
        procedure = procedures.stochastic_passes(model, objective, optim.gradient_descent(0.1),
                                                 x, targets, guard=guard)
        state, _ = procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)),
                                        0, 2)
        return state

    guarded, unguarded = final_params(x, procedures.DEFAULT_GUARD), final_params(x, None)
    assert_close_tree(unguarded.params, guarded.params, jnp.float32, "guard=None")
    poisoned = x.at[3, 0].set(jnp.nan)
    assert int(final_params(poisoned, procedures.DEFAULT_GUARD).guard.rejected) == 2
    assert all(bool(jnp.all(jnp.isfinite(leaf)))
               for leaf in jax.tree.leaves(final_params(poisoned, procedures.DEFAULT_GUARD).params))
    unguarded_poisoned = final_params(poisoned, None)
    assert int(unguarded_poisoned.guard.rejected) == 0
    assert not all(bool(jnp.all(jnp.isfinite(leaf)))
                   for leaf in jax.tree.leaves(unguarded_poisoned.params))


def test_online_without_a_guard_takes_the_steps_the_guard_rejects():
    """online(guard=None) on fresh batches: the guarded run's parameters on finite batches;
    on NaN batches every step is taken (NaN parameters), where the guard rejects them all."""
    model, params, _, _ = small_problem()
    objective = losses.Objective(losses.mean_squared_error(), 0.0)

    def sample(key, poisoned=False):
        x, targets = random_batch(key, 8, 4, 3, jnp.float32)
        return (x * jnp.nan if poisoned else x), targets

    def final_state(sample, guard):
        procedure = procedures.online(model, objective, optim.gradient_descent(0.1), sample,
                                      steps_per_record=4, guard=guard)
        state, _ = procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)),
                                        0, 1)
        return state

    assert_close_tree(final_state(sample, None).params,
                      final_state(sample, procedures.DEFAULT_GUARD).params, jnp.float32,
                      "online guard=None")

    def nan_sample(key):
        return sample(key, poisoned=True)

    guarded = final_state(nan_sample, procedures.DEFAULT_GUARD)
    assert int(guarded.guard.rejected) == 4
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(guarded.params))
    unguarded = final_state(nan_sample, None)
    assert int(unguarded.guard.rejected) == 0
    assert not any(bool(jnp.any(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(unguarded.params))


def test_stochastic_passes_hand_the_curvature_to_the_optimizer():
    """With h = 0 everywhere and mu = 1, the diagonal rule is plain descent."""
    model, params, x, targets = small_problem(batch=5)
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    lm = procedures.stochastic_passes(model, objective,
                                      optim.diagonal_levenberg_marquardt(0.1, 1.0), x, targets,
                                      curvature=lambda p: zero)
    sgd = procedures.stochastic_passes(model, objective, optim.gradient_descent(0.1), x,
                                       targets)
    key = jax.random.key(0)
    lm_state, _ = procedures.run_steps(lm, lm.init(params, key), 0, 1)
    sgd_state, _ = procedures.run_steps(sgd, sgd.init(params, key), 0, 1)
    assert_close_tree(lm_state.params, sgd_state.params, jnp.float32, "h = 0")
    halved = procedures.stochastic_passes(
        model, objective, optim.diagonal_levenberg_marquardt(0.1, 1.0), x, targets,
        curvature=lambda p: jax.tree.map(jnp.ones_like, p))
    halved_state, _ = procedures.run_steps(halved, halved.init(params, key), 0, 1)
    first_step = jax.tree.map(lambda a, b: a - b, halved_state.params, params)
    assert bool(jnp.any(jnp.abs(first_step[0]["w"]) > 0))


def test_misclassified_descent_with_the_hardest_examples_picked():
    """The per-example-gradient picker plugs into the lecture's procedure and trains."""
    from training import parallel

    key = jax.random.key(3)
    x = jax.random.normal(key, (40, 2), jnp.float32)
    targets = jax.nn.one_hot((x[:, 0] - x[:, 1] > 0).astype(jnp.int32), 2, dtype=jnp.float32)
    model = nets.build_mlp(2, 2, hidden_layers=0)
    _, params = model.init(jax.random.key(0), (-1, 2))
    objective = losses.lecture_objective(0.0)
    pick = parallel.pick_hardest_misclassified(model, objective, count=4)
    result = procedures.misclassified_descent(
        model, objective, optim.gradient_descent(1.0), params, x, targets,
        key=jax.random.key(1), steps=200, batch_size=4, stop_window=200, pick=pick)
    wrong = np.asarray(result.history["wrong"])
    assert wrong[0] > 0 and wrong[-1] < wrong[0]


def test_guarded_update_rejects_non_finite_steps_and_stops_after_a_failure():
    params = {"w": jnp.array([1.0, 2.0])}
    rule = optim.gradient_descent(0.5)
    state = procedures.initial_state(params, rule.init(params), jax.random.key(0))
    good = {"w": jnp.array([2.0, 2.0])}
    moved, opt_state, guard_state = procedures.guarded_update(
        rule, params, state.opt_state, state.guard, jnp.array(1.0), good, 0)
    np.testing.assert_allclose(moved["w"], [0.0, 1.0])
    bad = {"w": jnp.array([jnp.nan, 0.0])}
    kept, _, guard_state = procedures.guarded_update(
        rule, moved, opt_state, guard_state, jnp.array(1.0), bad, 1,
        procedures.Guard(max_failures=1))
    np.testing.assert_array_equal(kept["w"], moved["w"])
    assert bool(guard_state.failed) and int(guard_state.first_bad_step) == 1
    assert float(guard_state.lr_scale) == 0.5 and int(guard_state.first_bad_leaf) == 0
    frozen, _, after = procedures.guarded_update(
        rule, kept, opt_state, guard_state, jnp.array(1.0), good, 2)
    np.testing.assert_array_equal(frozen["w"], kept["w"])  # a failed run takes no step
    assert int(after.rejected) == 1


def online_sdlm_by_hand(model, objective, params, sample, key, eta, mu, *, records,
                        steps_per_record, curvature_every):
    """The online procedure's SDLM updates as a Python loop: the batches drawn from key as
    the procedure draws them, h re-estimated on the batch of every curvature_every-th update
    of each record, each step -eta g / (mu + h) written out."""
    value_and_grad = engines.manual(model, objective)
    diagonal = engines.curvature_diagonal(model, objective)
    for _ in range(records):
        for within in range(steps_per_record):
            key, batch_key = procedures._split(key)
            x, targets = sample(batch_key)
            if within % curvature_every == 0:
                h = diagonal(params, x, targets)
            grad = value_and_grad(params, x, targets)[1]
            params = jax.tree.map(lambda w, g, hk: w - eta * g / (mu + hk), params, grad, h)
    return params


def test_online_with_lecuns_curvature_steps_eta_over_mu_plus_h():
    """online(curvature_every=3) with the diagonal Levenberg-Marquardt optimizer: the first
    update is -eta g / (mu + h), h the backpropagated diagonal at the initial params on the
    first batch; the fourth uses a fresh h, the second and third the first one (checked
    against a loop that recomputes each step by hand)."""
    model = nets.build_mlp(4, 2, hidden_units=3, activation="tanh")
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    _, params = model.init(jax.random.key(0), (-1, 4))

    def sample(key):
        return random_batch(key, 5, 4, 2, jnp.float32)

    eta, mu = 0.05, 0.01
    procedure = procedures.online(model, objective, optim.diagonal_levenberg_marquardt(eta, mu),
                                  sample, steps_per_record=4, curvature_every=3)
    state = procedure.init(params, jax.random.key(1))
    new_state, _ = jax.jit(procedure.step)(state, 0)
    expected = online_sdlm_by_hand(model, objective, params, sample, state.key, eta, mu,
                                   records=1, steps_per_record=4, curvature_every=3)
    assert_close_tree(new_state.params, expected, jnp.float32, "online sdlm")
    with pytest.raises(ValueError, match="online: curvature_every must be >= 1"):
        procedures.online(model, objective, optax.sgd(0.1), sample, steps_per_record=2,
                          curvature_every=0)


@pytest.mark.parametrize("call, message", [
    (lambda: optim.gradient_descent(math.inf),
     "gradient_descent: learning_rate must be > 0 and finite, got inf"),
    (lambda: optim.gradient_descent(True),
     "gradient_descent: learning_rate must be > 0 and finite, got True"),
    (lambda: optim.diagonal_levenberg_marquardt(math.inf, 1.0),
     "diagonal_levenberg_marquardt: learning_rate must be > 0 and finite (or a schedule), "
     "got inf"),
    (lambda: optim.diagonal_levenberg_marquardt(True, 1.0),
     "diagonal_levenberg_marquardt: learning_rate must be > 0 and finite (or a schedule), "
     "got True"),
    (lambda: optim.diagonal_levenberg_marquardt(0.1, math.inf),
     "diagonal_levenberg_marquardt: mu must be > 0 and finite, got inf"),
    (lambda: optim.diagonal_levenberg_marquardt(0.1, math.nan),
     "diagonal_levenberg_marquardt: mu must be > 0 and finite, got nan"),
    (lambda: optim.lecun1998_schedule(5e-4, 0),
     "lecun1998_schedule: updates_per_pass must be an integer >= 1, got 0"),
    (lambda: optim.lecun1998_schedule(5e-4, -3),
     "lecun1998_schedule: updates_per_pass must be an integer >= 1, got -3"),
    (lambda: optim.lecun1998_schedule(-1.0, 10),
     "lecun1998_schedule: learning_rate must be > 0 and finite, got -1.0"),
    (lambda: optim.lecun1998_schedule(math.nan, 10),
     "lecun1998_schedule: learning_rate must be > 0 and finite, got nan"),
])
def test_update_rules_refuse_rates_that_are_not_finite_positive_numbers(call, message):
    """inf, nan, True and rates <= 0 were taken (a schedule's boundaries collapsed at 0 or
    fewer updates a pass); a schedule, as SDLM's learning rate, still is."""
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
    schedule = optim.lecun1998_schedule(5e-4, 10)
    assert optim.diagonal_levenberg_marquardt(schedule, 0.02) is not None


def never_called(key):
    raise AssertionError("not sampled: the procedure is refused first")


@pytest.mark.parametrize("call, message", [
    (lambda: procedures.Guard(factor=-1.0), "Guard: factor must be in (0, 1), got -1.0"),
    (lambda: procedures.Guard(factor=1.5), "Guard: factor must be in (0, 1), got 1.5"),
    (lambda: procedures.Guard(max_failures=0), "Guard: max_failures must be an int >= 1, got 0"),
    # 1.5 acted as 2 (a count of rejections compared with it)
    (lambda: procedures.Guard(max_failures=1.5),
     "Guard: max_failures must be an int >= 1, got 1.5"),
    (lambda: procedures.Guard(nan_leaf=-1),  # -1 poisoned the last leaf
     "Guard: nan_leaf must be an int >= 0 (a flat index of the gradient's leaves), got -1"),
    (lambda: procedures.online(*small_problem()[:1], losses.lecture_objective(0.0),
                               optim.gradient_descent(0.1), never_called, steps_per_record=0),
     "online: steps_per_record must be >= 1, got 0"),
    (lambda: procedures.full_batch_descent(
        small_problem()[0], losses.lecture_objective(0.0), optim.gradient_descent(0.1),
        *small_problem()[1:], steps=-3), "run: steps must be >= 1, got -3"),
    (lambda: procedures.curvature_on_subset(
        small_problem()[0], losses.lecture_objective(0.0), *small_problem()[2:], -5),
     "curvature_on_subset: examples must be between 1 and the 40 examples of x, got -5"),
    (lambda: procedures.curvature_on_subset(
        small_problem()[0], losses.lecture_objective(0.0), *small_problem()[2:], 0),
     "curvature_on_subset: examples must be between 1 and the 40 examples of x, got 0"),
    (lambda: procedures.curvature_on_subset(
        small_problem()[0], losses.lecture_objective(0.0), *small_problem()[2:], 41),
     "curvature_on_subset: examples must be between 1 and the 40 examples of x, got 41"),
])
def test_procedure_arguments_that_would_do_nothing_sensible_are_refused(call, message):
    """max_failures=0 froze a run after its first step, factor=-1 turned the rate negative,
    steps_per_record=0 gave NaN energies, steps=-3 a negative stop step, examples=-5 a
    curvature over all but the last 5 examples (0 divided by zero), and examples=41 of 40 a
    curvature over fewer examples than asked for."""
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def build(name, x, targets, **options):
    """Procedure `name` of the small problem's model on (x, targets), gradient descent."""
    model, objective, rule = small_problem()[0], losses.lecture_objective(0.0), \
        optim.gradient_descent(0.1)
    if name == "hessian_free":
        return procedures.hessian_free(model, objective, x, targets, **options)
    return getattr(procedures, name)(model, objective, rule, x, targets, **options)


PROCEDURES = {"full_batch": {}, "cost_checked": {}, "misclassified": {"batch_size": 2},
              "stochastic_passes": {"batch_size": 2}, "hessian_free": {}}
FUNCTION_NAMES = {"misclassified": "misclassified_descent"}


@pytest.mark.parametrize("name", sorted(PROCEDURES))
@pytest.mark.parametrize("examples, labelled", [(0, 0), (39, 40), (40, 25)])
def test_procedures_refuse_data_without_examples_or_with_unmatched_targets(name, examples,
                                                                           labelled):
    """Empty data ran full_batch, cost_checked and hessian_free to NaN energies without a word
    (the picking and stochastic ones blamed 'batch_size must be in [1, 0]'), and x and
    targets of different lengths were reported by the loss, not the procedure."""
    _, _, x, targets = small_problem()
    with pytest.raises(ValueError, match=re.escape(
            f"{FUNCTION_NAMES.get(name, name)}: x has shape ({examples}, 4) and targets "
            f"({labelled}, 3); expected the same number (>= 1) of examples along their first "
            "axis")):
        build(name, x[:examples], targets[:labelled], **PROCEDURES[name])


@pytest.mark.parametrize("name", sorted(PROCEDURES))
@pytest.mark.parametrize("key, got", [
    (0, "int 0"),
    (jax.random.key(0, impl="rbg"), "key<rbg> array of shape ()"),
    (jax.random.split(jax.random.key(0), 3), "key<fry> array of shape (3,)"),
    (jnp.zeros(2, jnp.float32), "float32 array of shape (2,)"),
])
def test_procedures_refuse_a_key_of_another_kind_by_name(name, key, got):
    """An int seed was an AttributeError ('int' object has no attribute 'dtype'), a key of
    another implementation an error about key data shapes from inside the first split (or no
    error at all in full_batch, which stored its data), several keys a broadcast further on.
    A typed key and the raw data of one (jax.random.PRNGKey) both still work."""
    model, params, x, targets = small_problem()
    procedure = build(name, x, targets, **PROCEDURES[name])
    with pytest.raises(TypeError, match=re.escape(
            "procedure init: key must be one PRNG key of the default implementation, "
            f"jax.random.key(seed) or its uint32 key data of shape (2,), got {got}")):
        procedure.init(params, key)
    typed = procedure.init(params, jax.random.key(3))
    raw = procedure.init(params, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(typed.key, raw.key)


@pytest.mark.parametrize("call, message", [
    (lambda: procedures.run(build("full_batch", *small_problem()[2:]), small_problem()[1],
                            jax.random.key(0), 2.5), "run: steps must be an integer, got 2.5"),
    (lambda: build("stochastic_passes", *small_problem()[2:], batch_size=2.5),
     "stochastic_passes: batch_size must be an integer, got 2.5"),
    (lambda: build("stochastic_passes", *small_problem()[2:], batch_size=True),
     "stochastic_passes: batch_size must be an integer, got True"),
    (lambda: build("misclassified", *small_problem()[2:], batch_size=4.0),
     "misclassified_descent: batch_size must be an integer, got 4.0"),
    (lambda: build("full_batch", *small_problem()[2:], stop_window=2.5).init(
        small_problem()[1], jax.random.key(0)),
     "stopping rule: stop_window must be an integer, got 2.5"),
])
def test_counts_that_are_not_integers_are_refused(call, message):
    """steps=2.5 ran 3 steps and reported a stop step of 2.5; batch_size=True ran batches of
    one; a float batch size or window was a TypeError about shapes from inside jax."""
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


@pytest.mark.parametrize("keys, held_out, message", [
    (jax.random.key(0), 40, "random_restarts: keys must be (restarts,) PRNG keys, restarts >= 1 "
     "(jax.random.split(key, restarts)), got key<fry> keys of shape ()"),
    (jax.random.split(jax.random.key(0), 2)[:0], 40, "random_restarts: keys must be "
     "(restarts,) PRNG keys, restarts >= 1 (jax.random.split(key, restarts)), got key<fry> "
     "keys of shape (0,)"),
    (jax.random.split(jax.random.key(0), 2), 0, "random_restarts: x_held_out has shape (0, 4) "
     "and targets_held_out (0, 3); expected the same number (>= 1) of examples"),
])
def test_random_restarts_refuse_no_restarts_or_no_held_out_examples(keys, held_out, message):
    """One key (not a batch of them) was vmap's rank error, no keys argmin's 'empty sequence',
    and no held-out examples made every error NaN and picked restart 0 without a word."""
    model, _, x, targets = small_problem()

    def never_trained(params, key):
        raise AssertionError("refused before training")

    with pytest.raises(ValueError, match=re.escape(message)):
        procedures.random_restarts(lambda key: model.init(key, (-1, 4))[1], never_trained,
                                   keys, model, x[:held_out], targets[:held_out])


@pytest.mark.parametrize("window, tolerance, fires", [(1, 1e-4, False), (3, 0.02, True)])
def test_misclassified_picking_every_example_stops_as_full_batch_descent(window, tolerance,
                                                                         fires):
    """Picking all 40 examples, each step is full-batch descent's: the same energies after
    each step and the same stop step, the window judging stop_window updates (it judged one
    fewer: a window of 1 stopped at step 1 whatever E did)."""
    model, params, x, targets = small_problem()
    objective = losses.lecture_objective(0.1)
    options = dict(steps=12, stop_window=window, stop_tolerance=tolerance)
    full = procedures.full_batch_descent(model, objective, optim.gradient_descent(0.3), params,
                                         x, targets, **options)
    picked = procedures.misclassified_descent(
        model, objective, optim.gradient_descent(0.3), params, x, targets,
        key=jax.random.key(0), batch_size=40, pick=lambda p, x, t: jnp.arange(x.shape[0]),
        **options)
    assert int(np.min(picked.history["wrong"])) > 0  # every step had a misclassified example
    assert (int(full.stop_step) < 12) == fires  # E falls at every step, by less and less
    assert int(picked.stop_step) == int(full.stop_step)
    np.testing.assert_allclose(picked.history["energy"], full.history["energy"], rtol=1e-6)
    assert_close_tree(picked.params, full.params, jnp.float32, "every example picked")


def test_misclassified_state_energy_is_e_of_its_params():
    """state.energy (experiments.lecture's final_energy) and the last record's energy are E
    of the state's params on the whole set, not E before the last update."""
    model, params, x, targets = small_problem()
    objective = losses.lecture_objective(0.1)
    procedure = procedures.misclassified(model, objective, optim.gradient_descent(0.5), x,
                                         targets, batch_size=8, stop_window=100)
    state, records = procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)),
                                          0, 5)

    def energy(p):
        return float(objective.value(p, model.apply(p, x), targets))

    assert energy(state.params) != pytest.approx(energy(params), rel=1e-3)
    assert float(state.energy) == pytest.approx(energy(state.params), rel=1e-6)
    assert float(records["energy"][-1]) == float(state.energy)
    wrong = np.sum(np.asarray(metrics.predicted_labels(model.apply(state.params, x)))
                   != np.asarray(metrics.target_labels(targets)))
    assert int(records["wrong"][-1]) == int(wrong)


# --- tests for behaviour a mutation run showed unchecked ---------------------------------------

ZERO_DATA_TERM = losses.Loss("zero", lambda o, t: 0.0 * jnp.sum(o), lambda o, t: jnp.zeros_like(o))


def float64_problem(examples=8):
    """A 3 -> 4 -> 2 MLP in float64, x ~ N(0, 1) (examples, 3), one-hot targets of classes 0
    and 1 in turn (0/1: the lecture's sigmoid cross-entropy refuses +-1)."""
    x = jax.random.normal(jax.random.key(0), (examples, 3), jnp.float64)
    targets = jax.nn.one_hot(jnp.arange(examples) % 2, 2, dtype=jnp.float64)
    model = nets.build_mlp(3, 2, hidden_units=4)
    _, params = model.init(jax.random.key(1), (-1, 3))
    return model, jax.tree.map(lambda p: p.astype(jnp.float64), params), x, targets


@pytest.mark.standard_promotion  # optax.piecewise_constant_schedule
def test_sdlm_with_lecun1998_schedule_takes_the_papers_step_sizes_by_update_count():
    """LeCun et al. 1998, Appendix C: eta = 0.0005 for the first 2 passes, 0.0002 for the next
    3, 0.0001 for the next 3, 0.00005 for the next 4, 0.00001 after. With 2 updates a pass,
    g = 2, h = 1.5 and mu = 0.5 each step is -eta g / (mu + h) = -eta, so update k (from 0)
    must use the rate of pass k // 2. Fails if the schedule is read at another count than the
    number of updates before this one, or if the count does not advance."""
    per_pass = 2
    rule = optim.diagonal_levenberg_marquardt(optim.lecun1998_schedule(5e-4, per_pass), mu=0.5)
    params = {"w": jnp.array([1.0], jnp.float64)}
    grads, curvature = {"w": jnp.array([2.0], jnp.float64)}, {"w": jnp.array([1.5], jnp.float64)}
    state = rule.init(params)
    rates = []
    for _ in range(14 * per_pass):
        updates, state = rule.update(grads, state, params, curvature=curvature)
        rates.append(-float(updates["w"][0]))
    by_pass = [5e-4] * 2 + [2e-4] * 3 + [1e-4] * 3 + [5e-5] * 4 + [1e-5] * 2
    np.testing.assert_allclose(rates, np.repeat(by_pass, per_pass), rtol=1e-10)
    assert int(state.count) == 14 * per_pass


def test_a_zero_stop_tolerance_never_stops_on_a_flat_energy():
    """stop_tolerance=0 stops on a relative decrease < 0 only: a step of 1e-300 leaves every
    weight, so E, exactly as it was (a decrease of exactly 0) and the run goes all 5 steps.
    Fails if the rule fires at decrease == tolerance (it would stop at step 1)."""
    model, params, x, targets = float64_problem()
    result = procedures.full_batch_descent(
        model, losses.lecture_objective(0.0), optim.gradient_descent(1e-300), params, x,
        targets, steps=5, stop_window=1, stop_tolerance=0.0)
    assert len(set(np.asarray(result.history["energy"]).tolist())) == 1
    assert int(result.stop_step) == 5


def test_perturb_draws_independent_noise_of_the_given_scale_for_every_leaf():
    """perturb(key, params, 0.1) adds N(0, 0.01) noise, a draw of its own for each leaf
    (NumPy statistics, key 0). Two leaves of the same shape and one of another: each sample
    standard deviation is 0.1 within 0.01 (standard error ~0.0011 at 4,000 draws; measured
    0.0988-0.1017), each mean 0 within 0.01 (standard error ~0.0016; measured at most 0.0014),
    and the correlations between leaves are below 0.1 in magnitude (standard error ~0.016;
    measured at most 0.035). Fails if leaves share a key: the noise of same-sized leaves is
    then the same draw (correlation 1)."""
    params = {"a": jnp.zeros((4000,), jnp.float64), "b": jnp.zeros((4000,), jnp.float64),
              "c": jnp.ones((50, 80), jnp.float64)}
    moved = procedures.perturb(jax.random.key(0), params, 0.1)
    noise = {name: np.ravel(np.asarray(moved[name]) - np.asarray(params[name]))
             for name in params}
    for name, values in noise.items():
        assert abs(values.std() - 0.1) < 0.01, name
        assert abs(values.mean()) < 0.01, name
    assert abs(np.corrcoef(noise["a"], noise["b"])[0, 1]) < 0.1
    assert abs(np.corrcoef(noise["a"], noise["c"])[0, 1]) < 0.1
    assert abs(np.corrcoef(noise["b"], noise["c"])[0, 1]) < 0.1


def online_problem():
    """A 4 -> 3 (tanh) -> 2 MLP in float64 and a sampler of fresh batches of 5."""
    model = nets.build_mlp(4, 2, hidden_units=3, activation="tanh")
    _, params = model.init(jax.random.key(0), (-1, 4))

    def sample(key):
        return random_batch(key, 5, 4, 2, jnp.float64)

    return model, jax.tree.map(lambda p: p.astype(jnp.float64), params), sample


def test_online_refreshes_the_curvature_at_the_start_of_every_record():
    """online(steps_per_record=4, curvature_every=3) over two records: h is re-estimated at
    updates 0 and 3 of each record (updates 0, 3, 4, 7 of the run), against a float64 loop
    (hand-written gradient and curvature diagonal, the step -eta g / (mu + h) by hand).
    Fails if the refresh follows the run's update count (updates 0, 3, 6) instead."""
    model, params, sample = online_problem()
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    eta, mu = 0.05, 0.01
    procedure = procedures.online(model, objective, optim.diagonal_levenberg_marquardt(eta, mu),
                                  sample, steps_per_record=4, curvature_every=3)
    start = procedure.init(params, jax.random.key(1))
    state, _ = procedures.run_steps(procedure, start, 0, 2)
    expected = online_sdlm_by_hand(model, objective, params, sample, start.key, eta, mu,
                                   records=2, steps_per_record=4, curvature_every=3)
    assert_close_tree(state.params, expected, jnp.float64, "two records")


def test_online_records_the_mean_loss_of_its_batches():
    """online(gradient_descent(0.1), steps_per_record=3): record["energy"] is the mean of the
    3 batch losses, each measured before its update (a loop with jax.grad). Fails if it
    reports another statistic, e.g. the last batch's loss (the three differ)."""
    model, params, sample = online_problem()
    objective = losses.Objective(losses.mean_squared_error(), 0.0)
    procedure = procedures.online(model, objective, optim.gradient_descent(0.1), sample,
                                  steps_per_record=3)
    state = procedure.init(params, jax.random.key(1))
    key_data = state.key
    _, records = procedures.run_steps(procedure, state, 0, 1)

    def energy(p, x, targets):
        return objective.value(p, model.apply(p, x), targets)

    expected, energies = params, []
    for _ in range(3):
        key_data, batch_key = procedures._split(key_data)
        x, targets = sample(batch_key)
        energies.append(float(energy(expected, x, targets)))
        grad = jax.grad(energy)(expected, x, targets)
        expected = jax.tree.map(lambda w, g: w - 0.1 * g, expected, grad)
    assert len(set(energies)) == 3
    np.testing.assert_allclose(float(records["energy"][0]), np.mean(energies), rtol=F64)


def test_a_failed_run_reports_no_later_rejections():
    """Guard(max_failures=1) with NaNs injected at steps 2, 3 and 4: step 2 is rejected and
    fails the run, which is frozen after it, so "rejected" is set at step 2 only (events do
    not happen in a frozen run). Fails if the frozen steps report their own NaNs."""
    model, params, x, targets = float64_problem()
    guard = procedures.Guard(max_failures=1, nan_steps=(2, 3, 4))
    result = procedures.full_batch_descent(
        model, losses.lecture_objective(0.0), optim.gradient_descent(0.1), params, x, targets,
        steps=6, guard=guard, stop_window=100)
    np.testing.assert_array_equal(np.asarray(result.history["rejected"]),
                                  [False, False, True, False, False, False])


def test_a_nan_gradient_in_the_last_batch_of_a_pass_is_caught_by_the_deferred_check():
    """stochastic_passes with one batch a pass and a NaN gradient injected at pass 0: every
    energy of the pass is finite (it is measured before the update), only the params are not,
    so the deferred check must look at them and rerun the pass checked: the params stay
    finite and the guard counts one rejection. Fails if the check looks at energies only."""
    model, params, x, targets = float64_problem()
    procedure = procedures.stochastic_passes(
        model, losses.lecture_objective(0.0), optim.gradient_descent(0.1), x, targets,
        batch_size=8, guard=procedures.Guard(nan_steps=(0,)))
    state, records = procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)),
                                          0, 2)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params))
    assert int(state.guard.rejected) == 1
    assert np.all(np.isfinite(np.asarray(records["energy"])))


def test_an_undone_cost_checked_step_also_undoes_the_optimizer_state():
    """cost_checked with momentum SGD turned into ascent (optax.sgd(0.01, momentum=0.9) then
    scale(-1)): the step raises E, so it is undone, and the momentum trace must go back to
    optax's initial zeros with it. Fails if the undone step keeps the new optimizer state
    (the trace would hold the gradient)."""
    model, params, x, targets = float64_problem()
    ascent = optax.chain(optax.sgd(0.01, momentum=0.9), optax.scale(-1.0))
    procedure = procedures.cost_checked(model, losses.lecture_objective(0.0), ascent, x,
                                        targets)
    state, records = procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)),
                                          0, 1)
    assert bool(records["perturbed"][0])
    initial = ascent.init(params)
    for leaf, zero in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(zero))


def test_stochastic_passes_keep_lambda_over_m_of_the_whole_set():
    """With the data term zero, lambda = 3, m = 8, batches of 2 and gradient_descent(1), each
    of the pass's 4 updates is w <- w - (lambda/m) w, so after the pass
    w = w0 (1 - 3/8)^4 (by hand). Fails if a batch uses lambda/2 of its own 2 examples."""
    model, params, x, targets = float64_problem(8)
    objective = losses.lecture_objective(3.0)._replace(loss=ZERO_DATA_TERM)
    procedure = procedures.stochastic_passes(model, objective, optim.gradient_descent(1.0), x,
                                             targets, batch_size=2)
    state, _ = procedures.run_steps(procedure, procedure.init(params, jax.random.key(0)), 0, 1)
    np.testing.assert_allclose(state.params[0]["w"], params[0]["w"] * (1 - 3.0 / 8) ** 4,
                               rtol=F64)


def test_the_guard_names_the_first_bad_leaf_and_step_of_a_streak():
    """Two rejected steps in a row: a NaN in leaf "a" at step 3, then in leaf "b" at step 4.
    The guard reports where the streak began, leaf 0 at step 3 (by hand). Fails if a later
    rejection of the streak overwrites the leaf."""
    params = {"a": jnp.array([1.0]), "b": jnp.array([1.0])}
    rule = optim.gradient_descent(0.5)
    state = procedures.initial_state(params, rule.init(params), jax.random.key(0))
    energy = jnp.array(1.0)
    _, opt_state, guard = procedures.guarded_update(
        rule, params, state.opt_state, state.guard, energy,
        {"a": jnp.array([jnp.nan]), "b": jnp.array([0.0])}, 3)
    _, _, guard = procedures.guarded_update(
        rule, params, opt_state, guard, energy,
        {"a": jnp.array([0.0]), "b": jnp.array([jnp.nan])}, 4)
    assert int(guard.consecutive) == 2
    assert int(guard.first_bad_leaf) == 0 and int(guard.first_bad_step) == 3


def test_misclassified_descent_draws_only_misclassified_examples():
    """Batches of one from 12 examples of which 4 are misclassified: for each of 8 keys the
    one step must equal w - 0.1 dE/dw on one of the misclassified examples alone (jax.grad,
    lambda = 0). Fails if the draw can pick a correctly classified example (a uniform draw
    over all 12 picks a misclassified one every time for 8 keys with probability 3^-8)."""
    model, params, x, targets = float64_problem(12)
    objective = losses.lecture_objective(0.0)
    outputs = model.apply(params, x)
    wrong = np.flatnonzero(np.asarray(metrics.predicted_labels(outputs))
                           != np.asarray(metrics.target_labels(targets)))
    assert len(wrong) == 4

    def energy(p, xb, tb):
        return objective.value(p, model.apply(p, xb), tb)

    def flat(tree):
        return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])

    candidates = [flat(jax.tree.map(lambda w, g: w - 0.1 * g, params,
                                    jax.grad(energy)(params, x[i:i + 1], targets[i:i + 1])))
                  for i in wrong]
    procedure = procedures.misclassified(model, objective, optim.gradient_descent(0.1), x,
                                         targets, batch_size=1, stop_window=10)
    one_step = jax.jit(lambda key: procedures.run_steps(
        procedure, procedure.init(params, key), 0, 1)[0].params)
    for seed in range(8):
        moved = flat(one_step(jax.random.key(seed)))
        errors = [np.max(np.abs(moved - c)) / np.max(np.abs(c)) for c in candidates]
        assert min(errors) <= F64, seed


def test_cost_checked_keeps_a_step_only_if_the_energy_strictly_decreases():
    """With the data term zero and lambda = 0 the gradient is 0: every proposal is the params
    themselves, E does not decrease, and each of the 3 steps is undone and perturbed (E = 0
    at every point). Fails if a step with an equal E is kept."""
    model, params, x, targets = float64_problem()
    objective = losses.lecture_objective(0.0)._replace(loss=ZERO_DATA_TERM)
    result = procedures.cost_checked_descent(
        model, objective, optim.gradient_descent(0.1), params, x, targets,
        key=jax.random.key(0), steps=3, stop_window=100)
    assert int(result.perturbations) == 3
