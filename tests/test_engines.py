"""The manual engine against jax.grad for whole models, and the custom_vjp registration."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nets
from nets import engines, layers, losses
from nets.gradcheck import astype, relative_error
from tests.helpers import F64, assert_close_tree, random_batch

MODELS = {
    "lecture": (dict(hidden_layers=1), losses.lecture_objective(0.5)),
    "deep_sigmoid": (dict(hidden_layers=4, hidden_units=9), losses.lecture_objective(2.0)),
    "probabilities": (dict(hidden_layers=2, hidden_units=6, output_activation="sigmoid"),
                      losses.lecture_objective(1.0, from_logits=False)),
    "tanh_mse": (dict(hidden_layers=2, hidden_units=7, activation="tanh",
                      output_activation="tanh"),
                 losses.Objective(losses.mean_squared_error(), 0.1)),
    "relu_softmax": (dict(hidden_layers=3, hidden_units=11, activation="relu"),
                     losses.Objective(losses.softmax_cross_entropy(), 0.0)),
    "linear": (dict(hidden_layers=0), losses.lecture_objective(0.3)),
}


def problem(name, dtype, features=5, classes=4, batch=13):
    kwargs, objective = MODELS[name]
    model = nets.build_mlp(features, classes, **kwargs)
    _, params = model.init(jax.random.key(0), (-1, features))
    x, targets = random_batch(jax.random.key(1), batch, features, classes, dtype)
    return model, objective, astype(params, dtype), x, targets


def broken_dense(out_features, name):
    """A Dense whose backward doubles dw: it must make the manual engine disagree."""
    good = layers.Dense(out_features, name=name)

    def backward(params, residuals, dy):
        dparams, dx = good.backward(params, residuals, dy)
        return {**dparams, "w": 2 * dparams["w"]}, dx

    return good._replace(backward=backward)


@pytest.mark.parametrize("name", MODELS)
def test_manual_engine_matches_autodiff(name, dtype):
    model, objective, params, x, targets = problem(name, dtype)
    manual_value, manual_grad = jax.jit(engines.manual(model, objective))(params, x, targets)
    auto_value, auto_grad = jax.jit(engines.autodiff(model, objective))(params, x, targets)
    assert relative_error(manual_value, auto_value) <= (1e-12 if dtype == "float64" else 1e-6)
    assert_close_tree(manual_grad, auto_grad, dtype, name)


def test_manual_engine_really_runs_the_handwritten_backward():
    """The equivalence above is not vacuous: a wrong backward breaks manual, not autodiff."""
    model = layers.serial(broken_dense(4, "hidden"), layers.Sigmoid(), layers.Dense(3))
    objective = losses.lecture_objective(0.0)
    _, params = model.init(jax.random.key(0), (-1, 5))
    x, targets = random_batch(jax.random.key(1), 6, 5, 3, jnp.float64)
    params = astype(params, jnp.float64)
    _, manual_grad = engines.manual(model, objective)(params, x, targets)
    _, auto_grad = engines.autodiff(model, objective)(params, x, targets)
    np.testing.assert_allclose(manual_grad[0]["w"], 2 * auto_grad[0]["w"], rtol=F64)
    np.testing.assert_allclose(manual_grad[2]["w"], auto_grad[2]["w"], rtol=F64)


def test_manual_vjp_engine_equals_manual_engine():
    model, objective, params, x, targets = problem("deep_sigmoid", jnp.float64)
    expected = engines.manual(model, objective)(params, x, targets)
    actual = jax.jit(engines.manual_vjp(model, objective))(params, x, targets)
    assert_close_tree(actual, expected, jnp.float64, "manual_vjp")


def test_check_grads_passes_on_the_custom_vjp():
    model, _, params, x, _ = problem("tanh_mse", jnp.float64)
    apply = engines.with_manual_vjp(model)
    check_grads(apply, (params, x), order=1, modes=["rev"])
    loss = engines.loss_with_manual_vjp(losses.sigmoid_cross_entropy())
    check_grads(loss, (apply(params, x), jax.nn.sigmoid(x[:, :4])), order=1, modes=["rev"])


def test_check_grads_catches_a_wrong_custom_vjp():
    model = layers.serial(broken_dense(3, "hidden"), layers.Tanh(), layers.Dense(2))
    _, params = model.init(jax.random.key(0), (-1, 4))
    x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
    with pytest.raises(AssertionError):
        check_grads(engines.with_manual_vjp(model), (astype(params, jnp.float64), x),
                    order=1, modes=["rev"])


def test_manual_engine_under_vmap_gives_per_example_gradients():
    """vmap over single examples; their mean equals the batch gradient (L2 = 0)."""
    model, objective, params, x, targets = problem("relu_softmax", jnp.float64)
    value_and_grad = engines.manual(model, objective)

    def one_example(xi, ti):
        return value_and_grad(params, xi[None, :], ti[None, :])[1]

    per_example = jax.vmap(one_example)(x, targets)
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example)
    assert_close_tree(mean, value_and_grad(params, x, targets)[1], jnp.float64, "vmap")
    loop = one_example(x[3], targets[3])
    assert_close_tree(jax.tree.map(lambda g: g[3], per_example), loop, jnp.float64, "loop")


def test_get_engine_names_the_choices():
    assert engines.get_engine("manual") is engines.manual
    with pytest.raises(ValueError, match="unknown name 'fast'.*autodiff"):
        engines.get_engine("fast")


@pytest.mark.standard_promotion
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_float32_params_with_float64_data_get_float32_gradients_from_every_engine(l2):
    """NumPy data under x64 is float64: the hand-written products then came out float64 (a
    scan's carry with momentum failed on it), and manual_vjp's custom_vjp was refused with
    l2 > 0. Every engine now returns the params' dtype, as jax.grad does, with the same
    values (to float32's tolerance)."""
    model = nets.build_mlp(5, 4, hidden_units=6)
    _, params = model.init(jax.random.key(0), (-1, 5))
    x, targets = random_batch(jax.random.key(1), 7, 5, 4, jnp.float64)
    objective = losses.lecture_objective(l2)
    results = {name: jax.jit(getattr(engines, name)(model, objective))(params, x, targets)[1]
               for name in ("manual", "autodiff", "manual_vjp")}
    for name, grad in results.items():
        assert {leaf.dtype for leaf in jax.tree.leaves(grad)} == {jnp.dtype(jnp.float32)}, name
        assert_close_tree(grad, results["autodiff"], jnp.float32, name)
    curvature = engines.curvature_diagonal(model, objective)(params, x, targets)
    assert {leaf.dtype for leaf in jax.tree.leaves(curvature)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("engine", ["manual", "manual_vjp", "autodiff"])
def test_accumulated_micro_batches_give_the_whole_batchs_value_and_gradient(engine):
    """`accumulated(engine, k)` against jax.grad of the whole batch, float64 (1e-10): the
    lecture's net with lambda = 0.5 (the penalty once, with the whole batch's m) at k = 1, 3
    and 12 (batch 12), and an LSTM with the per-step cross-entropy over integer targets at
    k = 2."""
    model, objective, params, x, targets = problem("lecture", jnp.float64, batch=12)
    sequence = nets.recurrent.sequence_model([nets.recurrent.lstm(3)], 4)
    sequence_params = astype(sequence.init(jax.random.key(2), (-1, 5, 2))[1], jnp.float64)
    tokens = jax.random.normal(jax.random.key(3), (6, 5, 2), jnp.float64)
    next_ids = jax.random.randint(jax.random.key(4), (6, 5), 0, 4)
    sequence_objective = losses.Objective(nets.recurrent.sequence_cross_entropy(), 0.2)
    run = engines.get_engine(engine)

    @jax.jit
    def everything():
        return ([engines.accumulated(run, k)(model, objective)(params, x, targets)
                 for k in (1, 3, 12)],
                engines.autodiff(model, objective)(params, x, targets),
                engines.accumulated(run, 2)(sequence, sequence_objective)(
                    sequence_params, tokens, next_ids),
                engines.autodiff(sequence, sequence_objective)(sequence_params, tokens,
                                                               next_ids))

    mlp_results, mlp_expected, lstm_result, lstm_expected = everything()
    for k, result in zip((1, 3, 12), mlp_results):
        assert_close_tree(result, mlp_expected, jnp.float64, f"{engine}, k = {k}")
    assert_close_tree(lstm_result, lstm_expected, jnp.float64, f"{engine}, LSTM, k = 2")


def test_accumulated_with_dropout_splits_the_key_one_per_micro_batch():
    """With a key, part j runs with split(key, k)[j]: the mean of jax.grad of each part
    under its own key (and the penalty once), float64; and not the whole batch's gradient
    under the one key (other masks)."""
    model = layers.serial(layers.Dense(6), layers.Tanh(), nets.Dropout(0.5), layers.Dense(3))
    params = astype(model.init(jax.random.key(0), (-1, 4))[1], jnp.float64)
    x, targets = random_batch(jax.random.key(1), 6, 4, 3, jnp.float64)
    objective = losses.Objective(losses.mean_squared_error(), 0.3)
    key = jax.random.key(7)
    got = jax.jit(engines.accumulated(engines.manual, 3)(model, objective))(
        params, x, targets, key)
    no_penalty = engines.autodiff(model, objective._replace(l2=0.0))
    parts = [no_penalty(params, x[2 * j:2 * j + 2], targets[2 * j:2 * j + 2], part_key)
             for j, part_key in enumerate(jax.random.split(key, 3))]
    expected_value = sum(value for value, _ in parts) / 3 + losses.l2_penalty(params, 0.3, 6)
    expected_grads = jax.tree.map(lambda *leaves: sum(leaves) / 3,
                                  *[grads for _, grads in parts])
    expected_grads = jax.tree.map(jnp.add, expected_grads, losses.l2_penalty_grad(params, 0.3, 6))
    assert_close_tree(got, (expected_value, expected_grads), jnp.float64, "dropout parts")
    whole = engines.autodiff(model, objective)(params, x, targets, key)
    assert relative_error(got[1][0]["w"], whole[1][0]["w"]) > 1e-3


def test_accumulated_refuses_batch_statistics_uneven_batches_and_bad_counts():
    batch_norm = nets.build_mlp(4, 3, hidden_units=5, activation="relu", batch_norm=True)
    params = batch_norm.init(jax.random.key(0), (-1, 4))[1]
    x, targets = random_batch(jax.random.key(1), 6, 4, 3, jnp.float32)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    with pytest.raises(ValueError, match=r"accumulated: .*: layers \['.*'\] normalise with "
                                         "their batch's statistics"):
        engines.accumulated(engines.manual, 2)(batch_norm, objective)(params, x, targets)
    model, objective, params, x, targets = problem("lecture", jnp.float32, batch=13)
    with pytest.raises(ValueError, match="accumulated: a batch of 13 inputs and 13 targets "
                                         "does not split into 3 equal micro-batches"):
        engines.accumulated(engines.manual, 3)(model, objective)(params, x, targets)
    with pytest.raises(ValueError, match="accumulated: a batch of 13 inputs and 12 targets"):
        engines.accumulated(engines.manual, 1)(model, objective)(params, x, targets[:12])
    assert engines.accumulated(engines.manual, np.int64(1))(model, objective)(
        params, x, targets)[0].shape == ()
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"accumulated: micro_batches must be a whole "
                                             rf"number >= 1, got {bad!r}"):
            engines.accumulated(engines.manual, bad)


def _as_lists(tree):
    """tree with every tuple (serial's and the combinators' params) made a list."""
    if isinstance(tree, (tuple, list)):
        return [_as_lists(entry) for entry in tree]
    if isinstance(tree, dict):
        return {key: _as_lists(value) for key, value in tree.items()}
    return tree


@pytest.mark.parametrize("nested", [False, True])
def test_params_held_as_a_list_get_a_list_gradient_from_every_engine(nested):
    """serial's forward and autodiff take params held in a list; manual, manual_vjp,
    accumulated, the curvature diagonal and the products did not (a raw pytree error). Each
    now gives the tuple's result, held as params are (a list), as jax.grad does and optax
    needs."""
    model = nets.build_mlp(5, 4, hidden_layers=2, hidden_units=6, activation="tanh",
                           residual=True)
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.3)
    _, params = model.init(jax.random.key(0), (-1, 5))
    params = astype(params, jnp.float64)
    x, targets = random_batch(jax.random.key(1), 6, 5, 4, jnp.float64)
    listed = _as_lists(params) if nested else list(params)
    v = jax.tree.map(lambda leaf: jnp.full_like(leaf, 0.5), params)
    listed_v = jax.tree.map(lambda leaf: jnp.full_like(leaf, 0.5), listed)
    for name, run in {
        "manual": lambda p, w: engines.manual(model, objective)(p, x, targets),
        "manual_vjp": lambda p, w: engines.manual_vjp(model, objective)(p, x, targets),
        "autodiff": lambda p, w: engines.autodiff(model, objective)(p, x, targets),
        "accumulated": lambda p, w: engines.accumulated(engines.manual, 2)(model, objective)(
            p, x, targets),
        "curvature_diagonal": lambda p, w: engines.curvature_diagonal(model, objective)(
            p, x, targets),
        "gauss_newton_product": lambda p, w: engines.gauss_newton_product(model, objective)(
            p, x, targets, w),
        "hessian_product": lambda p, w: engines.hessian_product(model, objective)(
            p, x, targets, w),
        "structurally_damped_product": lambda p, w: engines.structurally_damped_product(
            model, objective, 1)(p, x, targets, w, 0.5),
    }.items():
        expected = run(params, v)
        got = run(listed, listed_v)
        got_grads = got[1] if isinstance(got, tuple) else got
        assert jax.tree.structure(got_grads) == jax.tree.structure(listed), name
        assert_close_tree(got, expected, jnp.float64, name)


def test_engines_built_under_vmap_leave_a_traced_l2_alone():
    """The engines check a concrete l2 when they are built; one swept under vmap is traced."""
    model, _, params, x, targets = problem("tanh_mse", jnp.float64)

    def value(l2):
        objective = losses.Objective(losses.mean_squared_error(), l2)
        return engines.manual(model, objective)(params, x, targets)[0]

    swept = jax.vmap(value)(jnp.array([0.0, 0.5]))
    np.testing.assert_allclose(swept, [value(0.0), value(0.5)], rtol=F64)
