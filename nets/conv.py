"""2-D convolution (NHWC) with a hand-written backward pass, and LeNet connection tables.

Shape names: x (batch, height, width, in_channels), kernel w (kh, kw, in_channels / groups,
out_channels) ("HWIO"), y (batch, out_height, out_width, out_channels). With the input padded
to xp (top/bottom rows and left/right columns of `pad_value`) and strides (sh, sw),

    y[n, i, j, o] = sum_{a, b, c} xp[n, sh i + a, sw j + b, g(o) C_g + c] w[a, b, c, o] + b[..., o]

where C_g = in_channels / groups and g(o) = o // (out_channels / groups) is the group of output
map o. out_height = (H + top + bottom - kh) // sh + 1: when (H + pads - kh) is not a multiple of
sh, the last rows of xp are seen by no window (their dx is 0). Likewise for widths.

This module follows the layer contract of `nets.layers` (init, forward, backward, apply).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nets import initializers
from nets.layers import (
    Factors,
    Layer,
    check_direction,
    check_gradient,
    check_parameter,
    is_count,
    is_finite_number,
)
from nets.varying import (
    batch_product,
    is_split,
    product_sharding,
    reshape_keeping_batch,
    split_like,
)

__all__ = [
    "Conv2D",
    "IMPLEMENTATIONS",
    "channel_sum",
    "conv2d_patches",
    "conv2d_patch_kernel",
    "conv2d_from_patches",
    "conv2d_backward_input",
    "conv2d_backward_kernel",
    "conv2d_constant_padded",
    "conv2d_gather_patches",
    "window_index",
    "conv2d_tiles",
    "tile_width",
    "conv2d_band_matrix",
    "table_fan_in_uniform",
    "check_image_input",
    "lenet1989_h2_table",
    "lenet5_c3_table",
    "pair",
]

Pads = tuple[tuple[int, int], tuple[int, int]]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# The "patches", "gather" and "rows" forwards take y from their own product up to this many
# entries of the patches (or rows; 16 MB in float32), and XLA's convolution above it: on the
# 2-core CPU the product was faster for LeNet-1989 at batch 1 and 64 and LeNet-5 at batch 128
# (its step 9.0 ms against 11.5-12.2 ms with 2**20, taps-first patches), the convolution for
# the 7,291 training digits at once (0.10 s against 0.37 s, windows-first patches). Above it
# `apply` never builds the patches, which matters where the input is a constant (a data set
# closed over by a jitted function): XLA folded LeNet-5's "rows" of 8,000 images, 143 MB, at
# compile time (9.2 s against 1.2 s to compile E and the error on 8,000 + 2,000 images).
PATCH_PRODUCT_MAX_SIZE = 2**22
# From this many entries of the patches' gradient on, "patches" adds the input gradient back
# in place, one update per kernel offset, and below it as one sum of padded copies: on the
# 2-core CPU the updates took LeNet-5's C3 input gradient at batch 128 from 1.8 to 0.7 ms;
# the sum is the faster for one example (one operation instead of kkh kkw).
COL2IM_IN_PLACE_MIN_SIZE = 2**16
# From this many entries of the patches' gradient on, "gather" adds it back into dx as a sum
# of gathers over the transposed table, and below it as one scatter-add: on the 2-core
# CPU the scatter made LeNet-1989's one-example step 12% faster (a pass of the 1989 recipe
# 0.219 s against 0.249 s), the gather its batch-64 step 8% faster (1.39 ms against 1.52 ms).
GATHER_INPUT_GRADIENT_MIN_SIZE = 2**16
# Up to this many patch entries, "gather" copies the patches out transposed before the kernel
# gradient's product (the barrier keeps XLA from folding the copy back into the product): on
# one core, LeNet-1989's one-example recipe pass took 0.197 s against 0.257 s, but the copy
# made the batch-64 step slower (1.77 ms against 1.24 ms; 102 k and 307 k entries there).
TRANSPOSED_PATCHES_MAX_SIZE = 2**15
# The most entries of the banded kernel matrix of "rows" and "tiles" (64 MB in float32): for
# "rows" it has kh Wp C out_w O entries, Wp / kw times the kernel's products per output row
# for stride 1, so the implementation is for narrow images; a wider layer raises a ValueError
# naming it.
ROWS_BAND_MAX_SIZE = 2**24
# "tiles" cuts each output row into the widest tiles of adjacent outputs whose input spans at
# most this many kernel widths (`tile_width`): a tile costs span / kw times the multiply-adds
# of a direct convolution, and narrower tiles make the products too thin to run fast. On the
# 2-core CPU (2026-12-05) LeNet-5's batch-128 training step, C1 in tiles of 4 of its 28
# columns and C3 of 5 of its 10, took 0.93-0.94 of its time with tiles of 7 and 2, 0.95 with
# 14 and 5, and 1.02-1.03 with 14 and 2 or 28 and 5 (each alternated in one process).
TILE_MAX_SPAN = 2
# `channel_sum` folds adjacent columns into the channel axis up to this many values before it
# sums over the rest: XLA:CPU's reductions run slowly over a last axis of a few channels. On
# the 2-core CPU (2026-12-05, each alternated in one process) LeNet-5's batch-128 step took
# 0.94-0.98 of its time with C1's bias gradient alone summed over a last axis of 4 x 6
# columns instead of 6 (0.96-1.00 with whole rows, 28 x 6; 0.945 with no C1 bias gradient at
# all). With every bias and coefficient gradient of LeNet-5 through channel_sum, a width of
# 24 (C1 4 columns, S2 2, C3, S4 and C5 none) made the step 0.96-0.98 of its time unfolded,
# and 0.97 of its time with 32 (C3 2 columns as well).
CHANNEL_SUM_WIDTH = 24


def channel_sum(values: jax.Array) -> jax.Array:
    """sum_{n, i, j} values[n, i, j, c] of an NHWC array: (C,).

    The k adjacent columns of the widest fold with k C <= CHANNEL_SUM_WIDTH (k divides W;
    k = 1 when C alone is wider) are summed as one last axis of k C values first, then the k
    column sums: the same sum, in another order (above). A batch split over an Explicit mesh
    axis is summed as it is (a reshape may not merge it into the others)."""
    if is_split(values):
        return jnp.sum(values, axis=(0, 1, 2))
    *_, width, channels = values.shape
    fold = max((k for k in range(1, width + 1)
                if width % k == 0 and k * channels <= CHANNEL_SUM_WIDTH), default=1)
    column_sums = jnp.sum(values.reshape(-1, fold * channels), axis=0)
    return jnp.sum(column_sums.reshape(fold, channels), axis=0)


def pair(value: int | Sequence[int], what: str, layer_name: str) -> tuple[int, int]:
    """(value, value) for an int, the pair itself for a pair of positive ints."""
    try:
        values = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    except TypeError:
        values = ()
    if len(values) != 2 or not all(is_count(v) and v >= 1 for v in values):
        raise ValueError(f"{layer_name}: {what} must be a positive int or pair, got {value!r}")
    return int(values[0]), int(values[1])


def _pretty(dims: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def check_image_input(
    layer_name: str,
    shape: Sequence[int],
    channels: int | None = None,
    min_size: tuple[int, int] = (1, 1),
    what: str = "input x has shape",
) -> None:
    """Raise a ValueError unless `shape` is (batch, height, width, channels) with the
    given channel count (None: any) and height, width >= min_size.

    The message names the layer, the shape found and the shape expected, as `check_input`
    in `nets.layers` does (whose message cannot say "height >= k").
    """
    shape = tuple(shape)
    ok = len(shape) == 4 and all(isinstance(d, (int, np.integer)) for d in shape)
    if ok:
        _, height, width, found_channels = shape
        ok = (
            height >= min_size[0]
            and width >= min_size[1]
            and found_channels >= 1
            and channels in (None, found_channels)
        )
    if not ok:
        expected = _pretty((
            "batch",
            f"height >= {min_size[0]}",
            f"width >= {min_size[1]}",
            "channels" if channels is None else channels,
        ))
        raise ValueError(f"{layer_name}: {what} {shape}, expected {expected}")


def _resolve_padding(padding, size: tuple[int, int], kernel, stride) -> Pads:
    """Explicit ((top, bottom), (left, right)) pads for an input of spatial `size`.

    'SAME' follows XLA/TensorFlow: out = ceil(size / stride), the total padding
    max((out - 1) stride + k - size, 0) split with the extra row/column at the bottom/right.
    """
    if padding == "VALID":
        return (0, 0), (0, 0)
    if padding == "SAME":
        pads = []
        for n, k, s in zip(size, kernel, stride):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return padding


def _validate_padding(padding, name: str):
    if isinstance(padding, str):
        if padding.upper() not in ("VALID", "SAME"):
            raise ValueError(f"{name}: padding {padding!r}; use 'VALID', 'SAME' or "
                             "((top, bottom), (left, right))")
        return padding.upper()
    try:
        pads = tuple((lo, hi) for lo, hi in padding)
    except (TypeError, ValueError):
        pads = ()
    if len(pads) != 2 or not all(is_count(p) and p >= 0 for side in pads for p in side):
        raise ValueError(f"{name}: padding {padding!r}; use 'VALID', 'SAME' or "
                         "((top, bottom), (left, right)) with non-negative ints")
    return tuple((int(lo), int(hi)) for lo, hi in pads)


def _output_size(size: int, k: int, s: int, lo: int, hi: int) -> int:
    return (size + lo + hi - k) // s + 1


def _pad(x: jax.Array, pads: Pads, value: float) -> jax.Array:
    if not any(lo or hi for lo, hi in pads):
        return x
    return jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=value)


class _Call(NamedTuple):
    """What the products of one call need: the layer's settings and its input's geometry."""

    name: str
    size: tuple[int, int]  # (H, W) of x
    pads: Pads
    padded_size: tuple[int, int]  # (Hp, Wp)
    out_size: tuple[int, int]  # (out_h, out_w)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    pad_value: float


def _unpad(dxp: jax.Array, pads: Pads) -> jax.Array:
    """dx (batch, H, W, C) from dxp (batch, Hp, Wp, C): the border sliced off."""
    (top, bottom), (left, right) = pads
    return dxp[:, top:dxp.shape[1] - bottom, left:dxp.shape[2] - right, :]


def _large_output(call: _Call, x: jax.Array, w: jax.Array) -> jax.Array:
    """y from XLA's convolution, for patches (or rows) over PATCH_PRODUCT_MAX_SIZE entries:
    they then serve backward only, and `apply` lets XLA drop them."""
    return conv2d_constant_padded(x, w, call.pads, call.pad_value, call.stride, call.groups)


def _group_by_group(groups: int, convolve: Callable[[jax.Array, jax.Array], jax.Array],
                    a: jax.Array, b: jax.Array) -> jax.Array:
    """convolve(a_g, b_g) for each group g, the results joined along their last axis; a and b
    are cut into `groups` equal blocks along their last axes (each group's input channels,
    or output maps). The same numbers as XLA's grouped convolution (feature_group_count,
    batch_group_count), which XLA:CPU runs far slower than separate convolutions: AlexNet's
    conv2 at batch 2, the kernel gradient 94.6 against 8.0 ms, y 14.8 against 7.2 ms.
    a and b of different dtypes are promoted to their common one first, as the other
    implementations' products promote (XLA's convolution takes one dtype)."""
    dtype = jnp.result_type(a, b)
    a, b = a.astype(dtype), b.astype(dtype)
    if groups == 1:
        return convolve(a, b)
    return jnp.concatenate([convolve(a_g, b_g) for a_g, b_g in zip(
        jnp.split(a, groups, axis=-1), jnp.split(b, groups, axis=-1))], axis=-1)


def conv2d_constant_padded(x: jax.Array, w: jax.Array, pads: Pads, pad_value: float,
                           stride: tuple[int, int], groups: int = 1) -> jax.Array:
    """The VALID convolution of x padded by `pads` with `pad_value`, without building the
    padded input: the convolution is linear in its input and pad_c(x) = pad_0(x) + c B, B the
    border's indicator, so

        conv(pad_c(x), w) = conv(x, w, zero padding) + c conv(B, w),

    the second term computed for one example and broadcast over the batch. XLA pads with
    zeros inside its convolution; the explicit pad it replaces was fused into the previous
    layer's activation, and LeNet-1989's E over the 7,291 training digits took 50 ms with it
    on the 2-core CPU, 35 ms without.
    """
    def zero_padded(x, w):
        return lax.conv_general_dilated(x, w, window_strides=stride, padding=pads,
                                        dimension_numbers=_DIMENSIONS)

    def valid(x, w):
        return lax.conv_general_dilated(x, w, window_strides=stride, padding="VALID",
                                        dimension_numbers=_DIMENSIONS)

    y = _group_by_group(groups, zero_padded, x, w)
    if pad_value == 0:
        return y
    border = _pad(jnp.zeros((1, *x.shape[1:]), x.dtype), pads, 1.0)
    return y + pad_value * _group_by_group(groups, valid, border, w)


def conv2d_backward_input(
    dy: jax.Array, w: jax.Array, stride: tuple[int, int], padded_size: tuple[int, int],
    groups: int = 1,
) -> jax.Array:
    """dxp (batch, Hp, Wp, C) of y = VALID conv(xp, w) with strides, from dy.

    dxp[n, p, q, c] = sum over (i, a) with sh i + a = p, (j, b) with sw j + b = q, and o of
    dy[n, i, j, o] w[a, b, c, o] (within a group). That is a stride-1 convolution of dy
    dilated by the strides (sh - 1 zeros between rows, sw - 1 between columns; lhs_dilation)
    and zero-padded by k - 1 on each side ("full" correlation), with the spatially flipped
    kernel whose in/out channels are swapped. `extra` = Hp - ((out_h - 1) sh + kh) more zero
    rows at the bottom give the rows no window used their gradient, 0.
    """
    kh, kw = w.shape[:2]
    (sh, sw), (hp, wp) = stride, padded_size
    extra_h = hp - ((dy.shape[1] - 1) * sh + kh)
    extra_w = wp - ((dy.shape[2] - 1) * sw + kw)

    def full_correlation(dy, w):
        return lax.conv_general_dilated(
            dy, jnp.swapaxes(w, 2, 3)[::-1, ::-1], window_strides=(1, 1),
            padding=((kh - 1, kh - 1 + extra_h), (kw - 1, kw - 1 + extra_w)),
            lhs_dilation=(sh, sw), dimension_numbers=_DIMENSIONS)

    return _group_by_group(groups, full_correlation, dy, w)


def conv2d_backward_kernel(
    xp: jax.Array, dy: jax.Array, kernel_size: tuple[int, int], stride: tuple[int, int],
    groups: int = 1, w: jax.Array | None = None,
) -> jax.Array:
    """dw (kh, kw, C_g, O) of y = VALID conv(xp, w) with strides, from xp and dy.

    dw[a, b, c, o] = sum_{n, i, j} xp[n, sh i + a, sw j + b, g(o) C_g + c] dy[n, i, j, o]:
    a correlation of xp with dy in which the batch axis is summed (it plays the role of the
    input channels) and the channels of xp play the role of the batch, with dy dilated by the
    strides (rhs_dilation). We use this form, XLA's own filter-gradient convolution (cuDNN's
    backward-filter kernel on GPU), rather than patches and a matmul, because patches
    materialise kh kw copies of the input while this reads xp once. Group g of the output
    maps sums only over group g of the channels: one correlation per group
    (`_group_by_group`).
    Rows of xp that no window uses are cut off first, so the result is exactly (kh, kw).
    A batch split over an Explicit mesh axis is summed into w's layout (given w;
    `nets.varying.product_sharding`).
    """
    (kh, kw), (sh, sw) = kernel_size, stride
    used_h = (dy.shape[1] - 1) * sh + kh
    used_w = (dy.shape[2] - 1) * sw + kw
    out_sharding = None if w is None else product_sharding(xp, w)

    def correlation(xp, dy):
        return lax.conv_general_dilated(
            xp[:, :used_h, :used_w, :], dy, window_strides=(1, 1), padding="VALID",
            rhs_dilation=(sh, sw), dimension_numbers=("CHWN", "IHWO", "HWNC"),
            out_sharding=out_sharding)

    return _group_by_group(groups, correlation, xp, dy)


def _conv_forward(call: _Call, x: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
    """"conv": y from XLA's convolution of the padded input; nothing saved beyond x."""
    def valid(xp, w):
        return lax.conv_general_dilated(xp, w, window_strides=call.stride, padding="VALID",
                                        dimension_numbers=_DIMENSIONS)

    return _group_by_group(call.groups, valid, _pad(x, call.pads, call.pad_value), w), None


