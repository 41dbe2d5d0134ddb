"""Losses against direct NumPy evaluations and their hand-written gradients against jax.grad."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets
from nets import losses
from tests.helpers import F64, assert_close_tree

LOSSES = {
    "sigmoid_ce_logits": (losses.sigmoid_cross_entropy(), "logits"),
    "sigmoid_ce_probabilities": (losses.sigmoid_cross_entropy(from_logits=False), "probabilities"),
    "mse": (losses.mean_squared_error(), "logits"),
    "softmax_ce": (losses.softmax_cross_entropy(), "logits"),
    "lecun1998_map": (losses.lecun1998_map(j=2.0), "logits"),
}


def numpy_value(name, outputs, targets):
    """Each loss written out in float64 NumPy, independently of nets.losses."""
    o, t = np.asarray(outputs, np.float64), np.asarray(targets, np.float64)
    m = o.shape[0]
    if name == "sigmoid_ce_logits":
        s = 1 / (1 + np.exp(-o))
        return -np.sum(t * np.log(s) + (1 - t) * np.log(1 - s)) / m
    if name == "sigmoid_ce_probabilities":
        return -np.sum(t * np.log(o) + (1 - t) * np.log(1 - o)) / m
    if name == "mse":
        return np.sum((o - t) ** 2) / (2 * m)
    if name == "lecun1998_map":  # eq. 9 with penalties y = -o and j = 2, per unit of target
        penalties = -o
        competition = np.log(np.exp(-2.0) + np.exp(-penalties).sum(axis=1))
        return np.sum(t * penalties) / m + np.sum(t.sum(axis=1) * competition) / m
    shifted = o - o.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -np.sum(t * log_softmax) / m


def sample(kind, key, shape, dtype):
    z = 2 * jax.random.normal(key, shape, dtype)
    return jax.nn.sigmoid(z) if kind == "probabilities" else z


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (40, 10)])
def test_loss_value_matches_numpy(name, shape):
    loss, kind = LOSSES[name]
    out_key, target_key = jax.random.split(jax.random.key(shape[0]))
    outputs = sample(kind, out_key, shape, jnp.float64)
    targets = jax.random.bernoulli(target_key, 0.3, shape).astype(jnp.float64)
    np.testing.assert_allclose(loss.value(outputs, targets),
                               numpy_value(name, outputs, targets), rtol=F64)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (40, 10)])
def test_loss_grad_matches_jax_grad(name, shape, dtype):
    loss, kind = LOSSES[name]
    out_key, target_key = jax.random.split(jax.random.key(shape[1]))
    outputs = sample(kind, out_key, shape, dtype)
    targets = jax.random.bernoulli(target_key, 0.3, shape).astype(dtype)
    assert_close_tree(loss.grad(outputs, targets), jax.grad(loss.value)(outputs, targets),
                      dtype, name)


def test_sigmoid_cross_entropy_is_stable_for_large_logits():
    """At |z| = 100 the naive log(sigmoid) gives inf in float32; the value is exactly known."""
    z = jnp.array([[100.0, -100.0]], jnp.float32)
    y = jnp.array([[0.0, 1.0]], jnp.float32)
    value = losses.sigmoid_cross_entropy().value(z, y)
    np.testing.assert_allclose(value, 200.0, rtol=1e-6)  # log(1 + e^100) = 100 + O(e^-100)
    np.testing.assert_allclose(losses.sigmoid_cross_entropy().grad(z, y), [[1.0, -1.0]])


def test_lectures_output_error_times_sigmoid_derivative_is_sigma_minus_y():
    """dE/ds (-y/s + (1-y)/(1-s)) times s(1-s) equals s - y: the logits form's gradient."""
    z = jnp.linspace(-4, 4, 12, dtype=jnp.float64).reshape(3, 4)
    y = (jnp.arange(12).reshape(3, 4) % 2).astype(jnp.float64)
    s = jax.nn.sigmoid(z)
    np.testing.assert_allclose(losses.lecture_output_error(s, y) * s * (1 - s), s - y,
                               rtol=F64, atol=1e-15)
    # and the slide's sign typo (+y/s) would not give it
    assert not np.allclose((y / s + (1 - y) / (1 - s)) * s * (1 - s), s - y)


