"""Over examples and over devices: per-example gradients and data-parallel steps.

Model code never names a device or a batch axis (README, "Over examples, devices and
hosts"; a BatchNorm asked to synchronise its statistics is the one exception); this module maps
it over both. Every loss in `nets.losses` is a mean over the m examples of a batch, plus
lambda/(2m) times the squared weights, and both facts are used below.

Per example (`jax.vmap`):

    per_example_value_and_grad(model, objective, engine)(params, x, targets)
        -> (values (batch,), grads: params' pytree with a leading (batch,) axis)

runs the engine on each example alone, as a batch of one, under `jax.vmap`: the hand-written
backward passes for `engines.manual`, `vmap(grad)` for `engines.autodiff`. Example i's share of
the objective is E_i = loss_i + lambda/(2m) sum w^2, so that mean_i E_i = E and
mean_i dE_i/dw = dE/dw, the batch gradient. `weighted_sum` combines them (weights 1/m: the
mean); `gradient_norms` and `clip_gradients` give and bound each example's gradient norm;
`private_value_and_grad` is the DP-SGD gradient (Abadi et al. 2016, Algorithm 1): clip every
example's loss gradient to norm C, average, add Gaussian noise of standard deviation sigma C / m
from an explicit key (and, for a Poisson-drawn batch padded to a fixed size, example weights
and the expected batch size); with per_example="ghost" (`ghost_clipped_sum`) the clipped sum
of the Dense layers, and of convolutions with few windows, comes from the factors of their
per-example gradients (`Layer.factors`: inputs or patches, and output gradients), never from
the gradients themselves; `ghost_norms` gives the norms alone. `pick_hardest_misclassified`
ranks the misclassified examples by their gradient norm or loss, for the lecture's "pick
misclassified examples" procedure.

Over devices, one step with four spellings (`form`), all over a 1-D mesh whose axis is
`BATCH_AXIS` and all with any engine and any optax optimizer:

    "shard_map"  jit(shard_map(local step)): explicit in_specs P() for the replicated params and
                 optimizer state, P("batch") for the batch; each device computes the gradient
                 of its shard and `lax.pmean` averages them before the update, in one
                 all-reduce, the small leaves raveled into one vector
                 (`mean_over_devices`).
    "pmap"       the same local step under `jax.pmap` (in maintenance mode; in current JAX it
                 is implemented with jit and shard_map), batch laid out (devices, batch/devices).
    "jit"        the plain single-device step under `jax.jit` with NamedSharding annotations
                 (params replicated, batch split); XLA's partitioner inserts the all-reduce.
    "explicit"   the same step on the mesh's devices with its axis Explicit (JAX's sharding
                 in types): every value's type says how it is laid out, and each weight
                 gradient, a product over the split batch, is laid out as its parameter
                 (`nets.varying`), which puts the all-reduce there.

`data_parallel(...)` returns a `DataParallel` with `step(params, opt_state, x, targets, key=None)
-> (params, opt_state, energy, grad)`, `value_and_grad(params, x, targets, key=None) -> (energy,
grad)`, and the placement helpers `place_state`, `place_batch` and `fetch`. The key is for a
model with dropout (pass a new one each step, the same in every process): "jit" and
"explicit" draw the masks of the single-device step with that key; "shard_map" and "pmap" give
each device its own key, the key folded with the device's index (`device_key`), so that no two
shards share masks, and their step equals the mean of the single-device gradients of the
shards under those keys.

Devices may span several processes (`training.distributed`): each process passes
`place_batch` the examples it holds, and the global batch is their concatenation in process
order.

A model with BatchNorm layers (`nets.batch_coupled_layers`) steps differently per form: under
"shard_map" and "pmap" each device normalises its shard with the shard's own statistics (as
PyTorch's BatchNorm under DistributedDataParallel), so the step is the mean of the shards'
single-device steps; under "jit" and "explicit" the program is the single-device one, so the
statistics are the global batch's and the step is the single-device step. A BatchNorm built
with `axis_name=BATCH_AXIS` synchronises its statistics over the devices (SyncBatchNorm), and
then every form steps as the single-device step on the global batch.

Each device's gradient is the mean over its b/N examples; their mean is the gradient of the
global batch only when every device has the same number of examples, so a global batch not
divisible by the device count is a ValueError. The L2 term is split the same way: each device
uses lambda/N, whose mean over devices gives back lambda/(2m) sum w^2 for the global m.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nets import engines
from nets.layers import (
    Factors,
    Layer,
    forward_with_key,
    is_count,
    is_finite_number,
    is_serial,
    layer_keys,
)
from nets.losses import Objective, is_weight, l2_penalty, l2_penalty_grad
from nets.normalization import batch_coupled_layers
from training.metrics import predicted_labels, target_labels

__all__ = [
    "BATCH_AXIS",
    "FORMS",
    "per_example_value_and_grad",
    "gradient_norms",
    "clip_gradients",
    "weighted_sum",
    "private_value_and_grad",
    "ghost_norms",
    "ghost_clipped_sum",
    "PER_EXAMPLE_NORMS",
    "pick_hardest_misclassified",
    "batch_mesh",
    "check_batch",
    "DataParallel",
    "data_parallel",
    "mean_over_devices",
    "device_key",
    "SMALL_LEAF",
]

BATCH_AXIS = "batch"
FORMS = ("shard_map", "pmap", "jit", "explicit")

PerExample = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


# --- over examples ---------------------------------------------------------------------------

def per_example_value_and_grad(
    model: Layer, objective: Objective, engine: engines.Engine = engines.manual
) -> PerExample:
    """Each example's share of E and its gradient, by `jax.vmap` of the engine over examples.

    Returns `value_and_grads(params, x, targets, key=None) -> (values, grads)`. Shapes: x
    (batch, ...), targets (batch, ...); values (batch,); each grads leaf (batch, *leaf.shape).
    values[i] = loss(x_i, t_i) + lambda/(2m) sum w^2 and grads[i] its gradient, so that their
    means over the batch are E and dE/dparams (module docstring). With a key (a model with
    dropout) example i draws its masks from `jax.random.split(key, batch)[i]`.

    A model whose output for one example depends on the others (`nets.BatchNorm` without
    fixed statistics in params) has no per-example gradients: ValueError naming those layers.
    """

    def value_and_grads(params, x, targets, key=None):
        coupled = batch_coupled_layers(model, params)
        if coupled:
            raise ValueError(f"per_example_value_and_grad: {model.name}: layers {coupled} "
                             "normalise with their batch's statistics (BatchNorm), so one "
                             "example's loss depends on the others and has no gradient of "
                             "its own (fixed statistics: nets.with_population_statistics)")
        examples = x.shape[0]
        # a batch of one divides the penalty by 1; lambda/m keeps example i's share of it
        single = engine(model, objective._replace(l2=objective.l2 / examples))

        def one_example(x_i, target_i, key_i):
            return single(params, x_i[None], target_i[None], key_i)

        keys = None if key is None else jax.random.split(key, examples)
        return jax.vmap(one_example)(x, targets, keys)

    return value_and_grads


def gradient_norms(grads: Any) -> jax.Array:
    """||g_i||, the Euclidean norm of each example's whole gradient (all leaves): (batch,)."""
    squares = [jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1)
               for leaf in jax.tree.leaves(grads)]
    return jnp.sqrt(sum(squares))


