"""Recurrent nets: cells with a hand-written step backward, one scan helper, sequence layers.

A cell is one time step (README, "Recurrent nets"), a `Cell` of pure functions:

    init(key, input_size)                          -> params
    initial_carry(batch, dtype)                    -> carry (zeros)
    step(params, carry, x_t)                       -> (carry, y_t, residuals)
    step_backward(params, residuals, dcarry, dy_t) -> (dparams, dcarry_prev, dx_t)

Shapes: x_t (batch, input_size), y_t (batch, hidden); the carry is h (batch, hidden) for Elman
and GRU and the pair (h, c) for LSTM, h first. `dcarry` is dE/d(the carry the step emitted),
arriving from the later steps; `dy_t` is dE/dy_t; `dcarry_prev` is dE/d(the carry the step
read). Every step backward is written from the cell's equations (in each cell's docstring),
never by differentiating the step.

Every built-in cell also gives `step_curvature(weights, residuals, d2carry, d2y_t)`, LeCun's
diagonal second derivatives through the step (`nets.layers`), with the signature of
`step_backward`: each cell writes its step backward once, as a pullback whose products take
the step's local derivatives as factors, and the curvature is that pullback of the squared
factors with the squared weights; `bptt(..., curvature=True)` runs it back through time.

Every built-in cell also gives `step_tangent(params, carry, x_t, dparams, dcarry, dx_t) ->
(carry, y_t, dcarry_new, dy_t)`, the step in forward mode, written from its equations (in
each docstring): the step's outputs and their directional derivative for directions of the
params, the carry read and x_t (dx_t None for zero, a first layer's). `scan_tangent` runs it
over time, carrying the state and its tangent, and the sequence layers' `tangent` passes are
made of it, so that the Gauss-Newton product G v = J^T H J v (`nets.engines.
gauss_newton_product`) and Hessian-free optimisation cover the recurrent nets (Martens and
Sutskever 2011).

Every built-in cell also gives `step_backward_tangent(params, carry, x_t, v_params, v_carry,
v_x, dcarry, dy_t, r_dcarry, r_dy_t) -> (dparams, dcarry_prev, dx_t, R{dparams},
R{dcarry_prev}, R{dx_t})`, its step backward with the backward's directional derivative
(Pearlmutter's R-operator: each line of the step backward differentiated in all its inputs,
with the step tangent's values), which `scan_backward_tangent` runs back through time for
the exact Hessian's product (`nets.engines.hessian_product`). Both are made of the cell's
`tangent_parts` (`TangentParts`): a step tangent that also returns what the R-operator reads
(the step's gate values, their tangents, [v_x, v_h]), and the R-operator from those kept
values, so that `scan_backward_tangent` keeps them in its forward scan and its reverse scan
recomputes nothing. A cell with only the two functions (a user's) is run by recomputing each
step's values from the kept (carry, x_t, v_carry, v_x); one that replaces either function
replaces (or drops) its `tangent_parts` too, which `scan_backward_tangent` runs first.

A cell that a `torch.nn` module computes names it in `pytorch_module` (RNN, LSTM, GRU), and
`to_pytorch`/`pytorch_gradients` map its params and gradients onto that module's state dict.

A cell may also give `backward_weights(params)`: what its step backward reads in place of
params, made once per sequence by `bptt` outside the reverse scan. The LSTM and GRU give their
weight blocks transposed and apart (W_x^T, W_h^T), so that dx_t and dh_{t-1} are separate
products and dx_t is never computed where nothing reads it (a first layer's): 7-9% off a
step on one CPU core (LSTM and GRU, batch 32), the same on two at batch 64. The Elman cell
keeps one product for [dx_t, dh_{t-1}] (split, it was 10% slower on two cores).

A cell may also give `gradient_parts` (`GradientParts`): its step backward and curvature
returning the parameter gradient in parts that `bptt` sums over the steps as they are, and
`assemble(parts) -> dparams`, which `bptt` applies once after the reverse scan (the cell's
`step_backward` is that assembly of every step's parts). Both GRUs give their weight gradient
as its blocks (x^T da_x and h^T da_h apart, where dparams has them stacked in w), so that
each step adds every block to its own running sum instead of concatenating a new w first
(the same sums, bit for bit). Batch 64, T 100, hidden 256, 2-core CPU, 2026-12-05, each
alternated in one process: the bench's SGD step (one layer, read at its last step) of Cho's
GRU 0.945-0.954 of its time, of the reset-after GRU 0.998-1.013 (no change); `scan_cell`
and `bptt` alone with every step's dy and dx (a layer inside a stack) for the reset-after
GRU 0.94.

Likewise `forward_weights(params)`: params with the weight blocks the step reads already cut
out of w, made once per sequence by `scan_cell` outside the forward scan; the step takes
either (it slices w itself when given plain params, as a caller stepping by hand does).
Inside the scan, XLA:CPU copied the blocks out of w at every step (W_h, 786 KB, 70 us a step
for the reset-after GRU): both GRUs give their blocks apart, which made their manual SGD
steps (batch 64, T 100, hidden 256; 2-core CPU, 2026-12-05) 0.93-0.95 (reset-after) and
0.96-0.97 (Cho's) of their time. The LSTM's and Elman's steps multiply [x_t, h] by w whole.

Parameters: each cell keeps its input and recurrent weights stacked in one matrix
w = [W_x; W_h] of shape (input_size + hidden, gates * hidden), so that the L2 penalty of
`nets.losses` (the leaves keyed "w") covers both, and its biases in "b" (gates * hidden,).
LSTM peephole weights are vectors under "p" (3, hidden), not penalised. Initialisation: each
gate's W_x block Glorot-uniform, each gate's W_h block orthogonal (Saxe et al. 2014), biases
zero except the LSTM forget gate's, 1 (Gers et al. 2000; Jozefowicz et al. 2015).

Running a cell over time (one helper for every cell):

    scan_cell(cell, params, xs, carry0=None, mask=None, truncation=None, unroll=1,
              recompute_every=None) -> (ys, carry_T, residuals)
    bptt(cell, params, residuals, dys, dcarry_T=None, truncation=None, unroll=1)
        -> (dparams, dxs, dcarry0)          (+ dcarries with return_dcarries=True)
    scan_tangent(cell, params, xs, dparams, dxs=None, carry0=None, dcarry0=None, mask=None,
                 truncation=None, unroll=1) -> (ys, dys, carry_T, dcarry_T)

xs (batch, time, features) and ys (batch, time, hidden), as every sequence is here; both run
`lax.scan` over the time axis (time-major inside). `scan_cell` saves each step's residuals;
`bptt` is backpropagation through time, a reverse `lax.scan` of `step_backward` that sums the
parameter gradients of all steps. Options, of the helper and never of a cell:

- carry0: the initial state (default zeros); `bptt` returns its gradient dcarry0.
- mask (batch, time), 1 for real steps and 0 for padding: a masked step leaves the carry as it
  was, outputs y_t = 0, and contributes no gradient (its dcarry passes through unchanged).
- truncation=k: truncated BPTT with windows [0, k), [k, 2k), ...: no gradient crosses a window
  boundary through the carry. The forward pass places `stop_gradient` on the carry entering
  steps k, 2k, ... (values unchanged), so `jax.grad` of the forward gives the same truncated
  gradient as `bptt`; the gradient of carry0 flows through the first window only.
- unroll: passed to both scans.
- recompute_every=k: gradient checkpointing through time (Griewank 1992; Chen et al. 2016;
  Gruslys et al. 2016). `scan_cell` keeps the residuals of the first T mod k steps and, of
  the later ones, only the carry entering each segment of k steps (`RecomputeResiduals`);
  `bptt` runs each segment forward again from its carry just before its backward. Stored
  steps T / k carries + k residuals instead of T residuals (k near sqrt(T) keeps the least),
  at the cost of one more forward pass; the gradients are the same sums in the same order.

Both directions at once, over padded batches too: `scan_bidirectional(cell_fw, cell_bw,
(params_fw, params_bw), xs, mask=None)` and its backward `bptt_bidirectional` (the backward
direction on the flipped sequence and mask, so each sequence is read over its own length).

Sequence layers follow the Layer contract of `nets.layers`, so the manual and autodiff engines
and the losses work on whole sequence models: `rnn(cell)` (batch, time, in) -> (batch, time,
hidden), `rnn(cell, reverse=True)` from the last step, `bidirectional(cell_fw, cell_bw)` both
directions side by side; `LastStep()` (batch, time, f) -> (batch, f), and `FinalStates(F)`
each direction's final output of a bidirectional layer; `TimeDistributed(layer)` applies a
(batch, f) layer at every step; `sequence_model(cells, out_features)` stacks them (one
direction or, with bidirectional=True, both; dropout=rate drops each layer's outputs under a
key, with the same params);
`sequence_cross_entropy()` is the per-character loss on (batch, time, classes) logits and
integer targets (batch, time). `stack_forward`/`stack_backward` run a per-step
`sequence_model` from given states and return the final ones (with dropout under a key),
for truncated BPTT that carries the state across windows (experiments/char_rnn.py).
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nets import initializers
from nets.layers import (
    Dense,
    Layer,
    StaticShape,
    backward_tangent_with_key,
    check_direction,
    check_gradient,
    concrete_values,
    forward_with_key,
    is_count,
    linear_backward_tangent,
    parallel,
    serial,
    tangent_with_key,
)
from nets.losses import Loss
from nets.pooling import Dropout, dropout_after
from nets.varying import batch_product, split_like, vary_like, varying_axes

__all__ = [
    "Cell",
    "GradientParts",
    "TangentParts",
    "ScanResiduals",
    "RecomputeResiduals",
    "elman",
    "lstm",
    "gru",
    "gru_reset_after",
    "CELLS",
    "make_cell",
    "to_pytorch",
    "from_pytorch",
    "stack_to_pytorch",
    "stack_from_pytorch",
    "pytorch_gradients",
    "hidden_of",
    "scan_cell",
    "scan_tangent",
    "scan_backward_tangent",
    "bptt",
    "scan_bidirectional",
    "bptt_bidirectional",
    "rnn",
    "bidirectional",
    "FinalStates",
    "LastStep",
    "TimeDistributed",
    "sequence_model",
    "stack_forward",
    "stack_backward",
    "sequence_cross_entropy",
]

Params = Any
Carry = Any


class GradientParts(NamedTuple):
    """A cell's step backward and curvature returning its parameter gradient in parts, and
    the function that assembles the parts into dparams (module docstring)."""

    step_backward: Callable[[Params, Any, Carry, jax.Array], tuple[Any, Carry, jax.Array]]
    step_curvature: Callable[[Params, Any, Carry, jax.Array], tuple[Any, Carry, jax.Array]]
    assemble: Callable[[Any], Params]


class TangentParts(NamedTuple):
    """A cell's step tangent keeping what its step's R-operator reads, and that R-operator
    from what was kept (module docstring): `scan_backward_tangent` keeps every step's values
    and tangents in the forward scan instead of recomputing them in the reverse one."""

    step_tangent: Callable[..., tuple[Carry, jax.Array, Carry, jax.Array, Any]]
    step_backward_tangent: Callable[..., tuple]


class Cell(NamedTuple):
    """One recurrent step and its hand-written backward (module docstring)."""

    name: str
    hidden_size: int
    init: Callable[[jax.Array, int], Params]
    initial_carry: Callable[[int, Any], Carry]
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array, Any]]
    step_backward: Callable[[Params, Any, Carry, jax.Array], tuple[Params, Carry, jax.Array]]
    backward_weights: Callable[[Params], Any] | None = None
    step_curvature: Callable[[Params, Any, Carry, jax.Array], tuple[Params, Carry, jax.Array]] \
        | None = None
    pytorch_module: str | None = None  # the torch.nn module of the same function (to_pytorch)
    forward_weights: Callable[[Params], Params] | None = None
    gradient_parts: GradientParts | None = None
    step_tangent: Callable[..., tuple[Carry, jax.Array, Carry, jax.Array]] | None = None
    step_backward_tangent: Callable[..., tuple] | None = None
    tangent_parts: TangentParts | None = None

    def step_weights(self, params: Params) -> Params:
        """What `scan_cell` hands to `step`: forward_weights(params), or params."""
        return params if self.forward_weights is None else self.forward_weights(params)

    def input_size(self, params: Params) -> int:
        """Input features of the cell with these params (rows of w above the hidden ones)."""
        return params["w"].shape[0] - self.hidden_size


def hidden_of(carry: Carry) -> jax.Array:
    """h of a carry: the carry itself (Elman, GRU) or its first entry (LSTM's (h, c))."""
    return carry[0] if isinstance(carry, (tuple, list)) else carry


def _stacked_weights(key, input_size: int, hidden: int, gates: int) -> jax.Array:
    """[W_x; W_h] (input_size + hidden, gates * hidden): Glorot W_x, orthogonal W_h blocks."""
    keys = jax.random.split(key, 2 * gates)
    glorot = initializers.glorot_uniform()
    w_x = [glorot(k, (input_size, hidden)) for k in keys[:gates]]
    w_h = [jax.random.orthogonal(k, hidden, dtype=jnp.float32) for k in keys[gates:]]
    return jnp.concatenate([jnp.concatenate(w_x, 1), jnp.concatenate(w_h, 1)], 0)


def _check_size(name: str, hidden_size: int) -> None:
    if not is_count(hidden_size):
        raise ValueError(f"{name}: hidden_size must be an int, got {hidden_size!r}")
    if hidden_size < 1:
        raise ValueError(f"{name}: hidden_size must be >= 1, got {hidden_size}")


def _zeros_carry(hidden: int, pair: bool):
    def initial_carry(batch, dtype=jnp.float32):
        h = jnp.zeros((batch, hidden), dtype)
        return (h, h) if pair else h

    return initial_carry


def _transposed_blocks(w: jax.Array, hidden: int) -> dict:
    """W_x^T and W_h^T of w = [W_x; W_h], each its own array: a step backward's products
    dx = da W_x^T and dh = da W_h^T (dx is then never computed where it is unused)."""
    inputs = w.shape[0] - hidden
    return {"w_x_t": w[:inputs].T, "w_h_t": w[inputs:].T}


def _row(vector: jax.Array) -> jax.Array:
    """A (features,) vector as a (1, features) row, broadcast explicitly against a batch."""
    return vector[None, :]


def _input_term(dx: jax.Array | None, w_x: jax.Array, moved: jax.Array) -> jax.Array:
    """moved + dx W_x: a pre-activation's tangent with the input's part, which is zero (and
    its product skipped) where dx is None (a first layer's input, which no parameter moves)."""
    return moved if dx is None else moved + dx @ w_x


def _cell(name, hidden, init, initial_carry, step, factors, pullback,
          backward_weights=None, pytorch_module=None, forward_weights=None,
          assemble=None, tangent_parts=None) -> Cell:
    """A Cell whose step backward is `pullback(weights, factors(residuals), dcarry, dy)`, every
    local derivative of the step a factor of its products, and whose step curvature is the
    same pullback of the squared factors (bptt squares the weights): LeCun's diagonal rule
    d2in_i = sum_j J_ji^2 d2out_j, stage by stage through the step. With `assemble`, the
    pullback gives its parameter gradient in parts, `assemble(parts)` is dparams, and the cell
    has `gradient_parts` for bptt (module docstring). With `tangent_parts`, its step tangent and
    step backward tangent are made of them (`_step_tangents`)."""
    step_tangent, step_backward_tangent = _step_tangents(tangent_parts)

    def backward_in_parts(weights, residuals, dcarry, dy):
        return pullback(weights, factors(residuals), dcarry, dy)

    def curvature_in_parts(squared_weights, residuals, d2carry, d2y):
        squared = jax.tree.map(jnp.square, factors(residuals))
        return pullback(squared_weights, squared, d2carry, d2y)

    if assemble is None:
        return Cell(name, hidden, init, initial_carry, step, backward_in_parts, backward_weights,
                    curvature_in_parts, pytorch_module, forward_weights,
                    step_tangent=step_tangent, step_backward_tangent=step_backward_tangent,
                    tangent_parts=tangent_parts)

    def assembled(in_parts):
        def run(*args):
            parts, dcarry_prev, dx = in_parts(*args)
            return assemble(parts), dcarry_prev, dx

        return run

    return Cell(name, hidden, init, initial_carry, step, assembled(backward_in_parts),
                backward_weights, assembled(curvature_in_parts), pytorch_module,
                forward_weights, GradientParts(backward_in_parts, curvature_in_parts, assemble),
                step_tangent, step_backward_tangent, tangent_parts)


def _step_tangents(parts: TangentParts | None):
    """(step_tangent, step_backward_tangent) of a cell from its `TangentParts`: the step
    tangent without what it keeps, and the R-operator from the kept values of the step tangent
    at (carry, x_t) along (v_params, v_carry, v_x). (None, None) without parts."""
    if parts is None:
        return None, None

    def step_tangent(params, carry, x, dparams, dcarry, dx):
        return parts.step_tangent(params, carry, x, dparams, dcarry, dx)[:4]

    def step_backward_tangent(params, carry, x, v_params, v_carry, v_x, dcarry, dy, r_dcarry,
                              r_dy):
        kept = parts.step_tangent(params, carry, x, v_params, v_carry, v_x)[4]
        return parts.step_backward_tangent(params, kept, v_params, dcarry, dy, r_dcarry, r_dy)

    return step_tangent, step_backward_tangent


# --- cells ------------------------------------------------------------------------------------

_ACTIVATIONS = {
    # name: (f, f' and f'' as functions of the output)
    "tanh": (jnp.tanh, lambda h: 1 - h * h, lambda h: -2 * h * (1 - h * h)),
    "sigmoid": (jax.nn.sigmoid, lambda h: h * (1 - h), lambda h: h * (1 - h) * (1 - 2 * h)),
}


def elman(hidden_size: int, activation: str = "tanh", name: str | None = None) -> Cell:
    """Elman's simple recurrent net (Elman 1990): h_t = f([x_t, h_{t-1}] w + b), y_t = h_t.

    f is tanh or the logistic sigmoid. Backward, with dh = dcarry + dy_t the total dE/dh_t:
        da = dh * f'(h_t),  dw = [x_t, h_{t-1}]^T da,  db = sum_batch da,
        [dx_t, dh_{t-1}] = da w^T.
    Tangent (forward mode, `step_tangent`), for directions dw, db, dx_t, dh_{t-1}:
        dh_t = f'(h_t) ([x_t, h_{t-1}] dw + db + [dx_t, dh_{t-1}] w).
    The backward's R-operator (`step_backward_tangent`), with R{a} = [x_t, h_{t-1}] v_w +
    v_b + [v_x, v_h] w the pre-activation's tangent:
        R{da} = R{dh} f'(h_t) + dh f''(h_t) R{a},  R{dw} = [v_x, v_h]^T da + [x_t, h_{t-1}]^T
        R{da},  R{db} = sum_batch R{da},  R{[dx_t, dh_{t-1}]} = R{da} w^T + da v_w^T.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"elman: activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
    name = name or f"elman_{activation}"
    _check_size(name, hidden_size)
    function, derivative, second_derivative = _ACTIVATIONS[activation]
    hidden = hidden_size

    def init(key, input_size):
        return {"w": _stacked_weights(key, input_size, hidden, 1),
                "b": jnp.zeros((hidden,), jnp.float32)}

    def step(params, h, x):
        xh = jnp.concatenate([x, h], axis=-1)
        h_new = function(xh @ params["w"] + _row(params["b"]))
        return h_new, h_new, (xh, h_new)

    def factors(residuals):
        xh, h_new = residuals
        return xh, derivative(h_new)

    def pullback(params, factors, dh_new, dy):
        # one product for [dx_t, dh_{t-1}]: the LSTM's and GRU's backward_weights, measured
        # here, made this step 10% slower on two cores (7% faster on one)
        xh, slope = factors
        da = (dh_new + dy) * slope
        dxh = da @ params["w"].T
        inputs = xh.shape[1] - hidden
        grads = {"w": batch_product(xh, da), "b": jnp.sum(da, axis=0)}
        return grads, dxh[:, inputs:], dxh[:, :inputs]

    def step_tangent(params, h, x, v_params, v_h, v_x):
        h_new, _, (xh, _) = step(params, h, x)
        w, inputs = params["w"], x.shape[1]
        r_a = _input_term(v_x, w[:inputs], xh @ v_params["w"] + _row(v_params["b"])
                          + v_h @ w[inputs:])
        v_h_new = derivative(h_new) * r_a
        v_xh = jnp.concatenate([jnp.zeros_like(x) if v_x is None else v_x, v_h], axis=-1)
        return h_new, h_new, v_h_new, v_h_new, (xh, h_new, r_a, v_xh)

    def step_backward_tangent(params, kept, v_params, dh_new, dy, r_dh_new, r_dy):
        xh, h_new, r_a, v_xh = kept
        w, inputs = params["w"], xh.shape[1] - hidden
        dh, r_dh = dh_new + dy, r_dh_new + r_dy
        da = dh * derivative(h_new)
        r_da = r_dh * derivative(h_new) + dh * second_derivative(h_new) * r_a
        dxh, r_dxh = da @ w.T, r_da @ w.T + da @ v_params["w"].T
        grads = {"w": batch_product(xh, da), "b": jnp.sum(da, axis=0)}
        r_grads = {"w": batch_product(v_xh, da) + batch_product(xh, r_da),
                   "b": jnp.sum(r_da, axis=0)}
        return (grads, dxh[:, inputs:], dxh[:, :inputs], r_grads, r_dxh[:, inputs:],
                r_dxh[:, :inputs])

    return _cell(name, hidden, init, _zeros_carry(hidden, False), step, factors, pullback,
                 pytorch_module="RNN" if activation == "tanh" else None,
                 tangent_parts=TangentParts(step_tangent, step_backward_tangent))


def lstm(hidden_size: int, peepholes: bool = False, forget_bias: float = 1.0,
         name: str | None = None) -> Cell:
    """Long short-term memory (Hochreiter and Schmidhuber 1997, with the forget gate of Gers et
    al. 2000 and, optionally, the peepholes of Gers and Schmidhuber 2000).

    z = [x_t, h_{t-1}] w + b, split into the gate blocks (i, f, g, o):
        i = sigmoid(z_i + p_i * c_{t-1}),  f = sigmoid(z_f + p_f * c_{t-1}),  g = tanh(z_g),
        c_t = f * c_{t-1} + i * g,  o = sigmoid(z_o + p_o * c_t),  h_t = o * tanh(c_t),
    carry (h_t, c_t), y_t = h_t; the peephole terms p (3, hidden) only with peepholes=True.
    b_f starts at `forget_bias` (1). Backward, dh = dcarry_h + dy_t, dc = dcarry_c:
        da_o = dh tanh(c_t) o (1 - o);  dc += dh o (1 - tanh^2 c_t) + da_o p_o;
        da_i = dc g i (1 - i);  da_f = dc c_{t-1} f (1 - f);  da_g = dc i (1 - g^2);
        dc_{t-1} = dc f + da_i p_i + da_f p_f;  dp = sum_batch (da_i c_{t-1}, da_f c_{t-1},
        da_o c_t);  dw = [x_t, h_{t-1}]^T da;  [dx_t, dh_{t-1}] = da w^T.
    Tangent (`step_tangent`), for directions dw, db, dp, dx_t, (dh_{t-1}, dc_{t-1}):
        dz = [x_t, h_{t-1}] dw + db + [dx_t, dh_{t-1}] w  (+ dp_i c_{t-1} + p_i dc_{t-1} in
        dz_i, the same in dz_f, dp_o c_t + p_o dc_t in dz_o);  di = i (1 - i) dz_i,
        df = f (1 - f) dz_f,  dg = (1 - g^2) dz_g,  do = o (1 - o) dz_o;
        dc_t = df c_{t-1} + f dc_{t-1} + di g + i dg;
        dh_t = do tanh(c_t) + o (1 - tanh^2 c_t) dc_t.
    """
    name = name or ("lstm_peephole" if peepholes else "lstm")
    _check_size(name, hidden_size)
    hidden = hidden_size

    def init(key, input_size):
        bias = jnp.zeros((4 * hidden,), jnp.float32).at[hidden:2 * hidden].set(forget_bias)
        params = {"w": _stacked_weights(key, input_size, hidden, 4), "b": bias}
        if peepholes:
            params["p"] = jnp.zeros((3, hidden), jnp.float32)
        return params

    def step(params, carry, x):
        h, c = carry
        xh = jnp.concatenate([x, h], axis=-1)
        z = xh @ params["w"] + _row(params["b"])
        z_i, z_f, z_g, z_o = (z[:, k * hidden:(k + 1) * hidden] for k in range(4))
        if peepholes:
            p = params["p"]
            z_i, z_f = z_i + _row(p[0]) * c, z_f + _row(p[1]) * c
        i, f, g = jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jnp.tanh(z_g)
        c_new = f * c + i * g
        if peepholes:
            z_o = z_o + _row(params["p"][2]) * c_new
        o = jax.nn.sigmoid(z_o)
        tanh_c = jnp.tanh(c_new)
        h_new = o * tanh_c
        return (h_new, c_new), h_new, (xh, c, c_new, i, f, g, o, tanh_c)

    def backward_weights(params):
        return {**_transposed_blocks(params["w"], hidden), **({"p": params["p"]} if peepholes
                                                              else {})}

    def factors(residuals):
        xh, c, c_new, i, f, g, o, tanh_c = residuals
        return {"xh": xh, "c": c, "c_new": c_new, "i": i, "f": f, "g": g, "o": o,
                "tanh_c": tanh_c, "do": o * (1 - o), "dtanh_c": 1 - tanh_c * tanh_c,
                "di": i * (1 - i), "df": f * (1 - f), "dg": 1 - g * g}

    def pullback(weights, k, dcarry, dy):
        dh_new, dc_new = dcarry
        dh_new = dh_new + dy
        da_o = dh_new * k["tanh_c"] * k["do"]
        dc_new = dc_new + dh_new * k["o"] * k["dtanh_c"]
        if peepholes:
            dc_new = dc_new + da_o * _row(weights["p"][2])
        da_i = dc_new * k["g"] * k["di"]
        da_f = dc_new * k["c"] * k["df"]
        da_g = dc_new * k["i"] * k["dg"]
        dc = dc_new * k["f"]
        dparams = {}
        if peepholes:
            p = weights["p"]
            dc = dc + da_i * _row(p[0]) + da_f * _row(p[1])
            dparams["p"] = jnp.stack([jnp.sum(da_i * k["c"], 0), jnp.sum(da_f * k["c"], 0),
                                      jnp.sum(da_o * k["c_new"], 0)])
        da = jnp.concatenate([da_i, da_f, da_g, da_o], axis=-1)
        dparams.update({"w": batch_product(k["xh"], da), "b": jnp.sum(da, axis=0)})
        return dparams, (da @ weights["w_h_t"], dc), da @ weights["w_x_t"]

    def step_tangent(params, carry, x, dparams, dcarry, dx):
        """The step in forward mode, keeping its values (the residuals' names), their
        tangents (keyed "d" + name) and [dx_t, dh_{t-1}] for `step_backward_tangent`."""
        (h_new, c_new), _, (xh, c, _, i, f, g, o, tanh_c) = step(params, carry, x)
        dh, dc = dcarry
        w = params["w"]
        inputs = x.shape[1]
        dz = _input_term(dx, w[:inputs], xh @ dparams["w"] + _row(dparams["b"]) + dh @ w[inputs:])
        dz_i, dz_f, dz_g, dz_o = (dz[:, k * hidden:(k + 1) * hidden] for k in range(4))
        if peepholes:
            p, dp = params["p"], dparams["p"]
            dz_i = dz_i + _row(dp[0]) * c + _row(p[0]) * dc
            dz_f = dz_f + _row(dp[1]) * c + _row(p[1]) * dc
        di, df, dg = i * (1 - i) * dz_i, f * (1 - f) * dz_f, (1 - g * g) * dz_g
        dc_new = df * c + f * dc + di * g + i * dg
        if peepholes:
            dz_o = dz_o + _row(dparams["p"][2]) * c_new + _row(params["p"][2]) * dc_new
        do = o * (1 - o) * dz_o
        dtanh_c = (1 - tanh_c * tanh_c) * dc_new
        dh_new = do * tanh_c + o * dtanh_c
        dxh = jnp.concatenate([jnp.zeros_like(x) if dx is None else dx, dh], axis=-1)
        kept = {"xh": xh, "c": c, "c_new": c_new, "i": i, "f": f, "g": g, "o": o,
                "tanh_c": tanh_c, "dxh": dxh, "dc": dc, "dc_new": dc_new, "di": di, "df": df,
                "dg": dg, "do": do, "dtanh_c": dtanh_c}
        return (h_new, c_new), h_new, (dh_new, dc_new), dh_new, kept

    def step_backward_tangent(params, k, v_params, dcarry, dy, r_dcarry, r_dy):
        """The pullback above, each line differentiated in all its inputs (R{.} of every
        value is the step tangent's, kept in k; R{dh} = R{dcarry_h} + R{dy_t}, R{dc} =
        R{dcarry_c})."""
        i, f, g, o, c, tanh_c = (k[name] for name in ("i", "f", "g", "o", "c", "tanh_c"))
        ri, rf, rg, ro, rc, rtanh = (k[name] for name in ("di", "df", "dg", "do", "dc",
                                                           "dtanh_c"))
        dh, r_dh = dcarry[0] + dy, r_dcarry[0] + r_dy
        slope_o, slope_c = o * (1 - o), 1 - tanh_c * tanh_c
        da_o = dh * tanh_c * slope_o
        r_da_o = (r_dh * tanh_c * slope_o + dh * rtanh * slope_o
                  + dh * tanh_c * (1 - 2 * o) * ro)
        dc_new = dcarry[1] + dh * o * slope_c
        r_dc_new = (r_dcarry[1] + r_dh * o * slope_c + dh * ro * slope_c
                    - 2 * dh * o * tanh_c * rtanh)
        if peepholes:
            p, v_p = params["p"], v_params["p"]
            dc_new = dc_new + da_o * _row(p[2])
            r_dc_new = r_dc_new + r_da_o * _row(p[2]) + da_o * _row(v_p[2])
        slope_i, slope_f, slope_g = i * (1 - i), f * (1 - f), 1 - g * g
        da_i = dc_new * g * slope_i
        r_da_i = r_dc_new * g * slope_i + dc_new * rg * slope_i + dc_new * g * (1 - 2 * i) * ri
        da_f = dc_new * c * slope_f
        r_da_f = r_dc_new * c * slope_f + dc_new * rc * slope_f + dc_new * c * (1 - 2 * f) * rf
        da_g = dc_new * i * slope_g
        r_da_g = r_dc_new * i * slope_g + dc_new * ri * slope_g - 2 * dc_new * i * g * rg
        dc, r_dc = dc_new * f, r_dc_new * f + dc_new * rf
        grads, r_grads = {}, {}
        if peepholes:
            dc = dc + da_i * _row(p[0]) + da_f * _row(p[1])
            r_dc = (r_dc + r_da_i * _row(p[0]) + da_i * _row(v_p[0]) + r_da_f * _row(p[1])
                    + da_f * _row(v_p[1]))
            grads["p"] = jnp.stack([jnp.sum(da_i * c, 0), jnp.sum(da_f * c, 0),
                                    jnp.sum(da_o * k["c_new"], 0)])
            r_grads["p"] = jnp.stack([jnp.sum(r_da_i * c + da_i * rc, 0),
                                      jnp.sum(r_da_f * c + da_f * rc, 0),
                                      jnp.sum(r_da_o * k["c_new"] + da_o * k["dc_new"], 0)])
        da = jnp.concatenate([da_i, da_f, da_g, da_o], axis=-1)
        r_da = jnp.concatenate([r_da_i, r_da_f, r_da_g, r_da_o], axis=-1)
        xh, v_xh, w = k["xh"], k["dxh"], params["w"]
        inputs = xh.shape[1] - hidden
        grads.update({"w": batch_product(xh, da), "b": jnp.sum(da, axis=0)})
        r_grads.update({"w": batch_product(v_xh, da) + batch_product(xh, r_da),
                        "b": jnp.sum(r_da, axis=0)})
        dxh, r_dxh = da @ w.T, r_da @ w.T + da @ v_params["w"].T
        return (grads, (dxh[:, inputs:], dc), dxh[:, :inputs], r_grads, (r_dxh[:, inputs:], r_dc),
                r_dxh[:, :inputs])

    return _cell(name, hidden, init, _zeros_carry(hidden, True), step, factors, pullback,
                 backward_weights, pytorch_module=None if peepholes else "LSTM",
                 tangent_parts=TangentParts(step_tangent, step_backward_tangent))


def _gru_factors(x, h, r, z, n) -> dict:
    """The local derivatives both GRUs' step backwards multiply by (h_t = z h + (1 - z) n, r
    and z logistic, n tanh), with the step's input and state."""
    return {"x": x, "h": h, "r": r, "z": z, "h_minus_n": h - n, "one_minus_z": 1 - z,
            "dz": z * (1 - z), "dn": 1 - n * n, "dr": r * (1 - r)}


def _gru_gate_gradients(k: dict, dh_new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(da_z, da_n), the gradients of z's and n's pre-activations from dh' = dE/dh_t:
    da_z = dh' (h - n) z (1 - z),  da_n = dh' (1 - z)(1 - n^2)."""
    return dh_new * k["h_minus_n"] * k["dz"], dh_new * k["one_minus_z"] * k["dn"]


def _gru_gate_gradient_tangents(h, z, n, v_h, r_z, r_n, dh_new, r_dh_new):
    """(da_z, da_n, R{da_z}, R{da_n}) of `_gru_gate_gradients`, with R{h} = v_h, R{z} = r_z,
    R{n} = r_n and R{dh'} = r_dh_new:
        R{da_z} = R{dh'} (h - n) z (1 - z) + dh' (v_h - R{n}) z (1 - z) + dh' (h - n)
                  (1 - 2 z) R{z},
        R{da_n} = R{dh'} (1 - z)(1 - n^2) - dh' R{z} (1 - n^2) - 2 dh' (1 - z) n R{n}."""
    slope_z, slope_n = z * (1 - z), 1 - n * n
    da_z, da_n = dh_new * (h - n) * slope_z, dh_new * (1 - z) * slope_n
    r_da_z = (r_dh_new * (h - n) * slope_z + dh_new * (v_h - r_n) * slope_z
              + dh_new * (h - n) * (1 - 2 * z) * r_z)
    r_da_n = (r_dh_new * (1 - z) * slope_n - dh_new * r_z * slope_n
              - 2 * dh_new * (1 - z) * n * r_n)
    return da_z, da_n, r_da_z, r_da_n


def _gru_gate_tangents(r, z, v_rz_pre) -> tuple[jax.Array, jax.Array]:
    """(R{r}, R{z}) of both GRUs' logistic gates from their pre-activations' tangent
    v_rz_pre = [R{a_r}, R{a_z}] (batch, 2 hidden): R{r} = r (1 - r) R{a_r}, likewise z."""
    hidden = r.shape[-1]
    return r * (1 - r) * v_rz_pre[:, :hidden], z * (1 - z) * v_rz_pre[:, hidden:]


def _gru_state_tangent(values, v_x, v_h, tangents, **more) -> tuple[jax.Array, dict]:
    """Both GRUs' h_t = z h + (1 - z) n in forward mode, R{h_t} = R{z} (h - n) + z v_h +
    (1 - z) R{n}, and what their step backward tangent reads: the step's values (x, h, r, z,
    n), v_x (zeros for None), v_h, the gates' tangents (R{r}, R{z}, R{n}) and `more`."""
    x, h, r, z, n = values
    r_r, r_z, r_n = tangents
    kept = {"x": x, "h": h, "r": r, "z": z, "n": n, "v_h": v_h, "r_r": r_r, "r_z": r_z,
            "r_n": r_n, "v_x": jnp.zeros_like(x) if v_x is None else v_x, **more}
    return r_z * (h - n) + z * v_h + (1 - z) * r_n, kept


def gru(hidden_size: int, name: str = "gru") -> Cell:
    """Gated recurrent unit in the form of Cho et al. 2014 (eqs. 5-8): the reset gate scales
    h_{t-1} *before* the recurrent matrix of the candidate (cuDNN and PyTorch apply it after,
    r * (U_n h + b_n), a different function: `gru_reset_after`), and z = 1 keeps the old state.

    With w = [W_x; W_h] split into the blocks (r, z, n) of (input_size + hidden, hidden):
        r = sigmoid(x W_xr + h U_r + b_r),  z = sigmoid(x W_xz + h U_z + b_z),
        n = tanh(x W_xn + (r * h) U_n + b_n),  h_t = z * h + (1 - z) * n,  y_t = h_t.
    Backward, dh' = dcarry + dy_t:
        da_z = dh' (h - n) z (1 - z);  da_n = dh' (1 - z)(1 - n^2);  d(rh) = da_n U_n^T;
        da_r = d(rh) h r (1 - r);  dh = dh' z + d(rh) r + [da_r, da_z] [U_r, U_z]^T;
        dW_x = x^T [da_r, da_z, da_n];  d[U_r, U_z] = h^T [da_r, da_z];  dU_n = (r h)^T da_n;
        db = sum_batch [da_r, da_z, da_n];  dx = [da_r, da_z, da_n] W_x^T.
    Tangent (`step_tangent`), for directions of the blocks, db, dx_t and dh = dh_{t-1}:
        da_x = x dW_x + db + dx W_x;  d[r, z] = [r, z](1 - [r, z])(da_x,rz + h d[U_r, U_z]
        + dh [U_r, U_z]);  d(rh) = dr h + r dh;  dn_pre = da_x,n + (r h) dU_n + d(rh) U_n;
        dh_t = dz (h - n) + z dh + (1 - z)(1 - n^2) dn_pre.
    """
    _check_size(name, hidden_size)
    hidden = hidden_size

    def init(key, input_size):
        return {"w": _stacked_weights(key, input_size, hidden, 3),
                "b": jnp.zeros((3 * hidden,), jnp.float32)}

    def split(w, inputs):
        return w[:inputs], w[inputs:, :2 * hidden], w[inputs:, 2 * hidden:]

    def forward_weights(params):
        w_x, u_rz, u_n = split(params["w"], params["w"].shape[0] - hidden)
        return {**params, "w_x": w_x, "u_rz": u_rz, "u_n": u_n}

    def step(params, h, x):
        w_x, u_rz, u_n = ((params["w_x"], params["u_rz"], params["u_n"]) if "u_n" in params
                          else split(params["w"], x.shape[1]))
        a_x = x @ w_x + _row(params["b"])
        a_rz = jax.nn.sigmoid(a_x[:, :2 * hidden] + h @ u_rz)
        r, z = a_rz[:, :hidden], a_rz[:, hidden:]
        rh = r * h
        n = jnp.tanh(a_x[:, 2 * hidden:] + rh @ u_n)
        h_new = z * h + (1 - z) * n
        return h_new, h_new, (x, h, r, z, n, rh)

    def backward_weights(params):
        w_x, u_rz, u_n = split(params["w"], params["w"].shape[0] - hidden)
        return {"w_x_t": w_x.T, "u_rz_t": u_rz.T, "u_n_t": u_n.T}

    def factors(residuals):
        x, h, r, z, n, rh = residuals
        return {**_gru_factors(x, h, r, z, n), "rh": rh}

    def pullback(weights, k, dh_new, dy):
        dh_new = dh_new + dy
        da_z, da_n = _gru_gate_gradients(k, dh_new)
        drh = da_n @ weights["u_n_t"]
        da_r = drh * k["h"] * k["dr"]
        da_rz = jnp.concatenate([da_r, da_z], axis=-1)
        dh = dh_new * k["z"] + drh * k["r"] + da_rz @ weights["u_rz_t"]
        da = jnp.concatenate([da_rz, da_n], axis=-1)
        parts = {"w_x": batch_product(k["x"], da), "u_rz": batch_product(k["h"], da_rz),
                 "u_n": batch_product(k["rh"], da_n), "b": jnp.sum(da, axis=0)}
        return parts, dh, da @ weights["w_x_t"]

    def assemble(parts):
        w_h = jnp.concatenate([parts["u_rz"], parts["u_n"]], axis=1)
        return {"w": jnp.concatenate([parts["w_x"], w_h], axis=0), "b": parts["b"]}

    def step_tangent(params, h, x, v_params, v_h, v_x):
        """The step in forward mode, keeping its values, R{r}, R{z}, R{rh} and R{n} for
        `step_backward_tangent`."""
        h_new, _, (_, _, r, z, n, rh) = step(params, h, x)
        inputs = x.shape[1]
        w_x, u_rz, u_n = split(params["w"], inputs)
        v_wx, v_urz, v_un = split(v_params["w"], inputs)
        v_ax = _input_term(v_x, w_x, x @ v_wx + _row(v_params["b"]))
        v_rz_pre = v_ax[:, :2 * hidden] + h @ v_urz + v_h @ u_rz
        r_r, r_z = _gru_gate_tangents(r, z, v_rz_pre)
        r_rh = r_r * h + r * v_h
        r_n = (1 - n * n) * (v_ax[:, 2 * hidden:] + rh @ v_un + r_rh @ u_n)
        v_h_new, kept = _gru_state_tangent((x, h, r, z, n), v_x, v_h, (r_r, r_z, r_n),
                                           rh=rh, r_rh=r_rh)
        return h_new, h_new, v_h_new, v_h_new, kept

    def step_backward_tangent(params, k, v_params, dh_new, dy, r_dh_new, r_dy):
        """The pullback above, each line differentiated in all its inputs, with the step
        tangent's R{r}, R{z}, R{n} and R{rh} (kept in k)."""
        x, h, r, z, n, rh, v_h = (k[key] for key in ("x", "h", "r", "z", "n", "rh", "v_h"))
        r_r, r_z, r_rh, r_n = (k[key] for key in ("r_r", "r_z", "r_rh", "r_n"))
        inputs = x.shape[1]
        w_x, u_rz, u_n = split(params["w"], inputs)
        v_wx, v_urz, v_un = split(v_params["w"], inputs)
        dh_new, r_dh_new = dh_new + dy, r_dh_new + r_dy
        da_z, da_n, r_da_z, r_da_n = _gru_gate_gradient_tangents(h, z, n, v_h, r_z, r_n,
                                                                  dh_new, r_dh_new)
        drh, r_drh = da_n @ u_n.T, r_da_n @ u_n.T + da_n @ v_un.T
        slope_r = r * (1 - r)
        da_r = drh * h * slope_r
        r_da_r = r_drh * h * slope_r + drh * v_h * slope_r + drh * h * (1 - 2 * r) * r_r
        da_rz = jnp.concatenate([da_r, da_z], axis=-1)
        r_da_rz = jnp.concatenate([r_da_r, r_da_z], axis=-1)
        dh = dh_new * z + drh * r + da_rz @ u_rz.T
        r_dh = (r_dh_new * z + dh_new * r_z + r_drh * r + drh * r_r + r_da_rz @ u_rz.T
                + da_rz @ v_urz.T)
        da = jnp.concatenate([da_rz, da_n], axis=-1)
        r_da = jnp.concatenate([r_da_rz, r_da_n], axis=-1)
        grads = assemble({"w_x": batch_product(x, da), "u_rz": batch_product(h, da_rz),
                          "u_n": batch_product(rh, da_n), "b": jnp.sum(da, axis=0)})
        r_grads = assemble({"w_x": batch_product(k["v_x"], da) + batch_product(x, r_da),
                            "u_rz": batch_product(v_h, da_rz) + batch_product(h, r_da_rz),
                            "u_n": batch_product(r_rh, da_n) + batch_product(rh, r_da_n),
                            "b": jnp.sum(r_da, axis=0)})
        return (grads, dh, da @ w_x.T, r_grads, r_dh, r_da @ w_x.T + da @ v_wx.T)

    return _cell(name, hidden, init, _zeros_carry(hidden, False), step, factors, pullback,
                 backward_weights, forward_weights=forward_weights, assemble=assemble,
                 tangent_parts=TangentParts(step_tangent, step_backward_tangent))


def gru_reset_after(hidden_size: int, name: str = "gru_reset_after") -> Cell:
    """The gated recurrent unit of cuDNN, PyTorch's `nn.GRU` and Keras' `reset_after=True`:
    the reset gate scales the candidate's recurrent product *after* the matrix, so all three
    recurrent products are one, h_{t-1} [U_r, U_z, U_n], and the candidate has a second bias
    b_hn inside the reset (PyTorch's b_hn; its other recurrent biases only add to b).

    With w = [W_x; W_h] split into the blocks (r, z, n), b (3 hidden,) and b_hn (hidden,):
        a = x W_x + b,  q = h U_n + b_hn,
        r = sigmoid(a_r + h U_r),  z = sigmoid(a_z + h U_z),  n = tanh(a_n + r * q),
        h_t = z * h + (1 - z) * n,  y_t = h_t.
    Backward, dh' = dcarry + dy_t:
        da_z = dh' (h - n) z (1 - z);  da_n = dh' (1 - z)(1 - n^2);  dq = da_n r;
        da_r = da_n q r (1 - r);  dh = dh' z + [da_r, da_z, dq] W_h^T;
        dW_x = x^T [da_r, da_z, da_n];  dW_h = h^T [da_r, da_z, dq];
        db = sum_batch [da_r, da_z, da_n];  db_hn = sum_batch dq;  dx = [da_r, da_z, da_n] W_x^T.
    Tangent (`step_tangent`), for directions dW_x, dW_h, db, db_hn, dx_t and dh = dh_{t-1}:
        da = x dW_x + db + dx W_x;  da_h = h dW_h + dh W_h;  dq = da_h,n + db_hn;
        d[r, z] = [r, z](1 - [r, z])(da_rz + da_h,rz);  dn_pre = da_n + dr q + r dq;
        dh_t = dz (h - n) + z dh + (1 - z)(1 - n^2) dn_pre.
    """
    _check_size(name, hidden_size)
    hidden = hidden_size

    def init(key, input_size):
        return {"w": _stacked_weights(key, input_size, hidden, 3),
                "b": jnp.zeros((3 * hidden,), jnp.float32),
                "b_hn": jnp.zeros((hidden,), jnp.float32)}

    def forward_weights(params):
        inputs = params["w"].shape[0] - hidden
        return {**params, "w_x": params["w"][:inputs], "w_h": params["w"][inputs:]}

    def step(params, h, x):
        inputs = x.shape[1]
        w_x, w_h = ((params["w_x"], params["w_h"]) if "w_h" in params
                    else (params["w"][:inputs], params["w"][inputs:]))
        a = x @ w_x + _row(params["b"])
        a_h = h @ w_h
        rz = jax.nn.sigmoid(a[:, :2 * hidden] + a_h[:, :2 * hidden])
        r, z = rz[:, :hidden], rz[:, hidden:]
        q = a_h[:, 2 * hidden:] + _row(params["b_hn"])
        n = jnp.tanh(a[:, 2 * hidden:] + r * q)
        h_new = z * h + (1 - z) * n
        return h_new, h_new, (x, h, r, z, n, q)

    def backward_weights(params):
        return _transposed_blocks(params["w"], hidden)

    def factors(residuals):
        x, h, r, z, n, q = residuals
        return {**_gru_factors(x, h, r, z, n), "q": q}

    def pullback(weights, k, dh_new, dy):
        dh_new = dh_new + dy
        da_z, da_n = _gru_gate_gradients(k, dh_new)
        dq = da_n * k["r"]
        da_r = da_n * k["q"] * k["dr"]
        da_x = jnp.concatenate([da_r, da_z, da_n], axis=-1)
        da_h = jnp.concatenate([da_r, da_z, dq], axis=-1)
        dh = dh_new * k["z"] + da_h @ weights["w_h_t"]
        parts = {"w_x": batch_product(k["x"], da_x), "w_h": batch_product(k["h"], da_h),
                 "b": jnp.sum(da_x, axis=0), "b_hn": jnp.sum(dq, axis=0)}
        return parts, dh, da_x @ weights["w_x_t"]

    def assemble(parts):
        return {"w": jnp.concatenate([parts["w_x"], parts["w_h"]], axis=0), "b": parts["b"],
                "b_hn": parts["b_hn"]}

    def step_tangent(params, h, x, v_params, v_h, v_x):
        """The step in forward mode, keeping its values, R{r}, R{z}, R{q} and R{n} for
        `step_backward_tangent`."""
        h_new, _, (_, _, r, z, n, q) = step(params, h, x)
        inputs = x.shape[1]
        w, v_w = params["w"], v_params["w"]
        v_a = _input_term(v_x, w[:inputs], x @ v_w[:inputs] + _row(v_params["b"]))
        v_ah = h @ v_w[inputs:] + v_h @ w[inputs:]
        r_q = v_ah[:, 2 * hidden:] + _row(v_params["b_hn"])
        v_rz_pre = v_a[:, :2 * hidden] + v_ah[:, :2 * hidden]
        r_r, r_z = _gru_gate_tangents(r, z, v_rz_pre)
        r_n = (1 - n * n) * (v_a[:, 2 * hidden:] + r_r * q + r * r_q)
        v_h_new, kept = _gru_state_tangent((x, h, r, z, n), v_x, v_h, (r_r, r_z, r_n),
                                           q=q, r_q=r_q)
        return h_new, h_new, v_h_new, v_h_new, kept

    def step_backward_tangent(params, k, v_params, dh_new, dy, r_dh_new, r_dy):
        """The pullback above, each line differentiated in all its inputs, with the step
        tangent's R{r}, R{z}, R{q} and R{n} (kept in k)."""
        x, h, r, z, n, q, v_h = (k[key] for key in ("x", "h", "r", "z", "n", "q", "v_h"))
        r_r, r_z, r_q, r_n = (k[key] for key in ("r_r", "r_z", "r_q", "r_n"))
        inputs = x.shape[1]
        w_x, w_h = params["w"][:inputs], params["w"][inputs:]
        v_wx, v_wh = v_params["w"][:inputs], v_params["w"][inputs:]
        dh_new, r_dh_new = dh_new + dy, r_dh_new + r_dy
        da_z, da_n, r_da_z, r_da_n = _gru_gate_gradient_tangents(h, z, n, v_h, r_z, r_n,
                                                                  dh_new, r_dh_new)
        dq, r_dq = da_n * r, r_da_n * r + da_n * r_r
        slope_r = r * (1 - r)
        da_r = da_n * q * slope_r
        r_da_r = (r_da_n * q * slope_r + da_n * r_q * slope_r
                  + da_n * q * (1 - 2 * r) * r_r)
        da_x = jnp.concatenate([da_r, da_z, da_n], axis=-1)
        r_da_x = jnp.concatenate([r_da_r, r_da_z, r_da_n], axis=-1)
        da_h = jnp.concatenate([da_r, da_z, dq], axis=-1)
        r_da_h = jnp.concatenate([r_da_r, r_da_z, r_dq], axis=-1)
        dh = dh_new * z + da_h @ w_h.T
        r_dh = r_dh_new * z + dh_new * r_z + r_da_h @ w_h.T + da_h @ v_wh.T
        grads = assemble({"w_x": batch_product(x, da_x), "w_h": batch_product(h, da_h),
                          "b": jnp.sum(da_x, axis=0), "b_hn": jnp.sum(dq, axis=0)})
        r_grads = assemble({"w_x": batch_product(k["v_x"], da_x) + batch_product(x, r_da_x),
                            "w_h": batch_product(v_h, da_h) + batch_product(h, r_da_h),
                            "b": jnp.sum(r_da_x, axis=0), "b_hn": jnp.sum(r_dq, axis=0)})
        return (grads, dh, da_x @ w_x.T, r_grads, r_dh, r_da_x @ w_x.T + da_x @ v_wx.T)

    return _cell(name, hidden, init, _zeros_carry(hidden, False), step, factors, pullback,
                 backward_weights, pytorch_module="GRU", forward_weights=forward_weights,
                 assemble=assemble,
                 tangent_parts=TangentParts(step_tangent, step_backward_tangent))


CELLS = ("elman_tanh", "elman_sigmoid", "lstm", "lstm_peephole", "gru", "gru_reset_after")


def make_cell(kind: str, hidden_size: int) -> Cell:
    """A cell by name: one of `CELLS` ("elman" alone means tanh)."""
    builders = {
        "elman": lambda: elman(hidden_size, "tanh", name="elman_tanh"),
        "elman_tanh": lambda: elman(hidden_size, "tanh"),
        "elman_sigmoid": lambda: elman(hidden_size, "sigmoid"),
        "lstm": lambda: lstm(hidden_size),
        "lstm_peephole": lambda: lstm(hidden_size, peepholes=True),
        "gru": lambda: gru(hidden_size),
        "gru_reset_after": lambda: gru_reset_after(hidden_size),
    }
    if kind not in builders:
        raise ValueError(f"make_cell: unknown cell {kind!r}; choose one of {sorted(builders)}")
    return builders[kind]()


_PYTORCH_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}


def _pytorch_cell(cell: Cell, what: str) -> str:
    if cell.pytorch_module is None:
        raise ValueError(
            f"{what}({cell.name}): no torch.nn module computes this cell (nn.RNN is the tanh "
            "Elman cell, nn.LSTM the LSTM without peepholes, nn.GRU gru_reset_after)")
    return cell.pytorch_module


def to_pytorch(cell: Cell, params: Params, layer: int = 0, reverse: bool = False
               ) -> dict[str, np.ndarray]:
    """params of `cell` as the state dict entries of layer `layer` of the `torch.nn.<cell.
    pytorch_module>` (RNN with tanh, LSTM, GRU) that computes the same function:
        weight_ih_l0 = W_x^T (G H, F),  weight_hh_l0 = W_h^T (G H, H),
        bias_ih_l0 = b (G H,),  bias_hh_l0 = 0, except the GRU's n block: b_hn
    (suffix _l{layer}, and _reverse for the backward direction of a bidirectional module).
    The gate blocks are in the same order in both (LSTM i, f, g, o; GRU r, z, n). NumPy
    arrays of the params' dtype, for `module.load_state_dict` via `torch.from_numpy`; a
    stack's cells give one layer each, a `bidirectional` layer's two cells one direction
    each."""
    _pytorch_cell(cell, "to_pytorch")
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    inputs = w.shape[0] - cell.hidden_size
    bias_hh = np.zeros_like(b)
    if "b_hn" in params:
        bias_hh[2 * cell.hidden_size:] = np.asarray(params["b_hn"])
    suffix = _pytorch_suffix(layer, reverse)
    return {f"weight_ih{suffix}": w[:inputs].T.copy(), f"weight_hh{suffix}": w[inputs:].T.copy(),
            f"bias_ih{suffix}": b.copy(), f"bias_hh{suffix}": bias_hh}


def _pytorch_suffix(layer: int, reverse: bool) -> str:
    return f"_l{layer}" + ("_reverse" if reverse else "")


_PYTORCH_ENTRY = re.compile(r"(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def from_pytorch(cell: Cell, state: dict, layer: int = 0, reverse: bool = False) -> Params:
    """The params of `cell` that compute what layer `layer` of `torch.nn.<cell.
    pytorch_module>` does with the state dict `state` (weight_ih_l{layer}, weight_hh_l...,
    bias_ih_l..., bias_hh_l...; with reverse=True the _reverse entries, the backward
    direction of a bidirectional module; arrays or tensors on the CPU): w = [weight_ih^T;
    weight_hh^T], b = bias_ih + bias_hh, except the GRU's n block, where b takes bias_ih's
    and b_hn bias_hh's. `to_pytorch` undoes it. A stack: one call per layer and direction.
    Entries of another kind (a projection's weight_hr) are refused, not skipped."""
    _pytorch_cell(cell, "from_pytorch")
    unknown = sorted(name for name in state if not _PYTORCH_ENTRY.match(name))
    suffix = _pytorch_suffix(layer, reverse)
    names = [f"{kind}_{side}{suffix}" for kind in ("weight", "bias") for side in ("ih", "hh")]
    missing = [name for name in names if name not in state]
    if unknown or missing:
        direction = "backward" if reverse else "forward"
        raise ValueError(f"from_pytorch({cell.name}): state has the entries {sorted(state)}; "
                         f"layer {layer}, {direction} direction, of nn.{cell.pytorch_module} "
                         f"with biases needs {names}" + (f", and {unknown} are of no such "
                                                         "module" if unknown else ""))
    arrays = {name[:-len(suffix)]: np.asarray(state[name]) for name in names}
    hidden = cell.hidden_size
    sums = _PYTORCH_GATES[cell.pytorch_module] * hidden
    w_ih, w_hh = arrays["weight_ih"], arrays["weight_hh"]
    shapes = {name: np.shape(state[name]) for name in names}
    if (w_ih.ndim != 2 or w_ih.shape[0] != sums or w_hh.shape != (sums, hidden)
            or arrays["bias_ih"].shape != (sums,) or arrays["bias_hh"].shape != (sums,)):
        raise ValueError(f"from_pytorch({cell.name}): shapes {shapes}, expected weight_ih "
                         f"({sums}, input_size), weight_hh ({sums}, {hidden}) and biases "
                         f"({sums},) for nn.{cell.pytorch_module} with hidden_size {hidden}")
    b = arrays["bias_ih"] + arrays["bias_hh"]
    params = {"w": jnp.asarray(np.concatenate([w_ih.T, w_hh.T], axis=0))}
    if cell.pytorch_module == "GRU":
        b[2 * hidden:] = arrays["bias_ih"][2 * hidden:]
        params["b_hn"] = jnp.asarray(arrays["bias_hh"][2 * hidden:])
    params["b"] = jnp.asarray(b)
    return params


def pytorch_gradients(cell: Cell, grads: Params, layer: int = 0, reverse: bool = False
                      ) -> dict[str, np.ndarray]:
    """dE/d(the state dict entries of `to_pytorch`) from dE/dparams: the weights' gradients
    transposed; bias_ih and bias_hh add inside every gate, so each has the gradient db of b,
    except the GRU's n block of bias_hh, which is b_hn (gradient db_hn)."""
    _pytorch_cell(cell, "pytorch_gradients")
    state = to_pytorch(cell, grads, layer, reverse)
    bias_hh = np.asarray(grads["b"]).copy()
    if "b_hn" in grads:
        bias_hh[2 * cell.hidden_size:] = np.asarray(grads["b_hn"])
    return {**state, f"bias_hh{_pytorch_suffix(layer, reverse)}": bias_hh}


def _stack_module(cells: Any, what: str) -> str:
    """The one torch.nn module a stack of cells maps to (each layer the same module and
    hidden size, as in one nn.LSTM(num_layers=...)), else a ValueError naming the cells."""
    modules = {_pytorch_cell(cell, what) for cell in cells}
    sizes = {cell.hidden_size for cell in cells}
    if len(modules) != 1 or len(sizes) != 1:
        raise ValueError(f"{what}: one torch.nn module holds layers of one kind and one "
                         f"hidden_size; got {[(c.name, c.hidden_size) for c in cells]}")
    return modules.pop()


def stack_to_pytorch(cells: Any, params: Any, bidirectional: bool = False
                     ) -> dict[str, np.ndarray]:
    """The recurrent layers of `sequence_model(cells, ..., bidirectional=...)` as one state
    dict of torch.nn.<module>(input_size, H, num_layers=len(cells), bidirectional=...):
    params = that model's params[:len(cells)] (each a (forward, backward) pair when
    bidirectional); layer k's entries by `to_pytorch(cell, ..., layer=k)`. The cells must
    share their module and hidden size, as one PyTorch module's layers do."""
    _stack_module(cells, "stack_to_pytorch")
    if len(params) != len(cells):
        raise ValueError(f"stack_to_pytorch: {len(cells)} cells and {len(params)} layers of "
                         "params; pass the model's params[:len(cells)]")
    state = {}
    for layer, (cell, layer_params) in enumerate(zip(cells, params)):
        directions = zip(layer_params, (False, True)) if bidirectional else [(layer_params,
                                                                              False)]
        for direction_params, reverse in directions:
            state.update(to_pytorch(cell, direction_params, layer, reverse))
    return state


def stack_from_pytorch(cells: Any, state: dict, bidirectional: bool = False) -> tuple:
    """The params of the recurrent layers of `sequence_model(cells, ..., bidirectional=...)`
    (its params[:len(cells)]) that compute what torch.nn.<module>(num_layers=len(cells),
    bidirectional=...) does with `state`; `stack_to_pytorch` undoes it. Every entry of the
    state dict must be used: a deeper module, a missing direction or a foreign entry is
    refused by name."""
    module = _stack_module(cells, "stack_from_pytorch")
    params, used = [], set()
    for layer, cell in enumerate(cells):
        directions = (False, True) if bidirectional else (False,)
        found = tuple(from_pytorch(cell, state, layer, reverse) for reverse in directions)
        used.update(f"{kind}_{side}{_pytorch_suffix(layer, reverse)}" for kind in
                    ("weight", "bias") for side in ("ih", "hh") for reverse in directions)
        params.append(found if bidirectional else found[0])
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"stack_from_pytorch: entries {unused} are of no layer of "
                         f"{len(cells)} layers of nn.{module}"
                         f"{' (bidirectional)' if bidirectional else ''}")
    return tuple(params)


# --- the scan helper ------------------------------------------------------------------------

class ScanResiduals(NamedTuple):
    """What `bptt` needs from `scan_cell`: every step's residuals stacked on a leading time
    axis (time-major), and the mask as (time, batch) (None without one)."""

    steps: Any
    mask: jax.Array | None


class RecomputeResiduals(NamedTuple):
    """What `bptt` needs from `scan_cell(..., recompute_every=k)`: the first T mod k steps'
    residuals (`head`, a ScanResiduals), then for each later segment of k steps the carry
    entering it (`carries`, a leading segment axis), its inputs `xs` (segments, k, batch,
    features) and mask (segments, k, batch) or None, from which `bptt` recomputes the
    segment's residuals."""

    head: ScanResiduals
    carries: Any
    xs: jax.Array
    mask: jax.Array | None


def _select(condition: jax.Array, if_true: Any, if_false: Any) -> Any:
    """Per example: if_true where condition (batch,) holds, else if_false (pytrees alike)."""
    return jax.tree.map(lambda a, b: jnp.where(condition[:, None], a, b), if_true, if_false)


def _window_start(t: jax.Array, truncation: int) -> jax.Array:
    """Whether step t begins a truncation window other than the first."""
    return (t > 0) & (t % truncation == 0)


def _check_sequence(name: str, x: jax.Array, features: int | None) -> None:
    """Raise a ValueError unless x is (batch, time, features) (any features when None)."""
    if x.ndim != 3 or (features is not None and x.shape[2] != features):
        want = "features" if features is None else str(features)
        raise ValueError(f"{name}: input x has shape {tuple(x.shape)}, expected (batch, time, "
                         f"{want})")


def _check_options(name: str, xs, mask, truncation, unroll=1) -> None:
    _check_sequence(name, xs, None)
    if mask is not None and tuple(mask.shape) != tuple(xs.shape[:2]):
        raise ValueError(f"{name}: mask has shape {tuple(mask.shape)}, expected (batch, time) = "
                         f"{tuple(xs.shape[:2])}")
    _check_truncation(name, truncation)
    _check_unroll(name, unroll)


def _check_unroll(name: str, unroll: int | bool) -> None:
    """What lax.scan takes, an int >= 0 or a bool: 2.5 was a TypeError from deep in the
    scan's shapes, "2" a bare comparison error."""
    if not (isinstance(unroll, (bool, np.bool_)) or (is_count(unroll) and unroll >= 0)):
        raise ValueError(f"{name}: unroll must be an int >= 0 (steps per scan iteration) or a "
                         f"bool, got {unroll!r}")


def _check_truncation(name: str, truncation: int | None) -> None:
    """A whole number of steps >= 1, or None: a float such as 2.5 cut the windows where
    t % 2.5 == 0 (every 5 steps) and True every step, silently."""
    if truncation is None:
        return
    if not is_count(truncation):
        raise ValueError(f"{name}: truncation must be a whole number of steps (or None), got "
                         f"{truncation!r}")
    if truncation < 1:
        raise ValueError(f"{name}: truncation must be >= 1 (or None), got {truncation}")


def _check_outputs_gradient(name: str, what: str, dys: jax.Array, xs: jax.Array,
                            hidden: int) -> None:
    """dys (and its tangent) shaped as the scan's outputs, (batch, time, hidden) of xs: one
    of a single example or unit was broadcast in the reverse scan silently."""
    expected = (*xs.shape[:2], hidden)
    if tuple(dys.shape) != expected:
        raise ValueError(f"{name}: {what} has shape {tuple(dys.shape)}, expected (batch, "
                         f"time, hidden) = {expected}")


def _check_recompute_every(name: str, recompute_every: int | None) -> None:
    if recompute_every is not None and not (is_count(recompute_every) and recompute_every >= 1):
        raise ValueError(f"{name}: recompute_every must be a whole number >= 1 (or None), got "
                         f"{recompute_every!r}")


def _check_dtypes(name: str, params: Params, xs: jax.Array) -> None:
    """Raise a ValueError unless the params and x share one dtype: the scans carry the state
    and the gradients in it, and a float64 x with float32 params would fail inside bptt's
    scan."""
    dtypes = sorted({str(leaf.dtype) for leaf in jax.tree.leaves(params)})
    if dtypes != [str(xs.dtype)]:
        raise ValueError(f"{name}: input x has dtype {xs.dtype} and the params {dtypes}; cast "
                         "them to one dtype")


def _check_like(name: str, what: str, value: Any, expected: Any) -> None:
    """Raise a ValueError unless value has the structure, shapes and dtypes of expected: a
    carry against the cell's `initial_carry` for this batch and dtype (the gated cells would
    broadcast a carry of another batch size silently), a direction against its primal (one
    of another shape would be broadcast, one of another dtype fail inside the scan, whose
    carried tangent has the primal's dtype)."""
    def describe(tree):
        return jax.tree.map(lambda leaf: f"{tuple(leaf.shape)} {leaf.dtype}", tree)

    if jax.tree.structure(value) != jax.tree.structure(expected) or any(
            tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype
            for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(expected))):
        raise ValueError(f"{name}: {what} is {describe(value)}, expected {describe(expected)}")


def _check_mask(name: str, mask: jax.Array | None) -> None:
    """A mask marks real steps with True or 1 and padding with False or 0: any other value
    (0.5, a length, ...) is a ValueError where the values are known."""
    values = None if mask is None else concrete_values(mask)
    if values is not None and values.dtype != bool and not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name}: mask holds values {np.unique(values)[:5].tolist()}..., "
                         "expected booleans or 0 and 1")


def _forward_step(cell: Cell, weights: Params, truncation: int | None):
    """`scan_cell`'s scan body: (carry, (t, x_t, m_t)) -> (new carry, (y_t, residuals))."""
    def one_step(carry, inputs):
        t, x_t, m_t = inputs
        if truncation is not None:
            carry = jax.tree.map(
                lambda c: jnp.where(_window_start(t, truncation), lax.stop_gradient(c), c), carry)
        new_carry, y_t, residuals = cell.step(weights, carry, x_t)
        if m_t is not None:
            new_carry = _select(m_t, new_carry, carry)
            y_t = jnp.where(m_t[:, None], y_t, jnp.zeros_like(y_t))
        return new_carry, (y_t, residuals)

    return one_step


def _outputs_only(one_step):
    """A scan body like `one_step` that emits y_t alone (XLA then drops the residuals)."""
    def step(carry, inputs):
        new_carry, (y_t, _) = one_step(carry, inputs)
        return new_carry, y_t

    return step


def _segments(tree: Any, head: int, every: int) -> Any:
    """Time-major arrays (time, ...) -> their steps from `head` on as (segments, every, ...)."""
    return jax.tree.map(lambda a: a[head:].reshape((-1, every) + a.shape[1:]), tree)


def _unsegment(tree: Any) -> Any:
    """(segments, every, ...) -> (segments * every, ...)."""
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), tree)


