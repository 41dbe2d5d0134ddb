"""Multi-head self-attention (Vaswani et al. 2017) with a hand-written backward pass, learned
positions, and a small decoder-only transformer built from them.

On a sequence x (batch, T, F) with H heads of width D = F / H, for each example and head:

    [q k v] = x W_qkv + b_qkv                       q, k, v (T, D) per head
    s = q k^T / sqrt(D)                             s (T, T); with `causal`, s_ts = -inf for s > t
    p = softmax(s) along its last axis              each row p_t sums to 1
    o = p v                                         o (T, D), the heads side by side (T, F)
    y = o W_o + b_o                                 y (T, F)

Backward, given dy (the chain rule through each line above, bottom up):

    dW_o = o^T dy,  db_o = sum dy,  do = dy W_o^T
    dp = do v^T,    dv = p^T do
    ds = p * (dp - rowsum(p * dp))                  the softmax's Jacobian diag(p) - p p^T
    dq = ds k / sqrt(D),  dk = ds^T q / sqrt(D)
    dW_qkv = x^T [dq dk dv],  db_qkv = sum [dq dk dv],  dx = [dq dk dv] W_qkv^T

(sums over batch and time). A masked score has p = 0, so ds is 0 there without a mask in
the backward pass. The residuals are x, q, k, v, p and o: memory grows as batch H T^2.

Curvature (LeCun's Gauss-Newton diagonal, `nets.layers`), given d2y: the layer's rule
d2in_i = sum_j J_ji^2 d2out_j applied stage by stage through the five lines above, as
`serial` applies it layer by layer (the squared Jacobian of the whole layer is dense across
time, (T F)^2 entries an example; the stages drop its cross terms):

    d2W_o = (o^2)^T d2y,  d2b_o = sum d2y,  d2o = d2y (W_o^2)^T
    d2p = d2o (v^2)^T,    d2v = (p^2)^T d2o
    d2s = p^2 ((1 - 2p) d2p + rowsum(p^2 d2p))     sum_i (p_i (delta_ij - p_j))^2 d2p_i
    d2q = d2s (k^2) / D,  d2k = d2s^T (q^2) / D
    d2W_qkv = (x^2)^T [d2q d2k d2v],  d2b_qkv = sum [d2q d2k d2v],  d2x = [..] (W_qkv^2)^T
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from nets import initializers
from nets.accounting import layer_kind, wrapped_layer
from nets.layers import (
    ACTIVATIONS,
    Dense,
    Embedding,
    Layer,
    StaticShape,
    check_direction,
    check_gradient,
    check_parameter,
    is_count,
    is_finite_number,
    residual,
    serial,
    tie,
)
from nets.layers import remat as remat_layer
from nets.normalization import LayerNorm
from nets.pooling import Dropout
from nets.recurrent import TimeDistributed
from nets.varying import product_sharding

__all__ = ["SelfAttention", "PositionalEmbedding", "transformer_lm", "attention_maps"]


def _check_sequence(name: str, shape, features: int, what: str = "input x") -> None:
    if len(shape) != 3 or shape[-1] != features or shape[1] == 0:
        raise ValueError(f"{name}: {what} has shape {tuple(shape)}, expected "
                         f"(batch, time >= 1, {features})")


def SelfAttention(features: int, heads: int, causal: bool = True,
                  name: str = "SelfAttention") -> Layer:
    """Multi-head scaled dot-product self-attention over (batch, time, features).

    params: {"qkv": {"w": (F, 3F), "b": (3F,)}, "out": {"w": (F, F), "b": (F,)}}; the q, k
    and v columns of W_qkv hold the heads in order (head h: columns h D to (h + 1) D of each).
    W_qkv's three blocks and W_o are Glorot-uniform as (F, F) matrices, the biases 0. With
    causal (the default, a language model's) step t attends to steps 0..t only. The module
    docstring gives the forward and backward math.
    """
    for argument, value in (("features", features), ("heads", heads)):
        if not is_count(value):  # 2.5 heads were built, and failed inside init's reshape
            raise ValueError(f"{name}: {argument} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name}: {argument} must be >= 1, got {value}")
    if not isinstance(causal, bool):  # a str such as "no" was true
        raise ValueError(f"{name}: causal must be True or False, got {causal!r}")
    if features % heads:
        raise ValueError(f"{name}: features ({features}) must be a multiple of heads ({heads})")
    width = features // heads
    scale = 1.0 / math.sqrt(width)
    glorot = initializers.glorot_uniform()

    def init(key, input_shape):
        _check_sequence(name, input_shape, features, "input_shape")
        keys = jax.random.split(key, 4)
        w_qkv = jnp.concatenate([glorot(k, (features, features)) for k in keys[:3]], axis=1)
        params = {"qkv": {"w": w_qkv, "b": jnp.zeros((3 * features,), jnp.float32)},
                  "out": {"w": glorot(keys[3], (features, features)),
                          "b": jnp.zeros((features,), jnp.float32)}}
        return tuple(input_shape), params

    def split_heads(z):
        """(batch, T, F) -> (batch, T, H, D)."""
        return z.reshape(*z.shape[:2], heads, width)

    def merge_heads(z):
        """(batch, T, H, D) -> (batch, T, F)."""
        return z.reshape(*z.shape[:2], features)

    def dense(params, z):
        return jnp.einsum("btf,fg->btg", z, params["w"]) + params["b"][None, None, :]

    def weight_gradient(z, dz_out, w):
        """sum over batch and time of z^T dz_out, laid out as w (a split batch summed)."""
        return jnp.einsum("btf,btg->fg", z, dz_out, out_sharding=product_sharding(z, w))

    def dense_backward(params, z, dz_out):
        dparams = {"w": weight_gradient(z, dz_out, params["w"]),
                   "b": jnp.sum(dz_out, axis=(0, 1))}
        return dparams, jnp.einsum("btg,fg->btf", dz_out, params["w"])

    def check_params(params):
        """Each weight and bias of its own shape: a bias of one entry, or an output matrix of
        one column, was broadcast over the features silently."""
        for group, columns in (("qkv", 3 * features), ("out", features)):
            check_parameter(name, params[group], "w", (features, columns), f"params {group}")
            check_parameter(name, params[group], "b", (columns,), f"params {group}")

    def forward(params, x):
        _check_sequence(name, x.shape, features)
        check_params(params)
        q, k, v = (split_heads(z) for z in jnp.split(dense(params["qkv"], x), 3, axis=-1))
        s = jnp.einsum("bthd,bshd->bhts", q, k) * scale
        if causal:
            steps = x.shape[1]
            visible = jnp.arange(steps)[:, None] >= jnp.arange(steps)[None, :]
            s = jnp.where(visible[None, None], s, -jnp.inf)
        e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        p = e / jnp.sum(e, axis=-1, keepdims=True)
        o = merge_heads(jnp.einsum("bhts,bshd->bthd", p, v))
        return dense(params["out"], o), (x, q, k, v, p, o)

    def backward(params, residuals, dy):
        x, q, k, v, p, o = residuals
        check_gradient(name, dy, x.shape)  # the output is shaped as x
        dout, do = dense_backward(params["out"], o, dy)
        do = split_heads(do)
        dp = jnp.einsum("bthd,bshd->bhts", do, v)
        dv = jnp.einsum("bhts,bthd->bshd", p, do)
        ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
        dq = jnp.einsum("bhts,bshd->bthd", ds, k) * scale
        dk = jnp.einsum("bhts,bthd->bshd", ds, q) * scale
        dqkv = jnp.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)
        dqkv_params, dx = dense_backward(params["qkv"], x, dqkv)
        return {"qkv": dqkv_params, "out": dout}, dx

    def curvature(params, residuals, d2y):
        x, q, k, v, p, o = residuals
        check_gradient(name, d2y, x.shape, "d2y")
        squared = jax.tree.map(jnp.square, params)
        d2out, d2o = dense_backward(squared["out"], o * o, d2y)
        d2o = split_heads(d2o)
        d2p = jnp.einsum("bthd,bshd->bhts", d2o, v * v)
        d2v = jnp.einsum("bhts,bthd->bshd", p * p, d2o)
        d2s = p * p * ((1 - 2 * p) * d2p + jnp.sum(p * p * d2p, axis=-1, keepdims=True))
        d2q = jnp.einsum("bhts,bshd->bthd", d2s, k * k) * scale**2
        d2k = jnp.einsum("bhts,bthd->bshd", d2s, q * q) * scale**2
        d2qkv = jnp.concatenate([merge_heads(d2q), merge_heads(d2k), merge_heads(d2v)], axis=-1)
        d2qkv_params, d2x = dense_backward(squared["qkv"], x * x, d2qkv)
        return {"qkv": d2qkv_params, "out": d2out}, d2x

    def tangent(params, x, dparams, dx):
        """Forward mode through the five lines: d[q k v] = x dW_qkv + db_qkv + dx W_qkv,
        ds = (dq k^T + q dk^T) / sqrt(D), dp = p * (ds - rowsum(p * ds)), do = dp v + p dv,
        dy = o dW_o + db_o + do W_o (masked scores: p = 0, so dp = 0 there)."""
        y, (x, q, k, v, p, o) = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        dqkv = dense(dparams["qkv"], x)
        if dx is not None:
            dqkv = dqkv + jnp.einsum("btf,fg->btg", dx, params["qkv"]["w"])
        dq, dk, dv = (split_heads(z) for z in jnp.split(dqkv, 3, axis=-1))
        ds = (jnp.einsum("bthd,bshd->bhts", dq, k) + jnp.einsum("bthd,bshd->bhts", q, dk)) * scale
        dp = p * (ds - jnp.sum(p * ds, axis=-1, keepdims=True))
        do = merge_heads(jnp.einsum("bhts,bshd->bthd", dp, v)
                         + jnp.einsum("bhts,bshd->bthd", p, dv))
        return y, dense(dparams["out"], o) + jnp.einsum("btf,fg->btg", do, params["out"]["w"])

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        """Each line of the backward differentiated in all its inputs, with the tangents of
        the forward's (R{q}, R{k}, R{v}, R{p}, R{o} as `tangent` computes them):
            R{dW_o} = R{o}^T dy + o^T R{dy},  R{do} = R{dy} W_o^T + dy V_o^T
            R{dp} = R{do} v^T + do R{v}^T,    R{dv} = R{p}^T do + p^T R{do}
            R{ds} = R{p} (dp - rowsum(p dp)) + p (R{dp} - rowsum(R{p} dp + p R{dp}))
            R{dq} = (R{ds} k + ds R{k}) / sqrt(D),  R{dk} = (R{ds}^T q + ds^T R{q}) / sqrt(D)
            R{dW_qkv} = R{x}^T d[q k v] + x^T R{d[q k v]},
            R{dx} = R{d[q k v]} W_qkv^T + d[q k v] V_qkv^T."""
        _, (x, q, k, v, p, o) = forward(params, x)
        check_direction(name, "v_params", v_params, params, "params")
        check_direction(name, "v_x", v_x, x, "x")
        check_gradient(name, g_y, x.shape)
        check_gradient(name, r_g_y, x.shape, "R{dy}")
        r_qkv = dense(v_params["qkv"], x)
        if v_x is not None:
            r_qkv = r_qkv + jnp.einsum("btf,fg->btg", v_x, params["qkv"]["w"])
        r_q, r_k, r_v = (split_heads(z) for z in jnp.split(r_qkv, 3, axis=-1))
        r_s = (jnp.einsum("bthd,bshd->bhts", r_q, k)
               + jnp.einsum("bthd,bshd->bhts", q, r_k)) * scale
        r_p = p * (r_s - jnp.sum(p * r_s, axis=-1, keepdims=True))
        r_o = merge_heads(jnp.einsum("bhts,bshd->bthd", r_p, v)
                          + jnp.einsum("bhts,bshd->bthd", p, r_v))

        g_out, g_o = dense_backward(params["out"], o, g_y)
        r_g_out, r_g_o = dense_backward(params["out"], o, r_g_y)
        r_g_out = {"w": r_g_out["w"] + weight_gradient(r_o, g_y, params["out"]["w"]),
                   "b": r_g_out["b"]}
        r_g_o = r_g_o + jnp.einsum("btg,fg->btf", g_y, v_params["out"]["w"])
        g_o, r_g_o = split_heads(g_o), split_heads(r_g_o)
        g_p = jnp.einsum("bthd,bshd->bhts", g_o, v)
        r_g_p = (jnp.einsum("bthd,bshd->bhts", r_g_o, v)
                 + jnp.einsum("bthd,bshd->bhts", g_o, r_v))
        g_v = jnp.einsum("bhts,bthd->bshd", p, g_o)
        r_g_v = (jnp.einsum("bhts,bthd->bshd", r_p, g_o)
                 + jnp.einsum("bhts,bthd->bshd", p, r_g_o))
        centred = g_p - jnp.sum(p * g_p, axis=-1, keepdims=True)
        g_s = p * centred
        r_g_s = r_p * centred + p * (r_g_p - jnp.sum(r_p * g_p + p * r_g_p, axis=-1,
                                                     keepdims=True))
        g_q = jnp.einsum("bhts,bshd->bthd", g_s, k) * scale
        r_g_q = (jnp.einsum("bhts,bshd->bthd", r_g_s, k)
                 + jnp.einsum("bhts,bshd->bthd", g_s, r_k)) * scale
        g_k = jnp.einsum("bhts,bthd->bshd", g_s, q) * scale
        r_g_k = (jnp.einsum("bhts,bthd->bshd", r_g_s, q)
                 + jnp.einsum("bhts,bthd->bshd", g_s, r_q)) * scale
        g_qkv = jnp.concatenate([merge_heads(g_q), merge_heads(g_k), merge_heads(g_v)], axis=-1)
        r_g_qkv = jnp.concatenate([merge_heads(r_g_q), merge_heads(r_g_k), merge_heads(r_g_v)],
                                  axis=-1)
        g_qkv_params, g_x = dense_backward(params["qkv"], x, g_qkv)
        r_g_qkv_params, r_g_x = dense_backward(params["qkv"], x, r_g_qkv)
        r_g_x = r_g_x + jnp.einsum("btg,fg->btf", g_qkv, v_params["qkv"]["w"])
        if v_x is not None:
            r_g_qkv_params = {"w": r_g_qkv_params["w"]
                              + weight_gradient(v_x, g_qkv, params["qkv"]["w"]),
                              "b": r_g_qkv_params["b"]}
        return ({"qkv": g_qkv_params, "out": g_out}, g_x,
                {"qkv": r_g_qkv_params, "out": r_g_out}, r_g_x)

    return Layer(name, init, forward, backward, curvature=curvature, tangent=tangent,
                 backward_tangent=backward_tangent)


def PositionalEmbedding(context: int, features: int, std: float = 0.02,
                        name: str = "PositionalEmbedding") -> Layer:
    """A learned vector per position added to the input: y[:, t] = x[:, t] + p[t].

    Shapes: x (batch, T, F) with T <= context, p (context, F) drawn N(0, std^2) (GPT-2's
    0.02), y like x. Backward: dx = dy, dp[t] = sum over the batch of dy[:, t] for t < T and
    0 for the positions a shorter input does not reach. The key "p" is not a weight for the
    lecture's L2 penalty.
    """
    for argument, value in (("context", context), ("features", features)):
        if not is_count(value):
            raise ValueError(f"{name}: {argument} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name}: {argument} must be >= 1, got {value}")
    if not (is_finite_number(std) and std >= 0):  # NaN drew NaN positions
        raise ValueError(f"{name}: std must be a finite number >= 0, got {std!r}")

    def check(shape, what="input x"):
        _check_sequence(name, shape, features, what)
        if shape[1] > context:
            raise ValueError(f"{name}: {what} has {shape[1]} steps, more than the "
                             f"{context} positions of the context")

    def init(key, input_shape):
        check(input_shape, "input_shape")
        return tuple(input_shape), {"p": initializers.normal(std)(key, (context, features))}

    def forward(params, x):
        check(x.shape)
        # a p of one position (or one feature) was broadcast over them all
        check_parameter(name, params, "p", (context, features))
        return x + params["p"][None, : x.shape[1]], StaticShape(x.shape)

    def backward(params, x_shape, dy, what="dy"):
        check_gradient(name, dy, x_shape.shape, what)  # .set() broadcast one of (2, 3, 1)
        dp = jnp.zeros_like(params["p"]).at[: dy.shape[1]].set(jnp.sum(dy, axis=0))
        return {"p": dp}, dy

    def curvature(params, x_shape, d2y):
        return backward(params, x_shape, d2y, "d2y")

    def tangent(params, x, dparams, dx):
        """dy = dx + dp[:T]."""
        y, _ = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        dy = jnp.broadcast_to(dparams["p"][None, : x.shape[1]], y.shape)
        return y, dy if dx is None else dy + dx

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        """Linear in x and p: the backward of R{dy}."""
        _, x_shape = forward(params, x)
        check_direction(name, "v_params", v_params, params, "params")
        check_direction(name, "v_x", v_x, x, "x")
        g_params, g_x = backward(params, x_shape, g_y)
        r_g_params, r_g_x = backward(params, x_shape, r_g_y, "R{dy}")
        return g_params, g_x, r_g_params, r_g_x

    return Layer(name, init, forward, backward, curvature=curvature, tangent=tangent,
                 backward_tangent=backward_tangent)


def transformer_lm(vocabulary: int, context: int, features: int = 128, heads: int = 4,
                   blocks: int = 2, dropout: float = 0.0, remat: bool = False,
                   activation: str = "relu", tie_embeddings: bool = False,
                   name: str = "transformer_lm") -> Layer:
    """A decoder-only (GPT-style, pre-norm) transformer over token ids.

    ids (batch, T), integers in [0, vocabulary) -> logits (batch, T, vocabulary), T <=
    context. A token embedding (`nets.Embedding`), learned positions, then `blocks` blocks of

        x = x + SelfAttention(LayerNorm(x))               causal, `heads` heads
        x = x + Dense(act(Dense(LayerNorm(x))))           widths 4 F then F, at every step

    and a final LayerNorm and Dense to the vocabulary. Layers are named embed, positions,
    block1 (norm1a, attention1, norm1b, inner1, act1, outer1), ..., final_norm, output.
    With dropout > 0 (GPT's placement), `Dropout(dropout)` follows the positions and ends
    each block's two residual branches (drop0, drop1a, drop1b, ...); the model is then
    stochastic: training steps pass a key, inference none. With remat, each residual branch
    (attention, MLP) is a `nets.remat`: the backward keeps only each block's input and runs
    the block forward again (the same params, names and gradients). `activation` names the
    MLP's act from `nets.layers.ACTIVATIONS` ("relu" as in the original transformer; "gelu"
    or GPT-2's "gelu_tanh"). With tie_embeddings the output layer's weights are the token
    embedding's, transposed (`nets.tie`; Press and Wolf 2017, GPT-2): one (vocabulary,
    features) matrix, its gradient the sum of both uses; the output keeps its own bias.
    """
    if vocabulary < 1:
        raise ValueError(f"{name}: vocabulary must be >= 1, got {vocabulary}")
    if blocks < 0:
        raise ValueError(f"{name}: blocks must be >= 0, got {blocks}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must lie in [0, 1), got {dropout}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation={activation!r}; choose one of {sorted(ACTIVATIONS)}")
    glorot = initializers.glorot_uniform()

    def per_step(out_features, layer_name):
        return TimeDistributed(Dense(out_features, w_init=glorot, name=layer_name),
                               name=layer_name)

    def dropped(layer_name):
        return [Dropout(dropout, name=layer_name)] if dropout > 0 else []

    layers = [Embedding(vocabulary, features, w_init=glorot, name="embed"),
              PositionalEmbedding(context, features, name="positions"), *dropped("drop0")]
    for index in range(1, blocks + 1):
        attend = serial(LayerNorm(features, name=f"norm{index}a"),
                        SelfAttention(features, heads, name=f"attention{index}"),
                        *dropped(f"drop{index}a"), name=f"attend{index}")
        mix = serial(LayerNorm(features, name=f"norm{index}b"),
                     per_step(4 * features, f"inner{index}"),
                     ACTIVATIONS[activation](name=f"act{index}"),
                     per_step(features, f"outer{index}"), *dropped(f"drop{index}b"),
                     name=f"mix{index}")
        branches = [residual(attend, name=f"block{index}_attention"),
                    residual(mix, name=f"block{index}_mlp")]
        layers += [remat_layer(branch) for branch in branches] if remat else branches
    layers += [LayerNorm(features, name="final_norm"), per_step(vocabulary, "output")]
    model = serial(*layers, name=name)
    if tie_embeddings:
        return tie(model, ("embed", "w"), ("output", "w"), transpose=True, name=name)
    return model


def attention_maps(model: Layer, params, x: jax.Array) -> dict[str, jax.Array]:
    """The softmax weights p (batch, heads, T, T) of every SelfAttention in `model` on x, by
    layer name, read from the forward pass's residuals: p[b, h, t, s] is how much step t of
    example b attends to step s in head h. Descends into `serial` and into the branches of
    `parallel` and `residual`, as `transformer_lm` nests its attention."""
    _, residuals = model.forward(params, x)
    return dict(_maps(model, residuals))


def _maps(layer: Layer, residuals):
    kind = layer_kind(layer)
    if kind == "SelfAttention":
        yield layer.name, residuals[4]
    elif kind == "tie":  # the tied model's own residuals
        yield from _maps(wrapped_layer(layer), residuals)
    elif kind == "serial":
        for sublayer, sub_residuals in zip(layer.sublayers, residuals):
            yield from _maps(sublayer, sub_residuals)
    elif kind == "parallel":
        for branch, branch_residuals in zip(layer.sublayers, residuals[0]):
            yield from _maps(branch, branch_residuals)
