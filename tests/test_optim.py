"""training/optim.py with optax's combinators, and the SDLM curvature that does not fit."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from training import optim

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
GRADS = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.array([1.0, -2.0])}
CURVATURE = {"w": jnp.full((3, 2), 0.5), "b": jnp.array([1.5, 0.0])}


@pytest.mark.parametrize("factory, hyperparameters, extra", [
    (optim.gradient_descent, {"learning_rate": 0.1}, {}),
    (optim.diagonal_levenberg_marquardt, {"learning_rate": 0.1, "mu": 0.5},
     {"curvature": CURVATURE}),
])
def test_inject_hyperparams_under_jit_steps_as_the_rule(factory, hyperparameters, extra):
    """optax.inject_hyperparams rebuilds the rule with traced hyperparameters inside a jitted
    update: the step is the plain rule's, and one set in the state takes effect. (The
    hyperparameters' checks refused the tracers: 'learning_rate must be > 0 and finite, got
    JitTracer(float64[])'.)"""
    injected = optax.inject_hyperparams(factory)(**hyperparameters)
    state = injected.init(PARAMS)
    updates, state = jax.jit(injected.update)(GRADS, state, PARAMS, **extra)
    plain = factory(**hyperparameters)
    expected, _ = plain.update(GRADS, plain.init(PARAMS), PARAMS, **extra)
    for name in PARAMS:
        np.testing.assert_allclose(updates[name], expected[name], rtol=1e-12)
    state.hyperparams["learning_rate"] = jnp.asarray(0.2, state.hyperparams[
        "learning_rate"].dtype)
    doubled, _ = jax.jit(injected.update)(GRADS, state, PARAMS, **extra)
    for name in PARAMS:
        np.testing.assert_allclose(doubled[name], 2 * expected[name], rtol=1e-12)
    with pytest.raises(ValueError, match=r"learning_rate must be > 0 and finite.*, got -0.1"):
        optax.inject_hyperparams(factory)(**{**hyperparameters, "learning_rate": -0.1}).init(
            PARAMS)


@pytest.mark.parametrize("curvature, message", [
    ({"w": jnp.full((3, 1), 0.5), "b": jnp.array([1.5, 0.0])},
     "curvature at ['w'] has shape (3, 1), expected the gradient's (3, 2)"),
    ({"w": jnp.full((3, 2), 0.5), "b": jnp.array([1.5])},
     "curvature at ['b'] has shape (1,), expected the gradient's (2,)"),
    ({"w": jnp.full((3, 2), 0.5)},
     "curvature does not have the gradients' tree structure (made for other params?): "
     "expected PyTreeDef({'b': *, 'w': *}), got PyTreeDef({'w': *})"),
])
def test_sdlm_refuses_a_curvature_unlike_the_gradients(curvature, message):
    """A curvature leaf of another shape broadcast into the step (w's (3, 1) h gave a (3, 2)
    step from the wrong entries, b's (1,) one h for both): now a ValueError naming the leaf."""
    rule = optim.diagonal_levenberg_marquardt(0.1, mu=0.5)
    with pytest.raises(ValueError, match=re.escape(f"diagonal_levenberg_marquardt: {message}")):
        rule.update(GRADS, rule.init(PARAMS), PARAMS, curvature=curvature)


def test_sdlm_refuses_a_state_made_for_other_params():
    """The state's h (zeros from init) of other params broadcast silently as well."""
    rule = optim.diagonal_levenberg_marquardt(0.1, mu=0.5)
    other = rule.init({"w": jnp.ones((3, 1)), "b": jnp.zeros(2)})
    with pytest.raises(ValueError, match=re.escape(
            "diagonal_levenberg_marquardt: the state's curvature (from init) at ['w'] has shape "
            "(3, 1), expected the gradient's (3, 2)")):
        rule.update(GRADS, other, PARAMS)
    with pytest.raises(ValueError, match="the state's curvature .* tree structure"):
        rule.update(GRADS, rule.init([jnp.ones((3, 2)), jnp.zeros(2)]), PARAMS)


