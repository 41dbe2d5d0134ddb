"""The engines inside `jax.shard_map` with JAX's default check_vma=True (`nets.varying`): each
returns jax.grad's gradient there, the sum over the devices of each device's gradient of its
own energy, for nets with and without scans."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nets
from nets import engines, gradcheck, layers, losses, recurrent, varying
from nets.gradcheck import relative_error
from nets.models import lenet1989
from tests.helpers import F64, random_batch, random_like

AXIS = "batch"
DEVICES = 2


def mesh():
    return jax.make_mesh((DEVICES,), (AXIS,), devices=jax.devices()[:DEVICES],
                         axis_types=(jax.sharding.AxisType.Explicit,))


def case(name):
    """(model, objective, x, targets), float64, a batch of 4: 2 examples a device."""
    key = jax.random.key(1)
    if name == "mlp_l2":
        x, targets = random_batch(key, 4, 5, 3, jnp.float64)
        return nets.build_mlp(5, 3, hidden_units=7), losses.lecture_objective(0.5), x, targets
    if name == "mlp_batch_norm":
        x, targets = random_batch(key, 4, 5, 3, jnp.float64)
        return (nets.build_mlp(5, 3, hidden_units=6, activation="relu", batch_norm=True),
                losses.Objective(losses.softmax_cross_entropy(), 0.0), x, targets)
    if name == "lenet1989":
        x = jax.random.uniform(key, (4, 16, 16, 1), jnp.float64, -1, 1)
        targets = jnp.where(jax.nn.one_hot(jnp.arange(4), 10) > 0, 1.0, -1.0)
        return lenet1989(), losses.Objective(losses.mean_squared_error(), 0.0), x, targets
    kind, bidirectional = {"lstm": ("lstm", False), "gru_bidirectional":
                           ("gru_reset_after", True)}[name]
    model = recurrent.sequence_model([recurrent.make_cell(kind, 6)], 3, last_step=True,
                                     bidirectional=bidirectional)
    x = jax.random.normal(key, (4, 5, 2), jnp.float64)
    targets = jax.random.normal(jax.random.key(2), (4, 3), jnp.float64)
    return model, losses.Objective(losses.mean_squared_error(), 0.1), x, targets


def params_of(model, x):
    _, params = model.init(jax.random.key(0), (-1,) + x.shape[1:])
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)


def over_devices(function, params, x, targets):
    """function(params, x_d, targets_d) on each device's half of the batch, under shard_map
    with check_vma=True; params replicated, the result replicated (out_specs P())."""
    devices = mesh()
    mapped = jax.jit(jax.shard_map(function, mesh=devices, in_specs=(P(), P(AXIS), P(AXIS)),
                                   out_specs=P(), check_vma=True))
    split = NamedSharding(devices, P(AXIS))
    return mapped(jax.device_put(params, NamedSharding(devices, P())),
                  jax.device_put(x, split), jax.device_put(targets, split))


def assert_gradients_equal(got, want):
    """Leaf by leaf within F64, except a leaf that is zero up to rounding (the Dense biases
    just before a BatchNorm, whose exact gradient is 0): its difference within F64 of the
    whole gradient's norm."""
    whole = float(np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree.leaves(want))))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if max(np.linalg.norm(a), np.linalg.norm(b)) <= 1e-12 * whole:
            assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= F64 * whole
        else:
            assert relative_error(a, b) <= F64


def sum_of_halves(function, params, x, targets):
    """The independent reference: function on one device for each half, summed."""
    half = x.shape[0] // DEVICES
    parts = [function(params, x[i * half:(i + 1) * half], targets[i * half:(i + 1) * half])
             for i in range(DEVICES)]
    return jax.tree.map(lambda *leaves: sum(leaves), *parts)


@pytest.mark.parametrize("name", ["mlp_l2", "mlp_batch_norm", "lenet1989", "lstm",
                                  "gru_bidirectional"])
