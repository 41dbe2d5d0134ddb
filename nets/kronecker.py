"""Kronecker-factored blocks of the Gauss-Newton matrix (K-FAC), from the hand-written passes.

A Dense layer's weight gradient is dw = x^T dy: each example adds an outer product of the
layer's input a_n and the gradient b_n arriving at its output. Martens and Grosse (2015,
K-FAC) approximate the Gauss-Newton (Fisher) block of such a weight by a Kronecker product,

    G_w = sum_n (a_n a_n^T) (x) (b_n b_n^T)  ~  A (x) G,   A = (1/m) sum_n a_n a_n^T,
                                                          G = sum_n b_n b_n^T,

with the b_n sent back from the loss's curvature rather than from the targets: for each
example, columns u_nj with sum_j u_nj u_nj^T = H_n (the Hessian of E in that example's
outputs, `Loss.hessian_vector`, factored as U sqrt(Lambda)) run back through the backward
passes, so that sum_j b_nj b_nj^T = J_n^T H_n J_n exactly. One example (m = 1) makes the
approximation exact; with more it takes the mean of products as the product of means.
A convolution (Grosse and Martens 2016, KFC) sums its T windows' patches a_nt in A and
averages their output gradients in G:

    A = (1/m) sum_n sum_t a_nt a_nt^T,      G = (1/T) sum_n sum_j sum_t b_njt b_njt^T.

The layers' `factors` (nets/layers.py: Dense and Conv2D, one group) give a and b for every
leaf, so each leaf is its own block: a weight with (K, C) = (fan-in, outputs) and a bias
with K = 1 (its A is 1, or T for a shared convolution bias; its G is exact for a Dense or an
unshared bias). The leaf, read as a (K, C) matrix V (`leaf.reshape(K, C)`, the
`Factors` order), is multiplied by the block as A V G.

A layer with parameters but no `factors` (LeNet-5's trainable subsampling, LayerNorm, an
embedding, a recurrent cell, attention, ...) gets the diagonal of its exact Gauss-Newton
block instead (`DiagonalBlock`, as kfac-jax treats the layers it has no Kronecker form for):

    diag(G_theta) = sum_n sum_j (J_n^T u_nj)^2,

each term the square of one example's parameter gradient from one curvature column, by the
layer's own backward pass on a batch of one (vmapped over the examples and the columns).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nets.layers import Layer, forward_with_key, is_serial, layer_keys
from nets.losses import Objective, check_l2, is_weight
from nets.normalization import batch_coupled_layers
from nets.varying import batch_product, is_split, reshape_keeping_batch, split_like

__all__ = ["KroneckerBlock", "DiagonalBlock", "kronecker_factors", "block_shape",
           "identity_blocks"]


class KroneckerBlock(NamedTuple):
    """One parameter leaf's Gauss-Newton block as A (x) G, the leaf read as a (K, C) matrix.

    a (K, K), g (C, C); mask (K, C), 1 where the leaf is a parameter and 0 where a connection
    table leaves it out; penalty, the L2 term's lambda/m on this leaf (0 for a bias), which
    adds (lambda/m) I to the block.
    """

    a: jax.Array
    g: jax.Array
    mask: jax.Array
    penalty: jax.Array


class DiagonalBlock(NamedTuple):
    """One parameter leaf's Gauss-Newton block kept as its diagonal (module docstring).

    diagonal, the leaf's shape: diag(sum_n J_n^T H_n J_n) for that leaf; penalty as in
    `KroneckerBlock` (lambda/m on a weight, 0 on other leaves), which adds (lambda/m) I.
    """

    diagonal: jax.Array
    penalty: jax.Array


def is_block(value: Any) -> bool:
    """Whether a value is one leaf's block (Kronecker or diagonal): `jax.tree` `is_leaf`."""
    return isinstance(value, (KroneckerBlock, DiagonalBlock))


