"""nets.recurrent: each cell's hand-written BPTT against jax.grad, the helper's options, causality.

Compilation dominates the cost here, so each cell is checked on a few lengths (1, 17, 200) with
sizes drawn from a seeded generator, every option switched on in some case.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import recurrent
from nets.gradcheck import gradient_report, relative_error
from tests.helpers import assert_close_tree

CELLS = recurrent.CELLS


def random_like(rng, tree, dtype, scale=1.0):
    """N(0, scale^2) arrays (drawn by NumPy) shaped like the leaves of `tree` (arrays or
    ShapeDtypeStructs). NumPy, not eager jax.random: every eager op of a new shape compiles,
    and with random sizes that would cost more than the checks."""
    return jax.tree.map(lambda leaf: jnp.asarray(scale * rng.standard_normal(leaf.shape), dtype),
                        tree)


def random_params(cell, input_size, rng, dtype):
    """Random params of the cell's shapes, N(0, 0.5^2) on every leaf (peepholes and biases
    included), so that no term of a backward pass is multiplied by an exact zero."""
    shapes = jax.eval_shape(functools.partial(cell.init, input_size=input_size),
                            jax.random.key(0))
    return random_like(rng, shapes, dtype, 0.5)


def lengths_mask(lengths, time):
    return jnp.arange(time)[None, :] < jnp.asarray(lengths)[:, None]


def problem(kind, time, dtype, seed, with_mask, with_carry0):
    """A cell of random sizes, params, inputs, an optional mask and initial state, and the
    random linear read-outs R_y, R_c that define E = sum(ys R_y) + sum(carry_T R_c)."""
    rng = np.random.default_rng(seed)
    batch, features, hidden = (int(rng.integers(1, 5)), int(rng.integers(1, 6)),
                               int(rng.integers(1, 7)))
    cell = recurrent.make_cell(kind, hidden)
    params = random_params(cell, features, rng, dtype)
    xs = random_like(rng, jnp.zeros((batch, time, features)), dtype)
    zero_carry = jax.eval_shape(functools.partial(cell.initial_carry, batch))
    carry0 = random_like(rng, zero_carry, dtype) if with_carry0 else None
    mask = None
    if with_mask:
        lengths = rng.integers(0, time + 1, batch)
        lengths[0] = time  # keep one full-length sequence
        mask = jnp.asarray(np.arange(time)[None, :] < lengths[:, None])
    read_y = random_like(rng, jnp.zeros((batch, time, hidden)), dtype)
    read_carry = random_like(rng, zero_carry, dtype)
    return cell, params, xs, carry0, mask, read_y, read_carry


def energy_of(cell, mask, truncation, read_y, read_carry, unroll=1):
    def energy(params, xs, carry0):
        ys, carry_T, _ = recurrent.scan_cell(cell, params, xs, carry0, mask, truncation, unroll)
        pairs = zip(jax.tree.leaves(carry_T), jax.tree.leaves(read_carry))
        return jnp.sum(ys * read_y) + sum(jnp.sum(c * r) for c, r in pairs)

    return energy


def manual_gradients(cell, mask, truncation, read_y, read_carry, unroll=1):
    def gradients(params, xs, carry0):
        _, _, residuals = recurrent.scan_cell(cell, params, xs, carry0, mask, truncation, unroll)
        return recurrent.bptt(cell, params, residuals, read_y, read_carry, truncation, unroll)

    return gradients


def backpropagated_and_exact(model, objective, params, x, y):
    """(engines.curvature_diagonal's diagonal, gradcheck.gauss_newton_diagonal's exact one),
    each compiled as one program (op by op, each operation compiles apart)."""
    return (jax.jit(nets.engines.curvature_diagonal(model, objective))(params, x, y),
            nets.gradcheck.gauss_newton_diagonal(model, objective, params, x, y))


CASES = {
    # name: (time, dtype, mask, carry0, truncation); unroll: in the masked-steps test
    "T1": (1, "float64", False, False, None),
    "T17_mask_carry0_truncated": (17, "float64", True, True, 5),
    "T200_mask_truncated": (200, "float64", True, False, 30),
    "T200_float32": (200, "float32", False, True, None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", CELLS)
def test_bptt_matches_jax_grad_through_the_scan(kind, case):
    """dparams, dxs and dcarry0 by the hand-written BPTT equal jax.grad of the scanned forward
    (with stop_gradient at the window boundaries when truncated): 1e-10 in float64, 1e-5 in
    float32."""
    time, dtype, with_mask, with_carry0, truncation = CASES[case]
    seed = CELLS.index(kind) * 10 + list(CASES).index(case)
    cell, params, xs, carry0, mask, read_y, read_carry = problem(
        kind, time, dtype, seed, with_mask, with_carry0)
    if carry0 is None:
        carry0 = cell.initial_carry(xs.shape[0], xs.dtype)
    energy = energy_of(cell, mask, truncation, read_y, read_carry)
    manual = manual_gradients(cell, mask, truncation, read_y, read_carry)

    @jax.jit  # one compilation for both
    def both(params, xs, carry0):
        return manual(params, xs, carry0), jax.grad(energy, argnums=(0, 1, 2))(params, xs, carry0)

    actual, expected = both(params, xs, carry0)
    assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(expected[0]))
    assert_close_tree(actual, expected, dtype, f"{kind}/{case}")


@pytest.mark.parametrize("kind", CELLS)
def test_recomputed_segments_give_jax_grads_gradients_and_the_same_curvature(kind):
    """scan_cell(..., recompute_every=k) and bptt from its RecomputeResiduals (gradient
    checkpointing through time), T = 17 with a padding mask, a given carry0 and truncation to
    windows of 5, at k = 1, 4 (a head of 1 step, then 4 segments that the windows cut across)
    and 30 (no segment): ys and carry_T equal the plain scan's; dparams, dxs and dcarry0 equal
    jax.grad of the plain forward (float64, 1e-10); the curvature and every step's dcarry equal
    bptt's from every step's residuals (which the tests above check)."""
    time, truncation = 17, 5
    cell, params, xs, carry0, mask, read_y, read_carry = problem(
        kind, time, "float64", 70 + CELLS.index(kind), True, True)
    energy = energy_of(cell, mask, truncation, read_y, read_carry)
    d2ys = jnp.square(read_y)

    def both_ways(every):
        ys, carry_T, residuals = recurrent.scan_cell(cell, params, xs, carry0, mask, truncation,
                                                     recompute_every=every)
        run = functools.partial(recurrent.bptt, cell, params, residuals, truncation=truncation)
        return ((ys, carry_T), run(read_y, read_carry, return_dcarries=True),
                run(d2ys, jax.tree.map(jnp.square, read_carry), curvature=True))

    @jax.jit
    def everything():
        return ([both_ways(every) for every in (None, 1, 4, 30)],
                jax.grad(energy, argnums=(0, 1, 2))(params, xs, carry0))

    (plain, *recomputed), expected = everything()
    for every, (outputs, gradients, curvature) in zip((1, 4, 30), recomputed):
        what = f"{kind}, recompute_every={every}"
        assert_close_tree(outputs, plain[0], "float64", f"{what}: outputs")
        assert_close_tree(gradients[:3], expected, "float64", f"{what}: against jax.grad")
        assert_close_tree(gradients[3], plain[1][3], "float64", f"{what}: dcarries")
        assert_close_tree(curvature, plain[2], "float64", f"{what}: curvature")


def test_recomputed_residuals_keep_a_carry_per_segment_and_the_first_steps():
    """What recompute_every=k stores, T = 23, k = 5: the first 23 mod 5 = 3 steps' residuals
    (as the plain scan's first 3), one carry per later segment (the carry entering steps 3, 8,
    13, 18: the plain scan's carries there), the inputs of those 20 steps in segments; and an
    LSTM layer's XLA temporaries in its manual step, T = 100, k = 10, below those with every
    step's residuals (61.0 against 16.7 MB with jax 0.10.2 on the CPU)."""
    cell = recurrent.lstm(3)
    params = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (4, 23, 2), jnp.float32)

    @jax.jit  # one program
    def both(params, xs):
        return (recurrent.scan_cell(cell, params, xs),
                recurrent.scan_cell(cell, params, xs, recompute_every=5))

    (_, _, plain), (ys, _, kept) = both(params, xs)
    assert isinstance(kept, recurrent.RecomputeResiduals)
    assert kept.mask is None and kept.xs.shape == (4, 5, 4, 2)
    np.testing.assert_array_equal(kept.xs, jnp.swapaxes(xs[:, 3:], 0, 1).reshape(4, 5, 4, 2))
    assert_close_tree(kept.head.steps, jax.tree.map(lambda r: r[:3], plain.steps), "float32")
    h_entering = jnp.stack([ys[:, t - 1] for t in (3, 8, 13, 18)])
    np.testing.assert_allclose(recurrent.hidden_of(kept.carries), h_entering, rtol=1e-6)

    def temporaries(every):
        model = recurrent.sequence_model([recurrent.lstm(256)], 10, last_step=True,
                                         recompute_every=every)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), (64, 100, 32))[1])
        args = (params, jax.ShapeDtypeStruct((64, 100, 32), jnp.float32),
                jax.ShapeDtypeStruct((64, 10), jnp.float32))
        step = nets.manual(model, nets.Objective(nets.mean_squared_error(), 0.0))
        return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert temporaries(10) < 0.5 * temporaries(None)