def scan_cell(cell: Cell, params: Params, xs: jax.Array, carry0: Carry = None,
              mask: jax.Array | None = None, truncation: int | None = None,
              unroll: int = 1, recompute_every: int | None = None
              ) -> tuple[jax.Array, Carry, ScanResiduals | RecomputeResiduals]:
    """Run `cell` over xs (batch, time, features): (ys (batch, time, hidden), carry_T, residuals).

    carry0 defaults to the cell's zeros; mask (batch, time) and truncation as in the module
    docstring. `residuals` are for `bptt` with the same truncation.

    recompute_every=k keeps every step's residuals only for the first T mod k steps, and of
    the later ones only the carry entering each segment of k steps (`RecomputeResiduals`):
    `bptt` runs each segment forward again, one at a time, before its backward (gradient
    checkpointing through time: stored steps T / k + k instead of T, one forward pass more).
    """
    name = f"scan_cell({cell.name})"
    _check_options(name, xs, mask, truncation, unroll)
    _check_recompute_every(name, recompute_every)
    _check_dtypes(name, params, xs)
    _check_mask(name, mask)
    batch, time = xs.shape[:2]
    zeros = cell.initial_carry(batch, xs.dtype)
    if carry0 is None:
        carry0 = zeros
    _check_like(name, "carry0", carry0, zeros)
    mask_tm = None if mask is None else jnp.swapaxes(mask, 0, 1).astype(bool)
    weights = cell.step_weights(params)
    carry0 = split_like(vary_like(carry0, varying_axes((xs, weights, carry0, mask_tm))), xs)
    one_step = _forward_step(cell, weights, truncation)
    inputs = (jnp.arange(time), jnp.swapaxes(xs, 0, 1), mask_tm)
    if recompute_every is None:
        carry_T, (ys_tm, steps) = lax.scan(one_step, carry0, inputs, unroll=unroll)
        return jnp.swapaxes(ys_tm, 0, 1), carry_T, ScanResiduals(steps, mask_tm)
    head = time % recompute_every
    head_inputs = jax.tree.map(lambda a: a[:head], inputs)
    carry, (ys_head, head_steps) = lax.scan(one_step, carry0, head_inputs, unroll=unroll)
    head_mask = None if mask_tm is None else mask_tm[:head]

    def segment(carry, segment_inputs):
        carry_end, ys = lax.scan(_outputs_only(one_step), carry, segment_inputs, unroll=unroll)
        return carry_end, (carry, ys)

    carry_T, (carries, ys_segments) = lax.scan(
        segment, carry, _segments(inputs, head, recompute_every))
    ys_tm = jnp.concatenate([ys_head, _unsegment(ys_segments)], axis=0)
    residuals = RecomputeResiduals(ScanResiduals(head_steps, head_mask), carries,
                                   *_segments(inputs[1:], head, recompute_every))
    return jnp.swapaxes(ys_tm, 0, 1), carry_T, residuals