def block_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, int]:
    """(K, C) of a leaf as its layer's `factors` write it: a weight ("w") (size / C, C) with
    C its last axis, a bias (K = 1, C its size: one per output unit, or per map)."""
    size = 1
    for n in shape:
        size *= n
    if is_weight(path):
        return size // shape[-1], shape[-1]
    return 1, size


def _chain(model: Layer) -> tuple[Layer, ...]:
    return model.sublayers if is_serial(model) else (model,)


def _chain_params(model: Layer, params: Any) -> tuple:
    """params as one entry per layer of `_chain(model)`; for a `serial` model, params of
    another number of layers are a ValueError naming both counts (zipped with the layers,
    identity_blocks cut them short silently and the blocks raised a raw IndexError)."""
    if not is_serial(model):
        return (params,)
    layers = len(model.sublayers)
    if not isinstance(params, (tuple, list)) or len(params) != layers:
        got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
        raise ValueError(f"kronecker_factors: {model.name}: params must hold one entry per "
                         f"layer ({layers}), got {got}")
    return tuple(params)


def _has_diagonal_blocks(layer: Layer, layer_params: Any) -> bool:
    return bool(jax.tree.leaves(layer_params)) and layer.factors is None


def _check_model(model: Layer, params: Any) -> None:
    """Every layer with parameters but no `factors` sees each example alone (no BatchNorm on
    batch statistics) and draws no random numbers, so that its diagonal comes from its
    backward on a batch of one."""
    for layer, layer_params in zip(_chain(model), _chain_params(model, params)):
        if not _has_diagonal_blocks(layer, layer_params):
            continue
        coupled = batch_coupled_layers(layer, layer_params)
        if coupled:
            raise ValueError(f"kronecker_factors: {model.name}: layer {layer.name!r} has no "
                             f"`factors` and its layers {coupled} normalise with their batch's "
                             "statistics (BatchNorm), so its diagonal blocks have no "
                             "per-example form")
        if layer.stochastic:
            raise ValueError(f"kronecker_factors: {model.name}: layer {layer.name!r} has no "
                             "`factors` and draws random numbers: its diagonal blocks would "
                             "need the batch's masks one example at a time")


def identity_blocks(model: Layer, params: Any) -> Any:
    """params' structure with the block `kronecker_factors(model, ...)` gives each leaf, as
    an identity (A = I, G = I, or a diagonal of ones; penalty 0, mask 1): the blocks an
    optimiser holds before its first estimate (`training.optim`'s `model=`)."""
    _check_model(model, params)

    def kronecker(path, leaf):
        k, c = block_shape(path, leaf.shape)
        return KroneckerBlock(jnp.eye(k, dtype=leaf.dtype), jnp.eye(c, dtype=leaf.dtype),
                              jnp.ones((k, c), leaf.dtype), jnp.zeros((), leaf.dtype))

    def diagonal(leaf):
        return DiagonalBlock(jnp.ones_like(leaf), jnp.zeros((), leaf.dtype))

    chain_params = _chain_params(model, params)
    per_layer = tuple(
        jax.tree.map(diagonal, layer_params) if _has_diagonal_blocks(layer, layer_params)
        else jax.tree_util.tree_map_with_path(kronecker, layer_params)
        for layer, layer_params in zip(_chain(model), chain_params))
    return per_layer if is_serial(model) else per_layer[0]


def curvature_columns(objective: Objective, outputs: jax.Array,
                      targets: jax.Array) -> jax.Array:
    """Columns u_j (classes, batch, classes) with sum_j u_nj u_nj^T = H_n, the Hessian of E
    in example n's outputs: H_n built from `hessian_vector` against the unit vectors, then
    U sqrt(max(Lambda, 0)) from its eigendecomposition (the softmax's H is singular)."""
    classes = outputs.shape[1]
    units = jnp.eye(classes, dtype=outputs.dtype)
    columns = jax.vmap(lambda e: objective.loss.hessian_vector(
        outputs, targets, jnp.broadcast_to(e, outputs.shape)))(units)
    hessians = jnp.transpose(columns, (1, 2, 0))  # (batch, i, j): H_n e_j in column j
    hessians = (hessians + jnp.swapaxes(hessians, 1, 2)) / 2
    eigenvalues, eigenvectors = jnp.linalg.eigh(hessians)
    roots = eigenvectors * jnp.sqrt(jnp.maximum(eigenvalues, 0))[:, None, :]
    return jnp.transpose(roots, (2, 0, 1))


