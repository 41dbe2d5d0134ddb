"""The engines under `jax.jit` with a mesh of Explicit axes (JAX's sharding in types): the
batch split over 2 CPU devices, the params replicated, every value typed by its layout.

A hand-written weight gradient contracts the split batch; without `nets.varying.
product_sharding` JAX refuses it as ambiguous (`x.T @ dy`) or refuses the per-example slices
of a small batch, while `jax.grad` of the same forward pass runs. The reference is jax.grad of
the whole batch on one device, without a mesh (float64, <= 1e-10)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.gradcheck import CASES, case_batch, case_key
from nets import engines, gradcheck
from tests.helpers import assert_close_tree
from training import parallel

AXIS = "batch"
BY_NAME = {case.name: case for case in CASES}


def explicit_mesh():
    return jax.make_mesh((2,), (AXIS,), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Explicit,))


def point(name, batch=4):
    """(model, objective, params, x, targets, key) of the gradient report's case, float64."""
    case = BY_NAME[name]
    model, objective = case.build()
    key = case_key(0, case)
    x, targets = (a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
                  for a in case_batch(case, batch, key))
    params = jax.jit(lambda key: gradcheck.astype(model.init(key, (-1,) + x.shape[1:])[1],
                                                  jnp.float64))(key)  # one program
    return model, objective, params, x, targets, jax.random.key(3) if case.dropout else None


def on_the_mesh(function, params, x, targets):
    """jit(function)(params, x, targets) with x and targets split over the mesh's axis and
    params replicated, under `jax.set_mesh`."""
    mesh = explicit_mesh()
    with jax.set_mesh(mesh):
        split, whole = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
        return jax.jit(function)(jax.device_put(params, whole), jax.device_put(x, split),
                                 jax.device_put(targets, split))


@pytest.mark.parametrize("name", list(BY_NAME))
def test_manual_gradient_on_a_split_batch_is_jax_grad_of_the_whole_batch(name):
    """Every case of the gradient report (every layer, loss, cell and model): E and
    dE/dparams by the manual engine, the batch of 4 split over the mesh (2 examples a device;
    on one device a batch this small takes the outer products): jax.grad's on one device, and
    each gradient laid out as its parameter (replicated)."""
    model, objective, params, x, targets, key = point(name)
    energy, grads = on_the_mesh(lambda p, x, t: engines.manual(model, objective)(p, x, t, key),
                                params, x, targets)
    want_energy, want_grads = jax.jit(engines.autodiff(model, objective))(params, x, targets,
                                                                          key)
    assert_close_tree((energy, grads), (want_energy, want_grads), jnp.float64, name)
    for grad in jax.tree.leaves(grads):
        assert grad.sharding.is_fully_replicated


@pytest.mark.parametrize("name", ["mlp_lecture", "rnn_lstm_peephole_elman_gru_reset_after",
                                  "rnn_elman_sigmoid_lstm_gru", "lenet1989", "lenet5",
                                  "transformer_lm_tied_gelu"])
@pytest.mark.parametrize("product", ["gauss_newton", "hessian"])
def test_curvature_products_and_diagonal_on_a_split_batch_are_jaxs(product, name):
    """G v and H v (the tangent and R-operator passes: through time for the recurrent stacks
    of every cell, through LeNet-1989's -1 borders, unshared biases and table, LeNet-5's
    subsampling, the transformer's attention and tied embedding) and LeCun's curvature
    diagonal on the split batch: jax's products on one device (`nets.gradcheck`'s
    references) and the diagonal on one device."""
    model, objective, params, x, targets, _ = point(name)
    v = jax.tree.map(lambda leaf: jnp.asarray(np.cos(np.arange(leaf.size, dtype=leaf.dtype))
                                              .reshape(leaf.shape)), params)
    manual = getattr(engines, f"{product}_product")(model, objective)
    reference = getattr(gradcheck, f"{product}_product_reference")(model, objective)
    got = on_the_mesh(lambda p, x, t: manual(p, x, t, v), params, x, targets)
    assert_close_tree(got, jax.jit(reference)(params, x, targets, v), jnp.float64, product)
    diagonal = engines.curvature_diagonal(model, objective)
    assert_close_tree(on_the_mesh(diagonal, params, x, targets),
                      jax.jit(diagonal)(params, x, targets), jnp.float64, "curvature diagonal")


def test_per_example_gradients_and_ghost_norms_of_an_mlp_on_a_split_batch():
    """`training.parallel`'s per-example gradients (vmap of the manual engine) and ghost norms
    of the lecture's net on the split batch: jax.grad's per-example gradients on one device
    (vmap of the autodiff engine) and their norms. (A convolutional net's per-example pass
    is refused there inside vmap's batching of the patch gather: not supported.)"""
    model, objective, params, x, targets, _ = point("mlp_lecture")
    want_values, want_grads = jax.jit(parallel.per_example_value_and_grad(
        model, objective, engines.autodiff))(params, x, targets)
    values, grads = on_the_mesh(parallel.per_example_value_and_grad(model, objective), params,
                                x, targets)
    assert_close_tree((values, grads), (want_values, want_grads), jnp.float64, "per example")
    ghost_values, norms = on_the_mesh(parallel.ghost_norms(model, objective), params, x,
                                      targets)
    want_norms = np.sqrt(sum(np.sum(np.square(leaf).reshape(leaf.shape[0], -1), axis=1)
                             for leaf in jax.tree.leaves(want_grads)))
    assert_close_tree((ghost_values, norms), (want_values, want_norms), jnp.float64, "ghost")
