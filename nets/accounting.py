"""Model accounting: units, free parameters, connections and multiply-adds, from the model.

`count(model, input_shape)` walks a model's layers (descending into `serial`, into each
branch of `parallel` and `residual`, all on the same input, into
`nets.models.channel_groups` group by group, into the layer `dropout_after` wraps, and into
`TimeDistributed` once for all steps, its units, connections and multiply-adds times the
steps), takes every layer's output shape and parameter shapes from its own `init` (under
`jax.eval_shape`, so nothing is allocated: AlexNet's 61 M parameters cost nothing), and
applies the rule of the layer's kind. Per example:

    units        the outputs of a layer with weights (its neurons; the activation that follows
                 belongs to the same units). The inputs are counted apart (`inputs`), and
                 `units` totals neurons + inputs, as LeCun et al. 1989 count their 1,256;
                 `neurons` excludes them, as Krizhevsky et al. 2012 count their 650,000.
    params       free (trainable) parameters: kernel entries a connection table masks out are
                 constant zeros and do not count; unshared biases count one per unit.
    connections  weighted inputs of every unit, a shared weight counted once per use, plus
                 one per unit for its bias (the 1989 and 1998 papers' convention). Windows
                 reaching into the padding count in full (the 1989 paper's 19,968 for H1 is
                 768 units x (25 + 1)).
    macs         multiply-adds of the weighted sums: connections without the biases. For
                 trainable subsampling (y = w sum(x) + b) each summed input counts as one, as
                 w sum(x) = sum(w x) does. Activations, pooling, normalisation and dropout
                 are not counted (nor are they in the papers' figures). Self-attention's
                 products q k^T and p v are multiply-adds without weights: in macs, not in
                 connections.

Layers without parameters (activations, pooling, LRN, flatten, dropout) add no units,
parameters, connections or multiply-adds: a pooled map is not a new set of neurons in
Krizhevsky et al.'s 650,000. The exception is LeNet-5's RBF output (`EuclideanRBF`), whose
fixed centres are connections but not parameters. A layer's kind is the builder that made it,
read from its forward function's `__qualname__` ("Conv2D.<locals>.forward" -> "Conv2D");
`RULES` maps kinds with parameters (and `EuclideanRBF`) to their rule, and `register_rule`
adds one.

Two facts are not in the shapes and are read from the builders' closures (one place,
`_closure_value`): the connection table of a Conv2D (`mask`, in the closure of its `init`) and
the window of a Subsampling layer (`window`). Groups follow from the shapes (input channels /
kernel input channels), unshared biases from the bias shape. If a builder renames these, the
accounting raises an error naming the layer and the missing name; a `Layer.info` field set by
the builders would make this lookup unnecessary.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import jax
import numpy as np

from nets.layers import Layer, is_count

__all__ = [
    "LayerCount",
    "ModelCount",
    "RULES",
    "count",
    "layer_kind",
    "register_rule",
    "wrapped_layer",
]

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LayerCount:
    """One layer's figures, per example (see the module docstring)."""

    name: str
    kind: str
    output_shape: Shape
    units: int
    params: int
    connections: int
    macs: int

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "output_shape": list(self.output_shape)}


