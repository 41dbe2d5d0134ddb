"""Forward mode through time: every cell's hand-written step tangent run over a sequence by
`scan_tangent`, against `jax.jvp` of `scan_cell` (masks, truncation, a given state and its
direction) and against central differences; the sequence layers' tangents; the Gauss-Newton
product's columns against J^T J from `jax.jacobian`; the refusals. (G v of whole recurrent
models against jax's is among the models of tests/test_gauss_newton.py.)"""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import gradcheck
from nets.engines import gauss_newton_product
from nets.recurrent import CELLS, make_cell, scan_cell, scan_tangent
from tests.helpers import F64, assert_close_tree, assert_tangent_is_jvp, random_like

BATCH, TIME, FEATURES, HIDDEN = 4, 6, 3, 5
# sequence 1 has holes, 2 ends early, 3 starts late: every way a step can be skipped
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]])


def cell_point(kind, dtype, seed=0):
    """A cell, params (peepholes and b_hn random, not their zero init), xs, a carry0 and
    random directions of all three."""
    cell = make_cell(kind, HIDDEN)
    keys = jax.random.split(jax.random.key(seed), 6)
    params = gradcheck.astype(cell.init(keys[0], FEATURES), dtype)
    params = {**params, **{name: jax.random.normal(keys[1], params[name].shape, dtype)
                           for name in ("p", "b_hn") if name in params}}
    xs = jax.random.normal(keys[2], (BATCH, TIME, FEATURES), dtype)
    carry0 = random_like(keys[3], cell.initial_carry(BATCH, dtype), dtype)
    directions = (random_like(keys[4], params, dtype),
                  jax.random.normal(keys[5], xs.shape, dtype), random_like(keys[5], carry0, dtype))
    return cell, params, xs, carry0, directions


@pytest.mark.parametrize("kind", CELLS)
def test_scan_tangent_is_jax_jvp_of_scan_cell(kind, dtype):
    """ys, dys, carry_T and dcarry_T against jax.jvp of scan_cell's (ys, carry_T) in params,
    xs and carry0: plain, with a padding mask, with truncation every 2 steps, and with dxs
    and dcarry0 None against zero directions."""
    cell, params, xs, carry0, (dparams, dxs, dcarry0) = cell_point(kind, dtype)
    options = ({}, {"mask": MASK}, {"truncation": 2})

    @jax.jit
    def everything(params, xs, carry0, dparams, dxs, dcarry0):
        results = []
        for option in options:
            def forward(params, xs, carry0, option=option):
                return scan_cell(cell, params, xs, carry0, **option)[:2]

            results.append((
                scan_tangent(cell, params, xs, dparams, dxs, carry0, dcarry0, **option),
                scan_tangent(cell, params, xs, dparams, None, carry0, None, **option),
                jax.jvp(forward, (params, xs, carry0), (dparams, dxs, dcarry0)),
                jax.jvp(forward, (params, xs, carry0), (dparams, jnp.zeros_like(xs),
                                                        jax.tree.map(jnp.zeros_like, carry0)))))
        return results

    with jax.default_matmul_precision("highest"):
        results = everything(params, xs, carry0, dparams, dxs, dcarry0)
    for option, (got, got_alone, want, want_alone) in zip(options, results):
        ys, dys, carry_T, dcarry_T = got
        (ys_ref, carry_T_ref), (dys_ref, dcarry_T_ref) = want
        what = f"{kind} {sorted(option)}"
        assert_close_tree((ys, carry_T), (ys_ref, carry_T_ref), dtype, what)
        assert_close_tree((dys, dcarry_T), (dys_ref, dcarry_T_ref), dtype, what)
        assert_close_tree((got_alone[1], got_alone[3]), want_alone[1], dtype, f"{what} alone")
        assert float(jnp.max(jnp.abs(dys))) > 0.1
    masked_dys = results[1][0][1]
    assert float(jnp.max(jnp.abs(jnp.where(MASK[..., None] == 0, masked_dys, 0)))) == 0


@pytest.mark.parametrize("time", [0, 1])
def test_scan_tangent_of_one_step_and_of_none(time):
    """A sequence of one step is the step tangent itself (jax.jvp of scan_cell); of none,
    dys is (batch, 0, hidden) and dcarry_T is dcarry0."""
    cell, params, xs, carry0, (dparams, dxs, dcarry0) = cell_point("lstm", jnp.float64)
    xs, dxs = xs[:, :time], dxs[:, :time]
    ys, dys, _, dcarry_T = scan_tangent(cell, params, xs, dparams, dxs, carry0, dcarry0)
    (_, _), (dys_ref, dcarry_T_ref) = jax.jvp(
        lambda p, x, c: scan_cell(cell, p, x, c)[:2], (params, xs, carry0),
        (dparams, dxs, dcarry0))
    assert dys.shape == ys.shape == (BATCH, time, HIDDEN)
    assert_close_tree((dys, dcarry_T), (dys_ref, dcarry_T_ref), jnp.float64, f"T = {time}")
    if time == 0:
        assert all(np.array_equal(a, b) for a, b in zip(dcarry_T, dcarry0))