def test_truncation_matches_windows_with_stop_gradient_and_changes_the_gradient():
    """The reference for truncated BPTT built outside the helper: the sequence cut into windows
    of k steps, each run from stop_gradient(the previous window's final carry), and jax.grad.
    Truncation must also actually change the gradient (else the check proves nothing)."""
    time, k = 17, 5
    cell, params, xs, carry0, mask, read_y, read_carry = problem("lstm", time, "float64", 7,
                                                                 True, True)

    def windowed_energy(params, xs, carry0):
        carry, ys = carry0, []
        for start in range(0, time, k):
            if start:
                carry = jax.lax.stop_gradient(carry)
            window = slice(start, start + k)
            ys_w, carry, _ = recurrent.scan_cell(cell, params, xs[:, window], carry,
                                                 mask[:, window])
            ys.append(ys_w)
        pairs = zip(jax.tree.leaves(carry), jax.tree.leaves(read_carry))
        return jnp.sum(jnp.concatenate(ys, 1) * read_y) + sum(jnp.sum(c * r) for c, r in pairs)

    @jax.jit
    def all_three(params, xs, carry0):
        return (jax.grad(windowed_energy, argnums=(0, 1, 2))(params, xs, carry0),
                manual_gradients(cell, mask, k, read_y, read_carry)(params, xs, carry0),
                manual_gradients(cell, mask, None, read_y, read_carry)(params, xs, carry0))

    reference, truncated, full = all_three(params, xs, carry0)
    assert relative_error(full[0]["w"], truncated[0]["w"]) > 1e-3
    assert relative_error(full[1], truncated[1]) > 1e-3
    assert_close_tree(truncated, reference, "float64", "truncated vs windows")


@pytest.mark.parametrize("kind", CELLS)
def test_scan_runs_the_step_in_order(kind):
    """scan_cell's outputs and final carry equal a Python loop over cell.step. The scan hands
    the step `forward_weights(params)` (the GRUs' weight blocks cut out once), the loop plain
    params, which the step slices itself."""
    cell, params, xs, carry0, _, _, _ = problem(kind, 6, "float64", 3, False, True)
    ys, carry_T, _ = recurrent.scan_cell(cell, params, xs, carry0)
    carry, expected = carry0, []
    for t in range(xs.shape[1]):
        carry, y_t, _ = cell.step(params, carry, xs[:, t])
        expected.append(y_t)
    assert_close_tree((ys, carry_T), (jnp.stack(expected, 1), carry), "float64", kind)


def test_masked_steps_keep_the_carry_and_contribute_no_gradient():
    """A padded sequence with its mask gives the final state, outputs and gradients of the
    unpadded sequence; its padded inputs get exactly zero gradient."""
    time, length = 9, 4
    cell, params, xs, _, _, read_y, read_carry = problem("gru", time, "float64", 11, False,
                                                         False)
    xs, read_y = xs[:1], read_y[:1]
    read_carry = read_carry[:1]
    mask = lengths_mask([length], time)
    padded = manual_gradients(cell, mask, None, read_y, read_carry, unroll=3)  # unroll as well
    short = manual_gradients(cell, None, None, read_y[:, :length], read_carry)
    zero = cell.initial_carry(1, xs.dtype)
    dparams, dxs, dcarry0 = jax.jit(padded)(params, xs, zero)
    dparams_short, dxs_short, dcarry0_short = jax.jit(short)(params, xs[:, :length], zero)
    assert np.all(np.asarray(dxs[:, length:]) == 0)
    assert_close_tree((dparams, dxs[:, :length], dcarry0),
                      (dparams_short, dxs_short, dcarry0_short), "float64", "padded vs short")

    @jax.jit  # one program
    def forwards(params, xs):
        ys, carry_T, _ = recurrent.scan_cell(cell, params, xs, mask=mask, unroll=3)
        ys_short, carry_short, _ = recurrent.scan_cell(cell, params, xs[:, :length])
        return ys, carry_T, ys_short, carry_short

    ys, carry_T, ys_short, carry_short = forwards(params, xs)
    assert np.all(np.asarray(ys[:, length:]) == 0)
    assert_close_tree((ys[:, :length], carry_T), (ys_short, carry_short), "float64", "forward")


@pytest.mark.parametrize("kind", ["elman_tanh", "lstm_peephole", "gru"])
def test_causality_output_at_t_does_not_depend_on_later_inputs(kind):
    """d y_t / d x_s is exactly zero for s > t, by the manual BPTT and by jax.grad, and not
    zero at s = t."""
    time, t = 8, 3
    cell, params, xs, _, _, _, _ = problem(kind, time, "float64", 5, False, False)
    ys = jax.eval_shape(lambda xs: recurrent.scan_cell(cell, params, xs)[0], xs)
    read = jnp.zeros(ys.shape, ys.dtype).at[:, t].set(1.0)

    @jax.jit  # one program
    def both(params, xs, read):
        _, _, residuals = recurrent.scan_cell(cell, params, xs)
        _, dxs_manual, _ = recurrent.bptt(cell, params, residuals, read)
        return dxs_manual, jax.grad(
            lambda x: jnp.sum(recurrent.scan_cell(cell, params, x)[0] * read))(xs)

    dxs_manual, dxs_autodiff = both(params, xs, read)
    for dxs in (dxs_manual, dxs_autodiff):
        assert np.all(np.asarray(dxs[:, t + 1:]) == 0)
        assert np.any(np.asarray(dxs[:, t]) != 0)


def test_dcarries_are_the_gradients_of_each_step_state():
    """bptt(return_dcarries=True)[3][:, t] = dE/d(carry after step t): jax.grad of E with a
    zero perturbation added to every emitted carry."""
    time = 12
    cell, params, xs, _, _, read_y, read_carry = problem("lstm", time, "float64", 13, False,
                                                         False)
    batch = xs.shape[0]

    def perturbed_energy(deltas):
        def one_step(carry, inputs):
            x_t, delta_t = inputs
            carry, y_t, _ = cell.step(params, carry, x_t)
            carry = jax.tree.map(jnp.add, carry, delta_t)
            return carry, y_t

        deltas_tm = jax.tree.map(lambda d: jnp.swapaxes(d, 0, 1), deltas)
        carry_T, ys = jax.lax.scan(one_step, cell.initial_carry(batch, xs.dtype),
                                   (jnp.swapaxes(xs, 0, 1), deltas_tm))
        pairs = zip(jax.tree.leaves(carry_T), jax.tree.leaves(read_carry))
        return jnp.sum(jnp.swapaxes(ys, 0, 1) * read_y) + sum(jnp.sum(c * r) for c, r in pairs)

    @jax.jit  # one program
    def both(params, xs):
        _, _, residuals = recurrent.scan_cell(cell, params, xs)
        dcarries = recurrent.bptt(cell, params, residuals, read_y, read_carry,
                                  return_dcarries=True)[3]
        zeros = jax.tree.map(jnp.zeros_like, dcarries)
        return dcarries, jax.grad(perturbed_energy)(zeros)

    dcarries, expected = both(params, xs)
    assert_close_tree(dcarries, expected, "float64", "dcarries")


def test_sequence_models_agree_across_engines_and_with_finite_differences():
    """An LSTM with peepholes, a per-step projection and the sequence cross-entropy: manual vs
    jax.grad and finite differences, every parameter (stacks: test_stack_backward_...). Then an
    Elman net read at its last step, truncated, with MSE and the L2 penalty: manual vs jax.grad
    (finite differences see the untruncated gradient, so they do not apply)."""
    rng = np.random.default_rng(0)
    model = recurrent.sequence_model([recurrent.lstm(4, peepholes=True)], 5)
    shapes = jax.eval_shape(lambda key: model.init(key, (-1, 7, 2))[1], jax.random.key(0))
    params = random_like(rng, shapes, jnp.float64, 0.5)
    x = random_like(rng, jnp.zeros((3, 7, 2)), jnp.float64)
    targets = jnp.asarray(rng.integers(0, 5, (3, 7)))
    rows = gradient_report(model, nets.Objective(recurrent.sequence_cross_entropy(), 0.0),
                           params, x, targets, max_fd_coordinates=24)
    assert {row["layer"] for row in rows} == {"lstm_peephole_0", "output"}
    assert all(row["passed"] for row in rows), rows

    elman = recurrent.sequence_model([recurrent.elman(4)], 2, last_step=True, truncation=2)
    shapes = jax.eval_shape(lambda key: elman.init(key, (-1, 5, 2))[1], jax.random.key(0))
    objective = nets.Objective(nets.mean_squared_error(), l2=0.5)
    args = (random_like(rng, shapes, jnp.float64, 0.5), x[:, :5],
            random_like(rng, jnp.zeros((3, 2)), jnp.float64))
    untruncated_model = recurrent.sequence_model([recurrent.elman(4)], 2, last_step=True)
    manual, autodiff, untruncated = jax.jit(lambda *a: (
        nets.manual(elman, objective)(*a), nets.autodiff(elman, objective)(*a),
        nets.autodiff(untruncated_model, objective)(*a)))(*args)
    assert_close_tree(manual, autodiff, "float64", "elman last step")
    recomputing = recurrent.sequence_model([recurrent.elman(4)] * 2, 2, last_step=True,
                                           bidirectional=True, recompute_every=2)
    shapes = jax.eval_shape(lambda key: recomputing.init(key, (-1, 5, 2))[1], jax.random.key(0))
    args = (random_like(rng, shapes, jnp.float64, 0.5), *args[1:])
    by_hand, by_jax = jax.jit(lambda *a: (nets.manual(recomputing, objective)(*a),
                                          nets.autodiff(recomputing, objective)(*a)))(*args)
    assert_close_tree(by_hand, by_jax, "float64", "bidirectional elman stack, recomputed")
    assert relative_error(untruncated[1][0]["w"], manual[1][0]["w"]) > 1e-3
    # the recurrent matrix is under "w", so the L2 penalty reaches it
    assert nets.losses.is_weight((jax.tree_util.DictKey("w"),))


def test_sequence_cross_entropy_gradient_is_the_derivative_of_its_value():
    logits = jax.random.normal(jax.random.key(1), (2, 3, 4), jnp.float64)
    targets = jnp.array([[0, 3, 1], [2, 2, 0]])
    loss = recurrent.sequence_cross_entropy()
    assert_close_tree(loss.grad(logits, targets),
                      jax.grad(loss.value)(logits, targets), "float64", "cross-entropy")
    uniform = loss.value(jnp.zeros((2, 3, 4)), targets)
    assert float(uniform) == pytest.approx(np.log(4))