@dataclasses.dataclass(frozen=True)
class ModelCount:
    """A model's figures: `layers` (the inputs first, then every layer with parameters) and
    the totals. units = neurons + inputs."""

    name: str
    input_shape: Shape
    layers: tuple[LayerCount, ...]

    @property
    def inputs(self) -> int:
        return math.prod(self.input_shape[1:])

    @property
    def neurons(self) -> int:
        return sum(layer.units for layer in self.layers if layer.kind != "input")

    @property
    def units(self) -> int:
        return self.neurons + self.inputs

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def connections(self) -> int:
        return sum(layer.connections for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def layer(self, name: str) -> LayerCount:
        """The row of the layer called `name` (KeyError naming the rows otherwise)."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"{self.name}: no counted layer {name!r}; rows are "
                       f"{[row.name for row in self.layers]}")

    def totals(self) -> dict:
        return {"inputs": self.inputs, "neurons": self.neurons, "units": self.units,
                "params": self.params, "connections": self.connections, "macs": self.macs}

    def as_dict(self) -> dict:
        return {"name": self.name, "input_shape": list(self.input_shape), **self.totals(),
                "layers": [row.as_dict() for row in self.layers]}


def layer_kind(layer: Layer) -> str:
    """The builder that made `layer`: "Conv2D", "Dense", "serial", "elementwise", ...

    That is the function whose locals hold `layer.forward`: "Conv2D.<locals>.forward" ->
    "Conv2D" (a builder nested in another function is named by itself, not its parent).
    """
    qualname = getattr(layer.forward, "__qualname__", type(layer.forward).__name__)
    parts = [part for part in qualname.split(".")[:-1] if part != "<locals>"]
    return parts[-1] if parts else qualname


def wrapped_layer(layer: Layer) -> Layer:
    """The layer that a wrapper (`remat`, `dropout_after`, `tie`) runs: its forward's
    `layer` or `model`."""
    captured = inspect.getclosurevars(layer.forward).nonlocals
    for variable in ("layer", "model"):
        if isinstance(captured.get(variable), Layer):
            return captured[variable]
    raise ValueError(f"accounting: layer {layer.name!r} ({layer_kind(layer)}) wraps no layer")


def _closure_value(layer: Layer, function_name: str, variable: str) -> Any:
    """The value of `variable` captured by `layer.<function_name>` (its builder's argument)."""
    function = getattr(layer, function_name)
    captured = inspect.getclosurevars(function).nonlocals
    if variable not in captured:
        raise ValueError(
            f"accounting: layer {layer.name!r} ({layer_kind(layer)}) has no {variable!r} in the "
            f"closure of its {function_name}; update nets.accounting for its builder")
    return captured[variable]


def _shapes(layer: Layer, input_shape: Shape) -> tuple[Shape, Any]:
    """(output_shape, params as ShapeDtypeStructs) from layer.init, allocating nothing."""
    found = {}

    def init_params(key):
        found["output_shape"], params = layer.init(key, input_shape)
        return params

    params = jax.eval_shape(init_params, jax.random.key(0))
    return tuple(found["output_shape"]), params


Rule = Callable[[Layer, Shape, Shape, Any], tuple[int, int, int, int]]
"""rule(layer, input_shape, output_shape, param shapes) -> (units, params, connections, macs)"""


def _dense(layer, input_shape, output_shape, params):
    fan_in, out = params["w"].shape
    macs = fan_in * out
    return out, fan_in * out + math.prod(params["b"].shape), macs + out, macs


def _conv2d(layer, input_shape, output_shape, params):
    kh, kw, group_channels, out_channels = params["w"].shape
    mask = _closure_value(layer, "init", "mask")
    if mask is None:
        weights_per_map = np.full(out_channels, kh * kw * group_channels)
    else:
        # table[i, o]: map o sees input map i; masked kernel entries are constant zeros.
        weights_per_map = kh * kw * np.asarray(mask, bool).sum(axis=0)
    _, out_h, out_w, _ = output_shape
    units = out_h * out_w * out_channels
    kernel_params = int(weights_per_map.sum())
    macs = out_h * out_w * kernel_params
    return units, kernel_params + math.prod(params["b"].shape), macs + units, macs


def _subsampling(layer, input_shape, output_shape, params):
    kh, kw = _closure_value(layer, "init", "window")
    units = math.prod(output_shape[1:])
    params_count = math.prod(params["w"].shape) + math.prod(params["b"].shape)
    macs = units * kh * kw
    return units, params_count, macs + units, macs


def _embedding(layer, input_shape, output_shape, params):
    """A lookup: one unit per output feature at each position, each with one connection (the
    weight of its token, as from the one active input of a one-hot row), no bias and no
    multiply-add."""
    units = math.prod(output_shape[1:])
    return units, math.prod(params["w"].shape), units, 0


def _euclidean_rbf(layer, input_shape, output_shape, params):
    """Distances to fixed centres (LeNet-5's output): one unit per class, each with one
    connection per input (its centre's component, a constant, so no parameter) and no bias:
    the 1998 paper's 84 x 10 = 840. A squared difference counts as one multiply-add."""
    units = output_shape[-1]
    connections = units * input_shape[-1]
    return units, 0, connections, connections


def _parameters_only(layer, input_shape, output_shape, params):
    """A per-feature gain and bias after normalising, or learned positions added to the
    input: parameters, but no new neurons (as with local response normalisation) and no
    weighted sums."""
    return 0, sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)), 0, 0


def _self_attention(layer, input_shape, output_shape, params):
    """Per example of T steps and F features: the q, k, v and output neurons (4 T F units),
    their weighted inputs and biases, and as multiply-adds also the two products of the
    attention itself, q k^T and p v, F each per attended pair (T^2 pairs, T (T + 1) / 2
    when causal); these have no weights, so they are not connections."""
    _, steps, features = input_shape
    weights = params["qkv"]["w"].shape[0] * params["qkv"]["w"].shape[1] + math.prod(
        params["out"]["w"].shape)
    biases = params["qkv"]["b"].shape[0] + params["out"]["b"].shape[0]
    pairs = steps * (steps + 1) // 2 if _closure_value(layer, "forward", "causal") else steps**2
    return (4 * steps * features, weights + biases, steps * (weights + biases),
            steps * weights + 2 * pairs * features)