def _over_columns(function, columns: jax.Array) -> jax.Array:
    """function of each column (batch, ...) of columns (classes, batch, ...), stacked: vmapped,
    or one after another (`lax.map`) where the batch is split over Explicit mesh axes, whose
    layouts JAX's batching of the layers' reshapes does not carry."""
    if is_split(columns[0]):
        return jax.lax.map(function, columns)
    return jax.vmap(function)(columns)


def _layer_blocks(layer: Layer, layer_params: Any, x: jax.Array, columns: jax.Array,
                  penalty: float) -> Any:
    """{leaf key: KroneckerBlock} of one layer from its input x (batch, ...) and the
    curvature columns arriving at its output (classes, batch, ...)."""
    examples = x.shape[0]
    first = layer.factors(layer_params, x, columns[0])
    if set(first) != set(layer_params):
        raise ValueError(f"kronecker_factors: layer {layer.name!r} gives factors for "
                         f"{sorted(first)}, its parameters are {sorted(layer_params)}")
    b = _over_columns(lambda dy: {key: f.b for key, f in layer.factors(layer_params, x,
                                                                       dy).items()}, columns)
    blocks = {}
    for key, factors in first.items():
        leaf = layer_params[key]
        k, c = factors.a.shape[2], factors.b.shape[2]
        if (k, c) != block_shape((jax.tree_util.DictKey(key),), leaf.shape):
            raise ValueError(f"kronecker_factors: layer {layer.name!r}, leaf {key!r} of shape "
                             f"{tuple(leaf.shape)}: factors of (K, C) = {(k, c)}, expected "
                             f"{block_shape((jax.tree_util.DictKey(key),), leaf.shape)}")
        windows = factors.b.shape[1]
        rows = reshape_keeping_batch(factors.a, (examples * windows, k))
        a = batch_product(rows, rows) / examples
        gradients = jnp.moveaxis(b[key], 0, 1)  # (batch, columns, T, C): the batch leading
        gradients = reshape_keeping_batch(gradients, (gradients.shape[0] * gradients.shape[1]
                                                      * windows, c))
        g = batch_product(gradients, gradients) / windows
        mask = (jnp.ones((k, c), leaf.dtype) if factors.mask is None
                else factors.mask.astype(leaf.dtype))
        share = penalty if key == "w" else 0.0
        blocks[key] = KroneckerBlock(a.astype(leaf.dtype), g.astype(leaf.dtype), mask,
                                     jnp.asarray(share, leaf.dtype))
    return blocks


def _diagonal_blocks(layer: Layer, layer_params: Any, x: jax.Array, columns: jax.Array,
                     penalty: float) -> Any:
    """params' structure with a `DiagonalBlock` per leaf of one layer without `factors`, from
    its input x (batch, ...) and the curvature columns at its output (classes, batch, ...):
    sum_n sum_j (the layer's parameter gradient for example n alone, column j)^2. The
    per-example gradients are formed (batch x columns x the layer's parameters at once)."""
    if is_split(x):
        raise ValueError(f"kronecker_factors: layer {layer.name!r} has no `factors`: its "
                         "diagonal blocks are formed one example at a time, which a batch "
                         "split over Explicit mesh axes does not support")

    def squares(x_n, columns_n):
        _, kept = layer.forward(layer_params, x_n[None])
        grads = jax.vmap(lambda dy: layer.backward(layer_params, kept, dy[None])[0])(columns_n)
        return jax.tree.map(lambda g: jnp.sum(g ** 2, axis=0), grads)

    summed = jax.tree.map(lambda s: jnp.sum(s, axis=0),
                          jax.vmap(squares, in_axes=(0, 1))(x, columns))

    def block(path, leaf, diagonal):
        share = penalty if is_weight(path) else 0.0
        return DiagonalBlock(diagonal.astype(leaf.dtype), jnp.asarray(share, leaf.dtype))

    return jax.tree_util.tree_map_with_path(block, layer_params, summed)