def test_lstm_forget_bias_starts_at_one_and_layers_check_their_input():
    hidden = 3
    params = recurrent.lstm(hidden).init(jax.random.key(0), 2)
    np.testing.assert_array_equal(params["b"][hidden:2 * hidden], 1.0)
    np.testing.assert_array_equal(params["b"][:hidden], 0.0)
    assert params["w"].shape == (2 + hidden, 4 * hidden)
    layer = recurrent.rnn(recurrent.gru(hidden))
    shape, gru_params = layer.init(jax.random.key(0), (-1, 5, 2))
    assert shape == (-1, 5, hidden)
    with pytest.raises(ValueError, match=r"gru: input x has shape \(4, 5, 3\), expected "
                                         r"\(batch, time, 2\)"):
        layer.forward(gru_params, jnp.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="truncation must be >= 1"):
        recurrent.rnn(recurrent.gru(hidden), truncation=0)


def stack_problem(seed, cells, out_features, xs_shape):
    """A float64 problem for stack_forward/stack_backward: (rng, the sequence_model, random
    params, xs of xs_shape, random initial states, a random read-out of the outputs)."""
    rng = np.random.default_rng(seed)
    batch, time, features = xs_shape
    model = recurrent.sequence_model(cells, out_features)
    shapes = jax.eval_shape(lambda key: model.init(key, (-1, time, features))[1],
                            jax.random.key(0))
    params = random_like(rng, shapes, jnp.float64, 0.5)
    xs = random_like(rng, jnp.zeros(xs_shape), jnp.float64)
    carry_shapes = tuple(jax.eval_shape(functools.partial(c.initial_carry, batch))
                         for c in cells)
    carries0 = random_like(rng, carry_shapes, jnp.float64)
    read_out = random_like(rng, jnp.zeros((batch, time, out_features)), jnp.float64)
    return rng, model, params, xs, carries0, read_out


def test_stack_backward_from_given_states_matches_jax_grad():
    """stack_forward/stack_backward (truncated BPTT that carries the state across windows):
    dparams, dxs and dcarries0 against jax.grad, with given initial states and a read-out of
    the final ones."""
    cells = (recurrent.lstm(3), recurrent.elman(2))
    rng, model, params, xs, carries0, read_out = stack_problem(21, cells, 4, (2, 6, 5))
    read_carries = random_like(rng, carries0, jnp.float64)

    def energy(params, xs, carries0):
        outputs, carries_T, _ = recurrent.stack_forward(cells, params, xs, carries0)
        pairs = zip(jax.tree.leaves(carries_T), jax.tree.leaves(read_carries))
        return jnp.sum(outputs * read_out) + sum(jnp.sum(c * r) for c, r in pairs)

    @jax.jit
    def both(params, xs, carries0):
        outputs, _, residuals = recurrent.stack_forward(cells, params, xs, carries0)
        manual = recurrent.stack_backward(cells, params, residuals, read_out, read_carries)
        _, _, kept = recurrent.stack_forward(cells, params, xs, carries0, recompute_every=4)
        recomputed = recurrent.stack_backward(cells, params, kept, read_out, read_carries)
        return (manual, recomputed), jax.grad(energy, argnums=(0, 1, 2))(params, xs,
                                                                          carries0), outputs

    (manual, recomputed), expected, outputs = both(params, xs, carries0)
    assert_close_tree(manual, expected, "float64", "stack")
    assert_close_tree(recomputed, expected, "float64", "stack, recompute_every=4")
    # from the zero state, the stack is the sequence_model Layer
    assert_close_tree(recurrent.stack_forward(cells, params, xs)[0], model.apply(params, xs),
                      "float64", "stack vs model")


def test_time_distributed_dropout_draws_per_step_and_the_engines_agree():
    """TimeDistributed(Dense, ReLU, Dropout) under a key: a mask for every example and step
    (rows of the folded (batch * time, units) scale differ), and the manual gradient of the
    whole model equals jax.grad's with the same key (float64)."""
    inner = nets.serial(nets.Dense(6, name="dense"), nets.Relu(), nets.Dropout(0.5))
    model = nets.serial(recurrent.TimeDistributed(inner), recurrent.LastStep(),
                        nets.Dense(3, name="readout"))
    assert model.stochastic
    _, params = model.init(jax.random.key(0), (-1, 4, 3))
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (2, 4, 3), jnp.float64)
    targets = jax.nn.one_hot(jnp.array([0, 2]), 3, dtype=jnp.float64)
    key = jax.random.key(2)
    scale = np.asarray(jax.jit(model.forward)(params, x, key=key)[1][0][2])
    assert scale.shape == (8, 6) and len({row.tobytes() for row in scale}) > 4
    objective = nets.Objective(nets.softmax_cross_entropy(), 0.1)
    _, manual = jax.jit(nets.manual(model, objective))(params, x, targets, key)
    _, reference = jax.jit(nets.autodiff(model, objective))(params, x, targets, key)
    assert_close_tree(manual, reference, jnp.float64, "TimeDistributed dropout")
    assert float(jnp.linalg.norm(manual[0][0]["w"])) > 0


def test_time_distributed_curvature_is_the_exact_gauss_newton_diagonal_of_one_hidden_layer():
    """Per-step Dense, tanh, per-step Dense (outputs flattened for the squared error): one
    hidden layer and one output layer, so every unit reaches each output by one path and the
    backpropagated diagonal (time folded into the batch) is jax's exact Gauss-Newton one."""
    model = nets.serial(recurrent.TimeDistributed(nets.Dense(4, name="hidden")),
                        nets.Tanh(), recurrent.TimeDistributed(nets.Dense(3, name="out")),
                        nets.Flatten())
    _, params = model.init(jax.random.key(0), (-1, 5, 2))
    params = nets.gradcheck.astype(params, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 5, 2), jnp.float64)
    targets = jax.random.normal(jax.random.key(2), (3, 15), jnp.float64)
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    backpropagated, exact = backpropagated_and_exact(model, objective, params, x, targets)
    assert_close_tree(backpropagated, exact, jnp.float64, "per-step net")


def test_sequence_cross_entropy_curvature_is_the_diagonal_of_its_hessian():
    """p (1 - p) / (m T) against jnp.diag of jax.hessian of the loss in the logits, float64."""
    loss = recurrent.sequence_cross_entropy()
    z = jax.random.normal(jax.random.key(0), (2, 3, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (2, 3), 0, 4)
    hessian = jax.jit(jax.hessian(loss.value))(z, y).reshape(24, 24)
    np.testing.assert_allclose(loss.curvature(z, y), jnp.diag(hessian).reshape(2, 3, 4),
                               rtol=1e-12, atol=0)


def perturbed_cell_params(cell, input_size, seed):
    """Float64 params of `cell`, moved off their init (so the peepholes and biases are not
    0)."""
    params = cell.init(jax.random.key(seed), input_size)
    return jax.tree.map(lambda a: a.astype(jnp.float64) + 0.3 * jax.random.normal(
        jax.random.key(seed + 1), a.shape, jnp.float64), params)


@pytest.mark.parametrize("kind", ["elman_tanh", "elman_sigmoid", "lstm", "gru",
                                  "gru_reset_after"])
def test_one_step_curvature_is_the_exact_gauss_newton_diagonal(kind):
    """One step from a nonzero state: every weight reaches each output h_j by one path (LSTM:
    through its own gate; GRU's U_r: through r_k, r_k h_k and n_j), so LeCun's diagonal rule,
    bptt(curvature=True), equals sum_j (dh_j/dw)^2 d2y_j from jax's Jacobian (float64)."""
    cell = recurrent.make_cell(kind, 3)
    params = perturbed_cell_params(cell, 2, 0)
    x = jax.random.normal(jax.random.key(2), (4, 1, 2), jnp.float64)
    carry0 = jax.tree.map(lambda c: jax.random.normal(jax.random.key(3), c.shape, jnp.float64),
                          cell.initial_carry(4, jnp.float64))
    d2y = jax.random.uniform(jax.random.key(4), (4, 1, 3), jnp.float64)

    @jax.jit  # one program
    def both(params, x, carry0, d2y):
        _, _, residuals = recurrent.scan_cell(cell, params, x, carry0)
        d2params = recurrent.bptt(cell, params, residuals, d2y, curvature=True)[0]
        jacobian = jax.jacobian(lambda p: recurrent.scan_cell(cell, p, x, carry0)[0])(params)
        return d2params, jax.tree.map(lambda j: jnp.tensordot(d2y, j**2, axes=3), jacobian)

    d2params, exact = both(params, x, carry0, d2y)
    assert_close_tree(d2params, exact, jnp.float64, f"{kind} one step")


@pytest.mark.parametrize("kind", ["gru", "gru_reset_after"])
def test_gradient_parts_sum_to_the_assembled_gradient_bit_for_bit(kind):
    """Both GRUs sum their weight gradient's blocks apart over the steps (`gradient_parts`);
    bptt so gives the very numbers it gives with the parts assembled at every step (the cell
    without gradient_parts), gradient and curvature alike, float32."""
    cell = recurrent.make_cell(kind, 4)
    assert cell.gradient_parts is not None
    assembled_every_step = cell._replace(gradient_parts=None)
    params = perturbed_cell_params(cell, 3, 8)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    x = jax.random.normal(jax.random.key(9), (2, 7, 3), jnp.float32)
    dys = jax.random.normal(jax.random.key(10), (2, 7, 4), jnp.float32)
    _, _, residuals = recurrent.scan_cell(cell, params, x)
    for curvature in (False, True):
        got, want = (recurrent.bptt(c, params, residuals, dys, curvature=curvature)
                     for c in (cell, assembled_every_step))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["lstm", "gru_reset_after"])
def test_bptt_over_no_steps_gives_zero_gradients_of_the_params_shapes(kind):
    """A sequence of 0 steps: no gradient reaches the params, and dcarry0 is dcarry_T."""
    cell = recurrent.make_cell(kind, 3)
    params = cell.init(jax.random.key(0), 2)
    _, _, residuals = recurrent.scan_cell(cell, params, jnp.zeros((2, 0, 2), jnp.float32))
    dcarry_T = jax.tree.map(jnp.ones_like, cell.initial_carry(2))
    dparams, dxs, dcarry0 = recurrent.bptt(cell, params, residuals,
                                           jnp.zeros((2, 0, 3), jnp.float32),
                                           dcarry_T)
    assert jax.tree.map(jnp.shape, dparams) == jax.tree.map(jnp.shape, params)
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(dparams))
    assert dxs.shape == (2, 0, 2)
    assert_close_tree(dcarry0, dcarry_T, jnp.float32, "dcarry0")


