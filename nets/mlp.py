"""Multi-layer perceptrons with the lecture's STEP 0 defaults.

STEP 0 of the lecture fixes the architecture before training: as many inputs as features, as
many outputs as classes, one hidden layer by default, a hidden width that is a constant factor
(3 to 4) of the input dimension, and the same width in every hidden layer.
"""
from __future__ import annotations

from nets import initializers
from nets.layers import ACTIVATIONS, Dense, Layer, is_count, is_finite_number, serial
from nets.layers import remat as remat_layer
from nets.layers import residual as residual_block
from nets.normalization import BatchNorm, LayerNorm

__all__ = ["ACTIVATIONS", "mlp", "residual_mlp", "step0_hidden_units"]


def _check_counts(function: str, counts) -> None:
    """Each (value, argument, least) a whole number >= least, else a ValueError naming it: an
    input_dim of 64.5 made STEP 0's width 194 and a hidden_layers of True one layer, both
    silently (and 2.0 layers a raw TypeError of range)."""
    for value, argument, least in counts:
        if not is_count(value) or value < least:
            raise ValueError(f"{function}: {argument} must be >= {least}, got {value!r}; "
                             "expected a whole number")


def _expecting_inputs(function: str, model: Layer, input_dim: int) -> Layer:
    """model whose init refuses, by name, an input_shape whose last axis is not input_dim:
    the first Dense takes its width from the shape it is initialised with, so a net built for
    64 inputs (its STEP 0 width 3 x 64) was initialised for 32 silently."""

    def init(key, input_shape):
        if not len(input_shape) or input_shape[-1] != input_dim:
            raise ValueError(f"{model.name}: input_shape {tuple(input_shape)}, expected "
                             f"(batch, {input_dim}): {function} was built with "
                             f"input_dim={input_dim}")
        return model.init(key, input_shape)

    return model._replace(init=init)


def step0_hidden_units(input_dim: int, factor: float = 3.0) -> int:
    """The lecture's hidden width: `factor` (3 to 4) times the input dimension."""
    if not (is_finite_number(factor) and 3.0 <= factor <= 4.0):  # "3" was a raw TypeError
        raise ValueError(f"mlp: hidden_factor must lie in [3, 4] (STEP 0), got {factor!r}; "
                         "expected a number")
    return round(factor * input_dim)


def mlp(
    input_dim: int,
    num_classes: int,
    hidden_layers: int = 1,
    hidden_units: int | None = None,
    hidden_factor: float = 3.0,
    activation: str = "sigmoid",
    output_activation: str = "identity",
    w_init: initializers.Initializer | None = None,
    residual: bool = False,
    batch_norm: bool = False,
) -> Layer:
    """An MLP: `hidden_layers` x (Dense -> activation), then Dense -> output_activation.

    Shapes: x (batch, input_dim) -> y (batch, num_classes). With the default identity output
    the net returns logits for `sigmoid_cross_entropy(from_logits=True)`; with
    output_activation="sigmoid" it returns the lecture's s^L for the probability form.
    hidden_units overrides STEP 0's `hidden_factor * input_dim`. Layers are named
    hidden1, act1, hidden2, act2, ..., output, output_act. Its init refuses an input_shape
    other than (batch, input_dim).
    residual=True makes hidden layers 2, 3, ... residual blocks, h_l = h_(l-1) +
    act(h_(l-1) W_l + b_l) (`nets.layers.residual`, named block2, block3, ...), with the same
    parameters as the plain net: only the identity paths are added.
    batch_norm=True puts a `BatchNorm` (named norm1, norm2, ...) between each hidden Dense and
    its activation, where Ioffe and Szegedy (2015) put it: act(BN(h W + b)) (b is then
    redundant, kept so that the parameters are the plain net's plus g and b per norm).
    """
    _check_counts("mlp", ((input_dim, "input_dim", 1), (num_classes, "num_classes", 1),
                          (hidden_layers, "hidden_layers", 0)))
    for argument, name in (("activation", activation), ("output_activation", output_activation)):
        if name not in ACTIVATIONS:
            raise ValueError(f"mlp: {argument}={name!r}; choose one of {sorted(ACTIVATIONS)}")
    if hidden_units is not None and (not is_count(hidden_units) or hidden_units < 1):
        raise ValueError(f"mlp: hidden_units must be an int >= 1 (or None for STEP 0's), got "
                         f"{hidden_units!r}")
    width = step0_hidden_units(input_dim, hidden_factor) if hidden_units is None else hidden_units
    dense_kwargs = {} if w_init is None else {"w_init": w_init}
    layers = []
    for index in range(1, hidden_layers + 1):
        hidden = [Dense(width, name=f"hidden{index}", **dense_kwargs),
                  *([BatchNorm(width, name=f"norm{index}")] if batch_norm else []),
                  ACTIVATIONS[activation](name=f"act{index}")]
        if residual and index > 1:
            hidden = [residual_block(serial(*hidden, name=f"block{index}_layers"),
                                    name=f"block{index}")]
        layers += hidden
    layers.append(Dense(num_classes, name="output", **dense_kwargs))
    layers.append(ACTIVATIONS[output_activation](name="output_act"))
    suffix = ("_residual" if residual else "") + ("_batchnorm" if batch_norm else "")
    return _expecting_inputs("mlp", serial(
        *layers, name=f"mlp{hidden_layers}x{width}_{activation}{suffix}"), input_dim)


def residual_mlp(
    input_dim: int,
    num_classes: int,
    width: int = 64,
    blocks: int = 2,
    activation: str = "relu",
    w_init: initializers.Initializer | None = None,
    remat: bool = False,
) -> Layer:
    """A pre-norm residual MLP: Dense to `width`, `blocks` residual blocks, LayerNorm, Dense.

    Block b: y = x + Dense(act(Dense(LayerNorm(x)))), all of width `width` (the pre-activation
    order of He et al. 2016, "Identity mappings in deep residual networks", with layer
    normalisation in place of batch normalisation). Shapes: x (batch, input_dim) -> logits
    (batch, num_classes). Layers are named embed, block1 (norm1, inner1, act1, outer1), ...,
    final_norm, output. With remat, each block is a `nets.remat`: its backward keeps only the
    block's input and runs the block again (the same params, names and gradients).
    """
    _check_counts("residual_mlp", ((input_dim, "input_dim", 1), (num_classes, "num_classes", 1),
                                   (width, "width", 1), (blocks, "blocks", 0)))
    if activation not in ACTIVATIONS:
        raise ValueError(f"residual_mlp: activation={activation!r}; choose one of "
                         f"{sorted(ACTIVATIONS)}")
    dense_kwargs = {} if w_init is None else {"w_init": w_init}
    layers = [Dense(width, name="embed", **dense_kwargs)]
    for index in range(1, blocks + 1):
        block = serial(LayerNorm(width, name=f"norm{index}"),
                       Dense(width, name=f"inner{index}", **dense_kwargs),
                       ACTIVATIONS[activation](name=f"act{index}"),
                       Dense(width, name=f"outer{index}", **dense_kwargs),
                       name=f"block{index}_layers")
        block = residual_block(block, name=f"block{index}")
        layers.append(remat_layer(block) if remat else block)
    layers += [LayerNorm(width, name="final_norm"), Dense(num_classes, name="output",
                                                          **dense_kwargs)]
    return _expecting_inputs("residual_mlp", serial(
        *layers, name=f"residual_mlp{blocks}x{width}_{activation}"), input_dim)
