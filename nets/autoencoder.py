"""Autoencoders for greedy layer-wise pretraining, built from Dense and Sigmoid layers.

An autoencoder of one hidden layer is `serial(Dense(h, "encoder"), Sigmoid("code"),
Dense(d, "decoder"), Identity("reconstruction"))`: x (batch, d) -> code (batch, h) ->
reconstruction (batch, d). Trained with `nets.mean_squared_error()` against its own input
(targets = x), E = (1/2m) sum ||x_hat - x||^2, its backward pass is the layers' hand-written
ones: the manual engine needs nothing new. The decoder is linear because the inputs it
reconstructs (grey levels in [-1, 1], or codes in (0, 1)) are not probabilities; the encoder
and decoder weights are untied.

Greedy layer-wise pretraining (Hinton and Salakhutdinov 2006; Bengio et al. 2007, "Greedy
layer-wise training of deep networks"): train an autoencoder on x, keep its encoder as the
first hidden layer, train the next autoencoder on that layer's codes, and so on; then copy the
encoders into the deep net (`stack_encoders`) and fine-tune the whole net on the labels.
"""
from __future__ import annotations

from typing import Any, Sequence

from nets import initializers
from nets.layers import Dense, Identity, Layer, Sigmoid, serial

__all__ = ["autoencoder", "encoder", "encoder_params", "stack_encoders"]

ENCODER, CODE, DECODER = 0, 1, 2  # positions in the autoencoder's serial params


def autoencoder(input_dim: int, hidden_units: int,
                w_init: initializers.Initializer | None = None) -> Layer:
    """Dense(hidden_units) -> Sigmoid -> Dense(input_dim) -> Identity.

    Shapes: x (batch, input_dim) -> reconstruction (batch, input_dim). Layers: encoder, code,
    decoder, reconstruction. w_init defaults to Dense's U(+-2.4/sqrt(fan_in)).
    """
    if input_dim < 1 or hidden_units < 1:
        raise ValueError(f"autoencoder: input_dim ({input_dim}) and hidden_units "
                         f"({hidden_units}) must be >= 1")
    kwargs = {} if w_init is None else {"w_init": w_init}
    return serial(Dense(hidden_units, name="encoder", **kwargs), Sigmoid(name="code"),
                  Dense(input_dim, name="decoder", **kwargs), Identity(name="reconstruction"),
                  name=f"autoencoder{input_dim}-{hidden_units}")


def encoder(hidden_units: int) -> Layer:
    """The encoder half, Dense(hidden_units) -> Sigmoid: x (batch, d) -> codes (batch, h)."""
    return serial(Dense(hidden_units, name="encoder"), Sigmoid(name="code"),
                  name=f"encoder{hidden_units}")


def encoder_params(autoencoder_params: Sequence[Any]) -> tuple[Any, Any]:
    """The params of `encoder(h)` taken from those of `autoencoder(d, h)`."""
    return (autoencoder_params[ENCODER], autoencoder_params[CODE])


def stack_encoders(mlp_params: Sequence[Any], encoders: Sequence[Any]) -> tuple[Any, ...]:
    """mlp_params (of `nets.mlp.mlp`: hidden1, act1, hidden2, ...) with hidden layer i's
    {"w", "b"} replaced by those of encoder i (params of `encoder`, as `encoder_params`
    returns them), for i = 1..len(encoders); the later layers are left as they are.

    The shapes must match: encoder i maps the width of layer i - 1 to that of layer i.
    """
    params = list(mlp_params)
    hidden = (len(params) - 2) // 2
    if len(params) % 2 or not all(
            isinstance(params[2 * i], dict) and set(params[2 * i]) == {"w", "b"}
            and params[2 * i + 1] == () for i in range(hidden)):
        raise ValueError("stack_encoders: mlp_params are not those of a plain `mlp` (hidden1, "
                         "act1, ..., output, output_act); residual and batch-norm MLPs are not "
                         "supported")
    if len(encoders) > hidden:  # the last would have replaced the output layer
        raise ValueError(f"stack_encoders: {len(encoders)} encoders for an MLP of {hidden} "
                         "hidden layers")
    for index, entry in enumerate(encoders):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2
                and isinstance(entry[0], dict) and set(entry[0]) == {"w", "b"}):
            found = (f"{len(entry)} entries" if isinstance(entry, (tuple, list))
                     else type(entry).__name__)
            raise ValueError(f"stack_encoders: encoder {index + 1} must be the params of "
                             "`encoder` ((encoder's {'w', 'b'}, code's ()), as encoder_params "
                             f"returns them), got {found}; an autoencoder's whole params go "
                             "through encoder_params first")
        encoder_dense = entry[0]
        target = params[2 * index]
        for name in ("w", "b"):
            if encoder_dense[name].shape != target[name].shape:
                raise ValueError(
                    f"stack_encoders: encoder {index + 1} {name} has shape "
                    f"{tuple(encoder_dense[name].shape)}, hidden{index + 1} expects "
                    f"{tuple(target[name].shape)}")
        params[2 * index] = {"w": encoder_dense["w"], "b": encoder_dense["b"]}
    return tuple(params)
