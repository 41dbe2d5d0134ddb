"""The lecture's historical nets: LeNet 1989, LeNet-5 (1998) and AlexNet (2012).

Every builder returns a `serial` of the layers of `nets.layers`, `nets.conv` and
`nets.pooling` (init, forward, backward, apply), named after the paper's layers so that
`nets.accounting` and the gradient reports can refer to them. Inputs are NHWC.

Where the papers are silent we assume, and say so here (the numbers of `nets.accounting`
follow from these choices):

LeCun et al. 1989, "Backpropagation Applied to Handwritten Zip Code Recognition":
  * Padding. The paper gives 16x16 inputs and 8x8 H1 maps with 5x5 receptive fields two
    pixels apart, which needs a border, but not its width or value. We pad by 2 on every side
    with -1, the background of its [-1, 1] images (20x20; (20 - 5) // 2 + 1 = 8), and pad H1's
    8x8 maps the same way for H2 (12x12 -> 4x4). The last padded row and column are seen by no
    window. As karpathy/lecun1989-repro.
  * Which 8 of the 12 H1 maps each H2 map sees: not given; `nets.conv.lenet1989_h2_table`.
  * Activation. The paper uses "a scaled hyperbolic tangent" on every unit, outputs included,
    without its constants here; with `scaled_tanh=True` we take the 1998 paper's
    f(a) = 1.7159 tanh(2a/3) (LeCun et al. 1998, Appendix A), else plain tanh (the lecture's).
  * Initialisation: U(+-2.4/sqrt(F)) by default (`fan_in_exponent=0.5`; the paper writes
    2.4/F, `fan_in_exponent=1`; see `nets.initializers`), F the fan-in of each unit (200 for
    H2 with its table).

LeCun, Bottou, Bengio and Haffner 1998, "Gradient-Based Learning Applied to Document
Recognition", Section II.B:
  * The output layer is by default a Dense layer (84 x 10 weights and 10 biases, 850
    parameters, returning scores for a softmax or squared-error loss). `output="rbf"` gives
    the paper's Euclidean RBF units y_i = sum_j (x_j - w_ij)^2 (returned as scores -y), whose
    840 centres the paper set by hand to stylised 7x12 bitmaps, fixed, not counted among its
    60,000 trainable parameters. Its bitmaps are shown (Figure 3) but not published as data:
    ours are drawn in `lenet5_rbf_centres`.
  * S2 and S4 are trainable subsampling (a coefficient and a bias per map), followed by the
    squashing function, as in the paper; every squash is A tanh(S a), A = 1.7159, S = 2/3.
  * C5 is a 5x5 convolution on the 5x5 S4 maps (1x1 output), as the paper labels it; then a
    flatten.
  * Initialisation: the paper's U(+-2.4/F_i) with the square root, as above.

Krizhevsky, Sutskever and Hinton 2012, "ImageNet Classification with Deep Convolutional
Neural Networks", Section 3.5 and Figure 2:
  * Input 227x227x3, not the paper's "224x224x3": with 11x11 kernels at stride 4 and no
    padding, only 227 gives the 55x55 conv1 maps of Figure 2 ((227 - 11) / 4 + 1 = 55). The
    builder takes any size >= 67 (67 is the smallest for which every pool has a window).
  * Paddings: conv2 pads 2, conv3-5 pad 1 (zeros; the paper gives only the map sizes, which
    these paddings reproduce: 27x27 and 13x13).
  * Two towers (`towers=2`): conv1's 96 kernels are two towers of 48 over the same image (a
    plain convolution); conv2, conv4, conv5 are grouped convolutions (each tower sees its own
    maps); conv3 and the fully connected layers see both towers. Local response normalisation
    runs within each tower (`channel_groups`): the paper sums over "adjacent kernel maps"
    without saying whether adjacency crosses the GPUs; we assume not, each GPU holding only
    its own 48 or 128 maps. `towers=1` is the one-tower variant (ungrouped convolutions, LRN
    over all maps).
  * Order after conv1 and conv2: ReLU, then LRN (k=2, n=5, alpha=1e-4, beta=0.75, Section
    3.3), then 3x3 max pooling at stride 2 (Section 3.4); conv5 is followed by the same pool.
  * Dropout (rate 0.5) after the ReLUs of fc6 and fc7 (Section 4.2): the model is stochastic;
    given a key (`value_and_grad(params, x, targets, key)`) each Dropout draws its own mask,
    without one (inference) both are the identity.
  * The output layer returns 1000 logits (the paper's softmax belongs to the loss).
  * Initialisation as Section 5: weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5 and
    the hidden fully connected layers, 0 elsewhere.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nets import initializers
from nets.conv import Conv2D, lenet5_c3_table, lenet1989_h2_table, table_fan_in_uniform
from nets.layers import (
    Dense,
    EuclideanRBF,
    Layer,
    Relu,
    Sigmoid,
    Tanh,
    backward_tangent_with_key,
    check_direction,
    elementwise,
    forward_with_key,
    is_count,
    is_finite_number,
    layer_keys,
    serial,
    tangent_with_key,
)
from nets.pooling import Dropout, Flatten, LocalResponseNorm, MaxPool, Subsampling

__all__ = [
    "SCALED_TANH_AMPLITUDE",
    "SCALED_TANH_SLOPE",
    "LENET1989_INPUT_SHAPE",
    "LENET5_INPUT_SHAPE",
    "ALEXNET_INPUT_SHAPE",
    "ScaledTanh",
    "channel_groups",
    "lenet1989",
    "lenet1989_modern",
    "lenet5",
    "lenet5_rbf_centres",
    "alexnet",
]

# LeCun et al. 1998, Appendix A: f(a) = A tanh(S a) with f(+-1) = +-1, f'' largest at +-1.
SCALED_TANH_AMPLITUDE = 1.7159
SCALED_TANH_SLOPE = 2.0 / 3.0

LENET1989_INPUT_SHAPE = (-1, 16, 16, 1)
LENET5_INPUT_SHAPE = (-1, 32, 32, 1)
ALEXNET_INPUT_SHAPE = (-1, 227, 227, 3)


def ScaledTanh(
    amplitude: float = SCALED_TANH_AMPLITUDE,
    slope: float = SCALED_TANH_SLOPE,
    name: str = "ScaledTanh",
) -> Layer:
    """y = A tanh(S x), elementwise (LeCun et al. 1998, Appendix A: A = 1.7159, S = 2/3).

    Shapes: any; y has the shape of x; params ().
    Backward, from the output y: dy/dx = A S (1 - tanh^2(S x)) = (S / A) (A^2 - y^2), so
        dx = dy * (S / A) * (A^2 - y^2),
    and f''(x) = -2 (S / A) y f'(x). A is a finite number other than 0 (its derivative
    divides by A: 0 was a ZeroDivisionError at the first backward, NaN or inf a NaN gradient
    that jax.grad did not have) and S a finite number.
    """
    if not (is_finite_number(amplitude) and amplitude != 0):
        raise ValueError(f"{name}: amplitude must be a finite number other than 0, got "
                         f"{amplitude!r}")
    if not is_finite_number(slope):
        raise ValueError(f"{name}: slope must be a finite number, got {slope!r}")

    def derivative(y):
        return (slope / amplitude) * (amplitude * amplitude - y * y)

    return elementwise(lambda x: amplitude * jnp.tanh(slope * x), derivative,
                       second_derivative=lambda y: -2 * (slope / amplitude) * y * derivative(y),
                       name=name)


def channel_groups(layer: Layer, groups: int, name: str | None = None) -> Layer:
    """`layer` applied separately to each of `groups` equal slices of the channel axis.

    Shapes: x (..., C) -> the per-group outputs (..., C_out / groups each) concatenated along
    the last axis. Group g sees channels [g C / G, (g + 1) C / G) and has its own params
    (params is a tuple of G entries). This is AlexNet's split across two GPUs for layers that
    mix channels without weights, such as local response normalisation.
    Backward: dy is split the same way, each group's backward runs on its slice, and the dx
    slices are concatenated (dparams is the tuple of the groups' dparams); the tangent
    splits x, dx and dparams and joins y and dy likewise.
    """
    name = name or f"{layer.name}_x{groups}"
    if not is_count(groups) or groups < 1:  # 2.0 was a raw TypeError, True one group
        raise ValueError(f"{name}: groups must be >= 1, got {groups!r}; expected a whole "
                         "number")

    def check_groups(what, entries):
        """params, residuals or directions must hold one entry a group: zip cut fewer short."""
        if not isinstance(entries, (tuple, list)) or len(entries) != groups:
            found = len(entries) if isinstance(entries, (tuple, list)) else type(
                entries).__name__
            raise ValueError(f"{name}: {what} must hold {groups} group entries, got {found}")

    def split(x):
        if x.shape[-1] % groups:
            raise ValueError(f"{name}: input x has shape {tuple(x.shape)}, expected a last "
                             f"axis divisible by {groups} groups")
        return jnp.split(x, groups, axis=-1)

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if not input_shape or input_shape[-1] % groups:
            raise ValueError(f"{name}: input_shape {input_shape}, expected a last axis "
                             f"divisible by {groups} groups")
        group_shape = (*input_shape[:-1], input_shape[-1] // groups)
        params, out_channels = [], 0
        for group_key in jax.random.split(key, groups):
            output_shape, group_params = layer.init(group_key, group_shape)
            params.append(group_params)
            out_channels += output_shape[-1]
        return (*output_shape[:-1], out_channels), tuple(params)

    def forward(params, x, key=None):
        check_groups("params", params)
        keys = layer_keys((layer,) * groups, key)
        outputs, residuals = zip(*(
            forward_with_key(layer, group_params, part, group_key)
            for group_params, part, group_key in zip(params, split(x), keys)
        ))
        return jnp.concatenate(outputs, axis=-1), tuple(residuals)

    def backward_by(method):
        def run(params, residuals, dy):
            check_groups("params", params)
            check_groups("residuals", residuals)
            dparams, dx = zip(*(
                getattr(layer, method)(group_params, group_residuals, part)
                for group_params, group_residuals, part in zip(params, residuals, split(dy))
            ))
            return tuple(dparams), jnp.concatenate(dx, axis=-1)

        return run

    def tangent(params, x, dparams, dx, key=None):
        check_groups("params", params)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        keys = layer_keys((layer,) * groups, key)
        dx_parts = split(dx) if dx is not None else [None] * groups
        outputs, moved = zip(*(
            tangent_with_key(layer, group_params, part, group_dparams, dx_part, group_key)
            for group_params, part, group_dparams, dx_part, group_key in zip(
                params, split(x), dparams, dx_parts, keys)))
        if all(dy is None for dy in moved):
            return jnp.concatenate(outputs, axis=-1), None
        moved = [jnp.zeros_like(y) if dy is None else dy for y, dy in zip(outputs, moved)]
        return jnp.concatenate(outputs, axis=-1), jnp.concatenate(moved, axis=-1)

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y, key=None):
        """Each group's on its slices of x, v_x, dy and R{dy}; dx and R{dx} joined."""
        check_groups("params", params)
        check_direction(name, "v_params", v_params, params, "params")
        check_direction(name, "v_x", v_x, x, "x")
        keys = layer_keys((layer,) * groups, key)
        v_parts = split(v_x) if v_x is not None else [None] * groups
        parts = [backward_tangent_with_key(layer, *arguments) for arguments in zip(
            params, split(x), v_params, v_parts, split(g_y), split(r_g_y), keys)]
        return (tuple(part[0] for part in parts),
                jnp.concatenate([part[1] for part in parts], axis=-1),
                tuple(part[2] for part in parts),
                jnp.concatenate([part[3] for part in parts], axis=-1))

    return Layer(name, init, forward, backward_by("backward"), sublayers=(layer,) * groups,
                 curvature=None if layer.curvature is None else backward_by("curvature"),
                 stochastic=layer.stochastic,
                 tangent=None if layer.tangent is None else tangent,
                 backward_tangent=None if layer.backward_tangent is None else backward_tangent)


def _activation(activation: str) -> Callable[..., Layer]:
    choices = {"tanh": Tanh, "scaled_tanh": ScaledTanh, "relu": Relu, "sigmoid": Sigmoid}
    if activation not in choices:
        raise ValueError(f"activation {activation!r}; choose one of {sorted(choices)}")
    return choices[activation]


# H1 and H2 of the 1989 net: 5x5 kernels at stride 2 on inputs padded by 2 with -1.
_LENET1989_PADDING = ((2, 2), (2, 2))


def lenet1989(activation: str = "tanh", scaled_tanh: bool = False,
              implementation: str = "gather", fan_in_exponent: float = 0.5,
              h2_table: str = "blocks") -> Layer:
    """LeCun et al. 1989's zip-code net: H1 12@8x8, H2 12@4x4, H3 30, output 10.

    Input x: (batch, 16, 16, 1), grey levels in [-1, 1]; output (batch, 10), squashed.
    H1: 5x5 kernels at stride 2 over the input padded with -1 to 20x20, one bias per unit.
    H2: the same over H1 padded with -1 to 12x12, each map seeing 8 of the 12 H1 maps
    (`lenet1989_h2_table(h2_table)`: "blocks" or "cyclic"), one bias per unit. H3: 30 units,
    output: 10 units, both fully connected. The activation (tanh, or 1.7159 tanh(2x/3) with
    `scaled_tanh`; relu and sigmoid are accepted too) follows every layer, the output
    included. The module docstring lists
    the assumptions. Layers: H1, H1_act, H2, H2_act, flatten, H3, H3_act, output, output_act.
    `implementation` is that of both convolutions (`nets.conv.Conv2D`): "gather", the
    default, made the training step the fastest on the 2-core CPU, for one example (25 us a
    step in a scan against 47 us with "patches", which beat "conv") and for 64 (1.4 against
    1.7 ms) (BENCHMARKS.md, README).
    Every weight starts U(+-2.4 / F^fan_in_exponent), F the fan-in of its unit: 0.5, the
    default, or the paper's text, 1.
    """
    if scaled_tanh:
        if activation != "tanh":
            raise ValueError(f"lenet1989: scaled_tanh=True scales tanh, not {activation!r}")
        activation = "scaled_tanh"
    squash = _activation(activation)
    uniform = initializers.fan_in_uniform(2.4, fan_in_exponent)
    conv = dict(kernel_size=5, stride=2, padding=_LENET1989_PADDING, pad_value=-1.0,
                unshared_bias=True, implementation=implementation)
    table = lenet1989_h2_table(h2_table)
    return serial(
        Conv2D(12, **conv, w_init=uniform, name="H1"),
        squash(name="H1_act"),
        Conv2D(12, **conv, connection_table=table,
               w_init=table_fan_in_uniform(table, 2.4, fan_in_exponent), name="H2"),
        squash(name="H2_act"),
        Flatten(name="flatten"),
        Dense(30, w_init=uniform, name="H3"),
        squash(name="H3_act"),
        Dense(10, w_init=uniform, name="output"),
        squash(name="output_act"),
        name=f"lenet1989_{activation}",
    )


def lenet1989_modern(h1_maps: int = 12, h2_maps: int = 12, h3_units: int = 30,
                     implementation: str = "patches", dropout_rate: float = 0.0) -> Layer:
    """The 1989 net's layout with today's habits: ReLU, max pooling, shared biases.

    Input x: (batch, 16, 16, 1) in [-1, 1]; output (batch, 10) logits (no output squash).
    H1: h1_maps maps of 5x5 kernels at stride 1 over the input padded with -1 (16x16), ReLU,
    2x2 max pooling -> h1_maps@8x8. H2: h2_maps maps of 5x5 kernels over all H1 maps (no
    table) with zero padding, ReLU, 2x2 max pooling -> h2_maps@4x4 (after a ReLU the
    background is 0). H3: h3_units ReLU units; output: 10 units. The defaults are the 1989
    sizes (12, 12, 30); experiments.lenet1989 widens them. Our own variant; no paper describes
    it. `implementation` of both convolutions (`nets.conv.Conv2D`): "patches", the default,
    made a pass of experiments.lenet1989's modern variant 4.4x faster than "conv" on one CPU
    core (1.57 s against 6.97 s: XLA's kernel-gradient convolution for H2 took 22 ms a batch).
    dropout_rate > 0 puts a `Dropout` after H3's ReLU (none by default).
    """
    for name, size in (("h1_maps", h1_maps), ("h2_maps", h2_maps), ("h3_units", h3_units)):
        if size < 1:
            raise ValueError(f"lenet1989_modern: {name} must be >= 1, got {size}")
    if not 0 <= dropout_rate < 1:  # a negative or NaN rate would have meant no dropout
        raise ValueError(f"lenet1989_modern: dropout_rate must lie in [0, 1), got {dropout_rate}")
    return serial(
        Conv2D(h1_maps, 5, padding=((2, 2), (2, 2)), pad_value=-1.0,
               w_init=initializers.he_normal(), implementation=implementation, name="H1"),
        Relu(name="H1_act"),
        MaxPool(2, name="H1_pool"),
        Conv2D(h2_maps, 5, padding="SAME", w_init=initializers.he_normal(),
               implementation=implementation, name="H2"),
        Relu(name="H2_act"),
        MaxPool(2, name="H2_pool"),
        Flatten(name="flatten"),
        Dense(h3_units, w_init=initializers.he_normal(), name="H3"),
        Relu(name="H3_act"),
        *([Dropout(dropout_rate, name="H3_dropout")] if dropout_rate > 0 else []),
        Dense(10, name="output"),
        name="lenet1989_modern",
    )


def lenet5(activation: str = "scaled_tanh", implementation: str = "tiles",
           output: str = "dense") -> Layer:
    """LeNet-5 (LeCun et al. 1998, Section II.B and Figure 2).

    Input x: (batch, 32, 32, 1) (28x28 digits centred in a 32x32 field); output (batch, 10)
    scores. C1 6@28x28 (5x5), S2 6@14x14 (trainable 2x2 subsampling), C3 16@10x10 (5x5 over
    the S2 maps of `lenet5_c3_table`), S4 16@5x5, C5 120@1x1 (5x5), F6 84, output 10.
    `output`: "dense" (default) a Dense layer, scores for a softmax (module docstring), or
    "rbf", the paper's Euclidean RBF units (`nets.layers.EuclideanRBF`) with the fixed
    centres of `lenet5_rbf_centres`, scores = minus the penalties, for
    `nets.losses.lecun1998_map`; with it the model has the paper's 60,000 parameters and
    340,908 connections exactly. `activation` (default the paper's 1.7159 tanh(2a/3))
    follows C1, S2, C3, S4, C5 and F6. Layers: C1, C1_act, S2, S2_act, C3, C3_act, S4,
    S4_act, C5, C5_act, flatten, F6, F6_act, output.
    `implementation` of the three convolutions (`nets.conv.Conv2D`): "tiles", the default,
    made the training step at batch 128 on the 2-core CPU 0.86-0.91 of its time with "rows",
    which was 1.2-1.3x faster than "patches" (itself 1.6x faster than "conv"; BENCHMARKS.md,
    README); "gather" is the faster for one example at a time.
    """
    outputs = {"dense": lambda: Dense(10, name="output"),
               "rbf": lambda: EuclideanRBF(lenet5_rbf_centres(), name="output")}
    if output not in outputs:
        raise ValueError(f"lenet5: output {output!r}; choose one of {sorted(outputs)}")
    squash = _activation(activation)
    return serial(
        Conv2D(6, 5, implementation=implementation, name="C1"),
        squash(name="C1_act"),
        Subsampling(2, name="S2"),
        squash(name="S2_act"),
        Conv2D(16, 5, connection_table=lenet5_c3_table(), implementation=implementation, name="C3"),
        squash(name="C3_act"),
        Subsampling(2, name="S4"),
        squash(name="S4_act"),
        Conv2D(120, 5, implementation=implementation, name="C5"),
        squash(name="C5_act"),
        Flatten(name="flatten"),
        Dense(84, name="F6"),
        squash(name="F6_act"),
        outputs[output](),
        name=f"lenet5_{activation}" + ("_rbf" if output == "rbf" else ""),
    )


# The centres of LeNet-5's RBF output units, 7x12 bitmaps ("#" +1, "." -1), drawn here: the
# paper's are "stylized image[s] of the corresponding character class drawn on a 7x12 bitmap"
# (Section II.B, Figure 3), shown but not published as data. Each row holds that row of the
# digits 0-9, side by side.
_LENET5_DIGIT_ROWS = (
    "....... ....... ....... ....... ....... ....... ....... ....... ....... .......",
    "..###.. ...#... ..###.. ####### .....#. ####### ..####. ####### .#####. .#####.",
    ".#...#. ..##... .#...#. .....#. ....##. #...... .#..... ......# #.....# #.....#",
    "#.....# .#.#... #.....# ....#.. ...#.#. #...... #...... .....#. #.....# #.....#",
    "#.....# ...#... ......# ...#... ..#..#. ######. #...... ....#.. #.....# #.....#",
    "#.....# ...#... .....#. ..####. .#...#. ......# #.####. ....#.. .#####. #.....#",
    "#.....# ...#... ....#.. ......# #....#. ......# ##....# ...#... #.....# .######",
    "#.....# ...#... ...#... ......# ####### ......# #.....# ...#... #.....# ......#",
    "#.....# ...#... ..#.... ......# .....#. ......# #.....# ..#.... #.....# ......#",
    ".#...#. ...#... .#..... #.....# .....#. #.....# #.....# ..#.... #.....# .....#.",
    "..###.. .#####. ####### .#####. .....#. .#####. .#####. ..#.... .#####. .####..",
    "....... ....... ....... ....... ....... ....... ....... ....... ....... .......",
)


def lenet5_rbf_centres() -> np.ndarray:
    """(10, 84) centres of LeNet-5's RBF outputs, one per digit: a 7-wide, 12-high bitmap of
    the digit read row by row, +1 on the strokes and -1 elsewhere (LeCun et al. 1998: "the
    components of those parameters vectors were set to -1 or +1", inside the range of F6's
    1.7159 tanh, at its points of largest curvature). Drawn here, as the paper's Figure 3
    bitmaps are not published as data; every two digits differ in at least 9 of the 84 (6
    and 8)."""
    pixels = np.array([[list(bitmap) for bitmap in row.split(" ")]
                       for row in _LENET5_DIGIT_ROWS])  # (12 rows, 10 digits, 7 columns)
    return np.where(pixels == "#", 1.0, -1.0).transpose(1, 0, 2).reshape(10, 84)


def alexnet(towers: int = 2, num_classes: int = 1000, dropout_rate: float = 0.5) -> Layer:
    """AlexNet (Krizhevsky et al. 2012, Figure 2), in two towers or one.

    Input x: (batch, 227, 227, 3) (any size >= 67 works; the fully connected fan-in follows
    it); output (batch, num_classes) logits. With 227: conv1 96@55x55 (11x11, stride 4), ReLU,
    LRN, max pool 3x3/2 -> 27x27; conv2 256@27x27 (5x5, pad 2, grouped by tower), ReLU, LRN,
    pool -> 13x13; conv3 384@13x13 (3x3, pad 1, across towers); conv4 384 and conv5 256
    (3x3, pad 1, grouped), ReLU each; pool -> 6x6x256; fc6 4096, fc7 4096 (ReLU, dropout);
    output num_classes. The module docstring lists the assumptions.
    """
    if not is_count(towers) or towers not in (1, 2):  # 2.0 and True passed `in (1, 2)`
        raise ValueError(f"alexnet: towers must be 1 or 2, got {towers!r}")

    def conv(out_channels, kernel, name, stride=1, padding="VALID", groups=1, bias=0.0):
        pads = padding if isinstance(padding, str) else ((padding, padding),) * 2
        return Conv2D(out_channels, kernel, stride=stride, padding=pads,
                      w_init=initializers.normal(0.01), b_init=_constant(bias),
                      feature_group_count=groups, name=name)

    def dense(units, name, bias=0.0):
        return Dense(units, w_init=initializers.normal(0.01), b_init=_constant(bias), name=name)

    def lrn(name):
        if towers == 1:
            return LocalResponseNorm(name=name)
        return channel_groups(LocalResponseNorm(name=name), towers, name=name)

    return serial(
        conv(96, 11, "conv1", stride=4),
        Relu(name="conv1_act"),
        lrn("conv1_lrn"),
        MaxPool(3, 2, name="conv1_pool"),
        conv(256, 5, "conv2", padding=2, groups=towers, bias=1.0),
        Relu(name="conv2_act"),
        lrn("conv2_lrn"),
        MaxPool(3, 2, name="conv2_pool"),
        conv(384, 3, "conv3", padding=1),
        Relu(name="conv3_act"),
        conv(384, 3, "conv4", padding=1, groups=towers, bias=1.0),
        Relu(name="conv4_act"),
        conv(256, 3, "conv5", padding=1, groups=towers, bias=1.0),
        Relu(name="conv5_act"),
        MaxPool(3, 2, name="conv5_pool"),
        Flatten(name="flatten"),
        dense(4096, "fc6", bias=1.0),
        Relu(name="fc6_act"),
        Dropout(dropout_rate, name="fc6_dropout"),
        dense(4096, "fc7", bias=1.0),
        Relu(name="fc7_act"),
        Dropout(dropout_rate, name="fc7_dropout"),
        dense(num_classes, "output"),
        name=f"alexnet_{towers}tower{'s' if towers > 1 else ''}",
    )


def _constant(value: float) -> initializers.Initializer:
    """All entries `value` (AlexNet's biases of 1 or 0)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype)

    return init