@pytest.mark.parametrize("engine", ["manual", "manual_vjp", "autodiff"])
def test_every_engine_under_check_vma_sums_the_devices_gradients(name, engine):
    """Inside shard_map with check_vma=True the gradient of the replicated params is the sum
    of the two devices' gradients, as jax.grad gives it: each engine against jax.grad of
    each half's energy on one device, summed (float64). Without nets.varying, `manual`'s
    gradient varies by device (out_specs P() is refused), `manual_vjp`'s custom_vjp is
    refused, and a scan's carry changes type (a TypeError for the recurrent nets)."""
    model, objective, x, targets = case(name)
    params = params_of(model, x)
    value_and_grad = engines.get_engine(engine)(model, objective)
    grads = over_devices(lambda p, x, t: value_and_grad(p, x, t)[1], params, x, targets)
    reference = engines.autodiff(model, objective)
    expected = sum_of_halves(lambda p, x, t: reference(p, x, t)[1], params, x, targets)
    assert_gradients_equal(grads, expected)
    assert relative_error(jax.tree.leaves(grads)[0], jax.tree.leaves(expected)[0] / 2) > 0.1


def test_the_curvature_diagonal_under_check_vma_is_summed_over_the_devices():
    """curvature_diagonal of the replicated params inside shard_map with check_vma=True: the
    sum of each half's diagonal on one device (its single-device values are checked against
    the exact Gauss-Newton diagonal in tests/test_curvature.py)."""
    model, objective, x, targets = case("mlp_l2")
    params = params_of(model, x)
    diagonal = engines.curvature_diagonal(model, objective)
    got = over_devices(diagonal, params, x, targets)
    expected = sum_of_halves(diagonal, params, x, targets)
    assert_gradients_equal(got, expected)


@pytest.mark.parametrize("name", ["mlp_l2", "mlp_batch_norm", "lenet1989", "lstm",
                                  "gru_bidirectional"])
@pytest.mark.parametrize("product", ["gauss_newton", "hessian"])
def test_curvature_products_under_check_vma_sum_the_devices_products(name, product):
    """G v and H v of the replicated params inside shard_map with check_vma=True, v
    replicated: the sum over the devices of each half's product, as jax's own products of the
    whole energy give it (float64; the reference is jax's jvp and vjp on one device, each
    half, summed). The recurrent nets' forward scans keep tangents and kept values varying
    like their inputs while params and v do not."""
    model, objective, x, targets = case(name)
    params = params_of(model, x)
    v = random_like(jax.random.key(5), params, jnp.float64)
    manual = getattr(engines, f"{product}_product")(model, objective)
    reference = getattr(gradcheck, f"{product}_product_reference")(model, objective)
    got = over_devices(lambda pv, x, t: manual(pv[0], x, t, pv[1]), (params, v), x, targets)
    want = sum_of_halves(lambda pv, x, t: reference(pv[0], x, t, pv[1]), (params, v), x,
                         targets)
    assert_gradients_equal(got, want)
    assert relative_error(jax.tree.leaves(got)[0], jax.tree.leaves(want)[0] / 2) > 0.1


def test_scans_under_check_vma_take_a_replicated_initial_state():
    """scan_cell and bptt inside shard_map with check_vma=True, given a replicated carry0
    and dcarry_T (varying over no axis) with the batch split: the same ys, dparams and dxs
    as on one device (float64), with a mask."""
    cell = recurrent.make_cell("gru", 4)
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64),
                          cell.init(jax.random.key(0), 3))
    xs = jax.random.normal(jax.random.key(1), (4, 5, 3), jnp.float64)
    dys = jax.random.normal(jax.random.key(2), (4, 5, 4), jnp.float64)
    mask = jnp.array([[1, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 1]] * 2, jnp.float64)
    carry0 = jnp.full((2, 4), 0.3, jnp.float64)  # one device's batch, replicated

    def run(params, inputs, mask):
        xs, dys = inputs
        ys, _, residuals = recurrent.scan_cell(cell, params, xs, carry0, mask=mask)
        dparams, dxs, _ = recurrent.bptt(cell, params, residuals, dys, dcarry_T=carry0)
        return ys, dxs, dparams

    devices = mesh()
    mapped = jax.jit(jax.shard_map(run, mesh=devices, in_specs=(P(), P(AXIS), P(AXIS)),
                                   out_specs=(P(AXIS), P(AXIS), P(AXIS)), check_vma=True))
    split = NamedSharding(devices, P(AXIS))
    ys, dxs, dparams = jax.tree.map(np.asarray, mapped(
        jax.device_put(params, NamedSharding(devices, P())), jax.device_put((xs, dys), split),
        jax.device_put(mask, split)))
    for device in range(DEVICES):
        rows = slice(2 * device, 2 * device + 2)
        want_ys, want_dxs, want_dparams = run(params, (xs[rows], dys[rows]), mask[rows])
        assert relative_error(ys[rows], want_ys) <= F64
        assert relative_error(dxs[rows], want_dxs) <= F64
        # out_specs P(AXIS) stacks each device's own dparams along their first axis
        for got, want in zip(jax.tree.leaves(dparams), jax.tree.leaves(want_dparams)):
            size = want.shape[0]
            assert relative_error(got[device * size:(device + 1) * size], want) <= F64