def scan_tangent(cell: Cell, params: Params, xs: jax.Array, dparams: Params,
                 dxs: jax.Array | None = None, carry0: Carry = None, dcarry0: Carry = None,
                 mask: jax.Array | None = None, truncation: int | None = None, unroll: int = 1
                 ) -> tuple[jax.Array, jax.Array, Carry, Carry]:
    """`scan_cell` in forward mode: one scan of the cell's `step_tangent` carrying the state
    and its tangent. Returns (ys, dys, carry_T, dcarry_T), dys (batch, time, hidden) the
    directional derivative of ys for the directions dparams (shaped as params), dxs (as xs;
    None for zero) and dcarry0 (as the carry; None for zero).

    mask and truncation as in `scan_cell`: a masked step passes the carry and its tangent on
    and outputs y_t = 0, dy_t = 0; the state entering steps k, 2k, ... has its tangent
    zeroed, as its gradient is cut (so dys is the jvp of `scan_cell`'s forward, stop_gradient
    included). No residuals are kept: nothing runs backward.
    """
    name = f"scan_tangent({cell.name})"
    if cell.step_tangent is None:
        raise ValueError(f"{name}: this cell has no step tangent (forward-mode) pass")
    _check_options(name, xs, mask, truncation, unroll)
    _check_dtypes(name, params, xs)
    _check_mask(name, mask)
    _check_like(name, "dparams", dparams, params)
    if dxs is not None:
        _check_like(name, "dxs", dxs, xs)
    batch, time = xs.shape[:2]
    zeros = cell.initial_carry(batch, xs.dtype)
    carry0 = zeros if carry0 is None else carry0
    dcarry0 = zeros if dcarry0 is None else dcarry0
    _check_like(name, "carry0", carry0, zeros)
    _check_like(name, "dcarry0", dcarry0, zeros)
    mask_tm = None if mask is None else jnp.swapaxes(mask, 0, 1).astype(bool)
    dxs_tm = None if dxs is None else jnp.swapaxes(dxs, 0, 1)
    carries0 = split_like(vary_like((carry0, dcarry0), varying_axes(
        (xs, dxs, params, dparams, carry0, dcarry0, mask_tm))), xs)

    def one_step(carries, inputs):
        carry, dcarry = carries
        t, x_t, dx_t, m_t = inputs
        if truncation is not None:
            cut = _window_start(t, truncation)
            dcarry = jax.tree.map(lambda d: jnp.where(cut, jnp.zeros_like(d), d), dcarry)
        new_carry, y_t, new_dcarry, dy_t = cell.step_tangent(params, carry, x_t, dparams,
                                                             dcarry, dx_t)
        if m_t is not None:
            new_carry, new_dcarry = _select(m_t, (new_carry, new_dcarry), (carry, dcarry))
            y_t, dy_t = (jnp.where(m_t[:, None], a, jnp.zeros_like(a)) for a in (y_t, dy_t))
        return (new_carry, new_dcarry), (y_t, dy_t)

    inputs = (jnp.arange(time), jnp.swapaxes(xs, 0, 1), dxs_tm, mask_tm)
    (carry_T, dcarry_T), (ys_tm, dys_tm) = lax.scan(one_step, carries0, inputs, unroll=unroll)
    return jnp.swapaxes(ys_tm, 0, 1), jnp.swapaxes(dys_tm, 0, 1), carry_T, dcarry_T