def test_l2_gradient_is_lambda_over_m_not_lambda_over_2m():
    """jax.grad of the lecture's objective agrees with (lambda/m) w and not with the slide's."""
    model = nets.build_mlp(3, 2, hidden_units=10)
    _, params = model.init(jax.random.key(0), (-1, 3))
    params = nets.gradcheck.astype(params, jnp.float64)
    l2, m = 0.7, 5
    penalty_grad = jax.grad(losses.l2_penalty)(params, l2, m)
    for layer_params, layer_grad in zip(params, penalty_grad):
        if layer_params:
            w = layer_params["w"]
            np.testing.assert_allclose(layer_grad["w"], (l2 / m) * w, rtol=F64)
            assert not np.allclose(layer_grad["w"], (l2 / (2 * m)) * w)
            np.testing.assert_array_equal(layer_grad["b"], 0)  # biases are not penalised
    assert_close_tree(losses.l2_penalty_grad(params, l2, m), penalty_grad, jnp.float64)


def test_l2_penalty_value_by_hand():
    params = ({"w": jnp.array([[1.0, 2.0]]), "b": jnp.array([5.0, 5.0])}, (),
              {"w": jnp.ones((2, 1))})
    # lambda/(2m) * (1 + 4 + 1 + 1) with lambda = 2, m = 7
    np.testing.assert_allclose(losses.l2_penalty(params, 2.0, 7), 2.0 / 14 * 7.0)


def test_objective_value_is_loss_plus_penalty():
    loss = losses.mean_squared_error()
    params = ({"w": jnp.full((2, 2), 3.0), "b": jnp.zeros(2)},)
    outputs, targets = jnp.ones((4, 2)), jnp.zeros((4, 2))
    # 0.5 * 8 / 4 + 1.0/(2*4) * 36
    np.testing.assert_allclose(losses.Objective(loss, 1.0).value(params, outputs, targets),
                               1.0 + 4.5)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_rejects_mismatched_shapes(name):
    loss, _ = LOSSES[name]
    with pytest.raises(ValueError, match=r"outputs have shape \(4, 3\) and targets \(4, 2\)"):
        loss.value(jnp.zeros((4, 3)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="expected equal shapes"):
        loss.grad(jnp.zeros((4,)), jnp.zeros((4,)))


def test_lecun1998_map_by_hand_and_as_softmax_without_its_rubbish_class():
    """One example, penalties y = (1, 2), class 0, j = 10: E = 1 + log(e^-10 + e^-1 + e^-2).
    With j large the e^-j term vanishes and E is the softmax cross-entropy of -y, with j = 1
    it is well above it; j <= 0 is refused."""
    scores, target = jnp.array([[-1.0, -2.0]]), jnp.array([[1.0, 0.0]])
    np.testing.assert_allclose(losses.lecun1998_map(10.0).value(scores, target),
                               1 + np.log(np.exp(-10) + np.exp(-1) + np.exp(-2)), rtol=F64)
    z = jax.random.normal(jax.random.key(3), (5, 10), jnp.float64)
    t = jax.nn.one_hot(jnp.arange(5), 10, dtype=jnp.float64)
    far = losses.lecun1998_map(1e3)
    softmax = losses.softmax_cross_entropy()
    np.testing.assert_allclose(far.value(z, t), softmax.value(z, t), rtol=F64)
    np.testing.assert_allclose(far.grad(z, t), softmax.grad(z, t), rtol=F64)
    # A near rubbish class raises every example's partition function: E above softmax's.
    assert float(losses.lecun1998_map(1.0).value(z, t)) > float(softmax.value(z, t)) + 0.01
    with pytest.raises(ValueError, match="lecun1998_map: j must be > 0, got 0"):
        losses.lecun1998_map(0.0)


def test_lecture_objective_rejects_negative_lambda():
    with pytest.raises(ValueError, match="l2 must be >= 0, got -1"):
        losses.lecture_objective(-1)
    for objective in (nets.Objective(losses.mean_squared_error(), -0.5),
                      nets.Objective(losses.softmax_cross_entropy(), float("nan"))):
        params, outputs = {"w": jnp.ones((2, 2))}, jnp.zeros((3, 2))
        with pytest.raises(ValueError, match=r"l2_penalty: the L2 coefficient lambda must be "
                                             r">= 0, got"):
            objective.value(params, outputs, outputs)
        with pytest.raises(ValueError, match=r"l2_penalty_grad: the L2 coefficient lambda"):
            losses.l2_penalty_grad(params, objective.l2, 3)


def test_sigmoid_cross_entropy_at_logits_of_exactly_zero():
    """dE/dz = (sigmoid(0) - y)/m = (1/2 - y)/m, by hand, from the hand-written gradient and
    from jax.grad of the value alike (a value written with max(z, 0) and |z| gave jax.grad -y
    there, so the autodiff reference disagreed with the manual engine on a net whose logits
    are 0: a Dense with zero params, relative error 0.78)."""
    loss = losses.sigmoid_cross_entropy()
    z = jnp.zeros((2, 3), jnp.float64)
    y = jnp.array([[0.0, 1.0, 0.3], [1.0, 0.0, 0.5]])
    expected = (0.5 - y) / 2
    np.testing.assert_allclose(loss.grad(z, y), expected, rtol=F64)
    np.testing.assert_allclose(jax.grad(loss.value)(z, y), expected, rtol=F64)
    model = nets.Dense(3)
    params = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0), (-1, 4))[1])
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (2, 4), jnp.float64)
    objective = losses.lecture_objective(0.0)
    manual = nets.engines.manual(model, objective)(params, x, y)[1]
    autodiff = nets.engines.autodiff(model, objective)(params, x, y)[1]
    assert_close_tree(manual, autodiff, jnp.float64, "zero logits")
    np.testing.assert_allclose(manual["b"], jnp.sum(0.5 - y, axis=0) / 2, rtol=F64)


