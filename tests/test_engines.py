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
