"""Neural networks as pure functions with hand-written backward passes.

Layers (`nets.layers`), losses (`nets.losses`), models (`nets.mlp`), the two gradient engines
(`nets.engines`) and the checks between them (`nets.gradcheck`). Nothing here knows about
optimisers, devices or files.
"""
from nets import (
    accounting,
    attention,
    conv,
    engines,
    gradcheck,
    initializers,
    layers,
    losses,
    mlp,
    models,
    normalization,
    pooling,
    recurrent,
)
from nets.accounting import ModelCount
from nets.accounting import count as count_model
from nets.attention import PositionalEmbedding, SelfAttention, transformer_lm
from nets.conv import Conv2D, lenet5_c3_table, lenet1989_h2_table
from nets.engines import autodiff, get_engine, manual, manual_vjp, with_manual_vjp
from nets.layers import (
    Dense,
    Embedding,
    Identity,
    Layer,
    Relu,
    Sigmoid,
    Tanh,
    parallel,
    residual,
    serial,
)
from nets.losses import (
    Loss,
    Objective,
    lecture_objective,
    mean_squared_error,
    sigmoid_cross_entropy,
    softmax_cross_entropy,
)
from nets.mlp import mlp as build_mlp
from nets.mlp import residual_mlp
from nets.models import (
    ScaledTanh,
    alexnet,
    channel_groups,
    lenet5,
    lenet1989,
    lenet1989_modern,
)
from nets.normalization import LayerNorm
from nets.pooling import (
    AvgPool,
    Dropout,
    Flatten,
    LocalResponseNorm,
    MaxPool,
    Subsampling,
)
from nets.recurrent import (
    Cell,
    LastStep,
    TimeDistributed,
    bptt,
    elman,
    gru,
    lstm,
    rnn,
    scan_cell,
    sequence_cross_entropy,
    sequence_model,
)

__all__ = [
    "engines",
    "gradcheck",
    "initializers",
    "layers",
    "losses",
    "mlp",
    "Layer",
    "Dense",
    "Embedding",
    "Sigmoid",
    "Tanh",
    "Relu",
    "Identity",
    "serial",
    "parallel",
    "residual",
    "Loss",
    "Objective",
    "lecture_objective",
    "sigmoid_cross_entropy",
    "mean_squared_error",
    "softmax_cross_entropy",
    "manual",
    "autodiff",
    "manual_vjp",
    "with_manual_vjp",
    "get_engine",
    "build_mlp",
    "residual_mlp",
    "conv",
    "pooling",
    "Conv2D",
    "lenet1989_h2_table",
    "lenet5_c3_table",
    "AvgPool",
    "MaxPool",
    "Subsampling",
    "Flatten",
    "LocalResponseNorm",
    "Dropout",
    "normalization",
    "LayerNorm",
    "accounting",
    "models",
    "ModelCount",
    "count_model",
    "ScaledTanh",
    "channel_groups",
    "lenet1989",
    "lenet1989_modern",
    "lenet5",
    "alexnet",
    "recurrent",
    "Cell",
    "elman",
    "lstm",
    "gru",
    "scan_cell",
    "bptt",
    "rnn",
    "LastStep",
    "TimeDistributed",
    "sequence_model",
    "sequence_cross_entropy",
    "attention",
    "SelfAttention",
    "PositionalEmbedding",
    "transformer_lm",
]