@pytest.mark.parametrize("l2", [float("nan"), float("inf"), np.float64("nan"), -1.5, "0.1",
                                None])
def test_lecture_objective_refuses_a_lambda_that_is_not_a_finite_number_at_least_0(l2):
    """NaN and inf passed `l2 < 0` (to be refused only by the first l2_penalty, or to make
    every penalty inf); a str or None was a raw TypeError of <."""
    with pytest.raises(ValueError, match=r"lecture_objective: l2 must be >= 0, got .*; "
                                         r"expected a finite number"):
        losses.lecture_objective(l2)
    assert losses.lecture_objective(np.float32(0.5)).l2 == 0.5


@pytest.mark.parametrize("l2", [np.float32(-1.0), np.int64(-2), jnp.array(-1.0),
                                float("inf"), True])
def test_the_l2_penalty_refuses_numpy_and_array_lambdas_below_0_or_infinite(l2):
    """A NumPy float32 or int64, or a concrete jnp scalar, below 0 was not a Python float and
    went unchecked: a negative penalty that rewards large weights; inf made it inf."""
    params = {"w": jnp.ones((2, 2))}
    for penalty in (losses.l2_penalty, losses.l2_penalty_grad):
        with pytest.raises(ValueError, match=rf"{penalty.__name__}: the L2 coefficient lambda "
                                             r"must be >= 0, got"):
            penalty(params, l2, 3)
    # a traced lambda (swept under vmap) is still the caller's to check
    swept = jax.vmap(lambda lam: losses.l2_penalty(params, lam, 4))(jnp.array([0.0, 2.0]))
    np.testing.assert_allclose(swept, [0.0, 2.0 / 8 * 4])


@pytest.mark.parametrize("m", [0, -1, float("inf"), "8"])
def test_the_l2_penalty_refuses_a_number_of_examples_not_above_0(m):
    """m = 0 was a raw ZeroDivisionError and -1 a negative penalty. A fractional m is allowed:
    DP-SGD divides by its Poisson batches' expected size q N (`experiments.private` passes
    256.0), traced or not."""
    for penalty in (losses.l2_penalty, losses.l2_penalty_grad):
        with pytest.raises(ValueError, match=rf"{penalty.__name__}: m, the number of examples, "
                                             rf"must be a finite number > 0, got {m!r}"):
            penalty({"w": jnp.ones((2, 2))}, 0.1, m)
    params = {"w": jnp.full((2, 2), 3.0)}
    np.testing.assert_allclose(losses.l2_penalty(params, 0.1, 2.5), 0.1 / 5 * 36)
    np.testing.assert_allclose(jax.jit(lambda m: losses.l2_penalty_grad(params, 0.1, m)["w"])(
        2.5), jnp.full((2, 2), 0.1 / 2.5 * 3))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_loss_refuses_an_empty_batch(name):
    """A mean over no examples was NaN (0/0) from every loss, and the engines raised a raw
    ZeroDivisionError from lambda/(2m)."""
    loss = LOSSES[name][0]
    empty = jnp.zeros((0, 3), jnp.float32)
    for function in (loss.value, loss.grad, loss.curvature):
        with pytest.raises(ValueError, match=r"outputs have shape \(0, 3\); expected a batch "
                                             r"of at least one example"):
            function(empty, empty)
    model = nets.serial(nets.Dense(3, name="out"), name="net")
    _, params = model.init(jax.random.key(0), (-1, 4))
    for engine in (nets.engines.manual, nets.engines.autodiff):
        with pytest.raises(ValueError, match="expected a batch of at least one example"):
            engine(model, nets.Objective(loss, 0.1))(params, jnp.zeros((0, 4), jnp.float32),
                                                          empty)