def _recurrent(layer, input_shape, output_shape, params):
    """An `rnn` layer (nets.recurrent: Elman, LSTM, GRU) over the T steps of an example: at
    every step each of the cell's G H weighted sums (G gate blocks of H units: 1 for Elman, 4
    for the LSTM, 3 for the GRU) reads the step's input and the previous hidden state, F + H
    weights shared across steps, plus its bias; an LSTM's peepholes add one weight per unit
    and peephole (3 H) each step, and the reset-after GRU's candidate a second bias per unit
    (b_hn, H). Units: the T G H weighted sums."""
    _, steps, _ = input_shape
    fan_in, sums = params["w"].shape
    peepholes = math.prod(params["p"].shape) if "p" in params else 0
    biases = sums + (math.prod(params["b_hn"].shape) if "b_hn" in params else 0)
    weights = fan_in * sums + peepholes
    return (steps * sums, weights + biases, steps * (weights + biases), steps * weights)


RULES: dict[str, Rule] = {"Dense": _dense, "Embedding": _embedding, "Conv2D": _conv2d,
                          "Subsampling": _subsampling, "rnn": _recurrent,
                          "LayerNorm": _parameters_only, "BatchNorm": _parameters_only,
                          "PositionalEmbedding": _parameters_only,
                          "SelfAttention": _self_attention, "EuclideanRBF": _euclidean_rbf}


def register_rule(kind: str, rule: Rule) -> None:
    """Count layers made by the builder `kind` with `rule` (see `Rule`)."""
    RULES[kind] = rule


def _walk(layer: Layer, input_shape: Shape) -> tuple[Shape, list[LayerCount]]:
    kind = layer_kind(layer)
    if kind == "serial":
        rows = []
        for sublayer in layer.sublayers:
            input_shape, sub_rows = _walk(sublayer, input_shape)
            rows += sub_rows
        return input_shape, rows
    if kind in ("dropout_after", "remat"):  # the wrapped layer's counts
        return _walk(wrapped_layer(layer), input_shape)
    if kind == "tie":  # the model's counts, the tied parameter counted once, at its source
        output_shape, rows = _walk(wrapped_layer(layer), input_shape)
        target_layer = _closure_value(layer, "init", "target")[0]
        kept_params = jax.tree.leaves(_shapes(layer, input_shape)[1])
        kept = sum(math.prod(leaf.shape) for leaf in kept_params)
        shared = sum(row.params for row in rows) - kept
        return output_shape, [dataclasses.replace(row, params=row.params - shared)
                              if row.name == target_layer else row for row in rows]
    output_shape, params = _shapes(layer, input_shape)
    if not jax.tree.leaves(params) and kind not in RULES:
        return output_shape, []
    if kind == "parallel":
        rows = []
        for sublayer in layer.sublayers:
            rows += _walk(sublayer, input_shape)[1]
        return output_shape, rows
    if kind == "TimeDistributed":
        inner = _closure_value(layer, "init", "layer")
        batch, steps, features = input_shape
        _, sub_rows = _walk(inner, (batch, features))
        return output_shape, [dataclasses.replace(
            row, output_shape=(batch, steps, *row.output_shape[1:]), units=row.units * steps,
            connections=row.connections * steps, macs=row.macs * steps) for row in sub_rows]
    if kind == "channel_groups":
        groups = len(layer.sublayers)
        group_shape = (*input_shape[:-1], input_shape[-1] // groups)
        rows = []
        for index, sublayer in enumerate(layer.sublayers):
            _, sub_rows = _walk(sublayer, group_shape)
            rows += [dataclasses.replace(row, name=f"{row.name}[{index}]") for row in sub_rows]
        return output_shape, rows
    if kind not in RULES:
        raise ValueError(f"accounting: layer {layer.name!r} of kind {kind!r} has parameters but "
                         f"no counting rule; known kinds {sorted(RULES)} (see register_rule)")
    figures = RULES[kind](layer, input_shape, output_shape, params)
    return output_shape, [LayerCount(layer.name, kind, output_shape, *map(int, figures))]


def count(model: Layer, input_shape: Shape) -> ModelCount:
    """Units, parameters, connections and multiply-adds of `model` on inputs of input_shape.

    input_shape: (batch, ...) with batch -1 or any size; the figures are per example. Every
    size is a whole number (int() read 28.7 as 28, True as 1 and the str "15" as (1, 5)).
    """
    if isinstance(input_shape, (str, bytes)) or not (
            np.ndim(input_shape) == 1 and len(input_shape) >= 1
            and all(is_count(d) for d in input_shape)):
        raise ValueError(f"accounting: {getattr(model, 'name', model)}: input_shape must be "
                         f"(batch, ...) of whole numbers, got {input_shape!r}")
    input_shape = tuple(int(d) for d in input_shape)
    _, rows = _walk(model, input_shape)
    inputs = LayerCount("input", "input", input_shape, math.prod(input_shape[1:]), 0, 0, 0)
    return ModelCount(model.name, input_shape, (inputs, *rows))