def scan_backward_tangent(cell: Cell, params: Params, xs: jax.Array, v_params: Params,
                          v_xs: jax.Array | None, dys: jax.Array, r_dys: jax.Array,
                          truncation: int | None = None, unroll: int = 1,
                          mask: jax.Array | None = None):
    """BPTT and its R-operator (Pearlmutter 1994) from the zero state: a forward scan of the
    cell's step tangent keeping every step's values and tangents (`TangentParts`), then a
    reverse scan of its step backward tangent from them, carrying (dcarry, R{dcarry}) and
    summing the parameter gradient and its tangent. dys = dE/dys and r_dys its tangent
    (batch, time, hidden); v_params the parameters' direction, v_xs the inputs' tangent (None
    for zero). Returns (dparams, dxs, R{dparams}, R{dxs}). With truncation=k the carry's
    tangent and both dcarry and R{dcarry} are cut where a window starts, as `scan_tangent`
    and `bptt` cut them (the jvp of `bptt`'s gradient of `scan_cell`'s forward). With a mask
    (batch, time) a masked step passes the carry and its tangent on forward, and dcarry and
    R{dcarry} back, and adds nothing to the gradients, as in `scan_cell` and `bptt`."""
    _, _, kept = _scan_tangent_keeping(cell, params, xs, v_params, v_xs, truncation, unroll,
                                       mask)
    for what, gradient in (("dys", dys), ("r_dys", r_dys)):
        _check_outputs_gradient(f"scan_backward_tangent({cell.name})", what, gradient, xs,
                                cell.hidden_size)
    return _bptt_tangent(cell, params, kept, v_params, dys, r_dys, truncation, unroll, mask)