def clip_gradients(grads: Any, max_norm: float) -> tuple[Any, jax.Array]:
    """Each example's gradient scaled to norm at most C: g_i min(1, C / ||g_i||).

    Returns (clipped grads, the norms before clipping (batch,)). A zero gradient stays zero.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_gradients: max_norm must be > 0, got {max_norm}")
    norms = gradient_norms(grads)
    tiny = jnp.finfo(norms.dtype).tiny
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norms, tiny)).astype(norms.dtype)

    def scaled(leaf):
        return leaf * scale.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)

    return jax.tree.map(scaled, grads), norms


def weighted_sum(grads: Any, weights: jax.Array) -> Any:
    """sum_i weights_i g_i over the examples: a pytree like params, from per-example grads.

    Written as a contraction (`jnp.tensordot`) rather than `jnp.sum(weights * g, axis=0)`:
    XLA's CPU backend reduces the leading axis of a large array slowly (about 30x slower for
    the MLP's (128, 256, 768) per-example weight gradients), while a dot is its fast path; on
    accelerators both are fast. Mean: weights = 1/m.
    """
    return jax.tree.map(lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1),
                        grads)


PER_EXAMPLE_NORMS = ("vmap", "ghost")


def _check_per_example(caller: str, per_example: str, engine: engines.Engine) -> None:
    """per_example names one of PER_EXAMPLE_NORMS, and "ghost" (which runs the hand-written
    backward itself) comes with the manual engine: else ValueError naming the caller."""
    if per_example not in PER_EXAMPLE_NORMS:
        raise ValueError(f"{caller}: per_example must be one of {PER_EXAMPLE_NORMS}, got "
                         f"{per_example!r}")
    if per_example == "ghost" and engine is not engines.manual:
        raise ValueError(f"{caller}: per_example='ghost' runs the hand-written backward "
                         "itself; engine must be engines.manual")


def private_value_and_grad(
    model: Layer, objective: Objective, engine: engines.Engine = engines.manual, *,
    clip_norm: float, noise_multiplier: float = 0.0, per_example: str = "vmap",
) -> Callable[..., tuple[jax.Array, Any]]:
    """The DP-SGD gradient (Abadi et al. 2016, "Deep Learning with Differential Privacy",
    Algorithm 1): per-example loss gradients clipped to norm C, averaged, plus noise.

        g = (1/m) (sum_i clip_C(dloss_i/dw) + sigma C xi) + (lambda/m) w,   xi ~ N(0, I)

    Returns `value_and_grad(params, x, targets, key=None, *, weights=None, expected_batch=None)
    -> (E, g)`; with noise_multiplier sigma = 0 it has the engine's signature, and clip_norm =
    inf clips nothing (with sigma > 0 C must be finite). For Poisson sampling (each training
    example drawn with probability q, the sampling Abadi et al.'s analysis and the privacy
    accountants assume), pad the drawn examples to a fixed batch and give `weights` (batch,): 1
    for a drawn example, 0 for a padding row (which must be finite; it counts for nothing), and
    `expected_batch` = q N, which then replaces m above (so that the noise's scale does not
    depend on the number drawn); E is then the mean loss over the drawn examples. The L2 term
    does not depend on the data, so its gradient is added after clipping, untouched (a departure
    from clipping E_i whole, which would shrink the penalty with the data term). sigma > 0 needs
    an explicit `key`; for a model with dropout the key is split into the noise's and the masks'
    (without a key the model runs at inference, as in the engines).

    per_example="vmap" computes every example's gradient (`per_example_value_and_grad`, any
    engine) and weights them; "ghost" never forms the Dense layers' ones (`ghost_clipped_sum`,
    the hand-written backward only), the same g up to rounding.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"private_value_and_grad: noise_multiplier must be >= 0, got "
                         f"{noise_multiplier}")
    if not math.isfinite(noise_multiplier):  # inf noise made every gradient inf or NaN
        raise ValueError(f"private_value_and_grad: noise_multiplier must be finite, got "
                         f"{noise_multiplier}")
    if not clip_norm > 0:  # < 0 stepped against the gradient, NaN gave NaN
        raise ValueError(f"private_value_and_grad: clip_norm must be > 0, got {clip_norm}")
    if noise_multiplier > 0 and not math.isfinite(clip_norm):  # noise of sigma C: inf
        raise ValueError(f"private_value_and_grad: clip_norm must be finite with "
                         f"noise_multiplier {noise_multiplier} > 0 (the noise's scale is "
                         f"sigma C), got {clip_norm}")
    _check_per_example("private_value_and_grad", per_example, engine)
    data_objective = objective._replace(l2=0.0)
    if per_example == "ghost":
        clipped_sum = ghost_clipped_sum(model, data_objective)
    else:
        clipped_sum = _vmap_clipped_sum(model, data_objective, engine)

    def value_and_grad(params, x, targets, key=None, *, weights=None, expected_batch=None):
        if weights is not None and weights.shape != (x.shape[0],):
            raise ValueError(f"private_value_and_grad: weights must have shape "
                             f"({x.shape[0]},), one per example, got {weights.shape}")
        # checked where its value is known (not traced), NumPy's numbers too: np.int64(0)
        # divided the sum by 0 silently
        if (expected_batch is not None and not isinstance(expected_batch, jax.core.Tracer)
                and not (is_finite_number(expected_batch) and expected_batch > 0)):
            raise ValueError(f"private_value_and_grad: expected_batch must be > 0, got "
                             f"{expected_batch}")
        examples = x.shape[0] if expected_batch is None else expected_batch
        dropout_key = None
        if model.stochastic and key is not None:
            key, dropout_key = jax.random.split(key)
        data_energy, _, summed = clipped_sum(params, x, targets, clip_norm, dropout_key,
                                             weights)
        if noise_multiplier > 0:
            if key is None:
                raise ValueError("private_value_and_grad: noise_multiplier > 0 needs a PRNG "
                                 "key (value_and_grad(params, x, targets, key))")
            leaves, treedef = jax.tree.flatten(summed)
            keys = jax.random.split(key, len(leaves))
            leaves = [leaf + noise_multiplier * clip_norm
                      * jax.random.normal(leaf_key, leaf.shape, leaf.dtype)
                      for leaf, leaf_key in zip(leaves, keys)]
            summed = jax.tree.unflatten(treedef, leaves)
        penalty = l2_penalty_grad(params, objective.l2, examples)
        grad = jax.tree.map(lambda s, p: s / examples + p, summed, penalty)
        return data_energy + l2_penalty(params, objective.l2, examples), grad

    return value_and_grad