@pytest.mark.parametrize("kind", ["elman_sigmoid", "lstm_peephole", "gru", "gru_reset_after"])
def test_scan_tangent_is_the_central_difference_of_the_forward(kind):
    """float64: dys against (ys(w + e v) - ys(w - e v)) / 2e with e = 1e-5, whose error is of
    order e^2 |ys'''| ~ 1e-10 (the reference owes nothing to jax's differentiation)."""
    cell, params, xs, carry0, (dparams, dxs, dcarry0) = cell_point(kind, jnp.float64, seed=1)
    step = 1e-5

    def ys_at(scale):
        moved = jax.tree.map(lambda a, d: a + scale * d, (params, xs, carry0),
                             (dparams, dxs, dcarry0))
        return scan_cell(cell, *moved)[0]

    difference = (ys_at(step) - ys_at(-step)) / (2 * step)
    dys = scan_tangent(cell, params, xs, dparams, dxs, carry0, dcarry0)[1]
    assert gradcheck.relative_error(dys, difference) <= 1e-8


@pytest.mark.parametrize("layer", [
    nets.rnn(nets.lstm(4), reverse=True),
    nets.rnn(nets.gru(4), truncation=2, unroll=2),
    nets.rnn(nets.elman(4), recompute_every=2),
    nets.bidirectional(nets.gru_reset_after(3), nets.lstm(2, peepholes=True)),
    nets.serial(nets.bidirectional(nets.gru(3), nets.elman(2)), nets.FinalStates(3)),
    nets.serial(nets.rnn(nets.lstm(3)), nets.LastStep()),
], ids=["lstm_reversed", "gru_truncated_unrolled", "elman_recomputed", "bidirectional",
        "final_states", "last_step"])
def test_sequence_layer_tangent_is_jax_jvp(layer, dtype):
    assert_tangent_is_jvp(layer, (3, 5, 4), dtype)


def test_recurrent_gauss_newton_matrix_is_the_jacobians_product():
    """Every column G e_i of an Elman net read at its last step by one linear unit under
    squared error: the matrix is symmetric positive semi-definite and equals J^T J / m, J the
    (examples, parameters) Jacobian of the output by `jax.jacobian` (H = 1/m for one output
    per example)."""
    model = nets.serial(nets.rnn(nets.elman(3)), nets.LastStep(), nets.Dense(1))
    objective = nets.Objective(nets.mean_squared_error(), 0.0)
    params = gradcheck.astype(model.init(jax.random.key(0), (-1, 4, 2))[1], jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 4, 2), jnp.float64)
    targets = jax.random.normal(jax.random.key(2), (5, 1), jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    product = jax.jit(gauss_newton_product(model, objective))
    columns = jax.vmap(lambda e: jax.flatten_util.ravel_pytree(
        product(params, x, targets, unravel(e)))[0])(jnp.eye(flat.size))
    matrix = np.asarray(columns).T
    assert np.max(np.abs(matrix - matrix.T)) <= F64 * np.max(np.abs(matrix))
    assert np.min(np.linalg.eigvalsh(matrix)) >= -F64 * np.max(np.abs(matrix))
    jacobian = jax.jacobian(lambda f: model.apply(unravel(f), x)[:, 0])(flat)  # (5, params)
    assert gradcheck.relative_error(matrix, jacobian.T @ jacobian / 5) <= F64


def test_refusals_name_the_cell_the_argument_and_the_shape():
    cell = nets.lstm(3)
    params = cell.init(jax.random.key(0), 2)
    xs = jnp.zeros((2, 4, 2), jnp.float32)
    plain = cell._replace(name="plain_lstm", step_tangent=None)
    with pytest.raises(ValueError, match=r"scan_tangent\(plain_lstm\): this cell has no step "
                                         "tangent"):
        scan_tangent(plain, params, xs, params)
    with pytest.raises(ValueError, match="layer 'plain_lstm_0' has no tangent"):
        gauss_newton_product(nets.sequence_model([plain], 3),
                             nets.Objective(nets.sequence_cross_entropy()))
    with pytest.raises(ValueError, match=r"scan_tangent\(lstm\): dparams is .*'w': '\(5, 12\) "
                                         r"float32'.*expected .*'b': .*'w': '\(5, 12\) float32'"):
        scan_tangent(cell, params, xs, {"w": params["w"]})
    with pytest.raises(ValueError, match=r"dparams is .*'w': '\(5, 12\) float64'.*expected "
                                         r".*'w': '\(5, 12\) float32'"):
        scan_tangent(cell, params, xs, jax.tree.map(lambda a: a.astype(jnp.float64), params))
    with pytest.raises(ValueError, match=r"dxs is \(2, 3, 2\) float32, expected \(2, 4, 2\) "
                                         "float32"):
        scan_tangent(cell, params, xs, params, jnp.zeros((2, 3, 2), jnp.float32))
    with pytest.raises(ValueError, match=r"dxs is \(2, 4, 2\) float64, expected \(2, 4, 2\) "
                                         "float32"):
        scan_tangent(cell, params, xs, params, jnp.zeros((2, 4, 2), jnp.float64))
    with pytest.raises(ValueError, match=r"dcarry0 is \('\(3, 3\) float32', '\(3, 3\) float32'"
                                         r"\), expected \('\(2, 3\) float32'"):
        scan_tangent(cell, params, xs, params, dcarry0=(jnp.zeros((3, 3), jnp.float32),) * 2)