def _tangent_parts(cell: Cell) -> TangentParts:
    """The cell's `TangentParts`, or, for a cell with only `step_tangent` and
    `step_backward_tangent` (a user's), parts keeping (carry, x_t, v_carry, v_x) and
    recomputing the step from them in the reverse scan."""
    if cell.tangent_parts is not None:
        return cell.tangent_parts

    def step_tangent(params, carry, x, v_params, v_carry, v_x):
        return (*cell.step_tangent(params, carry, x, v_params, v_carry, v_x),
                (carry, x, v_carry, v_x))

    def step_backward_tangent(params, kept, v_params, dcarry, dy, r_dcarry, r_dy):
        carry, x, v_carry, v_x = kept
        return cell.step_backward_tangent(params, carry, x, v_params, v_carry, v_x, dcarry, dy,
                                          r_dcarry, r_dy)

    return TangentParts(step_tangent, step_backward_tangent)


def _cut_at_window_start(truncation: int | None, t: jax.Array, tree: Any) -> Any:
    """tree zeroed at a step where a truncation window starts (unchanged without one)."""
    if truncation is None:
        return tree
    cut = _window_start(t, truncation)
    return jax.tree.map(lambda d: jnp.where(cut, jnp.zeros_like(d), d), tree)


def _scan_tangent_keeping(cell, params, xs, v_params, v_xs, truncation, unroll, mask=None):
    """The forward half of `scan_backward_tangent`: (ys, v_ys, kept), ys and v_ys (batch,
    time, hidden), kept every step's values for the reverse scan (time-major)."""
    name = f"scan_backward_tangent({cell.name})"
    if cell.step_backward_tangent is None:
        raise ValueError(f"{name}: this cell has no step backward tangent (R-operator)")
    _check_options(name, xs, mask, truncation, unroll)
    _check_dtypes(name, params, xs)
    _check_mask(name, mask)
    _check_like(name, "v_params", v_params, params)
    if v_xs is not None:
        _check_like(name, "v_xs", v_xs, xs)
    zeros = cell.initial_carry(xs.shape[0], xs.dtype)
    parts = _tangent_parts(cell)

    def step_forward(carries, inputs):
        carry, v_carry = carries
        t, x_t, v_x_t, m_t = inputs
        v_carry = _cut_at_window_start(truncation, t, v_carry)
        new_carry, y_t, new_v_carry, v_y_t, kept = parts.step_tangent(
            params, carry, x_t, v_params, v_carry, v_x_t)
        if m_t is not None:
            new_carry, new_v_carry = _select(m_t, (new_carry, new_v_carry), (carry, v_carry))
            y_t, v_y_t = (jnp.where(m_t[:, None], a, jnp.zeros_like(a)) for a in (y_t, v_y_t))
        return (new_carry, new_v_carry), (y_t, v_y_t, kept)

    v_xs_tm = None if v_xs is None else jnp.swapaxes(v_xs, 0, 1)
    inputs = (jnp.arange(xs.shape[1]), jnp.swapaxes(xs, 0, 1), v_xs_tm, _time_major(mask))
    carries0 = split_like(vary_like((zeros, zeros), varying_axes((params, v_params, inputs))),
                          xs)
    _, (ys_tm, v_ys_tm, kept) = lax.scan(step_forward, carries0, inputs, unroll=unroll)
    return jnp.swapaxes(ys_tm, 0, 1), jnp.swapaxes(v_ys_tm, 0, 1), kept


