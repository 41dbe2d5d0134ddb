"""Two gradient engines with one interface, and the manual engine as a `jax.custom_vjp`.

An engine turns a model (a `Layer`) and an `Objective` into

    value_and_grad(params, x, targets, key=None) -> (E, dE/dparams)

where dE/dparams has the structure of params. `key` is for stochastic models (dropout,
nets/layers.py): the model's random draws come from it, the same ones in every engine for
the same key, and the gradient is that of E with those draws held fixed; None runs the model
at inference.

`manual` runs the hand-written backward passes (loss gradient, then each layer's `backward`
from the last to the first, then (lambda/m) w for the L2 penalty); `autodiff` runs
`jax.value_and_grad` on the same forward functions; `manual_vjp` runs `jax.value_and_grad`
through `with_manual_vjp` wrappers, so JAX's own machinery (grad, vmap, check_grads) drives
the hand-written backward passes. All three are pure and jit-compatible; none jits by
itself, so callers decide where compilation happens.

Under `jax.shard_map` the three agree either way:
- with `check_vma=False`, as `training.parallel` maps them, each device's gradient is its own,
  to be averaged explicitly;
- with JAX's default `check_vma=True`, the gradient of a parameter that does not vary over a
  mesh axis (a replicated one) is summed over that axis, as `jax.grad` sums it (the sum of the
  devices' gradients, twice their mean on 2 devices): `manual`, `manual_vjp`'s cotangents and
  `curvature_diagonal` sum their own over the axes they vary over and their parameters do not
  (`nets.varying.sum_over_added_axes`; a recurrent net's scans start their carries varying
  like their inputs, `nets.recurrent`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from nets.layers import (
    Layer,
    forward_with_key,
    is_count,
    serial,
    tangent_backward_with_key,
    tangent_with_key,
)
from nets.losses import Loss, Objective, check_l2, l2_penalty, l2_penalty_grad
from nets.varying import sum_over_added_axes, vary_like, varying_axes

__all__ = [
    "ENGINES",
    "Engine",
    "ValueAndGrad",
    "manual",
    "autodiff",
    "manual_vjp",
    "with_manual_vjp",
    "loss_with_manual_vjp",
    "get_engine",
    "accumulated",
    "curvature_diagonal",
    "gauss_newton_product",
    "hessian_product",
    "hidden_state_product",
    "structurally_damped_product",
]

ValueAndGrad = Callable[..., tuple[jax.Array, Any]]  # (params, x, targets, key=None)
Engine = Callable[[Layer, Objective], ValueAndGrad]


def _dtypes_of(tree: Any, like: Any) -> Any:
    """tree with each leaf cast to the dtype of the matching leaf of `like`: a gradient has
    its parameter's dtype, as jax.grad's has, even where float32 params met float64 data
    (NumPy arrays under x64) and the hand-written products came out float64."""
    return jax.tree.map(lambda leaf, reference: leaf.astype(jnp.result_type(reference)),
                        tree, like)


def _check_objective(engine: str, objective: Objective) -> None:
    """Refuse, when the engine is built, an Objective whose L2 coefficient is NaN, infinite
    or negative: built directly, `Objective(loss, l2)` cannot check it itself (a NamedTuple),
    and the first `l2_penalty` refused it only inside the first call. A traced l2 (swept under
    vmap) is left to the caller (`nets.losses.check_l2`)."""
    check_l2(engine, objective.l2)


def _lists_as_tuples(tree: Any) -> Any:
    """tree with every list made a tuple, its contents too: params held as lists (`serial`'s
    forward takes a list of layer entries as a tuple) laid out as the layers' backward and
    tangent passes give their gradients, in tuples. Without a list, tree itself."""
    if not any(isinstance(node, list) for node in jax.tree.leaves(
            tree, is_leaf=lambda node: isinstance(node, list))):
        return tree
    return jax.tree.map(lambda node: tuple(_lists_as_tuples(list_entry) for list_entry in node)
                        if isinstance(node, list) else node,
                        tree, is_leaf=lambda node: isinstance(node, list))


def _held_as(tree: Any, params: Any, held: Any) -> Any:
    """tree, laid out as `held` (params with their lists made tuples, `_lists_as_tuples`),
    laid out as params are: the gradient of params held in a list is a list, as jax.grad's
    is (and as optax needs it, one tree with the params')."""
    if held is params:
        return tree
    return jax.tree.unflatten(jax.tree.structure(params),
                              jax.tree.structure(held).flatten_up_to(tree))


def manual(model: Layer, objective: Objective) -> ValueAndGrad:
    """E and its gradient by the hand-written backward passes (no jax.grad anywhere). Each
    gradient leaf has its parameter's dtype; params held in lists get their gradient in lists,
    as from `autodiff`."""
    _check_objective("manual", objective)

    def value_and_grad(params, x, targets, key=None):
        held = _lists_as_tuples(params)
        outputs, residuals = forward_with_key(model, held, x, key)
        m = outputs.shape[0]
        value = objective.value(held, outputs, targets)
        doutputs = objective.loss.grad(outputs, targets)
        dparams, _ = model.backward(held, residuals, doutputs)
        dpenalty = l2_penalty_grad(held, objective.l2, m)
        grads = sum_over_added_axes(jax.tree.map(lambda a, b: a + b, dparams, dpenalty), held)
        return value, _held_as(_dtypes_of(grads, held), params, held)

    return value_and_grad


def autodiff(model: Layer, objective: Objective) -> ValueAndGrad:
    """E and its gradient by `jax.value_and_grad` of the forward pass (the reference)."""
    _check_objective("autodiff", objective)

    def energy(params, x, targets, key=None):
        return objective.value(params, model.apply(params, x, key), targets)

    return jax.value_and_grad(energy)


def with_manual_vjp(layer: Layer) -> Callable[..., jax.Array]:
    """`layer.apply` as a `jax.custom_vjp` whose backward is `layer.backward`:
    `apply(params, x, key=None)`.

    Differentiable in both params and x; the cotangent rule is the hand-written one, cast to
    the dtypes of params and x and, under `shard_map` with check_vma, summed over the mesh
    axes it varies over and they do not (custom_vjp requires both types to match; module
    docstring). The key (stochastic layers) gets no cotangent.
    """

    @jax.custom_vjp
    def apply_with_key(params, x, key):
        return layer.apply(params, x, key)

    def forward(params, x, key):
        y, residuals = forward_with_key(layer, params, x, key)
        # a scalar of x's dtype, varying over x's mesh axes: what dx must be cast and reduced to
        like_x = vary_like(jnp.zeros((), x.dtype), varying_axes(x))
        return y, (params, residuals, like_x)

    def backward(saved, dy):
        params, residuals, like_x = saved
        dparams, dx = layer.backward(params, residuals, dy)
        dparams, dx = sum_over_added_axes((dparams, dx), (params, like_x))
        return _dtypes_of(dparams, params), dx.astype(like_x.dtype), None

    apply_with_key.defvjp(forward, backward)

    def apply(params, x, key=None):
        return apply_with_key(params, x, key)

    return apply


def loss_with_manual_vjp(loss: Loss) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`loss.value` as a `jax.custom_vjp` whose output cotangent is `loss.grad`.

    Targets are data, not trained: their cotangent (never needed for training) is delegated to
    `jax.vjp` so that differentiating with respect to targets stays correct.
    """

    @jax.custom_vjp
    def value(outputs, targets):
        return loss.value(outputs, targets)

    def forward(outputs, targets):
        return loss.value(outputs, targets), (outputs, targets)

    def backward(saved, g):
        outputs, targets = saved
        _, target_vjp = jax.vjp(lambda t: loss.value(outputs, t), targets)
        return (g * loss.grad(outputs, targets)).astype(outputs.dtype), target_vjp(g)[0]

    value.defvjp(forward, backward)
    return value


def manual_vjp(model: Layer, objective: Objective) -> ValueAndGrad:
    """`jax.value_and_grad` through the custom_vjp-registered hand-written backward passes.

    The L2 term is differentiated by JAX (its gradient is (lambda/m) w, a single line).
    """
    _check_objective("manual_vjp", objective)
    apply = with_manual_vjp(model)
    loss_value = loss_with_manual_vjp(objective.loss)

    def energy(params, x, targets, key=None):
        outputs = apply(params, x, key)
        return loss_value(outputs, targets) + l2_penalty(params, objective.l2, outputs.shape[0])

    energy_and_grad = jax.value_and_grad(energy)

    def value_and_grad(params, x, targets, key=None):
        # the custom_vjp's cotangent must have params' own tree: run it on tuples
        held = _lists_as_tuples(params)
        value, grads = energy_and_grad(held, x, targets, key)
        return value, _held_as(grads, params, held)

    return value_and_grad


def accumulated(engine: Engine, micro_batches: int) -> Engine:
    """`engine` run over a batch as `micro_batches` equal parts one after another (a
    `lax.scan`), their gradients summed: the whole batch's E and dE/dparams, with the
    temporaries of one part (gradient accumulation).

    Every loss is a mean over the batch's m examples (`nets.losses`), so the mean of the
    parts' losses and of their gradients is the whole batch's. With k = micro_batches, the
    penalty lambda/(2m) ||w||^2 and its gradient are added once, with the whole batch's m
    (a part of m / k examples run alone would add k times it); under `shard_map` with
    check_vma, its gradient is summed over the devices the batch is split over, as the
    engines sum theirs (`nets.varying`). A key is split into one per part, so dropout draws
    other masks than for the whole batch at once. A model whose layers normalise with their
    batch's statistics (BatchNorm) would see each part's: refused, as are a batch that does
    not split evenly and a micro_batches below 1.
    """
    if not is_count(micro_batches) or micro_batches < 1:
        raise ValueError(f"accumulated: micro_batches must be a whole number >= 1, got "
                         f"{micro_batches!r}")
    micro_batches = int(micro_batches)  # a NumPy integer would not divide float32 weakly

    def make(model: Layer, objective: Objective) -> ValueAndGrad:
        from nets.normalization import batch_coupled_layers  # it imports nets.layers only

        _check_objective("accumulated", objective)
        part_value_and_grad = engine(model, objective._replace(l2=0.0))

        def value_and_grad(params, x, targets, key=None):
            held = _lists_as_tuples(params)
            value, grads = held_value_and_grad(held, x, targets, key)
            return value, _held_as(grads, params, held)

        def held_value_and_grad(params, x, targets, key):
            coupled = batch_coupled_layers(model, params)
            if coupled:
                raise ValueError(f"accumulated: {model.name}: layers {coupled} normalise with "
                                 "their batch's statistics (BatchNorm), which each micro-batch "
                                 "would compute over itself")
            for what, array in (("x", x), ("targets", targets)):
                if jnp.ndim(array) < 1:
                    raise ValueError(f"accumulated: {what} has shape {jnp.shape(array)}, "
                                     "expected (batch, ...): a batch to split into "
                                     f"{micro_batches} micro-batches")
            m = x.shape[0]
            if m % micro_batches or targets.shape[0] != m:
                raise ValueError(f"accumulated: a batch of {m} inputs and "
                                 f"{targets.shape[0]} targets does not split into "
                                 f"{micro_batches} equal micro-batches")

            def in_parts(array):
                return array.reshape((micro_batches, m // micro_batches) + array.shape[1:])

            keys = None if key is None else jax.random.split(key, micro_batches)

            def add_part(totals, part):
                part_x, part_targets, part_key = part
                value, grads = part_value_and_grad(params, part_x, part_targets, part_key)
                return jax.tree.map(jnp.add, totals, (value, grads)), None

            value_shape, grad_shapes = jax.eval_shape(
                part_value_and_grad, params, in_parts(x)[0], in_parts(targets)[0],
                None if key is None else keys[0])
            # zeros typed as the parts' results (under shard_map: E varies like the data,
            # each gradient like its parameter)
            zero_value = vary_like(jnp.zeros((), value_shape.dtype), varying_axes((x, targets)))
            zero_grads = jax.tree.map(
                lambda shape, param: vary_like(jnp.zeros(shape.shape, shape.dtype),
                                               varying_axes(param)), grad_shapes, params)
            (value, grads), _ = jax.lax.scan(add_part, (zero_value, zero_grads),
                                             (in_parts(x), in_parts(targets), keys))
            penalty = sum_over_added_axes(vary_like(
                l2_penalty_grad(params, objective.l2, m), varying_axes((x, targets))), params)
            grads = jax.tree.map(lambda total, share: total / micro_batches + share,
                                 grads, penalty)
            value = value / micro_batches + l2_penalty(params, objective.l2, m)
            return value, _dtypes_of(grads, params)

        return value_and_grad

    return make


ENGINES: dict[str, Engine] = {
    "manual": manual,
    "autodiff": autodiff,
    "manual_vjp": manual_vjp,
}


def get_engine(name: str) -> Engine:
    """The engine called `name`; a ValueError lists the choices for an unknown name."""
    if name not in ENGINES:
        raise ValueError(f"engine: unknown name {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name]


def _first_without(layer: Layer, method: str) -> str:
    """The name of the innermost layer of `layer` whose `method` (a field of Layer) is None."""
    for sublayer in layer.sublayers:
        if getattr(sublayer, method) is None:
            return _first_without(sublayer, method)
    return layer.name


def curvature_diagonal(model: Layer, objective: Objective):
    """diag(d2E/dparams2) in LeCun's Gauss-Newton diagonal approximation, backpropagated by hand.

    Returns `diagonal(params, x, targets, key=None) -> pytree like params`: the loss
    curvature at the outputs (`Loss.curvature`) run back through every layer's `curvature`
    (nets/layers.py), plus lambda/m for every weight from the L2 penalty. For the last layer,
    and for nets in which every unit reaches the output by one path (one hidden layer and one
    output), with a loss whose curvature at the outputs is diagonal (mean squared error,
    sigmoid cross-entropy), this is the exact diagonal of the Gauss-Newton matrix; elsewhere
    it drops the cross terms (LeCun et al. 1989, section 5). A stochastic model (dropout)
    runs at inference without a key, and with one draws its masks as the engines do: the
    diagonal of E with those masks held fixed.
    """
    if model.curvature is None:
        raise ValueError(f"{model.name}: layer {_first_without(model, 'curvature')!r} has no "
                         "curvature (Gauss-Newton) backward")
    if objective.loss.curvature is None:
        raise ValueError(f"{objective.loss.name}: this loss defines no curvature")
    _check_objective("curvature_diagonal", objective)

    def diagonal(params, x, targets, key=None):
        held = _lists_as_tuples(params)
        outputs, residuals = forward_with_key(model, held, x, key)
        d2params, _ = model.curvature(held, residuals, objective.loss.curvature(outputs,
                                                                                  targets))
        ones = jax.tree.map(jnp.ones_like, held)
        penalty = l2_penalty_grad(ones, objective.l2, outputs.shape[0])
        diagonal = jax.tree.map(lambda a, b: a + b, d2params, penalty)
        return _held_as(_dtypes_of(sum_over_added_axes(diagonal, held), held), params, held)

    return diagonal


def gauss_newton_product(model: Layer, objective: Objective):
    """G v, the Gauss-Newton matrix of E times a direction v, by hand (Schraudolph 2002):

        G = J^T H J + (lambda/m) I_weights,

    J the Jacobian of the outputs (batch, classes) in the parameters, H the loss's Hessian in
    the outputs (`Loss.hessian_vector`) and the last term the L2 penalty's own Hessian.
    Returns `product(params, x, targets, v, key=None) -> pytree like params` (a key for a
    stochastic model: G of E with the dropout masks of that key held fixed, as the engines'
    gradient). J v comes from the
    layers' `tangent` passes (forward mode, nets/layers.py), H (J v) from the loss, and J^T
    from the backward passes: one tangent and one forward-and-backward pass, no matrix
    formed. G is the Hessian of E without the terms in the outputs' second derivatives:
    positive semi-definite for the losses here (all convex in the outputs), equal to the
    Hessian where the outputs are linear in the parameters, and its diagonal is what
    `curvature_diagonal` approximates. Power iteration with it gives G's largest
    eigenvalue (`experiments.largest_eigenvalue`), conjugate gradients a Newton step (Martens
    2010); the recurrent layers' tangents run forward through time (`nets.recurrent.
    scan_tangent`). A model with a layer that has no tangent (a user's layer or cell without
    one) is refused by name.
    """
    _check_product_inputs(model, objective, "tangent", "tangent (forward-mode) pass",
                          "gauss_newton_product")

    def product(params, x, targets, v, key=None):
        held, v = _lists_as_tuples(params), _lists_as_tuples(v)
        outputs, doutputs = _outputs_and_tangent(model, held, x, v, key)
        _, residuals = forward_with_key(model, held, x, key)
        u = objective.loss.hessian_vector(outputs, targets, doutputs)
        gv, _ = model.backward(held, residuals, u)
        return _held_as(_plus_penalty(gv, v, objective, outputs.shape[0], held), params, held)

    return product


def _check_product_inputs(model: Layer, objective: Objective, method: str, what: str,
                          product: str) -> None:
    """Refuse, by name, a model with a layer whose `method` (a field of Layer) is None, a
    loss without a Hessian-vector product and an l2 the penalty would refuse (`product`, the
    function's name, names it)."""
    if getattr(model, method) is None:
        raise ValueError(f"{model.name}: layer {_first_without(model, method)!r} has no {what}")
    if objective.loss.hessian_vector is None:
        raise ValueError(f"{objective.loss.name}: this loss defines no Hessian-vector product")
    _check_objective(product, objective)


def _outputs_and_tangent(model, params, x, v, key):
    """(outputs, J v) by the tangent passes; J v zeros where nothing moves the outputs."""
    outputs, doutputs = tangent_with_key(model, params, x, v, None, key)
    return outputs, jnp.zeros_like(outputs) if doutputs is None else doutputs


def _plus_penalty(product, v, objective, m, params):
    """product + (lambda/m) v_weights (the L2 penalty's Hessian times v), summed over the
    mapped axes params do not vary over and cast to params' dtypes."""
    product = jax.tree.map(jnp.add, product, l2_penalty_grad(v, objective.l2, m))
    return _dtypes_of(sum_over_added_axes(product, params), params)


def hessian_product(model: Layer, objective: Objective):
    """H v, the exact Hessian of E times a direction v, by hand: Pearlmutter's (1994)
    R-operator run through backpropagation,

        H v = R{dE/dparams} = (J^T H_loss J + sum_units g_unit * (their second derivatives)) v
              + (lambda/m) v_w.

    Returns `product(params, x, targets, v, key=None) -> pytree like params` (a key for a
    stochastic model: the Hessian of E with that key's dropout masks held fixed, as the
    engines' gradient). The layers' tangent passes
    give the outputs' R{z} = J v, the loss's Hessian gives R{dE/dz} = H_loss J v
    (`Loss.hessian_vector`), and the layers' `backward_tangent` passes (nets/layers.py) carry
    the gradient and its R{} back together: where the Gauss-Newton product
    (`gauss_newton_product`) runs J^T alone, each layer here adds what its own second
    derivatives make of the gradient passing through it (an activation's g f''(x) v_x, a
    product's g v_w^T and v_x^T g). One tangent pass and one backward pass of twice the work,
    no matrix formed: the model's `tangent_backward` (`serial` hands each layer the layers
    above it and the loss as its upstream), so that a sequence layer runs its forward scan
    once and its reverse scan from the values that scan kept. H is indefinite away from a
    minimum; it equals G where the outputs are linear in the parameters, and differs from G
    by the terms weighted by the residual gradient elsewhere. Every layer here has a
    `backward_tangent`, the sequence layers through `nets.recurrent.scan_backward_tangent`; a
    model with a layer that has none (a user's, or a cell without `step_backward_tangent`) is
    refused by name.
    """
    _check_product_inputs(model, objective, "backward_tangent",
                          "backward_tangent (R-operator) pass", "hessian_product")

    def product(params, x, targets, v, key=None):
        def at_the_outputs(outputs, doutputs):
            doutputs = jnp.zeros_like(outputs) if doutputs is None else doutputs
            return (objective.loss.grad(outputs, targets),
                    objective.loss.hessian_vector(outputs, targets, doutputs))

        held, v = _lists_as_tuples(params), _lists_as_tuples(v)
        _, _, hv, _ = tangent_backward_with_key(model, held, x, v, None, at_the_outputs, key)
        return _held_as(_plus_penalty(hv, v, objective, targets.shape[0], held), params, held)

    return product


def hidden_state_product(model: Layer, layers: int):
    """S v = J_h^T J_h v / m by hand: the Gauss-Newton matrix of (1/2m) sum_n |h_n(w + d) -
    h_n(w)|^2 in d (at d = 0), times v, where h is the output of the first `layers` sublayers
    of the `serial` model (for a `sequence_model` of one cell, layers=1: every step's hidden
    state) and m the examples. Martens and Sutskever's (2011) structural damping, with the
    squared distance between hidden states as its D: added to G + lambda I as lambda mu S,
    it keeps a step from changing the hidden states much where G alone would allow it
    (`training.procedures.hessian_free(structural_damping=mu)`).

    Returns `product(params, x, v) -> pytree like params`: J_h v by those layers' tangent
    passes, J_h^T by their backward passes; zero for the later layers' params. Refused by
    name: a model with fewer sublayers, layers whose tangent is missing or that draw random
    numbers (dropout: S is defined here without them), params not one entry per sublayer.
    """
    prefix = _hidden_prefix(model, layers)

    def product(params, x, v):
        _check_per_sublayer(model, params)
        held, v = _lists_as_tuples(params), _lists_as_tuples(v)
        head = held[:layers]
        hidden, dhidden = prefix.tangent(head, x, tuple(v[:layers]), None)
        if dhidden is None:  # nothing in the prefix moves
            dhidden = jnp.zeros_like(hidden)
        _, residuals = prefix.forward(head, x)
        back, _ = prefix.backward(head, residuals, dhidden / hidden.shape[0])
        rest = jax.tree.map(jnp.zeros_like, held[layers:])
        return _as_params(tuple(back) + rest, params, held)

    return product


def structurally_damped_product(model: Layer, objective: Objective, layers: int):
    """(G + weight S) v in one tangent and one backward pass, by hand: G v as
    `gauss_newton_product` gives it, S v as `hidden_state_product(model, layers)`, but the
    tangent of the hidden states h is the one the outputs' tangent passes through, and
    (weight/m) J_h v joins the gradient arriving at h before the first layers' backward
    runs once: S costs next to nothing (Martens and Sutskever 2011 share the passes too).
    Returns `product(params, x, targets, v, weight)` (no key: a model with dropout runs at
    inference, as `gauss_newton_product` without one); refusals as both products'."""
    _check_product_inputs(model, objective, "tangent", "tangent (forward-mode) pass",
                          "structurally_damped_product")
    prefix = _hidden_prefix(model, layers)
    rest_layers = model.sublayers[layers:]
    suffix = serial(*rest_layers, name=f"{model.name}[{layers}:]") if rest_layers else None

    def product(params, x, targets, v, weight):
        _check_per_sublayer(model, params)
        held, v = _lists_as_tuples(params), _lists_as_tuples(v)
        head, tail = held[:layers], held[layers:]
        hidden, dhidden = prefix.tangent(head, x, tuple(v[:layers]), None)
        if dhidden is None:
            dhidden = jnp.zeros_like(hidden)
        _, head_residuals = prefix.forward(head, x)
        if suffix is None:
            outputs, doutputs = hidden, dhidden
        else:
            outputs, doutputs = suffix.tangent(tail, hidden, tuple(v[layers:]), dhidden)
            _, tail_residuals = suffix.forward(tail, hidden)
        m = outputs.shape[0]
        u = objective.loss.hessian_vector(outputs, targets, doutputs)
        dtail, dhidden_back = ((), u) if suffix is None else suffix.backward(
            tail, tail_residuals, u)
        dhead, _ = prefix.backward(head, head_residuals, dhidden_back + (weight / m) * dhidden)
        penalty = l2_penalty_grad(tuple(v), objective.l2, m)
        return _as_params(jax.tree.map(jnp.add, tuple(dhead) + tuple(dtail), penalty), params,
                          held)

    return product


def _hidden_prefix(model: Layer, layers: int) -> Layer:
    """The `serial` model's first `layers` sublayers as one layer, refused by name where it
    cannot give the hidden-state product."""
    sublayers = model.sublayers
    if not (is_count(layers) and 1 <= layers <= len(sublayers)):
        raise ValueError(f"{model.name}: layers must be a whole number in [1, "
                         f"{len(sublayers)}] (its sublayers), got {layers!r}")
    prefix = serial(*sublayers[:layers], name=f"{model.name}[:{layers}]")
    if prefix.tangent is None:
        raise ValueError(f"{model.name}: layer {_first_without(prefix, 'tangent')!r} has no "
                         "tangent (forward-mode) pass")
    if prefix.stochastic:
        raise ValueError(f"{model.name}: its first {layers} layers draw random numbers "
                         "(dropout); the hidden-state product is defined without them")
    return prefix


def _check_per_sublayer(model: Layer, params: Any) -> None:
    sublayers = model.sublayers
    if not (isinstance(params, (tuple, list)) and len(params) == len(sublayers)):
        raise ValueError(f"{model.name}: params must hold one entry per sublayer "
                         f"({len(sublayers)}), got {type(params).__name__} of "
                         f"{len(params) if isinstance(params, (tuple, list)) else 1}")


def _as_params(per_sublayer: tuple, params: Any, held: tuple) -> Any:
    """A per-sublayer tuple of gradients as params are held (tuples or lists; `held`, params
    with their lists made tuples), each leaf summed over the mesh axes it gained and in its
    parameter's dtype."""
    summed = sum_over_added_axes(per_sublayer, held)
    return _held_as(_dtypes_of(summed, held), params, held)