@pytest.mark.parametrize("kind", recurrent.CELLS)
def test_curvature_scan_is_the_step_curvature_run_back_through_time(kind):
    """bptt(curvature=True) over 6 steps with a padding mask and truncation to windows of 4,
    against a Python loop of the cell's step_curvature run backwards with the squared
    weights, zeroing what the mask and the window boundary stop; all entries >= 0."""
    cell = recurrent.make_cell(kind, 3)
    params = perturbed_cell_params(cell, 2, 5)
    x = jax.random.normal(jax.random.key(6), (2, 6, 2), jnp.float64)
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], jnp.float64)
    d2ys = jax.random.uniform(jax.random.key(7), (2, 6, 3), jnp.float64)
    _, _, residuals = recurrent.scan_cell(cell, params, x, mask=mask, truncation=4)
    d2params, d2xs, _ = recurrent.bptt(cell, params, residuals, d2ys, truncation=4,
                                       curvature=True)
    squared = jax.tree.map(jnp.square, params)
    weights = squared if cell.backward_weights is None else cell.backward_weights(squared)
    d2carry = cell.initial_carry(2, jnp.float64)
    total = jax.tree.map(jnp.zeros_like, params)
    d2x_steps = [None] * 6
    for t in reversed(range(6)):
        step_residuals = jax.tree.map(lambda r, t=t: r[t], residuals.steps)
        keep = mask[:, t][:, None]
        incoming = jax.tree.map(lambda d, keep=keep: d * keep, d2carry)
        step_d2params, d2carry_prev, d2x_steps[t] = cell.step_curvature(
            weights, step_residuals, incoming, d2ys[:, t] * keep)
        total = jax.tree.map(jnp.add, total, step_d2params)
        d2carry = jax.tree.map(lambda prev, d, keep=keep: keep * prev + (1 - keep) * d,
                               d2carry_prev, d2carry)
        if t == 4:
            d2carry = jax.tree.map(jnp.zeros_like, d2carry)
    assert_close_tree(d2params, total, jnp.float64, f"{kind} through time")
    np.testing.assert_allclose(d2xs, jnp.stack(d2x_steps, axis=1), rtol=1e-12, atol=1e-15)
    assert all(float(jnp.min(leaf)) >= 0 for leaf in jax.tree.leaves((d2params, d2xs)))


def test_a_sequence_model_has_lecuns_curvature():
    """Every layer of a stacked LSTM/GRU sequence model now has a curvature pass, so
    engines.curvature_diagonal runs on it; the readout (the last layer) is exact against
    jax's Gauss-Newton diagonal."""
    model = recurrent.sequence_model([recurrent.make_cell("lstm", 4),
                                      recurrent.make_cell("gru", 3)], 2, last_step=True)
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    _, params = model.init(jax.random.key(0), (-1, 5, 2))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (3, 5, 2), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (3, 2), jnp.float64)
    backpropagated, exact = backpropagated_and_exact(model, objective, params, x, y)
    assert_close_tree(backpropagated[-1], exact[-1], jnp.float64, "readout")
    assert relative_error(backpropagated[0]["w"], exact[0]["w"]) > 1e-3
    assert all(float(jnp.min(leaf)) >= 0 for leaf in jax.tree.leaves(backpropagated))


@pytest.mark.parametrize("kind, dropout", [("elman_tanh", 0.0), ("lstm", 0.0),
                                           ("elman_tanh", 0.5), ("lstm", 0.5)])
def test_stack_curvature_from_given_states_is_the_exact_gauss_newton_diagonal(kind, dropout):
    """stack_backward(curvature=True) from nonzero carried states, one step and one output:
    each weight of these cells reaches the output through one hidden unit, so LeCun's rule
    is exact, against sum (dy/dw)^2 d2y from jax's Jacobian of stack_forward (float64), with
    the cell's outputs dropped too (the same mask in both: the curvature scales by its
    square). The same states at zero give another diagonal: the carried states are used."""
    key = jax.random.key(12) if dropout else None
    cell = recurrent.make_cell(kind, 3)
    model = recurrent.sequence_model([cell], 1)
    shapes = jax.eval_shape(lambda key: model.init(key, (-1, 1, 2))[1], jax.random.key(0))
    params = random_like(np.random.default_rng(8), shapes, jnp.float64, 0.5)
    x = jax.random.normal(jax.random.key(9), (4, 1, 2), jnp.float64)
    carries0 = (jax.tree.map(lambda c: jax.random.normal(jax.random.key(10), c.shape,
                                                         jnp.float64),
                             cell.initial_carry(4, jnp.float64)),)
    d2y = jax.random.uniform(jax.random.key(11), (4, 1, 1), jnp.float64)

    @jax.jit  # one program for the given states, one for None (the zero states)
    def curvature(carries0):
        _, _, residuals = recurrent.stack_forward([cell], params, x, carries0, dropout=dropout,
                                                  key=key)
        return recurrent.stack_backward([cell], params, residuals, d2y, curvature=True)[0]

    @jax.jit  # one program
    def gauss_newton(params):
        jacobian = jax.jacobian(lambda p: recurrent.stack_forward(
            [cell], p, x, carries0, dropout=dropout, key=key)[0])(params)
        return jax.tree.map(lambda j: jnp.tensordot(d2y, j**2, axes=3), jacobian)

    exact = gauss_newton(params)
    assert_close_tree(curvature(carries0), exact, jnp.float64, f"{kind} stack curvature")
    zero_state = curvature(None)
    assert relative_error(zero_state[0]["w"], exact[0]["w"]) > 1e-3


def test_stack_curvature_from_zero_states_is_the_sequence_models():
    """From zero states, stack_backward(curvature=True) of an LSTM-over-GRU stack is
    engines.curvature_diagonal of the same sequence_model (float64, 5 steps, softmax
    cross-entropy per step)."""
    from nets import engines

    cells = (recurrent.make_cell("lstm", 4), recurrent.make_cell("gru", 3))
    model = recurrent.sequence_model(cells, 5)
    objective = nets.Objective(recurrent.sequence_cross_entropy(), 0.0)
    shapes = jax.eval_shape(lambda key: model.init(key, (-1, 5, 2))[1], jax.random.key(0))
    params = random_like(np.random.default_rng(12), shapes, jnp.float64, 0.5)
    x = jax.random.normal(jax.random.key(13), (3, 5, 2), jnp.float64)
    y = jax.random.randint(jax.random.key(14), (3, 5), 0, 5)

    @jax.jit  # one program
    def both(params, x, y):
        outputs, _, residuals = recurrent.stack_forward(cells, params, x)
        stacked = recurrent.stack_backward(cells, params, residuals,
                                           objective.loss.curvature(outputs, y),
                                           curvature=True)[0]
        return stacked, engines.curvature_diagonal(model, objective)(params, x, y)

    stacked, diagonal = both(params, x, y)
    assert_close_tree(stacked, diagonal, jnp.float64, "stack vs model")
    assert all(float(jnp.min(leaf)) >= 0 for leaf in jax.tree.leaves(stacked))


def test_bad_options_and_shapes_are_refused_by_name():
    cell = recurrent.lstm(3)
    params = cell.init(jax.random.key(0), 2)
    xs = jnp.zeros((4, 5, 2))
    refused = [
        (lambda: recurrent.lstm(0), r"lstm: hidden_size must be >= 1, got 0"),
        (lambda: recurrent.elman(3, "relu"), r"elman: activation 'relu'; choose one of "
                                             r"\['sigmoid', 'tanh'\]"),
        (lambda: recurrent.make_cell("rnn", 3), r"make_cell: unknown cell 'rnn'; choose one of"),
        (lambda: recurrent.scan_cell(cell, params, xs, mask=jnp.ones((4, 6))),
         r"scan_cell\(lstm\): mask has shape \(4, 6\), expected \(batch, time\) = \(4, 5\)"),
        (lambda: recurrent.scan_cell(cell, params, xs, truncation=0),
         r"scan_cell\(lstm\): truncation must be >= 1 \(or None\), got 0"),
        (lambda: recurrent.scan_cell(cell, params, xs[0]),
         r"scan_cell\(lstm\): input x has shape \(5, 2\), expected \(batch, time, features\)"),
        (lambda: recurrent.bptt(cell, params, None, jnp.zeros((4, 5, 3)), truncation=-2),
         r"bptt\(lstm\): truncation must be >= 1 \(or None\), got -2"),
        (lambda: recurrent.bptt(cell._replace(step_curvature=None), params, None,
                                jnp.zeros((4, 5, 3)), curvature=True),
         r"bptt\(lstm\): this cell has no step curvature"),
        (lambda: recurrent.scan_cell(cell, params, xs, recompute_every=0),
         r"scan_cell\(lstm\): recompute_every must be a whole number >= 1 \(or None\), got 0"),
        (lambda: recurrent.rnn(cell, recompute_every=2.5),
         r"lstm: recompute_every must be a whole number >= 1 \(or None\), got 2.5"),
        (lambda: recurrent.rnn(cell).init(jax.random.key(0), (4, 2)),
         r"lstm: input_shape \(4, 2\) must be \(batch, time, features\)"),
        (lambda: recurrent.LastStep().init(None, (4, 2)),
         r"LastStep: input_shape \(4, 2\) must be \(batch, time, features\)"),
        (lambda: recurrent.TimeDistributed(nets.Dense(2)).init(None, (4, 2)),
         r"TimeDistributed\(.*\): input_shape \(4, 2\) must be \(batch, time, features\)"),
        (lambda: recurrent.sequence_cross_entropy().value(jnp.zeros((4, 5, 3)),
                                                          jnp.zeros((4, 6), jnp.int32)),
         r"sequence_cross_entropy: outputs have shape \(4, 5, 3\) and targets \(4, 6\); "
         r"expected \(batch, time, classes\) and \(batch, time\)"),
    ]
    for call, message in refused:
        with pytest.raises(ValueError, match=message):
            call()