def test_outside_shard_map_nothing_varies():
    tree = {"w": jnp.ones((2, 3)), "b": np.zeros(3)}
    assert varying.varying_axes(tree) == frozenset()
    for same in (varying.vary_like(tree, ()), varying.sum_over_added_axes(tree, tree)):
        assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(tree)))


def test_the_helpers_type_values_by_the_axes_they_vary_over():
    """Inside shard_map with check_vma=True: a replicated value varies over no axis, a split
    one over the batch axis; vary_like adds the axis without changing the values, and
    sum_over_added_axes sums a split value over the devices (against NumPy)."""
    seen = {}

    def inspect(replicated, split):
        seen["replicated"] = varying.varying_axes(replicated)
        seen["split"] = varying.varying_axes(split)
        cast = varying.vary_like(replicated, [AXIS])
        seen["cast"] = varying.varying_axes(cast)
        total = varying.sum_over_added_axes(split, replicated)
        seen["total"] = varying.varying_axes(total)
        return cast - replicated, total

    devices = mesh()
    mapped = jax.jit(jax.shard_map(inspect, mesh=devices, in_specs=(P(), P(AXIS)),
                                   out_specs=(P(AXIS), P()), check_vma=True))
    replicated = np.arange(3.0)
    split = np.arange(6.0).reshape(2, 3)
    difference, total = mapped(
        jax.device_put(replicated, NamedSharding(devices, P())),
        jax.device_put(split, NamedSharding(devices, P(AXIS))))
    assert seen == {"replicated": frozenset(), "split": {AXIS}, "cast": {AXIS},
                    "total": frozenset()}
    assert np.array_equal(np.asarray(difference), np.zeros(6))
    np.testing.assert_array_equal(np.asarray(total), split.sum(axis=0, keepdims=True))


@pytest.mark.parametrize("engine", ["manual", "manual_vjp", "autodiff"])
def test_synchronised_batch_norm_under_check_vma(engine):
    """A BatchNorm synchronised over the mapped axis (statistics of the whole batch on every
    device), inside shard_map with check_vma=True: each device's energy is its half's mean
    loss under the whole batch's statistics, so the sum of the devices' gradients is twice
    jax.grad of the whole batch's energy under plain BatchNorm on one device."""
    synchronised, plain = (nets.serial(layers.Dense(6, name="hidden"),
                                       nets.BatchNorm(6, axis_name=axis_name), layers.Relu(),
                                       layers.Dense(3, name="output"))
                           for axis_name in (AXIS, None))
    objective = losses.Objective(losses.softmax_cross_entropy(), 0.0)
    x, targets = random_batch(jax.random.key(3), 4, 5, 3, jnp.float64)
    params = params_of(synchronised, x)
    value_and_grad = engines.get_engine(engine)(synchronised, objective)
    grads = over_devices(lambda p, x, t: value_and_grad(p, x, t)[1], params, x, targets)
    whole = engines.autodiff(plain, objective)(params, x, targets)[1]
    assert_gradients_equal(grads, jax.tree.map(lambda g: 2 * g, whole))


@pytest.mark.parametrize("name", ["mlp_l2", "lstm"])
@pytest.mark.parametrize("engine", ["manual", "autodiff"])
def test_accumulated_micro_batches_under_check_vma_sum_the_devices_gradients(name, engine):
    """`engines.accumulated(engine, 2)` inside shard_map with check_vma=True (each device's 2
    examples as 2 micro-batches of 1, its running sums typed like what they add up): the sum
    of each half's jax.grad on one device (float64)."""
    model, objective, x, targets = case(name)
    params = params_of(model, x)
    value_and_grad = engines.accumulated(engines.get_engine(engine), 2)(model, objective)
    grads = over_devices(lambda p, x, t: value_and_grad(p, x, t)[1], params, x, targets)
    reference = engines.autodiff(model, objective)
    expected = sum_of_halves(lambda p, x, t: reference(p, x, t)[1], params, x, targets)
    assert_gradients_equal(grads, expected)