def kronecker_factors(model: Layer, objective: Objective):
    """The Kronecker blocks of E's Gauss-Newton matrix (module docstring), by hand.

    Returns `blocks(params, x, targets, key=None, *, sample_key=None) -> pytree` with params'
    structure and a `KroneckerBlock` in place of each leaf. One forward pass keeps every
    layer's input; the loss's curvature columns (`curvature_columns`, one per output) then run
    back through the layers' `backward` passes (vmapped over the columns), and each layer
    with parameters turns its input and the columns at its output into A and G by its
    `factors`. With a `sample_key`, one random column per example, u_n = L_n e_n with e_n ~
    N(0, I), whose u_n u_n^T has mean H_n (Martens and Grosse's Monte Carlo estimate): one
    backward pass in place of one per output, and G an unbiased estimate. The model is a
    `serial` chain (or one layer). Its layers with `factors` (Dense, Conv2D with one group)
    get a `KroneckerBlock` per leaf; the others with parameters a `DiagonalBlock` per leaf
    (the exact diagonal, or with a `sample_key` its unbiased estimate; module docstring), so
    LeNet-5 (its subsampling) and a recurrent net read at its last step get blocks too; a
    wrapper such as `residual` is one layer, all of it diagonal. Refused by name: such a
    layer that normalises over the batch (BatchNorm) or draws random numbers, or on a batch
    split over Explicit mesh axes, and outputs that are not (batch, classes) (a language
    model's (batch, time, vocabulary), for one). A key runs a
    stochastic model (dropout) with those masks held fixed, as the engines do.
    """
    chained = is_serial(model)
    layers = _chain(model)
    if objective.loss.hessian_vector is None:
        raise ValueError(f"kronecker_factors: {objective.loss.name} defines no Hessian")
    # its penalty lambda/m is read here, not through l2_penalty: a negative or NaN lambda
    # made every block's penalty that, silently
    check_l2("kronecker_factors", objective.l2)

    def blocks(params, x, targets, key=None, *, sample_key=None):
        _check_model(model, params)
        chain_params = _chain_params(model, params)
        keys = layer_keys(layers, key) if chained else [key]
        inputs, residuals = [], []
        for layer, layer_params, layer_key in zip(layers, chain_params, keys):
            inputs.append(x)
            x, layer_residuals = forward_with_key(layer, layer_params, x, layer_key)
            residuals.append(layer_residuals)
        if x.ndim != 2:
            raise ValueError(f"kronecker_factors: {model.name}: outputs of shape "
                             f"{tuple(x.shape)}, expected (batch, classes)")
        columns = curvature_columns(objective, x, targets)
        if sample_key is not None:  # one column u_n = L_n e_n, e_n ~ N(0, I): E[u u^T] = H_n
            draws = split_like(jax.random.normal(sample_key, x.shape, x.dtype), x)
            columns = jnp.einsum("jni,nj->ni", columns, draws)[None]
        penalty = objective.l2 / x.shape[0]
        per_layer = list(chain_params)  # layers without parameters keep their ()
        for index in reversed(range(len(layers))):
            layer, layer_params = layers[index], chain_params[index]
            if _has_diagonal_blocks(layer, layer_params):
                per_layer[index] = _diagonal_blocks(layer, layer_params, inputs[index],
                                                    columns, penalty)
            elif jax.tree.leaves(layer_params):
                per_layer[index] = _layer_blocks(layer, layer_params, inputs[index], columns,
                                                 penalty)
            if index > 0 and any(jax.tree.leaves(p) for p in chain_params[:index]):
                columns = _over_columns(
                    lambda dy, layer=layer, layer_params=layer_params, kept=residuals[index]:
                    layer.backward(layer_params, kept, dy)[1], columns)
        return tuple(per_layer) if chained else per_layer[0]

    return blocks