def test_carries_gradients_masks_and_targets_of_the_wrong_kind_are_refused_by_name():
    """What would otherwise be broadcast or silently read another way: a carry0 of another
    batch (the GRUs broadcast it to the larger batch) or dtype, dys of another shape, a mask
    of 0.5, float or out-of-range targets (the loss picked class -1 as the last one while its
    gradient one-hot had none)."""
    gru = recurrent.gru(3)
    params = gru.init(jax.random.key(0), 2)
    xs = jnp.zeros((1, 4, 2), jnp.float32)
    _, _, residuals = recurrent.scan_cell(gru, params, xs)
    loss = recurrent.sequence_cross_entropy()
    refused = [
        (lambda: recurrent.scan_cell(gru, params, xs, jnp.zeros((5, 3), jnp.float32)),
         r"scan_cell\(gru\): carry0 is \(5, 3\) float32, expected \(1, 3\) float32"),
        (lambda: recurrent.scan_cell(gru, params, xs, jnp.zeros((1, 3), jnp.float16)),
         r"scan_cell\(gru\): carry0 is \(1, 3\) float16, expected \(1, 3\) float32"),
        (lambda: recurrent.scan_cell(recurrent.lstm(3), recurrent.lstm(3).init(
            jax.random.key(0), 2), xs, jnp.zeros((1, 3), jnp.float32)),
         r"scan_cell\(lstm\): carry0 is .*, expected \('\(1, 3\) float32', '\(1, 3\) "
         r"float32'\)"),
        (lambda: recurrent.scan_cell(gru, params, xs, mask=jnp.full((1, 4), 0.5)),
         r"scan_cell\(gru\): mask holds values \[0.5\]..., expected booleans or 0 and 1"),
        (lambda: recurrent.bptt(gru, params, residuals, jnp.zeros((1, 4, 1), jnp.float32)),
         r"bptt\(gru\): dys has shape \(1, 4, 1\), expected \(batch, time, hidden\) = "
         r"\(1, 4, 3\)"),
        (lambda: recurrent.bptt(gru, params, residuals, jnp.zeros((1, 4, 3), jnp.float32),
                                jnp.zeros((2, 3), jnp.float32)),
         r"bptt\(gru\): dcarry_T is \(2, 3\) float32, expected \(1, 3\) float32"),
        (lambda: loss.value(jnp.zeros((1, 2, 4)), jnp.array([[1.0, 2.7]])),
         r"sequence_cross_entropy: targets have dtype float64, expected integer class ids"),
        (lambda: loss.grad(jnp.zeros((1, 2, 4)), jnp.array([[1, -1]])),
         r"sequence_cross_entropy: targets range over \[-1, 1\], expected class ids in "
         r"\[0, 3\]"),
        (lambda: loss.value(jnp.zeros((1, 2, 4)), jnp.array([[1, 4]])),
         r"sequence_cross_entropy: targets range over \[1, 4\]"),
    ]
    for call, message in refused:
        with pytest.raises(ValueError, match=message):
            call()
    assert recurrent.scan_cell(gru, params, xs, mask=jnp.array([[1, 1, 0, 0]]))[0].shape == (
        1, 4, 3)


def test_out_of_range_targets_under_jit_pick_nothing_in_value_and_gradient_alike():
    """Inside jit the targets' values are unknown: a class outside [0, classes) then
    contributes nothing to E, and the gradient and the curvature are still E's first and
    second derivatives (jax.grad, the diagonal of jax.hessian)."""
    loss = recurrent.sequence_cross_entropy()
    logits = jax.random.normal(jax.random.key(1), (2, 2, 4), jnp.float64)
    targets = jnp.array([[1, -1], [4, 0]])
    value = jax.jit(loss.value)(logits, targets)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    assert float(value) == pytest.approx(-float(log_p[0, 0, 1] + log_p[1, 1, 0]) / 4, rel=1e-14)
    assert_close_tree(jax.jit(loss.grad)(logits, targets),
                      jax.grad(jax.jit(loss.value))(logits, targets), "float64", "gradient")
    hessian = jax.jit(jax.hessian(loss.value))(logits, targets).reshape(16, 16)
    assert_close_tree(jax.jit(loss.curvature)(logits, targets).reshape(16), jnp.diag(hessian),
                      "float64", "curvature")


def test_stacks_refuse_params_carries_and_residuals_of_other_lengths():
    """zip would have run the first cells only (the outputs 0.19 off) or handed the output
    layer's gradient to the wrong cell."""
    cells = (recurrent.lstm(3), recurrent.lstm(3))
    model = recurrent.sequence_model(cells, 2)
    _, params = model.init(jax.random.key(0), (-1, 4, 2))
    xs = jax.random.normal(jax.random.key(1), (2, 4, 2), jnp.float32)
    carries = tuple(cell.initial_carry(2, jnp.float32) for cell in cells)
    outputs, carries_T, residuals = recurrent.stack_forward(cells, params, xs, carries)
    refused = [
        (lambda: recurrent.stack_forward(cells, params, xs, carries[:1]),
         r"stack_forward: carries0 has 1 entries, expected one per cell, 2"),
        (lambda: recurrent.stack_forward(cells[:1], params, xs),
         r"stack_forward: 1 cells and 3 params entries, expected 2 \(one per cell, then the "
         r"output layer's\)"),
        (lambda: recurrent.stack_backward(cells, params, residuals, outputs, carries[:1]),
         r"stack_backward: dcarries_T has 1 entries, expected one per cell, 2"),
        (lambda: recurrent.stack_backward(cells[:1], params[1:], residuals, outputs),
         r"stack_backward: residuals has 2 entries, expected one per cell, 1"),
    ]
    for call, message in refused:
        with pytest.raises(ValueError, match=message):
            call()


# --- the PyTorch layout -------------------------------------------------------------------------

def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def pytorch_equations(module, state, xs):
    """The one-layer torch.nn.RNN (tanh), LSTM and GRU as PyTorch's documentation writes them,
    in NumPy, from a state dict: ys (batch, time, hidden), from the zero state."""
    w_ih, w_hh = state["weight_ih_l0"], state["weight_hh_l0"]
    b_ih, b_hh = state["bias_ih_l0"], state["bias_hh_l0"]
    hidden = w_hh.shape[1]
    h = np.zeros((xs.shape[0], hidden))
    c = np.zeros_like(h)
    ys = []
    for x in np.moveaxis(xs, 1, 0):
        gi, gh = x @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        if module == "RNN":
            h = np.tanh(gi + gh)
        elif module == "LSTM":
            i, f, g, o = np.split(gi + gh, 4, axis=1)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
        else:  # GRU: n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
            (i_r, i_z, i_n), (h_r, h_z, h_n) = np.split(gi, 3, axis=1), np.split(gh, 3, axis=1)
            r, z = _sigmoid(i_r + h_r), _sigmoid(i_z + h_z)
            n = np.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
        ys.append(h)
    return np.stack(ys, axis=1)


@pytest.mark.parametrize("kind", ["elman_tanh", "lstm", "gru_reset_after"])
def test_to_pytorch_gives_pytorchs_equations_our_outputs_and_gradients(kind):
    """Our params in PyTorch's layout, run through PyTorch's documented equations (NumPy,
    float64): the same ys as scan_cell (<= 1e-10), and `pytorch_gradients` of our BPTT equal to
    central finite differences of those equations in every state-dict entry (<= 1e-6, the
    float64 finite-difference tolerance of nets.gradcheck), so the map is right both ways."""
    rng = np.random.default_rng(7)
    cell = recurrent.make_cell(kind, 3)
    params = random_params(cell, 2, rng, jnp.float64)
    xs = random_like(rng, jnp.zeros((2, 4, 2)), jnp.float64)
    read = np.asarray(random_like(rng, jnp.zeros((2, 4, 3)), jnp.float64))
    state = recurrent.to_pytorch(cell, params)
    assert cell.pytorch_module in ("RNN", "LSTM", "GRU")
    ys, _, residuals = recurrent.scan_cell(cell, params, xs)
    assert relative_error(ys, pytorch_equations(cell.pytorch_module, state, np.asarray(xs))) \
        <= 1e-10
    grads = recurrent.bptt(cell, params, residuals, jnp.asarray(read))[0]
    theirs = recurrent.pytorch_gradients(cell, grads)
    assert sorted(theirs) == sorted(state)

    def energy(entries):
        return float(np.sum(pytorch_equations(cell.pytorch_module, entries, np.asarray(xs))
                            * read))

    step = 1e-6
    for key, array in state.items():
        differences = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            plus, minus = {**state, key: array.copy()}, {**state, key: array.copy()}
            plus[key][index] += step
            minus[key][index] -= step
            differences[index] = (energy(plus) - energy(minus)) / (2 * step)
        assert relative_error(theirs[key], differences) <= 1e-6, key


@pytest.mark.parametrize("kind", ["elman_tanh", "lstm", "gru_reset_after"])
def test_from_pytorch_computes_what_pytorch_does_with_any_state_dict(kind):
    """A random state dict (both biases nonzero in every block) through PyTorch's documented
    equations (NumPy, float64) gives the ys of scan_cell with `from_pytorch`'s params
    (<= 1e-10), and to_pytorch(from_pytorch(...)) then computes the same."""
    rng = np.random.default_rng(11)
    cell = recurrent.make_cell(kind, 3)
    sums = {"RNN": 1, "LSTM": 4, "GRU": 3}[cell.pytorch_module] * 3
    state = {"weight_ih_l0": rng.standard_normal((sums, 2)),
             "weight_hh_l0": rng.standard_normal((sums, 3)),
             "bias_ih_l0": rng.standard_normal(sums), "bias_hh_l0": rng.standard_normal(sums)}
    xs = rng.standard_normal((2, 5, 2))
    expected = pytorch_equations(cell.pytorch_module, state, xs)
    params = recurrent.from_pytorch(cell, state)
    assert relative_error(recurrent.scan_cell(cell, params, jnp.asarray(xs))[0], expected) \
        <= 1e-10
    again = recurrent.to_pytorch(cell, params)
    assert relative_error(pytorch_equations(cell.pytorch_module, again, xs), expected) <= 1e-10
    assert_close_tree(recurrent.from_pytorch(cell, again), params, jnp.float64, kind)


