"""The hand-written passes are written by hand: JAX's differentiation takes no part in them.

Every equation that JAX's differentiation adds to a program names its transformation in its
source's name stack (`nets.gradcheck.jax_differentiated`), so the program of each
hand-written pass, traced for every model of the gradient report
(`experiments.gradcheck.CASES`), must hold no such equation: the manual engine's gradient,
LeCun's curvature diagonal, the Gauss-Newton and Hessian products (tangent passes, then
backward ones), K-FAC's blocks, and `training.parallel`'s per-example passes (DP-SGD by vmap
and by ghost norms, the ghost norms); so must those of the layers the report's models leave out
(each Conv2D implementation, AvgPool, TimeDistributed). The same model's `jax.grad` program
holds them, and so does a layer whose backward or tangent calls `jax.vjp` or `jax.jvp`, so
the check can fail. Only tracing: nothing is compiled.
"""
import jax
import jax.numpy as jnp
import pytest

import nets
from experiments import gradcheck as report
from nets import engines, kronecker
from nets.conv import IMPLEMENTATIONS
from nets.gradcheck import astype, jax_differentiated
from tests.helpers import scale_layer
from training import parallel

PASSES = {  # name: (builder, whether it takes a direction v after the targets)
    "manual gradient": (engines.manual, False),
    "curvature diagonal": (engines.curvature_diagonal, False),
    "Gauss-Newton product": (engines.gauss_newton_product, True),
    "Hessian product": (engines.hessian_product, True),
    "K-FAC blocks": (kronecker.kronecker_factors, False),
    "DP-SGD by vmap": (lambda model, objective: parallel.private_value_and_grad(
        model, objective, clip_norm=1.0), False),
    "DP-SGD by ghost norms": (lambda model, objective: parallel.private_value_and_grad(
        model, objective, clip_norm=1.0, per_example="ghost"), False),
    "ghost norms": (parallel.ghost_norms, False),
}
# The cases a pass refuses, by name (test_each_pass_refuses_exactly_the_cases_left_out): K-FAC
# takes chains ending in (batch, classes) without batch statistics or random layers; no
# example has a gradient of its own under BatchNorm's batch statistics.
REFUSED = {"K-FAC blocks": ("conv_batchnorm", "transformer_lm", "transformer_lm_tied_gelu",
                            "rnn_bidirectional_stack_gru_elman_dropout",
                            "remat_blocks_dropout"),
           "DP-SGD by vmap": ("conv_batchnorm",), "DP-SGD by ghost norms": ("conv_batchnorm",),
           "ghost norms": ("conv_batchnorm",)}


def case_point(case):
    """A case's model, objective, float32 params, batch of 4 and dropout key (or None)."""
    model, objective = case.build()
    init_key, data_key = jax.random.split(report.case_key(0, case))
    params = astype(model.init(init_key, (-1, *case.input_shape))[1], jnp.float32)
    x, targets = astype(report.case_batch(case, 4, data_key), jnp.float32)
    key = jax.random.fold_in(data_key, 1) if case.dropout else None
    return model, objective, params, x, targets, key


def pass_program(name, model, objective, params, x, targets, key):
    """(function, args) of the named pass on that point; v = params for the products."""
    build, takes_direction = PASSES[name]
    run = build(model, objective)
    args = (params, x, targets, params) if takes_direction else (params, x, targets)
    return (lambda *a: run(*a, key=key)), args


CHECKED = [(case, name) for case in report.CASES for name in PASSES
           if case.name not in REFUSED.get(name, ())]


@pytest.mark.parametrize("case, name", CHECKED,
                         ids=[f"{case.name}-{name.replace(' ', '_')}" for case, name in CHECKED])
def test_no_hand_written_pass_is_differentiated_by_jax(case, name):
    model, objective, params, x, targets, key = case_point(case)
    function, args = pass_program(name, model, objective, params, x, targets, key)
    assert jax_differentiated(function, *args) == [], f"{case.name}: {name}"