# (loss, a value its targets may not take, values they may) for each loss
TARGET_RANGES = {
    "sigmoid_ce_logits": (-0.5, (0.0, 0.3, 1.0), r"finite and in \[0, 1\]"),
    "sigmoid_ce_probabilities": (1.5, (0.0, 0.7, 1.0), r"finite and in \[0, 1\]"),
    "mse": (np.inf, (-3.0, 0.0, 1e6), r"finite \("),
    "softmax_ce": (-1.0, (0.0, 0.25, 5.0), r"finite and >= 0"),
    "lecun1998_map": (np.nan, (0.0, 0.5, 2.0), r"finite and >= 0"),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_loss_refuses_target_values_outside_its_range_naming_the_first_and_its_index(name):
    """A sigmoid cross-entropy given targets of -1 (a net switched from mean squared error
    to it) trained towards a loss without minimum, silently: every function of every loss
    now refuses concrete targets it cannot take, and accepts the edges of its range (soft
    and multi-hot targets included)."""
    loss, kind = LOSSES[name]
    bad, good, expected = TARGET_RANGES[name]
    outputs = sample(kind, jax.random.key(1), (3, 4), jnp.float64)
    targets = np.zeros((3, 4))
    for value in good:
        targets[1, 2] = value
        loss.value(outputs, targets), loss.grad(outputs, targets)
    targets[1, 2], targets[2, 0] = bad, bad
    functions = (loss.value, loss.grad, loss.curvature,
                 lambda o, t: loss.hessian_vector(o, t, jnp.ones_like(o)))
    for function in functions:
        with pytest.raises(ValueError, match=rf"^{re.escape(loss.name)}: targets must be "
                                             rf"{expected}.*found {bad!r} at \(1, 2\) \(2 of "
                                             r"the 12 values\)$"):
            function(outputs, targets)
    loss.check_targets(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match=re.escape(loss.name)):
        loss.check_targets(jnp.asarray(targets))


@pytest.mark.parametrize("name", ["sigmoid_ce_logits", "softmax_ce"])
def test_a_loss_checks_nothing_inside_a_trace_and_the_procedures_check_the_whole_set(name):
    """Under jit the targets' values are unknown: a loss computes with them as they are
    (the gradient of its formula, whatever the targets), and the training procedures refuse
    the set before they compile."""
    from training import procedures

    loss, _ = LOSSES[name]
    outputs, targets = jnp.zeros((2, 3)), jnp.array([[0.0, 1.0, 0.0], [0.0, -1.0, 2.0]])
    def formula(z):  # the loss written out again, for any targets
        if name == "softmax_ce":
            return -jnp.sum(targets * jax.nn.log_softmax(z)) / 2
        return jnp.sum(jax.nn.softplus(z) - targets * z) / 2

    np.testing.assert_allclose(jax.jit(loss.grad)(outputs, targets), jax.grad(formula)(outputs),
                               rtol=F64)
    model = nets.serial(nets.Dense(3, name="out"), name="net")
    for build in (procedures.full_batch, procedures.cost_checked):
        with pytest.raises(ValueError, match=rf"^{build.__name__}: {loss.name}: targets .*"
                                             r"found -1.0 at \(1, 1\)"):
            build(model, nets.Objective(loss), optax.sgd(0.1), jnp.zeros((2, 4)), targets)
    with pytest.raises(ValueError, match=r"^stochastic_passes: .* found -1.0 at \(1, 1\)"):
        procedures.stochastic_passes(model, nets.Objective(loss), optax.sgd(0.1),
                                     jnp.zeros((2, 4)), targets, batch_size=1)


def test_target_values_are_read_only_where_this_process_can_read_them_whole():
    """Inside a trace nothing is read; nor from a global array over several hosts' devices
    (NumPy cannot fetch it: the check would raise where the loss runs), which a single
    process can only stand in for by an object that says so."""
    from nets.layers import concrete_values

    class SpreadOverHosts:
        is_fully_addressable = False

    assert concrete_values(SpreadOverHosts()) is None
    losses.sigmoid_cross_entropy().check_targets(SpreadOverHosts())
    seen = []
    jax.jit(lambda t: seen.append(concrete_values(t)) or t)(jnp.ones(2))
    assert seen == [None]
    np.testing.assert_array_equal(concrete_values(jnp.arange(3)), [0, 1, 2])