def _clip_scale(norms: jax.Array, clip_norm: float) -> jax.Array:
    """min(1, C / ||g_i||) per example: clip_C(g_i) = g_i times it (a zero gradient stays 0)."""
    return jnp.minimum(1.0, clip_norm / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))


def _mean_loss(losses: jax.Array, weights: jax.Array | None) -> jax.Array:
    """The mean of the examples' losses, or their weighted mean."""
    if weights is None:
        return jnp.mean(losses)
    weights = weights.astype(losses.dtype)
    return jnp.sum(weights * losses) / jnp.sum(weights)


def _vmap_clipped_sum(model: Layer, objective: Objective, engine: engines.Engine):
    """(E, each example's gradient norm, sum_i w_i clip_C(g_i)) from the per-example
    gradients: `run(params, x, targets, clip_norm, key, weights=None)` (w_i = 1 without
    weights; E their weighted mean loss)."""
    data_term = per_example_value_and_grad(model, objective, engine)

    def run(params, x, targets, clip_norm, key, weights=None):
        losses, grads = data_term(params, x, targets, key)
        norms = gradient_norms(grads)
        scale = _clip_scale(norms, clip_norm)
        if weights is not None:
            scale = scale * weights.astype(scale.dtype)
        return _mean_loss(losses, weights), norms, weighted_sum(grads, scale)

    return run


def _chain(model: Layer) -> tuple[Layer, ...]:
    """The layers `ghost_clipped_sum` walks: a `serial` model's sublayers, or the model."""
    return model.sublayers if is_serial(model) else (model,)


def _fold_example_axis(leaf: jax.Array) -> jax.Array:
    """(batch, 1, ...) -> (batch, ...): vmapped batches of one back into one batch."""
    return leaf.reshape((leaf.shape[0],) + leaf.shape[2:])


class _GhostPass(NamedTuple):
    """What `_ghost_pass` leaves for the clipped sum: the model's outputs (batch, ...), each
    example's squared gradient norm (batch,), the factored layers' `Factors` {chain index:
    {leaf key: Factors}}, the other layers' per-example gradients {chain index: grads with a
    leading (batch,) axis}, and the chain's params."""
    outputs: jax.Array
    squares: jax.Array
    factored: dict[int, dict[str, Factors]]
    formed: dict[int, Any]
    chain_params: tuple


def _is_python_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == 0