def conv_net(implementation):
    """Layers the report's models leave out: each Conv2D implementation, AvgPool."""
    model = nets.serial(nets.Conv2D(4, 3, stride=2, padding="SAME",
                                    implementation=implementation),
                        nets.Tanh(), nets.AvgPool(2), nets.Flatten(), nets.Dense(3))
    x, targets = jnp.ones((2, 9, 9, 2), jnp.float32), jnp.zeros((2, 3), jnp.float32)
    return model, nets.Objective(nets.mean_squared_error(), 0.1), (-1, 9, 9, 2), x, targets


def per_step_readout():
    """An LSTM read out at every step by `TimeDistributed`, under the sequence loss."""
    model = nets.serial(nets.rnn(nets.lstm(4)), nets.TimeDistributed(nets.Dense(2)))
    x, targets = jnp.ones((2, 5, 3), jnp.float32), jnp.zeros((2, 5), jnp.int32)
    return model, nets.Objective(nets.sequence_cross_entropy(), 0.1), (-1, 5, 3), x, targets


OTHER_MODELS = {**{f"conv_{name}_avg_pool": (lambda name=name: conv_net(name))
                   for name in IMPLEMENTATIONS},
                "lstm_time_distributed": per_step_readout}
ENGINE_PASSES = ["manual gradient", "curvature diagonal", "Gauss-Newton product",
                 "Hessian product"]


@pytest.mark.parametrize("model_name", sorted(OTHER_MODELS))
@pytest.mark.parametrize("name", ENGINE_PASSES)
def test_the_other_layers_passes_are_not_differentiated_by_jax(model_name, name):
    model, objective, input_shape, x, targets = OTHER_MODELS[model_name]()
    params = model.init(jax.random.key(0), input_shape)[1]
    function, args = pass_program(name, model, objective, params, x, targets, None)
    assert jax_differentiated(function, *args) == [], f"{model_name}: {name}"


@pytest.mark.parametrize("case", report.CASES, ids=lambda case: case.name)
def test_jax_grad_of_each_model_is_seen_as_jaxs(case):
    """The check can fail: jax.grad of the same model's E writes transposed jvp equations."""
    model, objective, params, x, targets, key = case_point(case)
    run = engines.autodiff(model, objective)
    stacks = jax_differentiated(lambda *a: run(*a, key=key), params, x, targets)
    assert any(stack.startswith("transpose(jvp(") for stack in stacks), case.name


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_each_pass_refuses_exactly_the_cases_left_out(name):
    """The cases a pass is not checked on are those it refuses, by a ValueError naming it."""
    refused = []
    for case in report.CASES:
        model, objective, params, x, targets, key = case_point(case)
        try:
            function, args = pass_program(name, model, objective, params, x, targets, key)
            jax.make_jaxpr(function)(*args)
        except ValueError as error:
            assert model.name in str(error), str(error)
            refused.append(case.name)
    assert tuple(refused) == REFUSED[name]


@pytest.mark.parametrize("differentiate, name, caught", [
    ("vjp", "manual gradient", True),
    ("linear_transpose", "manual gradient", True),
    ("jvp", "manual gradient", False),
    ("jvp", "Gauss-Newton product", True),
    ("vjp", "Gauss-Newton product", True),
    (None, "manual gradient", False),
    (None, "Gauss-Newton product", False),
])
def test_a_layer_differentiated_by_jax_is_caught(differentiate, name, caught):
    """A backward by jax.vjp shows in the gradient's program, a tangent by jax.jvp in the
    Gauss-Newton product's (which runs tangents, then backwards); the honest layer in none."""
    model = nets.serial(nets.Dense(4, name="hidden"), scale_layer(differentiate), nets.Tanh(),
                        nets.Dense(3, name="out"))
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    params = model.init(jax.random.key(0), (-1, 5))[1]
    x, targets = jnp.ones((2, 5), jnp.float32), jnp.zeros((2, 3), jnp.float32)
    function, args = pass_program(name, model, objective, params, x, targets, None)
    assert bool(jax_differentiated(function, *args)) is caught