def _time_major(mask: jax.Array | None) -> jax.Array | None:
    """A (batch, time) mask as booleans (time, batch), or None."""
    return None if mask is None else jnp.swapaxes(mask, 0, 1).astype(bool)


def _bptt_tangent(cell, params, kept, v_params, dys, r_dys, truncation, unroll, mask=None):
    """The reverse half of `scan_backward_tangent`, from `_scan_tangent_keeping`'s kept; a
    masked step's incoming (dcarry, R{dcarry}, dy, R{dy}) zeroed before it, as in `bptt`,
    and (dcarry, R{dcarry}) passed on past it."""
    parts = _tangent_parts(cell)
    zeros = cell.initial_carry(dys.shape[0], dys.dtype)
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    def step_back(state, inputs):
        dcarry, r_dcarry, grads, r_grads = state
        t, kept_t, dy_t, r_dy_t, m_t = inputs
        incoming = (dcarry, r_dcarry)
        if m_t is not None:
            incoming = _select(m_t, incoming, jax.tree.map(jnp.zeros_like, incoming))
            dy_t, r_dy_t = (jnp.where(m_t[:, None], a, jnp.zeros_like(a))
                            for a in (dy_t, r_dy_t))
        g, dcarry_prev, dx_t, r_g, r_dcarry_prev, r_dx_t = parts.step_backward_tangent(
            params, kept_t, v_params, incoming[0], dy_t, incoming[1], r_dy_t)
        if m_t is not None:
            dcarry_prev, r_dcarry_prev = _select(m_t, (dcarry_prev, r_dcarry_prev),
                                                 (dcarry, r_dcarry))
        dcarry_prev, r_dcarry_prev = _cut_at_window_start(truncation, t,
                                                          (dcarry_prev, r_dcarry_prev))
        return (dcarry_prev, r_dcarry_prev, jax.tree.map(jnp.add, grads, g),
                jax.tree.map(jnp.add, r_grads, r_g)), (dx_t, r_dx_t)

    inputs = (jnp.arange(dys.shape[1]), kept, jnp.swapaxes(dys, 0, 1),
              jnp.swapaxes(r_dys, 0, 1), _time_major(mask))
    zeros = split_like(zeros, dys)
    state0 = vary_like((zeros, zeros, zero_grads, zero_grads),
                       varying_axes((params, v_params, inputs)))
    (_, _, grads, r_grads), (dxs_tm, r_dxs_tm) = lax.scan(
        step_back, state0, inputs, reverse=True, unroll=unroll)
    return grads, jnp.swapaxes(dxs_tm, 0, 1), r_grads, jnp.swapaxes(r_dxs_tm, 0, 1)