def _weight_dot(grads_i: Any, layer_params: Any) -> jax.Array:
    """sum over a layer's weights ("w" leaves) of <g_i, w> per example: (batch,)."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(grads_i)[0]
    weights = jax.tree.leaves(layer_params)
    return sum((jnp.sum((leaf * weight[None]).reshape(leaf.shape[0], -1), axis=1)
                for (path, leaf), weight in zip(paths_and_leaves, weights) if is_weight(path)),
               jnp.zeros((), weights[0].dtype))


def _by_gram(factors: Factors) -> bool:
    """Whether ||a_n^T b_n||^2 costs less as <a_n a_n^T, b_n b_n^T> (T^2 (K + C) per example)
    than formed (T K C): few windows against a large kernel (Dense, T = 1; a convolution
    that sees most of its input). A masked leaf is formed (the mask is not in the Gram
    matrices)."""
    _, windows, k = factors.a.shape
    c = factors.b.shape[2]
    return factors.mask is None and windows * (k + c) <= k * c


def _gram_squares(factors: Factors, leaf: jax.Array, share, weight: bool) -> jax.Array:
    """||g_n||^2 = <a_n a_n^T, b_n b_n^T> of one factored leaf, plus 2 c <g_n, w> =
    2 c sum(a_n * (b_n w^T)) for a weight when c = share is not None (the penalty's cross
    term): (batch,)."""
    a, b = factors.a, factors.b
    squares = jnp.sum(jnp.einsum("ntk,nsk->nts", a, a) * jnp.einsum("ntc,nsc->nts", b, b),
                      axis=(1, 2))
    if share is None or not weight:
        return squares
    w = leaf.reshape(a.shape[2], b.shape[2])
    return squares + 2 * share * jnp.sum(jnp.einsum("ntc,kc->ntk", b, w) * a, axis=(1, 2))


def _factored_sum(factors: Factors, leaf: jax.Array, scale: jax.Array) -> jax.Array:
    """sum_n scale_n g_n of one factored leaf: one product over examples and windows. Only
    the leaves `_by_gram` takes come here, none of them masked."""
    a = factors.a.reshape(-1, factors.a.shape[2])
    b = (factors.b * scale[:, None, None]).reshape(-1, factors.b.shape[2])
    return (a.T @ b).reshape(leaf.shape)  # faster on CPU than the 3-D einsum


def _gram_leaves(layer: Layer, layer_params: Any, x: jax.Array, dy: jax.Array
                 ) -> dict[str, Factors]:
    """The leaves of a layer with `factors` whose norms `_by_gram` takes from the Gram
    matrices, with their factors ({} for a layer without factors)."""
    if layer.factors is None:
        return {}
    return {key: factors for key, factors in layer.factors(layer_params, x, dy).items()
            if _by_gram(factors)}


def _like(grads: Any, params: Any) -> Any:
    """The params with grads' structure: a layer's params dict cut to grads' keys."""
    return {key: params[key] for key in grads} if isinstance(grads, dict) else params


def _ghost_pass(model: Layer, objective: Objective, caller: str):
    """The forward and backward pass behind `ghost_norms` and `ghost_clipped_sum`:
    `run(params, x, targets, key) -> _GhostPass`.

    Example i's gradient is g_i = d_i + c w with d_i its loss's gradient and c = lambda/m on
    the weights (E_i's penalty share, as in `per_example_value_and_grad`), so

        ||g_i||^2 = ||d_i||^2 + 2 c <d_i, w> + c^2 ||w||^2.

    A layer with `factors` (Dense, Conv2D) gives each leaf's d_i as a_i^T b_i over T rows:
    where `_by_gram`, ||d_i||^2 is <a_i a_i^T, b_i b_i^T> (T = 1 for Dense:
    ||x_i||^2 ||dy_i||^2) and <d_i, w> is sum(a_i * (b_i w^T)); other leaves are formed by
    the backward per example. A Python lambda of 0 drops the penalty's terms from the
    program.
    """
    layers = _chain(model)
    chained = is_serial(model)
    penalised = not _is_python_zero(objective.l2)

    def one_example(params, x_i, key_i):
        """Each layer's input and residuals and the output, for a batch of one."""
        inputs, residuals = [], []
        x = x_i[None]
        # the keys the model's own forward gives its layers (serial: one per stochastic one)
        keys = layer_keys(layers, key_i) if chained else [key_i]
        for layer, layer_params, layer_key in zip(layers, params, keys):
            inputs.append(x)
            x, layer_residuals = forward_with_key(layer, layer_params, x, layer_key)
            residuals.append(layer_residuals)
        return x, inputs, residuals

    def backward_one(layer, layer_params, residuals_i, dy_i):
        return layer.backward(layer_params, residuals_i, dy_i[None])

    def run(params, x, targets, key):
        coupled = batch_coupled_layers(model, params)
        if coupled:
            raise ValueError(f"{caller}: {model.name}: layers {coupled} normalise with "
                             "their batch's statistics (BatchNorm), so one example's loss "
                             "depends on the others and has no gradient of its own")
        chain_params = params if chained else (params,)
        examples = x.shape[0]
        share = objective.l2 / examples if penalised else None  # c, each example's share
        keys = None if key is None else jax.random.split(key, examples)
        key_axis = None if keys is None else 0
        outputs, inputs, residuals = jax.vmap(one_example, in_axes=(None, 0, key_axis))(
            chain_params, x, keys)
        outputs = _fold_example_axis(outputs)
        dy = examples * objective.loss.grad(outputs, targets)
        squares, factored, formed = 0.0, {}, {}
        for index in reversed(range(len(layers))):
            layer, layer_params = layers[index], chain_params[index]
            grads_i, dx = jax.vmap(functools.partial(backward_one, layer, layer_params))(
                residuals[index], dy)
            by_gram = _gram_leaves(layer, layer_params, _fold_example_axis(inputs[index]), dy)
            for leaf_key, leaf_factors in by_gram.items():
                squares = squares + _gram_squares(leaf_factors, layer_params[leaf_key], share,
                                                  leaf_key == "w")
            if by_gram:  # XLA drops these leaves' per-example gradients from the program
                factored[index] = by_gram
                grads_i = {key: leaf for key, leaf in grads_i.items() if key not in by_gram}
            if jax.tree.leaves(grads_i):
                squares = squares + sum(jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1)
                                        for leaf in jax.tree.leaves(grads_i))
                if penalised:
                    squares = squares + 2 * share * _weight_dot(grads_i, _like(grads_i,
                                                                               layer_params))
                formed[index] = grads_i
            if index > 0:
                dy = _fold_example_axis(dx)
        if penalised:  # c^2 ||w||^2 = 2 c (lambda / 2m) ||w||^2
            squares = squares + 2 * share * l2_penalty(params, objective.l2, examples)
        return _GhostPass(outputs, squares, factored, formed, chain_params)

    return run