def test_from_pytorch_refuses_a_state_dict_of_other_entries_or_shapes():
    cell = recurrent.make_cell("lstm", 3)
    state = recurrent.to_pytorch(cell, cell.init(jax.random.key(0), 2))
    projected = {**state, "weight_hr_l0": np.zeros((2, 3))}  # nn.LSTM(proj_size=2)
    with pytest.raises(ValueError, match=r"from_pytorch\(lstm\): .*\['weight_hr_l0'\] "
                                         r"are of no such module"):
        recurrent.from_pytorch(cell, projected)
    with pytest.raises(ValueError, match=r"layer 1, forward direction, of nn.LSTM with biases "
                                         r"needs \['weight_ih_l1'"):
        recurrent.from_pytorch(cell, state, layer=1)
    with pytest.raises(ValueError, match=r"layer 0, backward direction, of nn.LSTM with "
                                         r"biases needs \['weight_ih_l0_reverse'"):
        recurrent.from_pytorch(cell, state, reverse=True)
    with pytest.raises(ValueError, match=r"from_pytorch\(lstm\): shapes .* weight_hh "
                                         r"\(12, 3\)"):
        recurrent.from_pytorch(cell, {**state, "weight_hh_l0": np.zeros((9, 3))})


def test_a_two_layer_pytorch_module_loads_as_a_stack_one_layer_at_a_time():
    """nn.LSTM(num_layers=2) as PyTorch documents it (layer 1 reads layer 0's h): the state
    dict of both layers, read by from_pytorch(layer=0) and (layer=1), gives the two scanned
    cells' outputs (<= 1e-10), and to_pytorch(..., layer=k) gives the entries back."""
    rng = np.random.default_rng(3)
    cells = [recurrent.make_cell("lstm", 4), recurrent.make_cell("lstm", 4)]
    state = {}
    for layer, inputs in enumerate((2, 4)):
        state.update({f"weight_ih_l{layer}": rng.standard_normal((16, inputs)),
                      f"weight_hh_l{layer}": rng.standard_normal((16, 4)),
                      f"bias_ih_l{layer}": rng.standard_normal(16),
                      f"bias_hh_l{layer}": rng.standard_normal(16)})
    xs = rng.standard_normal((2, 5, 2))
    expected = xs
    for layer in (0, 1):
        entries = {name.replace(f"_l{layer}", "_l0"): value for name, value in state.items()
                   if name.endswith(f"_l{layer}")}
        expected = pytorch_equations("LSTM", entries, expected)
    hs = jnp.asarray(xs)
    for layer, cell in enumerate(cells):
        params = recurrent.from_pytorch(cell, state, layer=layer)
        hs = recurrent.scan_cell(cell, params, hs)[0]
        assert sorted(recurrent.to_pytorch(cell, params, layer)) == sorted(
            name for name in state if name.endswith(f"_l{layer}"))
    assert relative_error(hs, expected) <= 1e-10


@pytest.mark.parametrize("kind", ["elman_sigmoid", "lstm_peephole", "gru"])
def test_cells_without_a_pytorch_module_are_refused_by_name(kind):
    cell = recurrent.make_cell(kind, 3)
    params = cell.init(jax.random.key(0), 2)
    for convert in (recurrent.to_pytorch, recurrent.pytorch_gradients):
        with pytest.raises(ValueError, match=f"{convert.__name__}\\({kind}\\): no torch.nn"):
            convert(cell, params)
    with pytest.raises(ValueError, match=f"from_pytorch\\({kind}\\): no torch.nn"):
        recurrent.from_pytorch(cell, {})


def test_a_reversed_rnn_and_a_bidirectional_layer_match_jax_grad_and_flip_time():
    """rnn(reverse=True) is the cell run from the last step: its output at t is the plain
    layer's on the flipped sequence, flipped (exactly). A bidirectional LSTM / reset-after GRU
    read at its last step: manual vs jax.grad and finite differences on every parameter
    (float64), vs jax.grad in float32; and its curvature is the parallel layer's."""
    rng = np.random.default_rng(5)
    cell = recurrent.make_cell("gru_reset_after", 3)
    params = random_params(cell, 2, rng, jnp.float64)
    x = random_like(rng, jnp.zeros((2, 6, 2)), jnp.float64)
    backwards = recurrent.rnn(cell, reverse=True)
    expected = jnp.flip(recurrent.rnn(cell).apply(params, jnp.flip(x, 1)), 1)
    assert jnp.array_equal(backwards.apply(params, x), expected)
    assert not jnp.allclose(backwards.apply(params, x), recurrent.rnn(cell).apply(params, x))

    model = nets.serial(recurrent.bidirectional(recurrent.lstm(4), recurrent.gru_reset_after(3)),
                        recurrent.LastStep(), nets.Dense(2))
    shapes = jax.eval_shape(lambda key: model.init(key, (-1, 6, 2))[1], jax.random.key(0))
    both = recurrent.bidirectional(recurrent.lstm(4), recurrent.gru_reset_after(3))
    assert both.init(jax.random.key(0), (-1, 6, 2))[0] == (-1, 6, 4 + 3)
    params = random_like(rng, shapes, jnp.float64, 0.5)
    targets = random_like(rng, jnp.zeros((2, 2)), jnp.float64)
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    for dtype in ("float64", "float32"):
        rows = gradient_report(model, objective, params, x, targets, dtype=dtype,
                               max_fd_coordinates=20)
        assert {row["layer"] for row in rows} == {"lstm_fw", "gru_reset_after_bw", "Dense"}
        assert all(row["passed"] for row in rows), rows
    assert model.curvature is not None


def test_a_bidirectional_pytorch_module_loads_direction_by_direction():
    """nn.GRU(bidirectional=True) as PyTorch documents it (outputs [h_fw_t, h_bw_t], the
    backward direction run from the last step with the _reverse entries): `bidirectional`
    with from_pytorch(reverse=False) and (reverse=True) gives its outputs (<= 1e-10), and
    to_pytorch(..., reverse=True) names the entries back."""
    rng = np.random.default_rng(9)
    state = {}
    for suffix in ("_l0", "_l0_reverse"):
        state.update({f"weight_ih{suffix}": rng.standard_normal((12, 2)),
                      f"weight_hh{suffix}": rng.standard_normal((12, 4)),
                      f"bias_ih{suffix}": rng.standard_normal(12),
                      f"bias_hh{suffix}": rng.standard_normal(12)})
    xs = rng.standard_normal((3, 5, 2))
    forward = pytorch_equations("GRU", state, xs)
    reverse_state = {name.replace("_reverse", ""): value for name, value in state.items()
                     if name.endswith("_reverse")}
    backward = np.flip(pytorch_equations("GRU", reverse_state, np.flip(xs, 1)), 1)
    cell = recurrent.make_cell("gru_reset_after", 4)
    params = (recurrent.from_pytorch(cell, state), recurrent.from_pytorch(cell, state,
                                                                          reverse=True))
    layer = recurrent.bidirectional(cell, cell)
    ys = layer.apply(params, jnp.asarray(xs))
    assert relative_error(ys, np.concatenate([forward, backward], axis=-1)) <= 1e-10
    assert sorted(recurrent.to_pytorch(cell, params[1], reverse=True)) == sorted(
        name for name in state if name.endswith("_reverse"))


def test_a_bidirectional_sequence_model_reads_each_directions_final_state():
    """sequence_model(bidirectional=True, last_step=True), two layers (LSTM, reset-after GRU):
    its output is the projection of [the top forward direction's last output, the top backward
    direction's first], recomputed here from scan_cell on x and on flipped x; its gradient
    against jax.grad (float64, float32) and finite differences."""
    rng = np.random.default_rng(3)
    cells = [recurrent.lstm(4), recurrent.gru_reset_after(3)]
    model = recurrent.sequence_model(cells, 2, last_step=True, bidirectional=True)
    out_shape, shapes = model.init(jax.random.key(0), (-1, 6, 5))
    assert tuple(out_shape) == (-1, 2)
    params = random_like(rng, shapes, jnp.float64, 0.5)
    x = random_like(rng, jnp.zeros((3, 6, 5)), jnp.float64)

    def direction(cell, cell_params, xs, reverse):
        in_order = (lambda s: jnp.flip(s, axis=1)) if reverse else (lambda s: s)
        return in_order(recurrent.scan_cell(cell, cell_params, in_order(xs))[0])

    @jax.jit  # one program
    def by_the_directions(params, x):
        hs = x
        for cell, (forward_params, backward_params) in zip(cells, params[:2]):
            hs = jnp.concatenate([direction(cell, forward_params, hs, False),
                                  direction(cell, backward_params, hs, True)], axis=2)
        final = jnp.concatenate([hs[:, -1, :3], hs[:, 0, 3:]], axis=1)
        return hs, final @ params[-1]["w"] + params[-1]["b"][None, :]

    hs, expected = by_the_directions(params, x)
    assert hs.shape == (3, 6, 6)
    assert relative_error(jax.jit(model.forward)(params, x)[0], expected) <= 1e-14

    targets = random_like(rng, jnp.zeros((3, 2)), jnp.float64)
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    rows = gradient_report(model, objective, params, x, targets, max_fd_coordinates=16)
    assert {row["layer"] for row in rows} == {"lstm_0_fw", "lstm_0_bw", "gru_reset_after_1_fw",
                                              "gru_reset_after_1_bw", "output"}
    assert all(row["passed"] for row in rows), rows
    # per step, without last_step: every output step reads both directions
    per_step = recurrent.sequence_model(cells, 2, bidirectional=True)
    rows = gradient_report(per_step, nets.Objective(recurrent.sequence_cross_entropy(), 0.0),
                           params[:2] + params[3:], x, jnp.asarray(rng.integers(0, 2, (3, 6))),
                           max_fd_coordinates=8)
    assert all(row["passed"] for row in rows), rows