def bptt(cell: Cell, params: Params, residuals: ScanResiduals | RecomputeResiduals,
         dys: jax.Array, dcarry_T: Carry = None, truncation: int | None = None,
         unroll: int = 1, return_dcarries: bool = False, curvature: bool = False):
    """Backpropagation through time: a reverse `lax.scan` of the cell's `step_backward`.

    dys (batch, time, hidden) = dE/dys; dcarry_T = dE/dcarry_T (default zeros). Returns
    (dparams, dxs (batch, time, features), dcarry0), and with return_dcarries also dcarries,
    the carry pytree with a time axis after the batch one: dcarries[:, t] = dE/d(the carry
    emitted by step t), the gradient arriving from the later steps (dys[:, t] not included),
    truncated like the rest. A masked step's incoming gradients are zeroed before its step
    backward, which is linear in them, so it contributes exactly nothing, and its dcarry
    passes through unchanged.

    With curvature=True the same scan backpropagates LeCun's diagonal second derivatives
    instead (`nets.layers`): dys, dcarry_T and the results are d2E/d(.)^2 diagonals, and each
    step runs the cell's `step_curvature` with the squared weights.

    Given `RecomputeResiduals` (`scan_cell(..., recompute_every=k)`), a reverse scan over the
    segments of k steps runs each segment forward from its kept carry (the steps' residuals,
    as `scan_cell` made them), then its steps backward, then the first T mod k steps from
    their kept residuals: the same sums in the same order as from `ScanResiduals`.
    """
    _check_truncation(f"bptt({cell.name})", truncation)
    _check_unroll(f"bptt({cell.name})", unroll)
    parts = cell.gradient_parts
    step_back = cell.step_backward if parts is None else parts.step_backward
    recompute = isinstance(residuals, RecomputeResiduals)
    forward_weights = cell.step_weights(params) if recompute else None
    if curvature:
        if cell.step_curvature is None:
            raise ValueError(f"bptt({cell.name}): this cell has no step curvature")
        step_back = cell.step_curvature if parts is None else parts.step_curvature
        params = jax.tree.map(jnp.square, params)
    head = residuals.head if recompute else residuals
    head_time, batch = jax.tree.leaves(head.steps)[0].shape[:2]
    segments, every = residuals.xs.shape[:2] if recompute else (0, 0)
    time = head_time + segments * every
    if tuple(dys.shape) != (batch, time, cell.hidden_size):
        raise ValueError(f"bptt({cell.name}): dys has shape {tuple(dys.shape)}, expected "
                         f"(batch, time, hidden) = {(batch, time, cell.hidden_size)} from "
                         "the forward's residuals")
    zeros = cell.initial_carry(batch, dys.dtype)
    if dcarry_T is None:
        dcarry_T = zeros
    _check_like(f"bptt({cell.name})", "dcarry_T", dcarry_T, zeros)
    weights = params if cell.backward_weights is None else cell.backward_weights(params)
    # the running sum has the shapes of one step's gradient (its parts, where the cell has
    # them), read off shapes alone so that a sequence of 0 steps works too
    step_residuals = jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.shape[1:], r.dtype),
                                  head.steps)
    step_dy = jax.ShapeDtypeStruct((batch, cell.hidden_size), dys.dtype)
    step_gradient = jax.eval_shape(step_back, weights, step_residuals, dcarry_T, step_dy)[0]
    zero_dparams = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), step_gradient)
    dcarry_T, zero_dparams = vary_like((dcarry_T, zero_dparams), varying_axes(
        (weights, residuals, dys, dcarry_T)))
    dcarry_T = split_like(dcarry_T, dys)

    def one_step_back(state, inputs):
        dcarry, dparams = state
        t, step_residuals, dy_t, m_t = inputs
        if m_t is not None:
            dcarry_in = _select(m_t, dcarry, jax.tree.map(jnp.zeros_like, dcarry))
            dy_t = jnp.where(m_t[:, None], dy_t, jnp.zeros_like(dy_t))
        else:
            dcarry_in = dcarry
        step_dparams, dcarry_prev, dx_t = step_back(weights, step_residuals,
                                                             dcarry_in, dy_t)
        if m_t is not None:
            dcarry_prev = _select(m_t, dcarry_prev, dcarry)
        if truncation is not None:
            cut = _window_start(t, truncation)
            dcarry_prev = jax.tree.map(lambda d: jnp.where(cut, jnp.zeros_like(d), d),
                                       dcarry_prev)
        dparams = jax.tree.map(jnp.add, dparams, step_dparams)
        return (dcarry_prev, dparams), (dx_t, dcarry if return_dcarries else None)

    steps = jnp.arange(time)
    dys_tm = jnp.swapaxes(dys, 0, 1)
    state = (dcarry_T, zero_dparams)
    outputs = []
    if recompute:
        one_step = _forward_step(cell, forward_weights, truncation)

        def segment_back(state, inputs):
            carry, t, xs, mask, dys_segment = inputs
            _, (_, segment_steps) = lax.scan(one_step, carry, (t, xs, mask), unroll=unroll)
            return lax.scan(one_step_back, state, (t, segment_steps, dys_segment, mask),
                            reverse=True, unroll=unroll)

        state, segment_outputs = lax.scan(segment_back, state, (
            residuals.carries, _segments(steps, head_time, every), residuals.xs,
            residuals.mask, _segments(dys_tm, head_time, every)), reverse=True)
        outputs.append(_unsegment(segment_outputs))
    head_inputs = (steps[:head_time], head.steps, dys_tm[:head_time], head.mask)
    (dcarry0, dparams), head_outputs = lax.scan(one_step_back, state, head_inputs,
                                                reverse=True, unroll=unroll)
    (dxs_tm, dcarries_tm) = jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0),
                                         head_outputs, *outputs)
    dxs = jnp.swapaxes(dxs_tm, 0, 1)
    if parts is not None:
        dparams = parts.assemble(dparams)
    if return_dcarries:
        return dparams, dxs, dcarry0, jax.tree.map(lambda d: jnp.swapaxes(d, 0, 1), dcarries_tm)
    return dparams, dxs, dcarry0


def _flip_time(sequence):
    return None if sequence is None else jnp.flip(sequence, axis=1)


def scan_bidirectional(forward_cell: Cell, backward_cell: Cell, params: tuple,
                       xs: jax.Array, mask: jax.Array | None = None, unroll: int = 1,
                       recompute_every: int | None = None):
    """Both directions over xs (batch, time, features), params = (forward, backward): (ys
    (batch, time, H_f + H_b) = [h_fw_t, h_bw_t], (forward carry_T, backward carry_T),
    residuals for `bptt_bidirectional`).

    With a padding mask (batch, time; True on each sequence's steps, its padding after
    them), every sequence is read over its own length in both directions, as PyTorch's packed
    sequences are: the backward direction runs on the flipped sequence and flipped mask, so
    it meets the padding first, keeps its zero state through it (masked steps pass the carry
    on) and starts at each sequence's last real step. Padded steps output zeros; the carries
    returned are each direction's final state (the forward one at the last real step, the
    backward one at the first step). recompute_every as in `scan_cell`, for both."""
    forward_params, backward_params = params
    ys_forward, carry_forward, residuals_forward = scan_cell(
        forward_cell, forward_params, xs, mask=mask, unroll=unroll,
        recompute_every=recompute_every)
    ys_backward, carry_backward, residuals_backward = scan_cell(
        backward_cell, backward_params, _flip_time(xs), mask=_flip_time(mask), unroll=unroll,
        recompute_every=recompute_every)
    ys = jnp.concatenate([ys_forward, _flip_time(ys_backward)], axis=2)
    return ys, (carry_forward, carry_backward), (residuals_forward, residuals_backward)


def bptt_bidirectional(forward_cell: Cell, backward_cell: Cell, params: tuple, residuals,
                       dys: jax.Array, dcarries_T: tuple | None = None, unroll: int = 1):
    """The hand-written backward of `scan_bidirectional`: each direction's `bptt` (the
    backward one on the flipped dy), from dys = dE/dys and dcarries_T = (dE/d forward
    carry_T, dE/d backward carry_T) (default zeros). Returns ((forward dparams, backward
    dparams), dxs), dxs the two directions' sum."""
    dcarry_forward, dcarry_backward = (None, None) if dcarries_T is None else dcarries_T
    hidden = forward_cell.hidden_size
    dparams_forward, dxs_forward, _ = bptt(forward_cell, params[0], residuals[0],
                                           dys[:, :, :hidden], dcarry_forward, unroll=unroll)
    dparams_backward, dxs_backward, _ = bptt(backward_cell, params[1], residuals[1],
                                             _flip_time(dys[:, :, hidden:]), dcarry_backward,
                                             unroll=unroll)
    return (dparams_forward, dparams_backward), dxs_forward + _flip_time(dxs_backward)


# --- sequence layers --------------------------------------------------------------------------