def _loss_of_one(objective: Objective) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """One example's loss from its output and target (a batch of one), to vmap."""
    def loss(output_i, target_i):
        return objective.loss.value(output_i[None], target_i[None])

    return loss


def ghost_norms(model: Layer, objective: Objective) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Each example's share of E and the norm of its gradient, without forming the Dense
    layers' per-example gradients (ghost norms; Goodfellow 2015, "Efficient per-example
    gradient computations"; `ghost_clipped_sum` describes the pass).

    Returns `norms(params, x, targets, key=None) -> (values (batch,), norms (batch,))`:
    values[i] = loss_i + lambda/(2m) sum w^2 and norms[i] = ||dE_i/dparams||, the values of
    `per_example_value_and_grad` and the `gradient_norms` of its gradients, up to rounding.
    The hand-written backward only (the manual engine's).
    """
    run_pass = _ghost_pass(model, objective, "ghost_norms")

    def norms(params, x, targets, key=None):
        ghost = run_pass(params, x, targets, key)
        penalty = l2_penalty(params, objective.l2, x.shape[0])
        values = jax.vmap(_loss_of_one(objective))(ghost.outputs, targets) + penalty
        return values, jnp.sqrt(ghost.squares)

    return norms


def ghost_clipped_sum(model: Layer, objective: Objective):
    """sum_i w_i clip_C(g_i) without forming the per-example gradients of Dense layers and of
    convolutions with few windows (ghost norms; Goodfellow 2015, "Efficient per-example
    gradient computations"; for convolutions, the Gram matrices of Li et al. 2022, "Large
    language models can be strong differentially private learners", chosen per layer by
    cost as in Bu et al. 2022's mixed ghost clipping): `run(params, x, targets, clip_norm,
    key=None, weights=None) -> (E, norms (batch,), clipped sum like params)`, g_i being
    dE_i/dparams as in `per_example_value_and_grad` (its penalty share included), w_i = 1
    without weights (E then their weighted mean loss).

    The model runs as a chain: a `serial` model's layers, or the model as one layer. Every
    layer runs on each example alone (vmapped over batches of one, as in
    `per_example_value_and_grad`: with a key, example i's dropout masks come from
    split(key, batch)[i]), and the hand-written backward runs back through the chain with
    every example's own loss gradient dy (m times `loss.grad`, each loss being a mean over
    the m examples):
    - a layer with `factors` (Dense, Conv2D) writes example i's gradient of a leaf as
      a_i^T b_i over T rows (Dense: x_i^T dy_i and 1^T dy_i; a convolution: its patches^T
      dy_i over the T windows). Where T^2 (K + C) <= K C and no connection table masks it,
      the leaf's share of ||g_i||^2 is <a_i a_i^T, b_i b_i^T> (for Dense
      (||x_i||^2 + 1) ||dy_i||^2) and its clipped sum the one product a^T (s * b) over
      examples and rows, s_i = min(1, C / ||g_i||): never formed. Other leaves are formed
      by the backward per example;
    - any other layer with parameters (a grouped convolution, a recurrent layer, the whole
      model when it is not serial) forms its own per-example gradients, adds their squares
      to ||g_i||^2 and their s-weighted sum (`weighted_sum`) to the clipped sum;
    - a layer without parameters passes dy back; dx always comes from the backward, whose
      unused per-example parameter gradients XLA drops;
    - with lambda > 0, the penalty's share (lambda/m) w adds to every example's gradient
      (`_ghost_pass` gives its terms in the norms), and (lambda/m) (sum_i s_i) w to the sum.
    A model whose examples are coupled (BatchNorm with the batch's statistics) is refused
    by name, as in `per_example_value_and_grad`.
    """
    run_pass = _ghost_pass(model, objective, "ghost_clipped_sum")

    def run(params, x, targets, clip_norm, key=None, weights=None):
        ghost = run_pass(params, x, targets, key)
        norms = jnp.sqrt(ghost.squares)
        scale = _clip_scale(norms, clip_norm)
        if weights is not None:
            scale = scale * weights.astype(scale.dtype)
        summed = []
        for index, layer_params in enumerate(ghost.chain_params):
            if index in ghost.factored:
                summed.append({**weighted_sum(ghost.formed.get(index, {}), scale),
                               **{key: _factored_sum(factors, layer_params[key], scale)
                                  for key, factors in ghost.factored[index].items()}})
            elif index in ghost.formed:
                summed.append(weighted_sum(ghost.formed[index], scale))
            else:
                summed.append(jax.tree.map(jnp.zeros_like, layer_params))
        summed = tuple(summed) if is_serial(model) else summed[0]
        if not _is_python_zero(objective.l2):
            penalty = l2_penalty_grad(params, objective.l2, x.shape[0])
            summed = jax.tree.map(lambda g, p: g + jnp.sum(scale) * p, summed, penalty)
        summed = jax.tree.map(lambda g, p: g.astype(p.dtype), summed, params)
        energy = (objective.loss.value(ghost.outputs, targets) if weights is None else
                  _mean_loss(jax.vmap(_loss_of_one(objective))(ghost.outputs, targets),
                             weights))
        return energy + l2_penalty(params, objective.l2, x.shape[0]), norms, summed

    return run


def pick_hardest_misclassified(
    model: Layer, objective: Objective, engine: engines.Engine = engines.manual, *,
    count: int, by: str = "grad_norm", threshold: float = 0.0, per_example: str = "vmap",
) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """The `count` misclassified examples with the largest gradient norm (or loss).

    For the lecture's "pick misclassified examples" procedure (`procedures.misclassified`
    draws them uniformly): here the misclassified examples are ranked by ||dE_i/dw|| (by
    "grad_norm") or by E_i (by "loss") and the largest taken. When fewer than `count` are
    misclassified, the rest are the correctly classified examples with the largest scores.
    Returns `pick(params, x, targets) -> (indices (count,), misclassified (count,) bool)`.
    Shapes: x (batch, ...), targets (batch, classes) one-hot or +-1 (`training.metrics`).

    per_example="vmap" forms every example's gradient (`per_example_value_and_grad`, any
    engine); "ghost" takes the norms by `ghost_norms` (the manual engine), the same ranking
    up to rounding without the Dense layers' per-example gradients.
    """
    if by not in ("grad_norm", "loss"):
        raise ValueError(f"pick_hardest_misclassified: by={by!r}; choose 'grad_norm' or 'loss'")
    _check_per_example("pick_hardest_misclassified", per_example, engine)
    if per_example == "ghost":
        values_and_norms = ghost_norms(model, objective)
    else:
        value_and_grads = per_example_value_and_grad(model, objective, engine)

        def values_and_norms(params, x, targets):
            values, grads = value_and_grads(params, x, targets)
            return values, gradient_norms(grads)

    def pick(params, x, targets):
        if not (is_count(count) and 1 <= count <= x.shape[0]):
            raise ValueError(f"pick_hardest_misclassified: count must be in [1, {x.shape[0]}],"
                             f" got {count}")
        values, norms = values_and_norms(params, x, targets)
        score = norms if by == "grad_norm" else values
        wrong = predicted_labels(model.apply(params, x), threshold) != target_labels(targets)
        # misclassified first, each group by descending score (lexsort: last key is primary)
        order = jnp.lexsort((-score, ~wrong))
        indices = order[:count]
        return indices, wrong[indices]

    return pick


# --- over devices ----------------------------------------------------------------------------

def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `BATCH_AXIS` over `devices` (default: every device of every
    process, `jax.devices()`). Axis type Auto: the "jit" form leaves the collectives to XLA."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def _check_examples(caller: str, x: Any, targets: Any, axes: int = 1) -> int:
    """x's number of examples (its first axis; its first `axes` for a batch laid out per
    device), after checking that targets hold as many: x of 8 examples with targets of 6 was
    split into shards of 4 and 3, and the loss named those shapes, not the batch's."""
    x_shape, target_shape = np.shape(x), np.shape(targets)
    if len(x_shape) < axes:
        raise ValueError(f"{caller}: x has shape {x_shape}; expected a leading batch axis")
    if target_shape[:axes] != x_shape[:axes]:
        raise ValueError(f"{caller}: x has shape {x_shape} and targets {target_shape}; "
                         f"expected one target per example, the same leading "
                         f"{'axis' if axes == 1 else f'{axes} axes'}")
    return x_shape[0]


def check_batch(global_batch: int, devices: int) -> None:
    """Raise a ValueError unless the global batch splits evenly over the devices."""
    if global_batch % devices:
        raise ValueError(
            f"data parallel: a global batch of {global_batch} examples does not split evenly "
            f"over {devices} devices; use a multiple of {devices} (each device's gradient is a "
            "mean over its examples, and the mean of the means is the batch gradient only for "
            "equal shards)")


class DataParallel(NamedTuple):
    """A data-parallel step and its placement helpers (module docstring).

    step(params, opt_state, x, targets, key=None) -> (params, opt_state, energy, grad):
        jitted (or pmapped); params and opt_state from `place_state`, x and targets from
        `place_batch`. energy and grad are E and dE/dparams of the global batch, before the
        update; key: the dropout masks' (module docstring).
    value_and_grad(params, x, targets, key=None) -> (energy, grad): the same without the
        update.
    place_state(tree) -> the tree replicated on every device of the mesh.
    place_batch(x, targets) -> the global batch split over the devices, from the examples this
        process holds (all of them in a single process): (batch, ...) for "shard_map" and
        "jit" and "explicit", (local devices, batch / devices, ...) for "pmap".
    fetch(tree) -> one copy of a replicated tree, as NumPy arrays on the host.
    """

    form: str
    mesh: Mesh
    step: Callable
    value_and_grad: Callable
    place_state: Callable[[Any], Any]
    place_batch: Callable[[Any, Any], tuple[Any, Any]]
    fetch: Callable[[Any], Any]

    @property
    def num_devices(self) -> int:
        return self.mesh.size


def _replicate(mesh: Mesh, tree: Any) -> Any:
    """Every leaf on every device of the mesh (a global array even across processes)."""
    sharding = NamedSharding(mesh, P())

    def place(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def _split_batch(mesh: Mesh, tree: Any) -> Any:
    """This process's examples as its part of a global batch sharded over the mesh."""
    sharding = NamedSharding(mesh, P(BATCH_AXIS))
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), tree)


def _fetch(tree: Any) -> Any:
    def one_copy(leaf):
        if isinstance(leaf, jax.Array):
            if not leaf.is_fully_replicated:
                raise ValueError(f"fetch: an array of shape {leaf.shape} is not replicated")
            return np.asarray(leaf.addressable_shards[0].data)
        return np.asarray(leaf)

    return jax.tree.map(one_copy, tree)


SMALL_LEAF = 2**16


def mean_over_devices(tree: Any) -> Any:
    """The mean of every leaf of tree over the devices of `BATCH_AXIS` (inside a mapped
    function), in one all-reduce: the leaves under `SMALL_LEAF` elements raveled into one
    vector (leaves of mixed dtypes averaged in their common dtype and cast back), the larger
    ones as they are. On 2 CPU devices a step took, per leaf / all raveled / this: LeNet-1989
    2.0-2.4 / 1.5 / 1.5 ms, LeNet-5 8.6-9.3 / 7.6 / 7.7 ms, and a 256-768-10 MLP 1.5 / 2.5-4.5
    / 1.4 ms (XLA:CPU's concatenation of its 196,608-weight layer took 1.7 ms). Over one
    device the tree is returned as it is."""
    leaves, treedef = jax.tree.flatten(tree)
    integers = [str(leaf.dtype) for leaf in leaves if not jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if integers:  # their mean would be truncated on the way back
        raise ValueError(f"mean_over_devices: leaves of dtypes {sorted(set(integers))}; "
                         "expected floating-point leaves only")
    if jax.lax.axis_size(BATCH_AXIS) == 1:
        return tree
    small = [i for i, leaf in enumerate(leaves) if np.size(leaf) < SMALL_LEAF]
    large = [i for i, leaf in enumerate(leaves) if np.size(leaf) >= SMALL_LEAF]
    # NumPy's promotion, explicit: float32 with float64 is float64, losslessly
    common = np.result_type(*[leaves[i].dtype for i in small]) if small else None
    flat, unravel = jax.flatten_util.ravel_pytree([leaves[i].astype(common) for i in small])
    flat, large_means = jax.lax.pmean((flat, [leaves[i] for i in large]), BATCH_AXIS)
    small_means = [mean.astype(leaves[i].dtype) for i, mean in zip(small, unravel(flat))]
    for i, leaf in [*zip(small, small_means), *zip(large, large_means)]:
        leaves[i] = leaf
    return jax.tree.unflatten(treedef, leaves)


def _with_key(args: tuple, key: Any, arity: int) -> tuple[tuple, Any]:
    """(the arity arguments before the key, the key) from a call that passed the key as a last
    positional argument or by name."""
    if len(args) == arity + 1 and key is None:
        return args[:-1], args[-1]
    if len(args) != arity:
        raise TypeError(f"data parallel: expected {arity} arguments and an optional key, got "
                        f"{len(args)}")
    return args, key


def device_key(key: jax.Array | None) -> jax.Array | None:
    """Inside a mapped function, this device's key for its shard's random draws (dropout):
    `key` folded with the device's index on `BATCH_AXIS`, so that no two shards share masks.
    None stays None."""
    return None if key is None else jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXIS))


def _update(optimizer, params, opt_state, grad):
    updates, opt_state = optimizer.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _checked(function: Callable, arity: int, devices: int) -> Callable:
    """`function(*args, key)` called as run(*args[, key]), after checking that the batch
    (the second-to-last argument) splits evenly over `devices`."""
    def run(*args, key=None):
        args, key = _with_key(args, key, arity)
        check_batch(_check_examples("data parallel", *args[-2:]), devices)
        return function(*args, key)

    return run


def _local_functions(model, objective, optimizer, engine, devices):
    """One device's (gradient, step) inside a mapped function: its shard's mean gradient, then
    the mean over devices (pmean). The L2 term is split over the devices, so that their mean
    carries it once."""
    local_value_and_grad = engine(model, objective._replace(l2=objective.l2 / devices))

    def local_gradient(params, x, targets, key):
        return mean_over_devices(local_value_and_grad(params, x, targets, device_key(key)))

    def local_step(params, opt_state, x, targets, key):
        energy, grad = local_gradient(params, x, targets, key)
        params, opt_state = _update(optimizer, params, opt_state, grad)
        return params, opt_state, energy, grad

    return local_gradient, local_step


def _shard_map_form(model, objective, optimizer, engine, mesh):
    """(step, value_and_grad, place_batch) by `jax.shard_map` over the mesh."""
    local_gradient, local_step = _local_functions(model, objective, optimizer, engine,
                                                  mesh.size)

    def sharded(function, replicated_args):
        # check_vma=False: each device's gradient of the replicated params stays its own
        # (with check_vma=True every engine sums it over the devices by itself, as jax.grad
        # does: nets/varying.py), so that the reduction is the explicit pmean of
        # `_local_functions` (the energy's and every leaf's in one all-reduce).
        mapped = jax.shard_map(
            function, mesh=mesh,
            in_specs=(P(),) * replicated_args + (P(BATCH_AXIS), P(BATCH_AXIS), P()),
            out_specs=P(), check_vma=False)
        return _checked(jax.jit(mapped), replicated_args + 2, mesh.size)

    def place_batch(x, targets):
        return _split_batch(mesh, (x, targets))

    return sharded(local_step, 2), sharded(local_gradient, 1), place_batch


def _pmap_form(model, objective, optimizer, engine, mesh):
    """(step, value_and_grad, place_batch) by `jax.pmap` over the mesh's devices. The mesh is
    given identically in every process; each maps over its own (local) devices, and the
    batch arrives as (local devices, batch / devices, ...)."""
    local_gradient, local_step = _local_functions(model, objective, optimizer, engine,
                                                  mesh.size)
    pmap_devices = list(mesh.devices.flat)
    own_devices = [d for d in pmap_devices if d.process_index == jax.process_index()]
    local_devices = len(own_devices)

    def pmapped(function, replicated_args):
        mapped = jax.pmap(function, BATCH_AXIS, devices=pmap_devices,
                          in_axes=(None,) * replicated_args + (0, 0, None), out_axes=None)
        arity = replicated_args + 2

        def run(*args, key=None):
            args, key = _with_key(args, key, arity)
            _check_examples("data parallel (pmap)", *args[-2:], axes=min(np.ndim(args[-2]), 2))
            if np.shape(args[-2])[0] != local_devices:
                raise ValueError(
                    f"data parallel (pmap): x has shape {np.shape(args[-2])}; expected "
                    f"({local_devices} local devices, batch / devices, ...): pass the "
                    "batch through place_batch")
            return mapped(*args, key)

        return run

    local_split = NamedSharding(Mesh(np.array(own_devices), (BATCH_AXIS,)), P(BATCH_AXIS))

    def place_batch(x, targets):
        return jax.tree.map(lambda leaf: jax.device_put(
            np.asarray(leaf).reshape(local_devices, -1, *np.shape(leaf)[1:]), local_split),
            (x, targets))

    return pmapped(local_step, 2), pmapped(local_gradient, 1), place_batch


def _jit_form(model, objective, optimizer, engine, mesh):
    """(step, value_and_grad, place_batch) by `jax.jit` of the whole batch's step, with the
    params replicated and the batch split by sharding annotations (XLA partitions it)."""
    full_value_and_grad = engine(model, objective)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(BATCH_AXIS))

    def annotated(params, x, targets):
        return (jax.lax.with_sharding_constraint(params, replicated),
                jax.lax.with_sharding_constraint(x, split),
                jax.lax.with_sharding_constraint(targets, split))

    def full_gradient(params, x, targets, key):
        return full_value_and_grad(*annotated(params, x, targets), key)

    return _whole_batch_functions(full_gradient, optimizer, mesh, out_shardings=replicated)


def _explicit_form(model, objective, optimizer, engine, mesh):
    """(step, value_and_grad, place_batch) by `jax.jit` of the whole batch's step on `mesh`
    with Explicit axes (`data_parallel` makes it): the inputs' layouts are their types, and
    no annotation is needed inside."""
    return _whole_batch_functions(engine(model, objective), optimizer, mesh)


def _whole_batch_functions(gradient, optimizer, mesh, **jit_options):
    """(step, value_and_grad, place_batch) from `gradient(params, x, targets, key) -> (E,
    dE/dparams)` of the whole batch, both jitted with `jit_options`."""
    def full_step(params, opt_state, x, targets, key):
        energy, grad = gradient(params, x, targets, key)
        params, opt_state = _update(optimizer, params, opt_state, grad)
        return params, opt_state, energy, grad

    def place_batch(x, targets):
        return _split_batch(mesh, (x, targets))

    return (_checked(jax.jit(full_step, **jit_options), 4, mesh.size),
            _checked(jax.jit(gradient, **jit_options), 3, mesh.size), place_batch)


def _with_axis_type(mesh: Mesh, axis_type: AxisType) -> Mesh:
    """The same devices and axis names, every axis of `axis_type`."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type,) * len(mesh.axis_names))


_FORM_BUILDERS = {"shard_map": _shard_map_form, "pmap": _pmap_form, "jit": _jit_form,
                  "explicit": _explicit_form}


def data_parallel(
    model: Layer, objective: Objective, optimizer: optax.GradientTransformation, *,
    engine: engines.Engine = engines.manual, form: str = "shard_map",
    mesh: Mesh | None = None,
) -> DataParallel:
    """The data-parallel training step of `form` over `mesh` (default `batch_mesh()`).

    See the module docstring for the four forms; the step and gradient are the same up to
    float rounding in all of them, and equal to the single-device ones, except for a model
    with BatchNorm layers (the module docstring says which statistics each form uses).
    """
    if form not in FORMS:
        raise ValueError(f"data_parallel: form={form!r}; choose one of {FORMS}")
    mesh = batch_mesh() if mesh is None else mesh
    if mesh.axis_names != (BATCH_AXIS,):
        raise ValueError(f"data_parallel: the mesh must be 1-D with axis {BATCH_AXIS!r}, got "
                         f"axes {mesh.axis_names}")
    if form == "explicit":
        mesh = _with_axis_type(mesh, AxisType.Explicit)
    step, value_and_grad, place_batch = _FORM_BUILDERS[form](model, objective, optimizer,
                                                             engine, mesh)

    def place_batch_checked(x, targets):
        check_batch(_check_examples("data parallel", x, targets) * jax.process_count(),
                    mesh.size)
        return place_batch(x, targets)

    def place_state(tree):
        return _replicate(mesh, tree)

    return DataParallel(form, mesh, step, value_and_grad, place_state, place_batch_checked,
                        _fetch)