def _conv_transpose(call: _Call, x: jax.Array, saved: None, w: jax.Array, dy: jax.Array,
                    power: int) -> tuple[jax.Array, jax.Array]:
    """"conv": dw and dx by XLA's convolutions. The padded input is rebuilt from x (O(size
    of x), cheap next to the convolutions)."""
    xp = _pad(x, call.pads, call.pad_value) ** power
    dw = conv2d_backward_kernel(xp, dy, call.kernel, call.stride, call.groups, w)
    dxp = conv2d_backward_input(dy, w, call.stride, call.padded_size, call.groups)
    return dw, _unpad(dxp, call.pads)


def _sees_whole_input(call: _Call) -> bool:
    """One window over the whole unpadded input (LeNet-5's C5: a 5x5 kernel on 5x5 maps),
    one group: the convolution is then a Dense layer on the flattened input."""
    return (call.groups == 1 and call.size == call.kernel
            and not any(lo or hi for lo, hi in call.pads))


def _whole_forward(call: _Call, x: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
    """y (batch, 1, 1, O) = flat(x) @ w as (kh kw C, O): a Dense layer's product (x's
    (h, w, c) order is the kernel's); nothing saved beyond x."""
    batch = x.shape[0]
    return (x.reshape(batch, -1) @ w.reshape(-1, w.shape[-1])).reshape(batch, 1, 1, -1), None


def _whole_transpose(call: _Call, x: jax.Array, saved: None, w: jax.Array, dy: jax.Array,
                     power: int) -> tuple[jax.Array, jax.Array]:
    """dw = flat(x^power)^T dy and dx = dy w^T, reshaped: a Dense layer's backward."""
    batch = x.shape[0]
    rows = dy.reshape(batch, -1)
    dw = batch_product(x.reshape(batch, -1) ** power, rows)
    return dw.reshape(w.shape), (rows @ w.reshape(-1, w.shape[-1]).T).reshape(x.shape)


def _space_to_depth(xc: jax.Array, stride: tuple[int, int], blocks: tuple[int, int]) -> jax.Array:
    """(sh, sw, C, batch, Hs, Ws) blocks of xc (C, batch, Hp, Wp), the padded input with its
    channels first: entry [r, q, c, n, u, v] = xc[c, n, sh u + r, sw v + q] for Hs, Ws =
    `blocks`. Rows and columns past xc are zeros; those past Hs sh and Ws sw are dropped (the
    callers only drop rows that no window uses)."""
    (sh, sw), (hs, ws) = stride, blocks
    height, width = hs * sh, ws * sw
    xc = xc[:, :, :height, :width]
    xc = jnp.pad(xc, ((0, 0), (0, 0), (0, height - xc.shape[2]), (0, width - xc.shape[3])))
    channels, batch = xc.shape[:2]
    return xc.reshape(channels, batch, hs, sh, ws, sw).transpose(3, 5, 0, 1, 2, 4)


def _patch_geometry(kernel_size, stride, out_size):
    """((kkh, kkw), (Hs, Ws)): kernel offsets in blocks of the stride, ceil(k / s), and the
    blocks of the input that the windows of an (out_h, out_w) output read."""
    blocks = tuple(-(-k // s) for k, s in zip(kernel_size, stride))
    return blocks, tuple(o - 1 + b for o, b in zip(out_size, blocks))


def conv2d_patches(
    xp: jax.Array, kernel_size: tuple[int, int], stride: tuple[int, int],
    out_size: tuple[int, int],
) -> jax.Array:
    """Patches (kkh, kkw, sh, sw, C, batch, out_h, out_w) of the padded input xp (batch, Hp,
    Wp, C) for a strided convolution, gathered block-wise (space to depth) so that any stride
    needs only kkh kkw = ceil(kh / sh) ceil(kw / sw) slices instead of kh kw:

        patches[a', b', r, q, c, n, i, j] = xp[n, sh (i + a') + r, sw (j + b') + q, c],

    the input under kernel offset (a, b) = (sh a' + r, sw b' + q) of window (i, j). Offsets
    a >= kh or b >= kw read rows that `conv2d_patch_kernel` pairs with zero weights. Taps and
    channels come first: each slice is then a block of whole rows of a map (XLA:CPU
    gathered the taps-last layout 3.5x slower for LeNet-5's C1), and the products with the
    (taps C, windows) matrix need no transpose.

    Built in two stages, the kkh row offsets stacked, then the kkw column offsets of those:
    XLA:CPU fuses a stack of a few slices into one pass but copied each of kkh kkw slices
    apart and then stacked them, and the two stages made LeNet-1989-modern's batch-32 SGD
    step 0.87-0.88 and LeNet-5's with "patches" 0.90 of its time (2-core CPU, 2026-12-05).
    """
    blocks, extent = _patch_geometry(kernel_size, stride, out_size)
    xs = _space_to_depth(xp.transpose(3, 0, 1, 2), stride, extent)
    (out_h, out_w) = out_size
    rows = jnp.stack([xs[..., a:a + out_h, :] for a in range(blocks[0])])
    return jnp.stack([rows[..., b:b + out_w] for b in range(blocks[1])], axis=1)


def conv2d_patch_kernel(w: jax.Array, stride: tuple[int, int]) -> jax.Array:
    """The kernel (kh, kw, C_g, O) as (kkh, kkw, sh, sw, C_g, O), zero-padded to kkh sh by
    kkw sw, in the order of `conv2d_patches`: entry [a', b', r, q] = w[sh a' + r, sw b' + q]."""
    (sh, sw), (kh, kw) = stride, w.shape[:2]
    (kkh, kkw), _ = _patch_geometry((kh, kw), stride, (1, 1))
    wp = jnp.pad(w, ((0, kkh * sh - kh), (0, kkw * sw - kw), (0, 0), (0, 0)))
    return wp.reshape(kkh, sh, kkw, sw, *w.shape[2:]).transpose(0, 2, 1, 3, 4, 5)


def _kernel_from_patch_kernel(dwp: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """Inverse of `conv2d_patch_kernel`: (kkh, kkw, sh, sw, C_g, O) -> (kh, kw, C_g, O)."""
    kkh, kkw, sh, sw = dwp.shape[:4]
    full = dwp.transpose(0, 2, 1, 3, 4, 5).reshape(kkh * sh, kkw * sw, *dwp.shape[4:])
    return full[:kernel_size[0], :kernel_size[1]]


def _patch_matrix(patches: jax.Array, groups: int) -> jax.Array:
    """The patches as (taps, groups, C_g, windows): windows = batch out_h out_w."""
    taps = int(np.prod(patches.shape[:4]))
    return patches.reshape(taps, groups, patches.shape[4] // groups, -1)


def _kernel_matrix(wp: jax.Array, groups: int) -> jax.Array:
    """The patch kernel (kkh, kkw, sh, sw, C_g, O) as (taps, C_g, groups, O / groups)."""
    taps = int(np.prod(wp.shape[:4]))
    return wp.reshape(taps, wp.shape[4], groups, wp.shape[5] // groups)


def conv2d_from_patches(patches: jax.Array, wp: jax.Array, groups: int) -> jax.Array:
    """y[n, i, j, o] = sum over (a', b', r, q, c) of patches * wp, within the group of o."""
    batch, out_h, out_w = patches.shape[5:]
    if groups == 1 and out_h * out_w > 1:
        # (O, windows) and then transposed: XLA:CPU runs this product 3-4x faster than
        # patches^T wp (LeNet-5's C1 and C3 at batch 128), but only if the barrier keeps it
        # from folding the transpose into the product's layout. Not for 1x1 outputs (C5),
        # where the transpose made one example's LeNet-5 step 1.5x slower.
        y = lax.optimization_barrier(wp.reshape(-1, wp.shape[-1]).T
                                     @ patches.reshape(-1, batch * out_h * out_w)).T
    elif groups == 1:
        y = lax.dot_general(patches.reshape(-1, batch * out_h * out_w),
                            wp.reshape(-1, wp.shape[-1]), (((0,), (0,)), ((), ())))
    else:
        y = jnp.einsum("tgcm,tcgo->mgo", _patch_matrix(patches, groups),
                       _kernel_matrix(wp, groups))
    return y.reshape(batch, out_h, out_w, -1)


def _patch_kernel_gradient(patches: jax.Array, dy: jax.Array, groups: int) -> jax.Array:
    """dwp (kkh, kkw, sh, sw, C_g, O) = sum over (n, i, j) of patches (x) dy, per group."""
    taps_shape = patches.shape[:4]
    out_channels = dy.shape[-1]
    if groups == 1:
        dwp = patches.reshape(-1, dy.size // out_channels) @ dy.reshape(-1, out_channels)
    else:
        dwp = jnp.einsum("tgcm,mgo->tcgo", _patch_matrix(patches, groups),
                         dy.reshape(-1, groups, out_channels // groups))
    return dwp.reshape(*taps_shape, patches.shape[4] // groups, out_channels)


def _patch_input_gradient(
    dy: jax.Array, wp: jax.Array, groups: int, padded_size: tuple[int, int],
) -> jax.Array:
    """dxp (batch, Hp, Wp, C): each window's dpatches = wp dy^T, added back where the window
    read them (the transpose of `conv2d_patches`: kkh kkw shifted block images)."""
    batch, out_h, out_w, out_channels = dy.shape
    kkh, kkw, sh, sw, c_g, _ = wp.shape
    dy_matrix = dy.reshape(-1, out_channels)
    if groups == 1:
        dpatches = lax.dot_general(wp.reshape(-1, out_channels), dy_matrix,
                                   (((1,), (1,)), ((), ())))
    else:
        dpatches = jnp.einsum("tcgo,mgo->tgcm", _kernel_matrix(wp, groups),
                              dy_matrix.reshape(-1, groups, out_channels // groups))
    dpatches = dpatches.reshape(kkh, kkw, sh, sw, c_g * groups, batch, out_h, out_w)
    hs, ws = out_h - 1 + kkh, out_w - 1 + kkw
    if dpatches.size >= COL2IM_IN_PLACE_MIN_SIZE:
        blocks = jnp.zeros((sh, sw, c_g * groups, batch, hs, ws), dy.dtype)
        for a in range(kkh):
            for b in range(kkw):
                blocks = blocks.at[..., a:a + out_h, b:b + out_w].add(dpatches[a, b])
    else:
        no_pad = ((0, 0),) * 4
        blocks = sum(jnp.pad(dpatches[a, b], (*no_pad, (a, hs - out_h - a), (b, ws - out_w - b)))
                     for a in range(kkh) for b in range(kkw))  # (sh, sw, C, batch, Hs, Ws)
    full = blocks.transpose(3, 4, 0, 5, 1, 2).reshape(batch, hs * sh, ws * sw, -1)
    hp, wp_ = padded_size
    full = full[:, :hp, :wp_]
    return jnp.pad(full, ((0, 0), (0, hp - full.shape[1]), (0, wp_ - full.shape[2]), (0, 0)))


def _patches_forward(call: _Call, x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """"patches": the block-wise patches of the padded input, saved, and y as their product
    with the patch kernel."""
    patches = conv2d_patches(_pad(x, call.pads, call.pad_value), call.kernel, call.stride,
                             call.out_size)
    if patches.size > PATCH_PRODUCT_MAX_SIZE:
        return _large_output(call, x, w), patches
    return conv2d_from_patches(patches, conv2d_patch_kernel(w, call.stride), call.groups), patches


def _patches_transpose(call: _Call, x: jax.Array, patches: jax.Array, w: jax.Array,
                       dy: jax.Array, power: int) -> tuple[jax.Array, jax.Array]:
    """"patches": dw = patches dy, dx = the windows' w dy^T added back."""
    dwp = _patch_kernel_gradient(patches ** power, dy, call.groups)
    dxp = _patch_input_gradient(dy, conv2d_patch_kernel(w, call.stride), call.groups,
                                call.padded_size)
    return _kernel_from_patch_kernel(dwp, call.kernel), _unpad(dxp, call.pads)


def window_index(size: Sequence[int], pads, kernel_size: Sequence[int],
                 stride: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The constant tables of the "gather" convolution of an (H, W) input with `pads`.

    index (windows, kh kw): index[i out_w + j, a kw + b] = r W + q, the flat position of the
    input under kernel offset (a, b) of window (i, j), r = sh i + a - top and
    q = sw j + b - left, or H W (a slot holding the pad value) when (r, q) is in the border.
    uses (H W, U): the transpose; uses[p] lists the flat entries w kh kw + t of
    (windows, kh kw) at which index equals p, padded with windows kh kw (a slot that reads
    0). U is the most windows that read one position, ceil(kh / sh) ceil(kw / sw) at most.
    Positions that no window reads (see the module docstring) list only the zero slot.
    Computed once per geometry (the arguments as tuples of ints) and cached.
    """
    return _window_index(tuple(map(int, size)), tuple(tuple(map(int, p)) for p in pads),
                         tuple(map(int, kernel_size)), tuple(map(int, stride)))


@functools.lru_cache(maxsize=None)
def _window_index(size, pads, kernel_size, stride):
    (height, width), ((top, bottom), (left, right)) = size, pads
    (kh, kw), (sh, sw) = kernel_size, stride
    out_h = _output_size(height, kh, sh, top, bottom)
    out_w = _output_size(width, kw, sw, left, right)
    rows = (sh * np.arange(out_h)[:, None, None, None] + np.arange(kh)[None, None, :, None]
            - top)
    cols = (sw * np.arange(out_w)[None, :, None, None] + np.arange(kw)[None, None, None, :]
            - left)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    index = np.where(inside, rows * width + cols, height * width)
    index = index.reshape(out_h * out_w, kh * kw).astype(np.int32)
    flat = index.ravel()
    entries = np.flatnonzero(flat < height * width)  # increasing: each use list is sorted
    positions = flat[entries]
    counts = np.bincount(positions, minlength=height * width)
    uses = np.full((height * width, max(int(counts.max(initial=0)), 1)), flat.size, np.int32)
    order = np.argsort(positions, kind="stable")
    rank = np.arange(positions.size) - np.repeat(np.cumsum(counts) - counts, counts)
    uses[positions[order], rank] = entries[order]
    return index, uses


def conv2d_gather_patches(x: jax.Array, pads: Pads, pad_value: float,
                          kernel_size: tuple[int, int], stride: tuple[int, int]) -> jax.Array:
    """Patches (batch, windows, kh kw, C) of x (batch, H, W, C) padded by `pads` with
    `pad_value`, in one gather: patches[n, i out_w + j, a kw + b, c] = xp[n, sh i + a,
    sw j + b, c]. Each entry is a run of C channels, read from x or from one appended
    position holding the pad value (`window_index`); the padded input is never built."""
    batch, height, width, channels = x.shape
    index, _ = window_index((height, width), pads, kernel_size, stride)
    border = split_like(jnp.full((batch, 1, channels), pad_value, x.dtype), x)
    flat = reshape_keeping_batch(x, (batch, height * width, channels))
    return jnp.concatenate([flat, border], axis=1)[:, index]


def _gather_product(patches: jax.Array, w: jax.Array, groups: int) -> jax.Array:
    """y (batch windows, O) = patches (batch, windows, kh kw, C) times w (kh, kw, C_g, O),
    within the groups."""
    rows = patches.shape[0] * patches.shape[1]
    if groups == 1:
        return patches.reshape(rows, -1) @ w.reshape(-1, w.shape[-1])
    taps, c_g, out_channels = w.shape[0] * w.shape[1], w.shape[2], w.shape[3]
    return jnp.einsum("mtgc,tcgo->mgo", patches.reshape(rows, taps, groups, c_g),
                      w.reshape(taps, c_g, groups, out_channels // groups)
                      ).reshape(rows, out_channels)


def _gather_kernel_gradient(patches: jax.Array, dy: jax.Array, kernel_size: tuple[int, int],
                            groups: int) -> jax.Array:
    """dw (kh, kw, C_g, O) = patches^T dy summed over batch and windows, per group. Up to
    TRANSPOSED_PATCHES_MAX_SIZE entries, patches^T is copied out before the product."""
    rows, out_channels = patches.shape[0] * patches.shape[1], dy.shape[-1]
    taps, channels = patches.shape[2], patches.shape[3]
    dy = dy.reshape(rows, out_channels)
    if groups == 1 and patches.size <= TRANSPOSED_PATCHES_MAX_SIZE:
        dw = lax.optimization_barrier(patches.reshape(rows, -1).T) @ dy
    elif groups == 1:
        dw = patches.reshape(rows, -1).T @ dy
    else:
        dw = jnp.einsum("mtgc,mgo->tcgo", patches.reshape(rows, taps, groups, channels // groups),
                        dy.reshape(rows, groups, out_channels // groups))
    return dw.reshape(*kernel_size, channels // groups, out_channels)


def _gather_input_gradient(dy: jax.Array, w: jax.Array, size: tuple[int, int], pads: Pads,
                           stride: tuple[int, int], groups: int) -> jax.Array:
    """dx (batch, H, W, C): the patches' gradient dy w^T, each entry added back at the
    position of x it was read from, as a sum of gathers over `window_index`'s uses (the
    entries read from the border are dropped). Below GATHER_INPUT_GRADIENT_MIN_SIZE entries
    of the patches' gradient, one scatter-add over the index instead."""
    batch, channels = dy.shape[0], w.shape[2] * groups
    rows, out_channels = dy.size // dy.shape[-1], dy.shape[-1]
    taps = w.shape[0] * w.shape[1]
    dy = dy.reshape(rows, out_channels)
    if groups == 1:
        dpatches = lax.dot_general(dy, w.reshape(-1, out_channels), (((1,), (1,)), ((), ())))
    else:
        dpatches = jnp.einsum("mgo,tcgo->mtgc", dy.reshape(rows, groups, out_channels // groups),
                              w.reshape(taps, w.shape[2], groups, out_channels // groups))
    dpatches = dpatches.reshape(batch, -1, channels)  # (batch, windows kh kw, C)
    index, uses = window_index(size, pads, w.shape[:2], stride)
    if dpatches.size < GATHER_INPUT_GRADIENT_MIN_SIZE:
        dx = jnp.zeros((batch, size[0] * size[1] + 1, channels), dy.dtype)
        dx = dx.at[:, index.ravel()].add(dpatches)[:, :-1]  # the last slot: the border
    else:
        dpatches = jnp.pad(dpatches, ((0, 0), (0, 1), (0, 0)))  # the slot that reads 0
        # One gather per column of uses, added up: XLA fuses them into one loop. Gathering
        # the whole table first materialised it (batch, H W, U, C) before the sum: LeNet-1989's
        # batch-64 step then needed 3.6 MB of temporaries to jax.grad's 3.3 MB (now 3.1 MB).
        dx = functools.reduce(jnp.add, (dpatches[:, uses[:, use]]
                                        for use in range(uses.shape[1])))
    return dx.reshape(batch, *size, channels)


def _gather_forward(call: _Call, x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """"gather": the patches in one gather, saved, and y as one product."""
    patches = conv2d_gather_patches(x, call.pads, call.pad_value, call.kernel, call.stride)
    if patches.size > PATCH_PRODUCT_MAX_SIZE:
        return _large_output(call, x, w), patches
    y = _gather_product(patches, w, call.groups)
    return y.reshape(x.shape[0], *call.out_size, -1), patches


def _gather_transpose(call: _Call, x: jax.Array, patches: jax.Array, w: jax.Array,
                      dy: jax.Array, power: int) -> tuple[jax.Array, jax.Array]:
    """"gather": dw = patches^T dy, dx = dy w^T added back over the index table."""
    dw = _gather_kernel_gradient(patches ** power, dy, call.kernel, call.groups)
    dx = _gather_input_gradient(dy, w, call.size, call.pads, call.stride, call.groups)
    return dw, dx


def tile_width(out_width: int, kernel_width: int, stride_width: int) -> int:
    """The output columns of one tile of "tiles": the most that divide out_width and whose
    input, span = sw (tile - 1) + kw columns, is at most TILE_MAX_SPAN kernel widths; 1 (a
    window a tile) when no other does. LeNet-5: 4 of C1's 28 columns, 5 of C3's 10."""
    return max(tile for tile in range(1, out_width + 1) if out_width % tile == 0 and (
        tile == 1 or stride_width * (tile - 1) + kernel_width <= TILE_MAX_SPAN * kernel_width))


def conv2d_tiles(xp: jax.Array, kernel_size: tuple[int, int], stride: tuple[int, int],
                 out_size: tuple[int, int], tile: int) -> jax.Array:
    """The input that each tile of `tile` adjacent outputs of a row reads, (batch out_h U,
    kh span C) with U = out_w / tile tiles a row and span = sw (tile - 1) + kw input columns,
    from the padded input xp (batch, Hp, Wp, C):

        tiles[(n, i, u), (a, q, c)] = xp[n, sh i + a, sw tile u + q, c].

    tile = out_w gives whole rows (the "rows" implementation), tile = 1 one window's patch
    a tile."""
    (kernel_height, kernel_width), (stride_height, stride_width) = kernel_size, stride
    (out_height, out_width), channels = out_size, xp.shape[-1]
    span, step = stride_width * (tile - 1) + kernel_width, stride_width * tile
    rows = jnp.stack([xp[:, a:a + stride_height * (out_height - 1) + 1:stride_height]
                      for a in range(kernel_height)], axis=2)  # (batch, out_h, kh, Wp, C)
    tiles = jnp.stack([rows[..., step * u:step * u + span, :] for u in range(out_width // tile)],
                      axis=2)  # (batch, out_h, U, kh, span, C)
    return tiles.reshape(-1, kernel_height * span * channels)


@functools.lru_cache(maxsize=None)
def _band_index(in_width: int, kernel_width: int, stride_width: int, out_width: int
                ) -> np.ndarray:
    """(W, out_w): the kernel column b = q - sw j that input column q meets in window
    column j, or kw (a zero column) where window j does not read q."""
    offset = np.arange(in_width)[:, None] - stride_width * np.arange(out_width)[None, :]
    inside = (offset >= 0) & (offset < kernel_width)
    return np.where(inside, offset, kernel_width).astype(np.int32)


def _ungrouped(w: jax.Array, groups: int) -> jax.Array:
    """w (kh, kw, C_g, O) as a kernel over all C input channels, (kh, kw, C, O): output map
    o keeps its weights on its own group's channels and has zeros on the others."""
    if groups == 1:
        return w
    kh, kw, c_g, out_channels = w.shape
    blocks = w.reshape(kh, kw, 1, c_g, groups, out_channels // groups)
    eye = jnp.eye(groups, dtype=w.dtype).reshape(1, 1, groups, 1, groups, 1)  # [h, g]: h == g
    return (blocks * eye).reshape(kh, kw, groups * c_g, out_channels)


def _grouped(full: jax.Array, groups: int) -> jax.Array:
    """Inverse of `_ungrouped`: the diagonal blocks of (kh, kw, C, O) as (kh, kw, C_g, O)."""
    if groups == 1:
        return full
    kh, kw, channels, out_channels = full.shape
    blocks = full.reshape(kh, kw, groups, channels // groups, groups, out_channels // groups)
    return jnp.einsum("abhcgo,hg->abcgo", blocks, jnp.eye(groups, dtype=full.dtype)
                      ).reshape(kh, kw, channels // groups, out_channels)


def conv2d_band_matrix(w: jax.Array, in_width: int, stride_width: int, out_width: int,
                       groups: int = 1) -> jax.Array:
    """The kernel w (kh, kw, C_g, O) as the banded matrix T (kh W C, out_w O) over W =
    in_width input columns with

        T[(a, q, c), (j, o)] = w[a, q - sw j, c, o] if 0 <= q - sw j < kw (c in o's group),

    and 0 elsewhere, so that out_w adjacent outputs of a row are one product: y[n, i, tile u]
    = tiles[n, i, u] T (`conv2d_tiles`; W = sw (out_w - 1) + kw, or more columns that no
    window reads). Every entry is a weight or 0, so T(w)^2 = T(w^2)."""
    full = _ungrouped(w, groups)
    kh, kw, channels, out_channels = full.shape
    index = _band_index(in_width, kw, stride_width, out_width)
    band = jnp.pad(full, ((0, 0), (0, 1), (0, 0), (0, 0)))[:, index]  # (kh, W, out_w, C, O)
    return band.transpose(0, 1, 3, 2, 4).reshape(kh * in_width * channels,
                                                  out_width * out_channels)


def _band_kernel_gradient(dband: jax.Array, kernel_size: tuple[int, int], in_width: int,
                          stride_width: int, out_width: int, groups: int) -> jax.Array:
    """dw (kh, kw, C_g, O) from dT (kh W C, out_w O), the gradient of the band matrix:
    each weight stands once in every window column, dw[a, b, c, o] = sum_j
    dT[(a, sw j + b, c), (j, o)]."""
    kh, kw = kernel_size
    channels = dband.shape[0] // (kh * in_width)
    out_channels = dband.shape[1] // out_width
    dband = dband.reshape(kh, in_width, channels, out_width, out_channels)
    columns = stride_width * np.arange(out_width)[None, :] + np.arange(kw)[:, None]  # (kw, out_w)
    windows = np.broadcast_to(np.arange(out_width)[None, :], columns.shape)
    per_window = dband.transpose(0, 2, 4, 1, 3)[..., columns, windows]  # (kh, C, O, kw, out_w)
    full = jnp.sum(per_window, axis=-1).transpose(0, 3, 1, 2)
    return _grouped(full, groups)


def _tiles_input_gradient(dtiles: jax.Array, stride: tuple[int, int],
                          padded_size: tuple[int, int], tile: int) -> jax.Array:
    """dxp (batch, Hp, Wp, C) from dtiles (batch, out_h, U, kh, span, C), the transpose of
    `conv2d_tiles`: row a of tile u of output row i goes back to input row sh i + a, columns
    sw tile u + q.

    A sum of U kh padded copies (`lax.pad`, sh - 1 rows between each tile's rows), which
    XLA fuses into one pass over dxp: LeNet-5's whole batch-128 step with whole rows took
    0.94-0.96 of the time it took with kh in-place updates (2-core CPU, 2026-12-05), and
    with its tiles 0.96 of the time it took when the tiles were first summed into rows (one
    pass each) and those then into dxp; in-place updates took 1.13-1.14 of it."""
    (stride_height, stride_width), (padded_height, padded_width) = stride, padded_size
    _, out_height, tiles, kernel_height, span, _ = dtiles.shape
    rows_spanned = stride_height * (out_height - 1) + 1
    zero = jnp.zeros((), dtiles.dtype)

    def placed(u, a):
        rows = (a, padded_height - a - rows_spanned, stride_height - 1)
        columns = (stride_width * tile * u, padded_width - stride_width * tile * u - span, 0)
        return lax.pad(dtiles[:, :, u, a], zero, ((0, 0, 0), rows, columns, (0, 0, 0)))

    return sum(placed(u, a) for u in range(tiles) for a in range(kernel_height))


def _banded(implementation: str):
    """(forward, transpose) of "rows" (one tile a row) or "tiles" (`tile_width`): the input
    of each tile (`conv2d_tiles`) times the kernel as a banded matrix over its span
    (`conv2d_band_matrix`, kh span C by tile O), the same for every tile."""

    def geometry(call: _Call) -> tuple[int, int]:
        (out_width, kernel_width, stride_width) = call.out_size[1], call.kernel[1], call.stride[1]
        tile = (out_width if implementation == "rows"
                else tile_width(out_width, kernel_width, stride_width))
        return tile, stride_width * (tile - 1) + kernel_width

    def band_matrix(call: _Call, w: jax.Array) -> jax.Array:
        tile, span = geometry(call)
        size = call.kernel[0] * span * w.shape[2] * call.groups * tile * w.shape[3]
        if size > ROWS_BAND_MAX_SIZE:
            raise ValueError(
                f"{call.name}: implementation {implementation!r} needs a band matrix of {size} "
                f"entries ({span} input columns to {tile} output columns), more than "
                f"ROWS_BAND_MAX_SIZE = {ROWS_BAND_MAX_SIZE}; use 'patches' or 'conv' for "
                "this layer")
        return conv2d_band_matrix(w, span, call.stride[1], tile, call.groups)

    def forward(call: _Call, x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The input of every tile, saved, and y = tiles T(w)."""
        band = band_matrix(call, w)
        tiles = conv2d_tiles(_pad(x, call.pads, call.pad_value), call.kernel, call.stride,
                             call.out_size, geometry(call)[0])
        if tiles.size > PATCH_PRODUCT_MAX_SIZE:
            return _large_output(call, x, w), tiles
        return (tiles @ band).reshape(x.shape[0], *call.out_size, -1), tiles

    def transpose(call: _Call, x: jax.Array, tiles: jax.Array, w: jax.Array, dy: jax.Array,
                  power: int) -> tuple[jax.Array, jax.Array]:
        """dT = tiles^T dy summed along the band's diagonals into dw; dx = dy T^T added back
        tile by tile and row by row."""
        batch, out_h, out_w, out_channels = dy.shape
        tile, span = geometry(call)
        dy_tiles = dy.reshape(-1, tile * out_channels)
        dband = lax.dot_general(tiles ** power, dy_tiles, (((0,), (0,)), ((), ())))
        dw = _band_kernel_gradient(dband, call.kernel, span, call.stride[1], tile, call.groups)
        dtiles = (dy_tiles @ band_matrix(call, w).T).reshape(
            batch, out_h, out_w // tile, call.kernel[0], span, -1)
        dxp = _tiles_input_gradient(dtiles, call.stride, call.padded_size, tile)
        return dw, _unpad(dxp, call.pads)

    return forward, transpose


# Each implementation's (forward, transpose): forward(call, x, w) -> (y without the bias,
# saved) and transpose(call, x, saved, w ** power, dy, power) -> (dw, dx), w masked.
_PRODUCTS = {
    "conv": (_conv_forward, _conv_transpose),
    "patches": (_patches_forward, _patches_transpose),
    "gather": (_gather_forward, _gather_transpose),
    "rows": _banded("rows"),
    "tiles": _banded("tiles"),
}
IMPLEMENTATIONS = tuple(_PRODUCTS)


def table_fan_in_uniform(mask: np.ndarray, scale: float = 2.4,
                         exponent: float = 0.5) -> initializers.Initializer:
    """U(+-scale / F_o^exponent) per output map o, F_o = kh kw (inputs that o sees).

    LeCun et al. 1998, Appendix A: "uniformly distributed between -2.4/F_i and 2.4/F_i, where
    F_i is the number of inputs (fan-in) of the unit"; with a connection table the fan-in
    differs between maps (75, 100 or 150 in C3), so the kernel's full fan-in would be wrong.
    The square root by default, as in `initializers.fan_in_uniform` (see its docstring).
    """
    mask = np.asarray(mask, bool)

    def init(key, shape, dtype=jnp.float32):
        fan_in = shape[0] * shape[1] * mask.sum(axis=0)
        limit = jnp.asarray(scale / fan_in.astype(np.float64) ** exponent, dtype)
        return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * limit[None, None, None, :]

    return init


def _validate_table(connection_table, out_channels: int, groups: int, name: str) -> np.ndarray:
    table = np.asarray(connection_table)
    if table.ndim != 2 or table.shape[1] != out_channels:
        raise ValueError(f"{name}: connection_table has shape {table.shape}, expected "
                         f"(in_channels, {out_channels})")
    if not np.isin(table, (0, 1)).all():
        raise ValueError(f"{name}: connection_table must hold only 0/1 or booleans")
    table = table.astype(bool)
    if not table.any(axis=0).all():
        raise ValueError(f"{name}: every output map must see at least one input map; columns "
                         f"{np.flatnonzero(~table.any(axis=0)).tolist()} are empty")
    if groups != 1:
        raise ValueError(f"{name}: use either connection_table or feature_group_count, not both "
                         "(a block-diagonal table is a grouped convolution)")
    return table


def Conv2D(
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: str | Pads = "VALID",
    pad_value: float = 0.0,
    w_init: initializers.Initializer | None = None,
    b_init: initializers.Initializer = initializers.zeros,
    unshared_bias: bool = False,
    feature_group_count: int = 1,
    connection_table=None,
    implementation: str = "conv",
    name: str = "Conv2D",
) -> Layer:
    """2-D convolution (cross-correlation, as in every deep-learning library), NHWC.

    Shapes: x (batch, H, W, C); params "w" (kh, kw, C / groups, out_channels) and "b"
    (out_channels,), or (out_h, out_w, out_channels) with `unshared_bias` (one bias per unit,
    as in LeCun et al. 1989); y (batch, out_h, out_w, out_channels). Math in the module
    docstring.

    padding: 'VALID', 'SAME' (XLA's split) or ((top, bottom), (left, right)); the border is
    filled with `pad_value` (LeCun 1989 pads its [-1, 1] images with -1, the background).
    feature_group_count: G groups of C / G inputs and out_channels / G outputs (the two
    towers of AlexNet's conv2, conv4 and conv5).
    connection_table: boolean (C, out_channels); [i, o] says output map o sees input map i
    (LeNet-5's C3, LeNet 1989's H2). It is a constant mask on the kernel: y uses
    w * mask[None, None], dw is masked the same way, and masked weights are initialised to 0,
    so they stay exactly 0 under gradient descent and the L2 penalty and are no free
    parameters. The default w_init then uses each map's own fan-in (`table_fan_in_uniform`).
    w_init defaults to U(+-2.4 / sqrt(kh kw C / G)).
    implementation: how the three products are computed, with the same results:
      "conv"     lax.conv_general_dilated for y, dx and dw (XLA's convolution kernels);
      "patches"  the forward pass gathers the input's patches block-wise for the stride
                 (`conv2d_patches`) and keeps them as residuals; dw and dx are matrix
                 products with them (dx added back window by window), and so is y while the
                 patches are small (`PATCH_PRODUCT_MAX_SIZE`; XLA's convolution above, where
                 `apply` lets XLA drop the patches). On CPU this is faster for small images
                 (BENCHMARKS.md), where XLA's transposed convolutions are slow;
      "gather"   the patches (batch, windows, kh kw, C) in one gather with a constant index
                 table (`conv2d_gather_patches`, `window_index`), y and dw as one product
                 each, and dx as one scatter-add over the table (from
                 `GATHER_INPUT_GRADIENT_MIN_SIZE` on, a sum of gathers over its transpose):
                 the fewest operations, the fastest for one example at a time (LeNet-1989's
                 1989 recipe; y from XLA's convolution above `PATCH_PRODUCT_MAX_SIZE` as for
                 "patches").
      "rows"     each output row as one product: the kh input rows it reads
                 (`conv2d_tiles` with one tile a row, batch out_h by kh Wp C) times the
                 kernel laid out as a banded matrix (`conv2d_band_matrix`, kh Wp C by
                 out_w O); dw sums the band gradient rows^T dy along its diagonals and dx is
                 dy T^T added back row by row. Wp / kw times the multiply-adds of the other
                 forms (stride 1), in a few large products and no per-offset copies. The
                 band matrix is limited to `ROWS_BAND_MAX_SIZE` entries (a ValueError names
                 the layer), which keeps it to narrow images;
      "tiles"    "rows" over tiles of `tile_width` adjacent outputs of a row instead of the
                 whole row: one band matrix (kh span C by tile O, span = sw (tile - 1) + kw)
                 serves every tile, with span / kw (at most `TILE_MAX_SPAN`) times the
                 multiply-adds of the other forms instead of Wp / kw. The fastest for LeNet-5
                 at batch 128 on CPU.

    Whatever the implementation, a convolution whose one window covers its whole unpadded
    input (LeNet-5's C5, 5x5 kernels on 5x5 maps; one group) runs as a Dense layer on the
    flattened input (`_sees_whole_input`): one product each for y, dw and dx. Vmapped over
    single examples the "tiles" kernel gradient had gathered every example's 48,000-entry
    kernel along the band's diagonals; the per-example LeNet-5 step took half the time
    without it (8.0-8.3 against 16.1-17.1 ms, alternated in one process), the batch step
    0.97-0.98 of it.

    Backward (dy: (batch, out_h, out_w, out_channels)):
        db = sum_{n, i, j} dy (shared) or sum_n dy (unshared),
        dw = correlation of xp with dy (`conv2d_backward_kernel`), times the mask,
        dx = full correlation of the stride-dilated dy with the flipped, in/out-swapped kernel
             (`conv2d_backward_input`), with the padding border sliced off.
    """
    if not is_count(out_channels) or out_channels < 1:
        raise ValueError(f"{name}: out_channels must be an int >= 1, got {out_channels!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{name}: implementation must be one of {IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    kernel = pair(kernel_size, "kernel_size", name)
    strides = pair(stride, "stride", name)
    padding = _validate_padding(padding, name)
    if not is_finite_number(pad_value):  # NaN or inf filled every border window's output
        raise ValueError(f"{name}: pad_value must be a finite number, got {pad_value!r}")
    groups = feature_group_count
    if not is_count(groups) or groups < 1 or out_channels % groups:
        raise ValueError(f"{name}: feature_group_count {feature_group_count} must be >= 1 and "
                         f"divide out_channels {out_channels}")
    mask = None
    if connection_table is not None:
        mask = _validate_table(connection_table, out_channels, groups, name)
    if w_init is None:
        w_init = table_fan_in_uniform(mask) if mask is not None else initializers.fan_in_uniform()

    # Explicit pads (zeros for 'SAME', whose pads depend on the input size, and 'VALID'), and
    # the smallest height and width whose padded size fits the kernel (SAME always fits).
    fixed_pads = ((0, 0), (0, 0)) if isinstance(padding, str) else padding
    min_size = (1, 1) if padding == "SAME" else tuple(
        max(k - lo - hi, 1) for k, (lo, hi) in zip(kernel, fixed_pads))

    def output_spatial(size: tuple[int, int]) -> tuple[int, int]:
        pads = _resolve_padding(padding, size, kernel, strides)
        return tuple(_output_size(n, k, s, *p) for n, k, s, p in zip(size, kernel, strides, pads))

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        channels = input_shape[-1] if len(input_shape) == 4 else None
        check_image_input(name, input_shape, mask.shape[0] if mask is not None else None,
                          min_size, what="input_shape")
        if channels % groups:
            raise ValueError(f"{name}: input_shape {input_shape} has {channels} channels, not "
                             f"divisible by feature_group_count {groups}")
        out_h, out_w = output_spatial(input_shape[1:3])
        key_w, key_b = jax.random.split(key)
        w = w_init(key_w, (*kernel, channels // groups, out_channels))
        if mask is not None:
            w = w * jnp.asarray(mask, w.dtype)[None, None]
        bias_shape = (out_h, out_w, out_channels) if unshared_bias else (out_channels,)
        params = {"w": w, "b": b_init(key_b, bias_shape)}
        return (input_shape[0], out_h, out_w, out_channels), params

    def check_forward_input(params, x):
        w_shape = tuple(params["w"].shape)
        if len(w_shape) != 4 or w_shape[:2] != kernel or w_shape[3] != out_channels:
            raise ValueError(f"{name}: params 'w' has shape {w_shape}, expected "
                             f"{_pretty((*kernel, 'channels / groups', out_channels))}")
        if not unshared_bias:
            check_parameter(name, params, "b", (out_channels,))
        elif params["b"].ndim != 3 or params["b"].shape[2] != out_channels:
            raise ValueError(f"{name}: params 'b' has shape {tuple(params['b'].shape)}, "
                             f"expected (out_h, out_w, {out_channels}) (an unshared bias)")
        kernel_in = w_shape[2] * groups
        check_image_input(name, x.shape, kernel_in, min_size)
        if unshared_bias:
            want = params["b"].shape[:2]
            if output_spatial(x.shape[1:3]) != want:
                sizes = [_input_sizes(o, k, s, padding, p)
                         for o, k, s, p in zip(want, kernel, strides, fixed_pads)]
                expected = _pretty(("batch", *sizes, kernel_in))
                raise ValueError(f"{name}: input x has shape {tuple(x.shape)}, expected "
                                 f"{expected} (the unshared bias is {tuple(params['b'].shape)})")

    def masked(w):
        return w if mask is None else w * jnp.asarray(mask, w.dtype)[None, None]

    def products(call: _Call, x: jax.Array):
        """(forward, transpose) of `implementation`, or a Dense layer's where the one window
        covers the whole input (`_sees_whole_input`). With x's batch split over an Explicit
        mesh axis, "conv"'s: the others merge the batch with the windows into rows, which a
        split axis refuses (the same numbers within rounding, by XLA's convolutions)."""
        if _sees_whole_input(call):
            return _whole_forward, _whole_transpose
        return _PRODUCTS["conv" if is_split(x) else implementation]

    def call_geometry(size: tuple[int, int]) -> _Call:
        pads = _resolve_padding(padding, size, kernel, strides)
        padded_size = tuple(n + lo + hi for n, (lo, hi) in zip(size, pads))
        return _Call(name, size, pads, padded_size, output_spatial(size), kernel, strides,
                     groups, pad_value)

    def forward(params, x):
        check_forward_input(params, x)
        call = call_geometry(x.shape[1:3])
        y, saved = products(call, x)[0](call, x, masked(params["w"]))
        b = params["b"]
        y = y + (b[None] if unshared_bias else b[None, None, None, :])
        # x, not the padded copy: backward reads the call geometry off its shape.
        return y, (x, saved)

    def transpose(w, residuals, dy, power):
        """(dparams, dx) of y = conv(xp, w) + b, with xp and w raised to `power` (1: the
        gradient; 2: the Gauss-Newton diagonal, since every output is a sum of w * xp)."""
        x, saved = residuals
        call = call_geometry(x.shape[1:3])
        check_gradient(name, dy, (x.shape[0], *call.out_size, out_channels),
                       "dy" if power == 1 else "d2y")
        dw, dx = products(call, x)[1](call, x, saved, masked(w) ** power, dy, power)
        return {"w": masked(dw), "b": bias_gradient(dy)}, dx

    def bias_gradient(dy):
        return jnp.sum(dy, axis=0) if unshared_bias else channel_sum(dy)

    def backward(params, residuals, dy):
        return transpose(params["w"], residuals, dy, 1)

    def curvature(params, residuals, d2y):
        return transpose(params["w"], residuals, d2y, 2)

    def factors(params, x, dy):
        """Example n's dw = patches_n^T dy_n over its T windows (patches (T, kh kw C), dy
        (T, O), times the table's mask) and db = 1^T dy_n, or dy_n itself for unshared
        biases (`Factors`). One group only."""
        batch, windows = x.shape[0], dy.shape[1] * dy.shape[2]
        patches = conv2d_gather_patches(x, call_geometry(x.shape[1:3]).pads, pad_value, kernel,
                                        strides)
        patches = reshape_keeping_batch(patches, (batch, windows, patches.shape[2]
                                                  * patches.shape[3]))
        w_mask = None if mask is None else jnp.broadcast_to(
            jnp.asarray(mask, dy.dtype)[None, None], params["w"].shape).reshape(-1, out_channels)
        rows = reshape_keeping_batch(dy, (batch, windows, out_channels))
        ones = split_like(jnp.ones((batch, 1 if unshared_bias else windows, 1), dy.dtype), dy)
        bias = (reshape_keeping_batch(dy, (batch, 1, math.prod(dy.shape[1:])))
                if unshared_bias else rows)
        return {"w": Factors(patches, rows, w_mask), "b": Factors(ones, bias)}

    def tangent(params, x, dparams, dx):
        """dy = conv(xp, dw) + db + conv(dx padded with zeros, w): y is linear in (w, b), and
        in x but for the constant border, which does not move."""
        check_forward_input(params, x)
        call = call_geometry(x.shape[1:3])
        forward_product = products(call, x)[0]
        y, _ = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        dy, _ = forward_product(call, x, masked(dparams["w"]))
        db = dparams["b"]
        dy = dy + (db[None] if unshared_bias else db[None, None, None, :])
        if dx is not None:
            dy = dy + forward_product(call._replace(pad_value=0.0), dx, masked(params["w"]))[0]
        return y, dy

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        """y = conv(xp, w) + b is bilinear in (w, xp): the backward's products, each moved
        in both factors, R{dw} = corr(v_x padded with zeros, g_y) + corr(xp, R{g_y}), R{db}
        = the bias sum of R{g_y}, R{dx} = conv^T(R{g_y}, w) + conv^T(g_y, v_w), all by this
        implementation's own transposed products."""
        check_forward_input(params, x)
        check_direction(name, "v_params", v_params, params, "params")
        check_direction(name, "v_x", v_x, x, "x")
        call = call_geometry(x.shape[1:3])
        forward_product, transpose_product = products(call, x)
        residuals = (x, forward_product(call, x, masked(params["w"]))[1])
        g_params, g_x = transpose(params["w"], residuals, g_y, 1)
        r_g_params, r_g_x = transpose(params["w"], residuals, r_g_y, 1)
        r_g_x = r_g_x + transpose(v_params["w"], residuals, g_y, 1)[1]
        if v_x is not None:
            still_border = call._replace(pad_value=0.0)
            saved = forward_product(still_border, v_x, masked(params["w"]))[1]
            r_w, _ = transpose_product(still_border, v_x, saved, masked(params["w"]), g_y, 1)
            r_g_params = {**r_g_params, "w": r_g_params["w"] + masked(r_w)}
        return g_params, g_x, r_g_params, r_g_x

    return Layer(name, init, forward, backward, curvature=curvature,
                 factors=factors if groups == 1 else None, tangent=tangent,
                 backward_tangent=backward_tangent)


def _input_sizes(out: int, k: int, s: int, padding, pads: tuple[int, int]) -> str:
    """The input sizes (as 'n' or 'lo..hi') that give `out` outputs along one axis."""
    if padding == "SAME":
        lo, hi = (out - 1) * s + 1, out * s
    else:
        smallest = (out - 1) * s + k - sum(pads)  # may be < 1: padding alone fits the kernel
        lo, hi = max(smallest, 1), smallest + s - 1
    return str(lo) if lo == hi else f"{lo}..{hi}"


H2_SCHEMES = ("blocks", "cyclic")


def lenet1989_h2_table(scheme: str = "blocks") -> np.ndarray:
    """The (12, 12) connection table from H1 to H2 of LeCun et al. 1989 (zip codes).

    The paper says only that each H2 unit "combines local information coming from 8 of the
    12 different feature maps in H1" and does not say which 8. Two schemes, in each of which
    every H2 map sees 8 H1 maps and every H1 map feeds 8 H2 maps:
      "blocks" (the default), the one of karpathy/lecun1989-repro: H1 maps are split into
        three blocks of four, B0 = {0..3}, B1 = {4..7}, B2 = {8..11}; H2 maps 0-3 see B0
        and B1, maps 4-7 see B1 and B2, maps 8-11 see B2 and B0 (the pairs cycle): three
        distinct sets of inputs;
      "cyclic": H2 map o sees the 8 contiguous H1 maps o, o + 1, ..., o + 7 (mod 12), as
        LeNet-5's C3 maps 6-11 see contiguous S2 maps (LeCun et al. 1998, Table I): twelve
        distinct sets.
    Returns table[i, o]: H2 map o sees H1 map i.
    """
    if scheme not in H2_SCHEMES:
        raise ValueError(f"lenet1989_h2_table: scheme={scheme!r}; choose one of {H2_SCHEMES}")
    inputs, outputs = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    if scheme == "cyclic":
        return (inputs - outputs) % 12 < 8
    blocks, first = inputs // 4, outputs // 4  # the block of each H1 map, each H2 map's first
    return (blocks == first) | (blocks == (first + 1) % 3)


# LeCun, Bottou, Bengio and Haffner 1998, Table I: rows are S2 maps 0-5, columns C3 maps 0-15,
# "X" a connection. Maps 0-5 see 3 contiguous S2 maps, 6-11 see 4 contiguous, 12-14 see 4
# non-contiguous, 15 sees all 6 (contiguous is modulo 6).
_LENET5_C3_ROWS = (
    "X   XXX  XXXX XX",
    "XX   XXX  XXXX X",
    "XXX   XXX  X XXX",
    " XXX  XXXX  X XX",
    "  XXX  XXXX XX X",
    "   XXX  XXXX XXX",
)


def lenet5_c3_table() -> np.ndarray:
    """The (6, 16) S2 -> C3 connection table of LeNet-5 (LeCun et al. 1998, Table I).

    table[i, o] says C3 map o sees S2 map i; 60 connections in all.
    """
    return np.array([[mark == "X" for mark in row] for row in _LENET5_C3_ROWS], bool)