def rnn(cell: Cell, *, truncation: int | None = None, unroll: int = 1, reverse: bool = False,
        recompute_every: int | None = None, name: str | None = None) -> Layer:
    """A Layer running `cell` over x (batch, time, in) from the zero state: y (batch, time,
    hidden), the cell's y_t at every step. Backward: `bptt` (with the same truncation); its
    curvature is `bptt(..., curvature=True)`.

    reverse=True runs the cell from the last step to the first (the backward direction of a
    bidirectional layer): y = flip(scan(flip(x))) along time, and its backward the flipped
    bptt of the flipped dy; truncation windows then count from the last step.

    recompute_every=k keeps the carry every k steps in place of every step's residuals and
    runs each segment forward again in the backward (`scan_cell`): gradient checkpointing
    through time, for long sequences.

    The Layer contract has one input, so there is no mask here: batches of padded sequences
    call `scan_cell`/`bptt` with their mask directly (as the tests do)."""
    name = name or cell.name
    _check_truncation(name, truncation)
    _check_unroll(name, unroll)
    _check_recompute_every(name, recompute_every)

    def in_order(sequence):
        return jnp.flip(sequence, axis=1) if reverse else sequence

    def init(key, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{name}: input_shape {tuple(input_shape)} must be (batch, time, "
                             "features)")
        return (input_shape[0], input_shape[1], cell.hidden_size), cell.init(key, input_shape[2])

    def forward(params, x):
        _check_sequence(name, x, cell.input_size(params))
        ys, _, residuals = scan_cell(cell, params, in_order(x), truncation=truncation,
                                     unroll=unroll, recompute_every=recompute_every)
        return in_order(ys), residuals

    def backward_by(curvature):
        def run(params, residuals, dy):
            dparams, dx, _ = bptt(cell, params, residuals, in_order(dy), truncation=truncation,
                                  unroll=unroll, curvature=curvature)
            return dparams, in_order(dx)

        return run

    def tangent(params, x, dparams, dx):
        _check_sequence(name, x, cell.input_size(params))
        ys, dys, _, _ = scan_tangent(cell, params, in_order(x), dparams, _flip_time(dx)
                                     if reverse else dx, truncation=truncation, unroll=unroll)
        return in_order(ys), in_order(dys)

    def tangent_backward(params, x, v_params, v_x, upstream):
        """`scan_backward_tangent` in the layer's order, asking upstream for (g_y, R{g_y})
        between its forward scan and its reverse one (every step's values kept from that
        forward scan, so recompute_every changes nothing here)."""
        _check_sequence(name, x, cell.input_size(params))
        ys, v_ys, kept = _scan_tangent_keeping(cell, params, in_order(x), v_params,
                                               None if v_x is None else in_order(v_x),
                                               truncation, unroll)
        g_y, r_g_y = upstream(in_order(ys), in_order(v_ys))
        check_gradient(name, g_y, ys.shape)
        check_gradient(name, r_g_y, ys.shape, "R{dy}")
        g_params, g_x, r_g_params, r_g_x = _bptt_tangent(
            cell, params, kept, v_params, in_order(g_y), in_order(r_g_y), truncation, unroll)
        return g_params, in_order(g_x), r_g_params, in_order(r_g_x)

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        return tangent_backward(params, x, v_params, v_x, lambda y, v_y: (g_y, r_g_y))

    has_backward_tangent = cell.step_tangent is not None and cell.step_backward_tangent is not None
    return Layer(name, init, forward, backward_by(False),
                 curvature=backward_by(True) if cell.step_curvature is not None else None,
                 tangent=tangent if cell.step_tangent is not None else None,
                 backward_tangent=backward_tangent if has_backward_tangent else None,
                 tangent_backward=tangent_backward if has_backward_tangent else None)


def bidirectional(forward_cell: Cell, backward_cell: Cell, *, truncation: int | None = None,
                  unroll: int = 1, recompute_every: int | None = None,
                  name: str = "bidirectional") -> Layer:
    """Two `rnn` layers side by side on one sequence (Schuster and Paliwal 1997), the second
    reversed: y[:, t] = [forward_cell's h_t, backward_cell's h_t] (batch, time, H_f + H_b), as
    PyTorch's bidirectional modules give them. `nets.layers.parallel` with combine="concat":
    params (forward params, backward params); dx is the sum of the two directions' dx."""
    return parallel(
        rnn(forward_cell, truncation=truncation, unroll=unroll,
            recompute_every=recompute_every, name=f"{forward_cell.name}_fw"),
        rnn(backward_cell, truncation=truncation, unroll=unroll, reverse=True,
            recompute_every=recompute_every, name=f"{backward_cell.name}_bw"),
        combine="concat", name=name)


_both_directions = bidirectional  # for sequence_model, whose option of that name hides it


def LastStep(name: str = "LastStep") -> Layer:
    """y = x[:, -1]: (batch, time, features) -> (batch, features); backward puts dy at the last
    step and zeros elsewhere, and so does the curvature with d2y (a Jacobian of ones); the
    tangent is dx[:, -1]."""

    def init(key, input_shape):
        del key
        if len(input_shape) != 3:
            raise ValueError(f"{name}: input_shape {tuple(input_shape)} must be (batch, time, "
                             "features)")
        return (input_shape[0], input_shape[2]), ()

    def forward(params, x):
        del params
        _check_sequence(name, x, None)
        return x[:, -1, :], StaticShape(x.shape)

    def backward(params, x_shape, dy):
        del params
        batch, _, features = x_shape.shape
        check_gradient(name, dy, (batch, features))
        return (), split_like(jnp.zeros(x_shape.shape, dy.dtype), dy).at[:, -1, :].set(dy)

    def tangent(params, x, dparams, dx):
        y, _ = forward(params, x)
        check_direction(name, "dx", dx, x, "x")
        return y, None if dx is None else dx[:, -1, :]

    return Layer(name, init, forward, backward, curvature=backward, tangent=tangent,
                 backward_tangent=linear_backward_tangent(forward, backward))


def FinalStates(forward_features: int, name: str = "FinalStates") -> Layer:
    """Each direction's final output of a bidirectional layer: y = [x[:, -1, :F], x[:, 0, F:]]
    with F = forward_features, (batch, time, features) -> (batch, features): the forward
    direction ends at the last step, the backward one at the first (PyTorch's h_n of a
    bidirectional module, the two directions side by side). The backward puts each half of dy
    at its step and zeros elsewhere; the curvature does the same with d2y, and the tangent
    selects dx as the forward selects x."""
    if not is_count(forward_features):  # 1.5 was built, and failed in the forward's slices
        raise ValueError(f"{name}: forward_features must be an int, got {forward_features!r}")

    def init(key, input_shape):
        del key
        if len(input_shape) != 3:
            raise ValueError(f"{name}: input_shape {tuple(input_shape)} must be (batch, time, "
                             "features)")
        if not 0 < forward_features < input_shape[2]:
            raise ValueError(f"{name}: forward_features must be in [1, {input_shape[2] - 1}] "
                             f"for {input_shape[2]} features, got {forward_features}")
        return (input_shape[0], input_shape[2]), ()

    def forward(params, x):
        del params
        _check_sequence(name, x, None)
        if not 0 < forward_features < x.shape[2]:
            raise ValueError(f"{name}: forward_features must be in [1, {x.shape[2] - 1}] for "
                             f"x of shape {x.shape}, got {forward_features}")
        y = jnp.concatenate([x[:, -1, :forward_features], x[:, 0, forward_features:]], axis=1)
        return y, StaticShape(x.shape)

    def backward(params, x_shape, dy):
        del params
        batch, _, features = x_shape.shape
        check_gradient(name, dy, (batch, features))
        dx = split_like(jnp.zeros(x_shape.shape, dy.dtype), dy)
        dx = dx.at[:, -1, :forward_features].set(dy[:, :forward_features])
        return (), dx.at[:, 0, forward_features:].set(dy[:, forward_features:])

    def tangent(params, x, dparams, dx):
        y, _ = forward(params, x)
        check_direction(name, "dx", dx, x, "x")
        return y, None if dx is None else forward(params, dx)[0]

    return Layer(name, init, forward, backward, curvature=backward, tangent=tangent,
                 backward_tangent=linear_backward_tangent(forward, backward))


def TimeDistributed(layer: Layer, name: str | None = None) -> Layer:
    """`layer` (batch, f) -> (batch, g) applied at every time step: (batch, time, f) ->
    (batch, time, g), by folding time into the batch. Parameters are shared across steps; a
    stochastic layer (dropout) draws for every example and step apart from one key. The
    backward and curvature passes fold time the same way."""
    name = name or f"TimeDistributed({layer.name})"

    def init(key, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{name}: input_shape {tuple(input_shape)} must be (batch, time, "
                             "features)")
        batch, time = input_shape[:2]
        (_, out), params = layer.init(key, (-1, input_shape[2]))
        return (batch, time, out), params

    def forward(params, x, key=None):
        _check_sequence(name, x, None)
        batch, time, features = x.shape
        y, residuals = forward_with_key(layer, params, x.reshape(batch * time, features), key)
        return y.reshape(batch, time, y.shape[-1]), residuals

    def folded(method, what):
        def run(params, residuals, dy):
            if dy.ndim != 3:  # the layer's own backward checks the folded rows
                raise ValueError(f"{name}: {what} has shape {tuple(dy.shape)}, expected "
                                 "(batch, time, features)")
            batch, time, out = dy.shape
            dparams, dx = method(params, residuals, dy.reshape(batch * time, out))
            return dparams, dx.reshape(batch, time, dx.shape[-1])

        return run

    def tangent(params, x, dparams, dx, key=None):
        _check_sequence(name, x, None)
        check_direction(name, "dx", dx, x, "x")  # the fold met another batch as a reshape error
        batch, time, features = x.shape
        y, dy = tangent_with_key(layer, params, x.reshape(batch * time, features), dparams,
                                 None if dx is None else dx.reshape(batch * time, features),
                                 key)
        return (y.reshape(batch, time, y.shape[-1]),
                None if dy is None else dy.reshape(batch, time, dy.shape[-1]))

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y, key=None):
        _check_sequence(name, x, None)
        check_direction(name, "v_x", v_x, x, "x")
        batch, time, features = x.shape
        for what, gradient in (("dy", g_y), ("R{dy}", r_g_y)):
            if gradient.shape[:2] != (batch, time) or gradient.ndim != 3:
                raise ValueError(f"{name}: {what} has shape {tuple(gradient.shape)}, expected "
                                 f"(batch, time, features) with (batch, time) = {(batch, time)}")

        def fold(z):
            return None if z is None else z.reshape(batch * time, z.shape[-1])

        g_params, g_x, r_g_params, r_g_x = backward_tangent_with_key(
            layer, params, fold(x), v_params, fold(v_x), fold(g_y), fold(r_g_y), key)
        return (g_params, g_x.reshape(batch, time, features), r_g_params,
                r_g_x.reshape(batch, time, features))

    curvature = None if layer.curvature is None else folded(layer.curvature, "d2y")
    return Layer(name, init, forward, folded(layer.backward, "dy"), curvature=curvature,
                 stochastic=layer.stochastic,
                 tangent=None if layer.tangent is None else tangent,
                 backward_tangent=None if layer.backward_tangent is None else backward_tangent)


def sequence_model(cells: Any, out_features: int, *, last_step: bool = False,
                   bidirectional: bool = False, dropout: float = 0.0,
                   truncation: int | None = None, unroll: int = 1,
                   recompute_every: int | None = None, name: str = "sequence_model") -> Layer:
    """A stack of `rnn` layers (one per cell, bottom first) and a Dense output projection
    (Glorot-uniform), at every step (batch, time, out_features) or, with last_step, at the
    last one (batch, out_features). params: one entry per layer, as in `serial`.

    bidirectional=True makes each layer `bidirectional(cell, cell)`: the cell's definition
    twice, with params of its own each, the second run from the last step, y_t = [h_fw_t,
    h_bw_t] (2 H features into the next layer; PyTorch's bidirectional=True). Its params
    entry is then (forward params, backward params). With last_step the projection reads
    `FinalStates`: the forward direction's last output and the backward one's first.

    dropout > 0 drops each recurrent layer's outputs (the input of the next layer and of the
    projection; Zaremba et al. 2014, as Karpathy's char-rnn) at that rate when the model is
    given a key (`nets.dropout_after`: the params are those of the model without dropout);
    without a key it runs at inference. truncation, unroll and recompute_every go to every
    `rnn` layer."""
    cells = list(cells)
    if not cells:
        raise ValueError(f"{name}: cells is empty; a sequence model needs at least one cell")
    if bidirectional:
        numbered = [cell._replace(name=f"{cell.name}_{index}")
                    for index, cell in enumerate(cells)]  # sublayers lstm_0_fw, lstm_0_bw, ...
        layers = [_both_directions(cell, cell, truncation=truncation, unroll=unroll,
                                   recompute_every=recompute_every, name=cell.name)
                  for cell in numbered]
    else:
        layers = [rnn(cell, truncation=truncation, unroll=unroll,
                      recompute_every=recompute_every, name=f"{cell.name}_{index}")
                  for index, cell in enumerate(cells)]
    if dropout:
        layers = [dropout_after(layer, dropout) for layer in layers]
    if last_step:
        final = FinalStates(cells[-1].hidden_size) if bidirectional else LastStep()
        layers += [final, _projection(out_features)]
    else:
        layers.append(TimeDistributed(_projection(out_features), name="output"))
    return serial(*layers, name=name)


def _projection(out_features: int) -> Layer:
    return Dense(out_features, w_init=initializers.glorot_uniform(), name="output")


# Forward and backward of a per-step `sequence_model` from given states and to final ones,
# for truncated BPTT that carries the state from one window to the next. (The output layer's
# forward and backward read their shapes from params, so out_features=1 stands for any.)
_PER_STEP_OUTPUT = TimeDistributed(_projection(1), name="output")


def _check_stack(name: str, cells: Any, params: Params, **per_cell: Any) -> None:
    """Raise a ValueError unless params hold one entry per cell and the output layer's, and
    each given per-cell argument (carries0, dcarries_T, the residuals' cells) one per cell:
    zip would otherwise drop the extra cells or pair the wrong entries silently."""
    if len(params) != len(cells) + 1:
        raise ValueError(f"{name}: {len(cells)} cells and {len(params)} params entries, "
                         f"expected {len(cells) + 1} (one per cell, then the output layer's)")
    if per_cell.get("residuals") is not None:
        per_cell["residuals"] = per_cell["residuals"][0]
    for argument, value in per_cell.items():
        if value is not None and len(value) != len(cells):
            raise ValueError(f"{name}: {argument} has {len(value)} entries, expected one per "
                             f"cell, {len(cells)}")


def stack_forward(cells: Any, params: Params, xs: jax.Array, carries0: Any = None,
                  truncation: int | None = None, unroll: int = 1, dropout: float = 0.0,
                  key: jax.Array | None = None, recompute_every: int | None = None):
    """`sequence_model(cells, out_features, dropout=dropout)` run from the states carries0
    (one per cell, default zeros): (outputs (batch, time, out_features), carries_T (tuple, one
    per cell), residuals). params are that model's, (cell params..., output params). With a
    key, each cell's outputs are dropped at rate `dropout` (a mask per cell from the key; the
    carried states are not dropped). recompute_every as in `scan_cell`, for every cell
    (`stack_backward` takes either kind of residuals)."""
    if key is not None and not dropout:
        raise ValueError("stack_forward: a key was given, but dropout is 0: nothing draws "
                         "random numbers")
    _check_stack("stack_forward", cells, params, carries0=carries0)
    carries0 = (None,) * len(cells) if carries0 is None else tuple(carries0)
    keys = [None] * len(cells) if key is None else list(jax.random.split(key, len(cells)))
    drop = Dropout(dropout, name="stack_forward dropout")
    hs, carries_T, residuals, scales = xs, [], [], []
    for cell, cell_params, carry0, cell_key in zip(cells, params[:-1], carries0, keys):
        hs, carry_T, cell_residuals = scan_cell(cell, cell_params, hs, carry0,
                                                truncation=truncation, unroll=unroll,
                                                recompute_every=recompute_every)
        hs, scale = drop.forward((), hs, key=cell_key)
        carries_T.append(carry_T)
        residuals.append(cell_residuals)
        scales.append(scale)
    outputs, output_residuals = _PER_STEP_OUTPUT.forward(params[-1], hs)
    return outputs, tuple(carries_T), (tuple(residuals), tuple(scales), output_residuals)


def stack_backward(cells: Any, params: Params, residuals: Any, doutputs: jax.Array,
                   dcarries_T: Any = None, truncation: int | None = None, unroll: int = 1,
                   curvature: bool = False):
    """The hand-written backward of `stack_forward`: (dparams, dxs, dcarries0), dparams with
    the structure of params; dcarries_T (one per cell, default zeros) is dE/dcarries_T. Each
    cell's output gradient is multiplied by its dropout mask m / (1 - rate), if any.

    With curvature=True, LeCun's diagonal second derivatives instead (`bptt`): doutputs is
    d2E/doutputs^2 (the loss's `curvature`), the results are d2E/d(.)^2 diagonals, and the
    states carried in from the previous window are constants, as in the gradient."""
    _check_stack("stack_backward", cells, params, residuals=residuals, dcarries_T=dcarries_T)
    cell_residuals, scales, output_residuals = residuals
    output_backward = _PER_STEP_OUTPUT.curvature if curvature else _PER_STEP_OUTPUT.backward
    doutput_params, dhs = output_backward(params[-1], output_residuals, doutputs)
    dcarries_T = (None,) * len(cells) if dcarries_T is None else tuple(dcarries_T)
    dparams, dcarries0 = [doutput_params], []
    for cell, cell_params, residual, scale, dcarry_T in reversed(
            list(zip(cells, params[:-1], cell_residuals, scales, dcarries_T))):
        if scale is not None:  # the dropout mask m / (1 - rate) of this cell's outputs
            dhs = dhs * (scale * scale if curvature else scale)
        dcell, dhs, dcarry0 = bptt(cell, cell_params, residual, dhs, dcarry_T, truncation,
                                   unroll, curvature=curvature)
        dparams.append(dcell)
        dcarries0.append(dcarry0)
    return tuple(reversed(dparams)), dhs, tuple(reversed(dcarries0))


def sequence_cross_entropy() -> Loss:
    """Softmax cross-entropy per step, in nats, averaged over batch and time.

    outputs: logits (batch, time, classes); targets: integer classes (batch, time), of an
    integer dtype (ValueError otherwise), each in [0, classes) (ValueError where the values
    are known; inside jit a step whose class lies outside adds nothing to E, dE/dz or the
    curvature, though m T still counts it).
        E = -(1/(m T)) sum_i sum_t log softmax(z_it)[y_it],
        dE/dz_it = (softmax(z_it) - onehot(y_it)) / (m T).
    (Averaging over time too keeps the step size independent of the window length; divide by
    log 2 for bits per character.) Curvature, the diagonal of d2E/dz2 (whose full block per
    step is (diag(p) - p p^T) / (m T), p = softmax(z_it)): p (1 - p) / (m T), as
    `nets.softmax_cross_entropy` gives per example; `hessian_vector` is the whole block's
    product.
    """
    name = "sequence_cross_entropy"

    def class_ids(y):
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"{name}: targets have dtype {y.dtype}, expected integer class "
                             "ids")
        return concrete_values(y)

    def check_targets(y):
        """What holds without the outputs (the procedures' check of a whole set): integer
        class ids, none below 0."""
        values = class_ids(y)
        if values is not None and values.size and values.min() < 0:
            raise ValueError(f"{name}: targets range over [{values.min()}, {values.max()}], "
                             "expected class ids >= 0")

    def check(z, y):
        if z.ndim != 3 or tuple(y.shape) != tuple(z.shape[:2]):
            raise ValueError(f"{name}: outputs have shape {tuple(z.shape)} and targets "
                             f"{tuple(y.shape)}; expected (batch, time, classes) and "
                             "(batch, time)")
        values = class_ids(y)
        if values is not None and values.size and not (
                0 <= values.min() and values.max() < z.shape[-1]):
            raise ValueError(f"{name}: targets range over [{values.min()}, {values.max()}], "
                             f"expected class ids in [0, {z.shape[-1] - 1}]")

    def value(z, y):
        check(z, y)
        picked = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype) * jax.nn.log_softmax(z, axis=-1)
        return -jnp.sum(picked) / (z.shape[0] * z.shape[1])

    def grad(z, y):
        check(z, y)
        one_hot = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
        picked = jnp.sum(one_hot, axis=-1, keepdims=True)  # 0 for a class outside the range
        return (jax.nn.softmax(z, axis=-1) * picked - one_hot) / (z.shape[0] * z.shape[1])

    def curvature(z, y):
        check(z, y)
        p = jax.nn.softmax(z, axis=-1)
        picked = jnp.sum(jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype), axis=-1, keepdims=True)
        return p * (1 - p) * picked / (z.shape[0] * z.shape[1])

    def hessian_vector(z, y, u):
        """The whole block per step times u: (diag(p) - p p^T) u / (m T)."""
        check(z, y)
        if u.shape != z.shape:
            raise ValueError(f"{name}: hessian_vector's u has shape {tuple(u.shape)}, expected "
                             f"the outputs' {tuple(z.shape)}")
        p = jax.nn.softmax(z, axis=-1)
        picked = jnp.sum(jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype), axis=-1, keepdims=True)
        return picked * p * (u - jnp.sum(p * u, axis=-1, keepdims=True)) / (
            z.shape[0] * z.shape[1])

    return Loss(name, value, grad, curvature, hessian_vector, check_targets)