@pytest.mark.parametrize("time", [1, 4])
def test_final_states_backward_and_curvature_match_jax(time):
    """FinalStates' backward against jax.vjp of its forward, and its curvature (a Jacobian of
    ones and zeros: the same map on d2y); with one step both halves come from it."""
    layer = recurrent.FinalStates(2)
    x = jax.random.normal(jax.random.key(0), (3, time, 5), jnp.float64)
    y, residuals = layer.forward((), x)
    np.testing.assert_array_equal(y[:, :2], x[:, -1, :2])
    np.testing.assert_array_equal(y[:, 2:], x[:, 0, 2:])
    dy = jax.random.normal(jax.random.key(1), y.shape, jnp.float64)
    expected = jax.vjp(lambda x: layer.forward((), x)[0], x)[1](dy)[0]
    np.testing.assert_array_equal(layer.backward((), residuals, dy)[1], expected)
    np.testing.assert_array_equal(layer.curvature((), residuals, dy)[1], expected)


def test_final_states_refuses_a_split_outside_the_features():
    with pytest.raises(ValueError, match=r"FinalStates: forward_features must be in \[1, 3\]"):
        recurrent.FinalStates(4).init(jax.random.key(0), (-1, 5, 4))
    with pytest.raises(ValueError, match="forward_features must be in"):
        recurrent.FinalStates(0).forward((), jnp.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="must be \\(batch, time, features\\)"):
        recurrent.FinalStates(2).init(jax.random.key(0), (-1, 4))


def test_a_stacked_bidirectional_pytorch_module_loads_as_a_sequence_model():
    """nn.LSTM(num_layers=2, bidirectional=True) as PyTorch documents it (each layer's input
    the concatenated directions of the one below) in NumPy: `stack_from_pytorch` gives the
    params of sequence_model(bidirectional=True) whose top layer outputs match (<= 1e-10; read
    through an identity projection), and `stack_to_pytorch` names every entry back."""
    rng = np.random.default_rng(11)
    hidden, inputs = 3, 2
    state = {}
    for layer, fan_in in ((0, inputs), (1, 2 * hidden)):
        for suffix in (f"_l{layer}", f"_l{layer}_reverse"):
            state.update({f"weight_ih{suffix}": rng.standard_normal((4 * hidden, fan_in)),
                          f"weight_hh{suffix}": rng.standard_normal((4 * hidden, hidden)),
                          f"bias_ih{suffix}": rng.standard_normal(4 * hidden),
                          f"bias_hh{suffix}": rng.standard_normal(4 * hidden)})
    xs = rng.standard_normal((2, 5, inputs))
    hs = xs
    for layer in (0, 1):
        def entries(suffix, layer=layer):
            return {name.replace(suffix, "_l0"): value for name, value in state.items()
                    if name.endswith(suffix)}

        forward = pytorch_equations("LSTM", entries(f"_l{layer}"), hs)
        backward = np.flip(pytorch_equations("LSTM", entries(f"_l{layer}_reverse"),
                                             np.flip(hs, 1)), 1)
        hs = np.concatenate([forward, backward], axis=-1)

    cells = [recurrent.lstm(hidden), recurrent.lstm(hidden)]
    params = recurrent.stack_from_pytorch(cells, state, bidirectional=True)
    model = recurrent.sequence_model(cells, 2 * hidden, bidirectional=True)
    identity = {"w": jnp.eye(2 * hidden), "b": jnp.zeros(2 * hidden)}
    ys = model.apply((*params, identity), jnp.asarray(xs))
    assert relative_error(ys, hs) <= 1e-10
    exported = recurrent.stack_to_pytorch(cells, params, bidirectional=True)
    assert sorted(exported) == sorted(state)
    assert_close_tree(recurrent.stack_from_pytorch(cells, exported, bidirectional=True), params,
                      "float64", "round trip")


def test_stack_conversions_refuse_what_one_pytorch_module_cannot_hold():
    rng = np.random.default_rng(12)
    lstm, gru = recurrent.lstm(3), recurrent.gru_reset_after(3)
    with pytest.raises(ValueError, match="one kind and one hidden_size"):
        recurrent.stack_to_pytorch([lstm, gru], ())
    with pytest.raises(ValueError, match="one kind and one hidden_size"):
        recurrent.stack_from_pytorch([lstm, recurrent.lstm(4)], {})
    params = (random_params(lstm, 2, rng, jnp.float64), random_params(lstm, 3, rng, jnp.float64))
    state = recurrent.stack_to_pytorch([lstm, lstm], params)
    assert sorted({name.rsplit("_", 1)[-1] for name in state}) == ["l0", "l1"]
    with pytest.raises(ValueError, match=r"entries \['bias_hh_l1', .*of no layer of 1 layers"):
        recurrent.stack_from_pytorch([lstm], state)
    with pytest.raises(ValueError, match="backward direction"):  # no _reverse entries
        recurrent.stack_from_pytorch([lstm, lstm], state, bidirectional=True)
    with pytest.raises(ValueError, match="2 cells and 1 layers of params"):
        recurrent.stack_to_pytorch([lstm, lstm], params[:1])


def test_a_sequence_whose_dtype_is_not_the_params_is_refused_by_name():
    """float64 inputs into float32 params would fail inside bptt's scan (its carried gradient
    changes dtype); the forward refuses them first, naming the cell and both dtypes."""
    model = recurrent.sequence_model([recurrent.lstm(3)], 2, last_step=True)
    params = model.init(jax.random.key(0), (-1, 4, 2))[1]
    x = jnp.zeros((1, 4, 2), jnp.float64)
    with pytest.raises(ValueError, match=r"scan_cell\(lstm\): input x has dtype float64 and "
                                         r"the params \['float32'\]; cast them to one dtype"):
        nets.manual(model, nets.Objective(nets.mean_squared_error(), 0.0))(
            params, x, jnp.zeros((1, 2), jnp.float64))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_sequence_model_without_cells_is_refused_by_name(bidirectional):
    with pytest.raises(ValueError, match="classifier: cells is empty"):
        recurrent.sequence_model([], 3, last_step=True, bidirectional=bidirectional,
                                 name="classifier")


def test_scan_bidirectional_reads_each_padded_sequence_over_its_own_length():
    """Right-padded sequences of lengths 6, 3, 1 under a mask: each sequence's outputs and
    final states (forward at its last real step, backward at its first) equal both directions
    run on that sequence alone, unpadded; padding outputs zeros. bptt_bidirectional against
    jax.grad of the same scans (float64), the padding getting no gradient."""
    rng = np.random.default_rng(21)
    forward_cell, backward_cell = recurrent.lstm(3), recurrent.gru_reset_after(2)
    params = (random_params(forward_cell, 4, rng, jnp.float64),
              random_params(backward_cell, 4, rng, jnp.float64))
    lengths = [6, 3, 1]
    xs = random_like(rng, jnp.zeros((3, 6, 4)), jnp.float64)
    mask = lengths_mask(lengths, 6)

    def scan(params, xs, recompute_every=None):
        return recurrent.scan_bidirectional(forward_cell, backward_cell, params, xs, mask,
                                            recompute_every=recompute_every)

    @jax.jit  # one program for each length
    def both_directions_alone(params, alone):
        forward, forward_T, _ = recurrent.scan_cell(forward_cell, params[0], alone)
        backward, backward_T, _ = recurrent.scan_cell(backward_cell, params[1],
                                                      jnp.flip(alone, axis=1))
        return forward, forward_T, backward, backward_T

    ys, carries, residuals = jax.jit(scan)(params, xs)
    assert ys.shape == (3, 6, 5)
    for i, length in enumerate(lengths):
        alone = xs[i:i + 1, :length]
        forward, forward_T, backward, backward_T = both_directions_alone(params, alone)
        expected = jnp.concatenate([forward, jnp.flip(backward, axis=1)], axis=2)[0]
        assert relative_error(ys[i, :length], expected) <= 1e-14
        assert np.all(np.asarray(ys[i, length:]) == 0)
        assert_close_tree(jax.tree.map(lambda c, i=i: c[i:i + 1], carries),
                          (forward_T, backward_T), "float64", f"final states of {i}")

    read = random_like(rng, ys, jnp.float64)
    read_carries = random_like(rng, carries, jnp.float64)

    def energy(params, xs):
        ys, carries, _ = recurrent.scan_bidirectional(forward_cell, backward_cell, params, xs,
                                                      mask)
        products = jax.tree.map(lambda c, r: jnp.sum(c * r), carries, read_carries)
        return jnp.sum(ys * read) + sum(jax.tree.leaves(products))

    @jax.jit  # one program
    def gradients(params, xs, residuals):
        manual = recurrent.bptt_bidirectional(forward_cell, backward_cell, params, residuals,
                                              read, read_carries)
        _, _, kept = scan(params, xs, recompute_every=4)
        recomputed = recurrent.bptt_bidirectional(forward_cell, backward_cell, params, kept,
                                                  read, read_carries)
        return jax.grad(energy, argnums=(0, 1))(params, xs), manual, recomputed

    expected, manual, recomputed = gradients(params, xs, residuals)
    assert_close_tree(manual, expected, "float64", "bptt_bidirectional")
    assert np.all(np.asarray(manual[1][2, 1:]) == 0)  # the one-step sequence's padding
    assert_close_tree(recomputed, expected, "float64", "bptt_bidirectional, recompute_every=4")