def test_sdlm_under_optax_masked_takes_the_whole_trees_curvature():
    """optax.masked hands the rule the unmasked gradients only; the curvature of the whole
    tree (as the procedures pass it) is cut to them. It was a pytree structure error."""
    rule = optax.masked(optim.diagonal_levenberg_marquardt(0.1, mu=0.5),
                        {"w": True, "b": False})
    state = rule.init(PARAMS)
    updates, state = rule.update(GRADS, state, PARAMS, curvature=CURVATURE)
    np.testing.assert_allclose(updates["w"], -0.1 * GRADS["w"] / (0.5 + 0.5), rtol=1e-12)
    np.testing.assert_array_equal(updates["b"], GRADS["b"])  # masked out: passed through
    again, _ = rule.update(GRADS, state, PARAMS)  # the kept estimate
    np.testing.assert_allclose(again["w"], updates["w"], rtol=1e-12)


def test_sdlm_after_clipping_in_a_chain():
    """optax.chain(clip_by_global_norm, SDLM): the clipped gradient, then eta / (mu + h)."""
    rule = optax.chain(optax.clip_by_global_norm(1.0),
                       optim.diagonal_levenberg_marquardt(0.1, mu=0.5))
    updates, _ = rule.update(GRADS, rule.init(PARAMS), PARAMS, curvature=CURVATURE)
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in GRADS.values()))
    for name in PARAMS:
        np.testing.assert_allclose(updates[name],
                                   -0.1 * GRADS[name] / norm / (0.5 + CURVATURE[name]),
                                   rtol=1e-12)


@pytest.mark.parametrize("learning_rate", [-1.0, 0.0, float("nan"), float("inf"), True])
def test_kfac_refuses_a_learning_rate_as_the_other_rules_do(learning_rate):
    """kfac(-1.0, ...) climbed the objective (optax.sgd checks nothing): now the ValueError
    of gradient_descent and SDLM."""
    with pytest.raises(ValueError, match=re.escape(
            f"kfac: learning_rate must be > 0 and finite (or a schedule), got {learning_rate}")):
        optim.kfac(learning_rate, 0.1)
    assert optim.kfac(optax.constant_schedule(0.1), 0.1) is not None


def test_sdlm_keeps_a_curvature_of_another_dtype_in_the_states_dtype_in_a_scan():
    """A float64 curvature for float32 params was stored in the state as given: the state's
    h turned float64, and a jitted lax.scan over the steps refused its carry's new dtype. It
    is now kept in the state's dtype (init's, the params'), masked or not, and the steps are
    those of the float32 curvature."""
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), PARAMS)
    grads = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), GRADS)
    curvature = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), CURVATURE)
    for rule, masked in ((optim.diagonal_levenberg_marquardt(0.1, mu=0.5), False),
                         (optax.masked(optim.diagonal_levenberg_marquardt(0.1, mu=0.5),
                                       {"w": True, "b": False}), True)):

        def step(carry, _, rule=rule):
            params, state = carry
            updates, state = rule.update(grads, state, params, curvature=curvature)
            return (optax.apply_updates(params, updates), state), None

        (final, state), _ = jax.jit(lambda carry, rule=rule, step=step: jax.lax.scan(
            step, carry, None, length=3))((params, rule.init(params)))
        assert jax.tree.map(lambda leaf: leaf.dtype, final) == {"w": jnp.float32,
                                                               "b": jnp.float32}
        h = (state.inner_state if masked else state).curvature
        assert h["w"].dtype == jnp.float32
        expected = params["w"] - 3 * 0.1 * grads["w"] / (0.5 + jnp.float32(0.5))
        np.testing.assert_allclose(final["w"], expected, rtol=1e-6)
        if not masked:
            assert h["b"].dtype == jnp.float32