def test_stack_dropout_backward_matches_jax_grad_with_the_same_key():
    """stack_forward(dropout=0.5, key): each cell's outputs dropped by a mask of its own (the
    outputs differ from the run without a key, and the masks of the two cells differ), and
    stack_backward's dparams, dxs and dcarries0 equal jax.grad's of the same forward with
    the same key (float64). A key with dropout 0 is refused; from the zero states the key
    gives the masks of sequence_model(dropout=) (the same outputs exactly)."""
    cells = (recurrent.lstm(4), recurrent.gru(4))
    _, _, params, xs, carries0, read_out = stack_problem(5, cells, 3, (3, 5, 2))
    key = jax.random.key(6)

    def energy(params, xs, carries0):
        outputs, _, _ = recurrent.stack_forward(cells, params, xs, carries0, dropout=0.5,
                                                key=key)
        return jnp.sum(outputs * read_out)

    @jax.jit  # one program
    def everything(params, xs, carries0):
        outputs, _, residuals = recurrent.stack_forward(cells, params, xs, carries0,
                                                        dropout=0.5, key=key)
        inference = recurrent.stack_forward(cells, params, xs, carries0, dropout=0.5)[0]
        manual = recurrent.stack_backward(cells, params, residuals, read_out)
        expected = jax.grad(energy, argnums=(0, 1, 2))(params, xs, carries0)
        return outputs, residuals[1], inference, manual, expected

    outputs, scales, inference, manual, expected = everything(params, xs, carries0)
    assert all(0 < int(jnp.sum(s == 0)) < s.size for s in scales)
    assert not np.array_equal(np.asarray(scales[0]), np.asarray(scales[1]))
    assert float(jnp.max(jnp.abs(outputs - inference))) > 1e-3
    assert_close_tree(manual, expected, "float64", "stack dropout")
    with pytest.raises(ValueError, match="a key was given, but dropout is 0"):
        recurrent.stack_forward(cells, params, xs, key=key)
    # from the zero states, the same key gives sequence_model(dropout=)'s masks
    dropped = recurrent.sequence_model(cells, 3, dropout=0.5)
    np.testing.assert_array_equal(
        np.asarray(recurrent.stack_forward(cells, params, xs, dropout=0.5, key=key)[0]),
        np.asarray(dropped.apply(params, xs, key)))


def test_a_sequence_model_with_dropout_has_the_same_params_and_the_engines_agree():
    """sequence_model(dropout=0.3): the params of the model without dropout (the same values
    from the same init key, so a checkpoint or stack_to_pytorch reads either); without a key
    it is that model; with a key the manual gradient equals jax.grad's with the same masks
    (float64), and E differs from E at inference."""
    cells = [recurrent.make_cell("lstm", 4), recurrent.make_cell("elman_tanh", 3)]
    plain = recurrent.sequence_model(cells, 2, last_step=True)
    dropped = recurrent.sequence_model(cells, 2, last_step=True, dropout=0.3)
    assert dropped.stochastic and not plain.stochastic
    _, params = dropped.init(jax.random.key(0), (-1, 5, 2))
    assert_close_tree(params, plain.init(jax.random.key(0), (-1, 5, 2))[1], jnp.float32,
                      "same init")
    params = nets.gradcheck.astype(params, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 5, 2), jnp.float64)
    targets = jax.nn.one_hot(jnp.array([0, 1, 1, 0]), 2, dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(dropped.apply(params, x)),
                                  np.asarray(plain.apply(params, x)))
    objective = nets.Objective(nets.softmax_cross_entropy(), 0.0)
    key = jax.random.key(3)
    value, manual = jax.jit(nets.manual(dropped, objective))(params, x, targets, key)
    reference_value, reference = jax.jit(nets.autodiff(dropped, objective))(
        params, x, targets, key)
    assert relative_error(value, reference_value) <= 1e-10
    assert_close_tree(manual, reference, jnp.float64, "sequence_model dropout")
    inference_value, _ = jax.jit(nets.manual(plain, objective))(params, x, targets)
    assert abs(float(inference_value) - float(value)) > 1e-3


def scanned_for_refusals(cell):
    """A cell of 4 units scanned over a (2, 5, 3) float32 batch: (cell, params, xs, residuals,
    dys of ones), the valid arguments the refusal tests below spoil one at a time."""
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float32)
    _, _, residuals = recurrent.scan_cell(cell, params, xs)
    return cell, params, xs, residuals, jnp.ones((2, 5, 4), jnp.float32)


def test_unroll_counts_that_lax_scan_cannot_take_are_refused_by_name():
    """unroll=2.5 was a TypeError from deep inside the scan ("Shapes must be 1D sequences of
    concrete values of integer type"), unroll="2" a bare comparison TypeError; lax.scan's own
    values (an int >= 0, or a bool) still run."""
    cell, params, xs, residuals, dys = scanned_for_refusals(recurrent.elman(4))
    refused = [
        (lambda: recurrent.scan_cell(cell, params, xs, unroll=2.5), "scan_cell(elman_tanh)",
         "2.5"),
        (lambda: recurrent.bptt(cell, params, residuals, dys, unroll="2"), "bptt(elman_tanh)",
         "'2'"),
        (lambda: recurrent.scan_tangent(cell, params, xs, params, unroll=2.5),
         "scan_tangent(elman_tanh)", "2.5"),
        (lambda: recurrent.scan_backward_tangent(cell, params, xs, params, None, dys, dys,
                                                 unroll=-1),
         "scan_backward_tangent(elman_tanh)", "-1"),
        (lambda: recurrent.rnn(cell, unroll=2.5, name="layer"), "layer", "2.5"),
        (lambda: nets.sequence_model([cell], 2, unroll=2.5), "elman_tanh_0", "2.5"),
    ]
    for call, name, value in refused:
        with pytest.raises(ValueError, match=re.escape(
                f"{name}: unroll must be an int >= 0 (steps per scan iteration) or a bool, got "
                f"{value}")):
            call()
    ys, _, _ = recurrent.scan_cell(cell, params, xs)
    for unroll in (2, True):
        np.testing.assert_allclose(recurrent.scan_cell(cell, params, xs, unroll=unroll)[0], ys,
                                   atol=1e-6)  # float32, fused otherwise


def test_truncations_and_directions_that_would_be_misread_are_refused_by_name():
    """Each was accepted without a word: a truncation of 2.5 steps cut the windows where
    t % 2.5 == 0 (every 5 steps) and True every step; scan_backward_tangent broadcast an
    R{dys} of one example or one unit in its reverse scan; LastStep's and FinalStates'
    tangents read a dx of one example as the batch's dy; FinalStates(1.5) was built. A
    v_xs or an rnn's dy of another batch was a raw concatenate or scan-carry TypeError."""
    cell, params, xs, residuals, dys = scanned_for_refusals(recurrent.lstm(4))
    refused = [
        (lambda: recurrent.scan_cell(cell, params, xs, truncation=2.5),
         r"scan_cell\(lstm\): truncation must be a whole number of steps \(or None\), got 2.5"),
        (lambda: recurrent.scan_cell(cell, params, xs, truncation=True),
         r"scan_cell\(lstm\): truncation must be a whole number of steps \(or None\), got True"),
        (lambda: recurrent.rnn(cell, truncation=2.5, name="layer"),
         r"layer: truncation must be a whole number of steps \(or None\), got 2.5"),
        (lambda: recurrent.bptt(cell, params, residuals, dys, truncation=2.5),
         r"bptt\(lstm\): truncation must be a whole number of steps \(or None\), got 2.5"),
        (lambda: recurrent.scan_backward_tangent(cell, params, xs, params, None, dys,
                                                 dys[:1]),
         r"scan_backward_tangent\(lstm\): r_dys has shape \(1, 5, 4\), expected \(batch, "
         r"time, hidden\) = \(2, 5, 4\)"),
        (lambda: recurrent.scan_backward_tangent(cell, params, xs, params, None, dys,
                                                 dys[..., :1]),
         r"scan_backward_tangent\(lstm\): r_dys has shape \(2, 5, 1\)"),
        (lambda: recurrent.scan_backward_tangent(cell, params, xs, params, xs[:1], dys, dys),
         r"scan_backward_tangent\(lstm\): v_xs is \(1, 5, 3\) float32, expected \(2, 5, 3\) "
         r"float32"),
        (lambda: recurrent.rnn(cell, name="layer").backward_tangent(
            params, xs, params, None, dys[:1], dys[:1]),
         r"layer: dy has shape \(1, 5, 4\), expected the output's \(2, 5, 4\)"),
        (lambda: recurrent.LastStep(name="last").tangent((), xs, (), xs[:1]),
         r"last: dx has shape \(1, 5, 3\), expected x's \(2, 5, 3\)"),
        (lambda: recurrent.FinalStates(1, name="final").tangent((), xs, (), xs[:, :1]),
         r"final: dx has shape \(2, 1, 3\), expected x's \(2, 5, 3\)"),
        (lambda: recurrent.FinalStates(1.5, name="final"),
         r"final: forward_features must be an int, got 1.5"),
        (lambda: recurrent.TimeDistributed(nets.Dense(2), name="steps").tangent(
            {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, xs, {"w": jnp.ones((3, 2)),
                                                            "b": jnp.ones(2)}, xs[:1]),
         r"steps: dx has shape \(1, 5, 3\), expected x's \(2, 5, 3\)"),
    ]
    for call, message in refused:
        with pytest.raises(ValueError, match=message):
            call()


def test_the_sequence_cross_entropys_check_of_a_whole_set_refuses_negative_and_float_ids():
    """Without the outputs the number of classes is unknown, so the check the training
    procedures run on the whole set before compiling refuses what it can: ids below 0 and a
    float dtype; ids above the classes are refused where the outputs are given (above)."""
    import optax

    from training import procedures

    loss = recurrent.sequence_cross_entropy()
    loss.check_targets(jnp.array([[0, 70], [3, 1]]))
    with pytest.raises(ValueError, match=r"^sequence_cross_entropy: targets range over "
                                         r"\[-2, 3\], expected class ids >= 0$"):
        loss.check_targets(jnp.array([[0, -2], [3, 1]]))
    with pytest.raises(ValueError, match="targets have dtype float32, expected integer"):
        loss.check_targets(jnp.zeros((2, 2), jnp.float32))
    model = recurrent.sequence_model([recurrent.elman(3)], 4)
    with pytest.raises(ValueError, match=r"^stochastic_passes: sequence_cross_entropy: "
                                         r"targets range over \[-1, 2\]"):
        procedures.stochastic_passes(model, nets.Objective(loss), optax.sgd(0.1),
                                     jnp.zeros((2, 5, 2)), jnp.array([[0, 1, 2, -1, 0]] * 2),
                                     batch_size=1)
