"""Pooling, subsampling, flattening, local response normalisation and dropout (NHWC).

Every layer follows the contract of `nets.layers` (init, forward, backward, apply) with its
backward written from the math next to its forward. Windows slide over height and width only,
without padding: with window (kh, kw) and strides (sh, sw), out_h = (H - kh) // sh + 1, and
rows past the last window get no gradient (dx = 0 there). Likewise for widths.
"""
from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nets import initializers
from nets.conv import channel_sum, check_image_input, pair
from nets.layers import (
    Layer,
    StaticShape,
    check_direction,
    check_gradient,
    check_parameter,
    forward_with_key,
    is_count,
    is_finite_number,
    linear_backward_tangent,
    sum_all,
    tangent_backward_with_key,
    tangent_with_key,
)
from nets.varying import reshape_keeping_batch

__all__ = [
    "AvgPool",
    "MaxPool",
    "Subsampling",
    "Flatten",
    "LocalResponseNorm",
    "Dropout",
    "dropout_after",
    "window_sum",
    "window_sum_transpose",
]


def _output_size(size: int, k: int, s: int) -> int:
    return (size - k) // s + 1


def window_sum(x: jax.Array, window: tuple[int, int], stride: tuple[int, int]) -> jax.Array:
    """s[n, i, j, c] = sum_{a < kh, b < kw} x[n, sh i + a, sw j + b, c]; no padding.

    Windows that tile the input (stride = window) are summed as kh kw strided slices, one
    elementwise sum that XLA fuses with its operands (LeNet-5's batch-128 step with S2 and S4
    so: 0.92 of its time with the windows as the axes of a reshape and a reduction, which was
    0.97-0.98 of its time with XLA's reduce_window; 2-core CPU, 2026-12-05); overlapping ones
    by reduce_window."""
    if tuple(window) == tuple(stride):
        out_size = (x.shape[1] // window[0], x.shape[2] // window[1])
        return functools.reduce(operator.add, _window_views(x, window, stride, out_size))
    # The zero is a NumPy constant, concrete even under jit, so that lax recognises the sum
    # and uses its differentiable window-sum primitive (a traced zero gives a generic
    # reduction that jax.grad cannot differentiate).
    return lax.reduce_window(x, np.zeros((), x.dtype), lax.add, (1, *window, 1),
                             (1, *stride, 1), "VALID")


def window_sum_transpose(
    ds: jax.Array, window: tuple[int, int], stride: tuple[int, int], size: tuple[int, int]
) -> jax.Array:
    """The transpose of `window_sum`: dx[n, p, q, c] = sum of ds over the windows holding (p, q).

    dx[p] = sum_{i: sh i <= p < sh i + kh} ds[i] (and likewise along the width): a stride-1
    window sum of ds dilated by the strides (base_dilation puts sh - 1 zeros between rows)
    and zero-padded by k - 1 on both sides, plus `extra` zero rows at the bottom for the rows
    that no window covers. `size` is (H, W) of x. Windows that tile the input (stride =
    window): each ds copied over its window, then the uncovered rows and columns as zeros.
    """
    if tuple(window) == tuple(stride):
        (kh, kw), (batch, out_h, out_w, channels) = window, ds.shape
        tiles = jnp.broadcast_to(ds[:, :, None, :, None, :],
                                 (batch, out_h, kh, out_w, kw, channels))
        dx = reshape_keeping_batch(tiles, (batch, out_h * kh, out_w * kw, channels))
        return jnp.pad(dx, ((0, 0), (0, size[0] - out_h * kh), (0, size[1] - out_w * kw), (0, 0)))
    pads = [(0, 0)]
    for k, s, n, out in zip(window, stride, size, ds.shape[1:3]):
        extra = n - ((out - 1) * s + k)
        pads.append((k - 1, k - 1 + extra))
    pads.append((0, 0))
    return lax.reduce_window(ds, np.zeros((), ds.dtype), lax.add, (1, *window, 1),
                             (1, 1, 1, 1), pads, base_dilation=(1, *stride, 1))


def _pool_init(name, window, stride):
    def init(key, input_shape):
        del key
        check_image_input(name, input_shape, min_size=window, what="input_shape")
        batch, height, width, channels = input_shape
        return (batch, _output_size(height, window[0], stride[0]),
                _output_size(width, window[1], stride[1]), channels), ()

    return init


def _pooled_shape(x_shape, window, stride):
    """The output shape of a pooling of x_shape's (H, W) by windows without padding."""
    batch, height, width, channels = x_shape
    return (batch, _output_size(height, window[0], stride[0]),
            _output_size(width, window[1], stride[1]), channels)


def _window_and_stride(window, stride, name):
    window = pair(window, "window", name)
    return window, window if stride is None else pair(stride, "stride", name)


def AvgPool(window, stride=None, name: str = "AvgPool") -> Layer:
    """Average over each (kh, kw) window; stride defaults to the window (non-overlapping).

    Shapes: x (batch, H, W, C) -> y (batch, (H - kh) // sh + 1, (W - kw) // sw + 1, C).
    y = window_sum(x) / (kh kw); backward: dx = window_sum_transpose(dy) / (kh kw).
    """
    window, stride = _window_and_stride(window, stride, name)
    area = window[0] * window[1]

    def forward(params, x):
        del params
        check_image_input(name, x.shape, min_size=window)
        return window_sum(x, window, stride) / area, StaticShape(x.shape)

    def backward(params, x_shape, dy):
        del params
        check_gradient(name, dy, _pooled_shape(x_shape.shape, window, stride))
        return (), window_sum_transpose(dy, window, stride, x_shape.shape[1:3]) / area

    def curvature(params, x_shape, d2y):
        """Every Jacobian entry is 1/(kh kw): d2x = window_sum_transpose(d2y) / (kh kw)^2."""
        check_gradient(name, d2y, _pooled_shape(x_shape.shape, window, stride), "d2y")
        return backward(params, x_shape, d2y / area)

    def tangent(params, x, dparams, dx):
        """Linear in x: dy = window_sum(dx) / (kh kw)."""
        y, _ = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        return y, None if dx is None else window_sum(dx, window, stride) / area

    return Layer(name, _pool_init(name, window, stride), forward, backward,
                 curvature=curvature, tangent=tangent,
                 backward_tangent=linear_backward_tangent(forward, backward, name))


def _window_views(x, window, stride, out_size):
    """The kh kw strided views x[:, a + sh i, b + sw j, :], each (batch, out_h, out_w, C)."""
    (kh, kw), (sh, sw), (out_h, out_w) = window, stride, out_size
    return [
        x[:, a:a + (out_h - 1) * sh + 1:sh, b:b + (out_w - 1) * sw + 1:sw, :]
        for a in range(kh) for b in range(kw)
    ]


def MaxPool(window, stride=None, name: str = "MaxPool") -> Layer:
    """Maximum over each (kh, kw) window; stride defaults to the window (3x3 stride 2 works).

    Shapes as `AvgPool`. y[n, i, j, c] = max_{a, b} x[n, sh i + a, sw j + b, c]; the backward
    routes dy[n, i, j, c] to the input that attained the maximum, and overlapping windows add
    up. A window whose maximum is attained k times (ties) gives each of them dy / k: jax.grad's
    convention (the mean of the one-sided subgradients), so that the two engines agree at
    ties too, e.g. in windows of ReLU zeros or where float32 rounds near-equal values to one.
    Residuals: per output, the window offsets a kw + b that attain the maximum as the bits of
    one int32 (kh kw <= 31), and x's shape. A window holding a NaN attains nothing
    (NaN == NaN is false): y is NaN there, so E is too (the procedures' guard rejects such a
    step), and its dy reaches no input, where jax.grad gives NaN. Routing NaN to its inputs
    made the pool's forward and backward 3-5x slower at AlexNet's sizes (XLA's fusion), so
    it is not done.
    """
    window, stride = _window_and_stride(window, stride, name)
    if window[0] * window[1] > 31:
        raise ValueError(f"{name}: window {window} has {window[0] * window[1]} positions; at "
                         "most 31 are supported")

    def forward(params, x):
        del params
        check_image_input(name, x.shape, min_size=window)
        out_size = tuple(_output_size(n, k, s) for n, k, s in zip(x.shape[1:3], window, stride))
        views = _window_views(x, window, stride, out_size)
        # one reduce_max over the stacked views: its jax.grad splits ties evenly (a chain of
        # pairwise maxima would halve at each link instead)
        y = jnp.max(jnp.stack(views), axis=0)
        attained = functools.reduce(jnp.bitwise_or, [
            (view == y).astype(jnp.int32) << offset for offset, view in enumerate(views)])
        return y, (attained, StaticShape(x.shape))

    def route_to_maxima(residuals, dy, power):
        """dx: dy / k**power to each of the k positions of a window that attain its max."""
        attained, x_shape = residuals
        check_gradient(name, dy, attained.shape, "dy" if power == 1 else "d2y")
        (kh, kw), (sh, sw) = window, stride
        height, width = x_shape.shape[1:3]
        out_h, out_w = dy.shape[1:3]
        ties = lax.population_count(attained).astype(dy.dtype)
        share = dy / (ties if power == 1 else ties * ties)
        dx = jnp.zeros(x_shape.shape, dy.dtype)
        for offset in range(kh * kw):
            a, b = divmod(offset, kw)
            routed = jnp.where((attained >> offset) & 1 == 1, share, jnp.zeros((), dy.dtype))
            # Put routed[i, j] at (a + sh i, b + sw j): interior padding dilates by the
            # stride, edge padding shifts by the offset (no scatter needed).
            dx = dx + lax.pad(routed, jnp.zeros((), dy.dtype), (
                (0, 0, 0),
                (a, height - a - (out_h - 1) * sh - 1, sh - 1),
                (b, width - b - (out_w - 1) * sw - 1, sw - 1),
                (0, 0, 0),
            ))
        return dx

    def backward(params, residuals, dy):
        del params
        return (), route_to_maxima(residuals, dy, 1)

    def curvature(params, residuals, d2y):
        """The Jacobian's entries are 1/k at the k maxima: d2x gets d2y / k^2 there."""
        del params
        return (), route_to_maxima(residuals, d2y, 2)

    def tangent(params, x, dparams, dx):
        """dy: the mean of dx over the k positions of a window that attain its max (the
        Jacobian's row, as backward routes it)."""
        y, (attained, _) = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        if dx is None:
            return y, None
        ties = lax.population_count(attained).astype(dx.dtype)
        views = _window_views(dx, window, stride, y.shape[1:3])
        picked = sum_all([jnp.where((attained >> offset) & 1 == 1, view, jnp.zeros((), dx.dtype))
                          for offset, view in enumerate(views)])
        return y, picked / ties

    return Layer(name, _pool_init(name, window, stride), forward, backward,
                 curvature=curvature, tangent=tangent,
                 backward_tangent=linear_backward_tangent(forward, backward, name))


def _coefficient_init(window):
    """U(+-2.4 / sqrt(kh kw)): a subsampling unit has kh kw inputs (fan_in_uniform's rule)."""
    limit = 2.4 / math.sqrt(window[0] * window[1])

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def Subsampling(
    window=2,
    w_init: initializers.Initializer | None = None,
    b_init: initializers.Initializer = initializers.zeros,
    name: str = "Subsampling",
) -> Layer:
    """LeNet-5's trainable subsampling (LeCun et al. 1998, section II.B, layers S2 and S4).

    Each map sums its non-overlapping (kh, kw) windows, multiplies by a trainable coefficient
    and adds a trainable bias (the paper then applies its sigmoid; here that is a separate
    layer):
        y[n, i, j, c] = w[c] * s[n, i, j, c] + b[c],   s = window_sum(x) (stride = window).
    Shapes: x (batch, H, W, C), w (C,), b (C,), y (batch, H // kh, W // kw, C).
    The coefficient is stored as "w", so the L2 penalty of `nets.losses` applies to it (the
    lecture penalises every weight and no bias; the paper's coefficient is a weight).
    w_init defaults to U(+-2.4 / sqrt(kh kw)).
    Backward: dw[c] = sum_{n,i,j} dy s, db[c] = sum_{n,i,j} dy,
              dx = window_sum_transpose(dy * w[c]) (each input gets its window's dy w[c]).
    """
    window = pair(window, "window", name)
    w_init = w_init or _coefficient_init(window)

    def init(key, input_shape):
        output_shape, _ = _pool_init(name, window, window)(key, input_shape)
        key_w, key_b = jax.random.split(key)
        channels = input_shape[-1]
        return output_shape, {"w": w_init(key_w, (channels,)), "b": b_init(key_b, (channels,))}

    def forward(params, x):
        check_parameter(name, params, "b", params["w"].shape)
        check_image_input(name, x.shape, params["w"].shape[0], window)
        sums = window_sum(x, window, window)
        y = params["w"][None, None, None, :] * sums + params["b"][None, None, None, :]
        return y, (sums, StaticShape(x.shape))

    def backward(params, residuals, dy):
        sums, x_shape = residuals
        check_gradient(name, dy, sums.shape)
        dparams = {"w": channel_sum(dy * sums), "b": channel_sum(dy)}
        dx = window_sum_transpose(dy * params["w"][None, None, None, :], window, window,
                                  x_shape.shape[1:3])
        return dparams, dx

    def curvature(params, residuals, d2y):
        """d2w = sum d2y * sums^2, d2b = sum d2y, d2x = spread(d2y * w^2)."""
        sums, x_shape = residuals
        check_gradient(name, d2y, sums.shape, "d2y")
        return backward({"w": params["w"] ** 2, "b": params["b"]}, (sums**2, x_shape), d2y)

    def tangent(params, x, dparams, dx):
        """dy = dw[c] s + db[c] + w[c] window_sum(dx)."""
        y, (sums, _) = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        dy = dparams["w"][None, None, None, :] * sums + dparams["b"][None, None, None, :]
        if dx is not None:
            dy = dy + params["w"][None, None, None, :] * window_sum(dx, window, window)
        return y, dy

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        """y = w s + b is bilinear in (w, x): R{dw} = sum R{g_y} s + g_y window_sum(v_x),
        R{db} = sum R{g_y}, R{dx} = spread(R{g_y} w + g_y v_w)."""
        _, residuals = forward(params, x)
        check_direction(name, "v_params", v_params, params, "params")
        check_direction(name, "v_x", v_x, x, "x")
        g_params, g_x = backward(params, residuals, g_y)
        r_g_params, r_g_x = backward(params, residuals, r_g_y)
        r_g_x = r_g_x + backward(v_params, residuals, g_y)[1]
        if v_x is not None:
            moved_sums = channel_sum(g_y * window_sum(v_x, window, window))
            r_g_params = {**r_g_params, "w": r_g_params["w"] + moved_sums}
        return g_params, g_x, r_g_params, r_g_x

    return Layer(name, init, forward, backward, curvature=curvature, tangent=tangent,
                 backward_tangent=backward_tangent)


def Flatten(name: str = "Flatten") -> Layer:
    """(batch, H, W, C) -> (batch, H W C), row-major (C fastest); any rank >= 2 works.

    Backward: dx = dy reshaped to the shape of x.
    """

    def init(key, input_shape):
        del key
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or min(input_shape[1:]) < 1:
            raise ValueError(f"{name}: input_shape {input_shape}, expected (batch, ...) with "
                             "known sizes after the batch axis")
        return (input_shape[0], math.prod(input_shape[1:])), ()

    def forward(params, x):
        del params
        if x.ndim < 2:
            raise ValueError(f"{name}: input x has shape {tuple(x.shape)}, expected (batch, ...)")
        return x.reshape(x.shape[0], -1), StaticShape(x.shape)

    def backward(params, x_shape, dy):
        del params
        check_gradient(name, dy, (x_shape.shape[0], math.prod(x_shape.shape[1:])))
        return (), dy.reshape(x_shape.shape)

    def tangent(params, x, dparams, dx):
        y, _ = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        return y, None if dx is None else dx.reshape(y.shape)

    return Layer(name, init, forward, backward, curvature=backward, tangent=tangent,
                 backward_tangent=linear_backward_tangent(forward, backward, name))


def _negative_power(d: jax.Array, beta: float) -> jax.Array:
    """d^(-beta) for d > 0; the paper's beta = 3/4 as two reciprocal square roots, 1/sqrt(d)
    1/sqrt(sqrt(d)): 3.7x faster than the power on the 2-core CPU (0.46 against 1.7 ms for
    AlexNet's first LRN at batch 2), within 2.1e-7 of it in float32."""
    if beta == 0.75:
        return lax.rsqrt(d) * lax.rsqrt(lax.sqrt(d))
    return d ** -beta


def LocalResponseNorm(
    size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75,
    name: str = "LocalResponseNorm",
) -> Layer:
    """Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).

    With r = size // 2 and the sum over channels j in [c - r, c + r] that exist,
        d[n, h, w, c] = k + alpha sum_j x[n, h, w, j]^2,    y = x d^(-beta).
    As in the paper, alpha multiplies the sum itself (Caffe and TensorFlow's AlexNet divide it
    by size); defaults are the paper's k = 2, n = 5, alpha = 1e-4, beta = 0.75. size must be
    odd, so that the window is centred.
    Residuals x, d and d^(-beta) (the backward then needs no power). Backward: since c is in
    the window of j exactly when j is in the window of c,
        dx[c] = dy[c] d[c]^(-beta)
                - 2 alpha beta x[c] sum_{j in window(c)} dy[j] x[j] d[j]^(-beta - 1).
    Curvature, sum_j J_jc^2 d2y[j] with J_jc = delta_jc d[j]^(-beta) - 2 alpha beta x[j] x[c]
    d[j]^(-beta - 1) for c in window(j):
        d2x[c] = d2y[c] d[c]^(-2 beta) (1 - 4 alpha beta x[c]^2 / d[c])
                 + 4 alpha^2 beta^2 x[c]^2 sum_{j in window(c)} d2y[j] x[j]^2 d[j]^(-2 beta - 2).
    Tangent: dy[c] = dx[c] d[c]^(-beta) - 2 alpha beta x[c] d[c]^(-beta - 1) sum_{j in
    window(c)} x[j] dx[j].
    """
    if not is_count(size) or size < 1 or size % 2 == 0:
        raise ValueError(f"{name}: size must be an odd int >= 1, got {size!r}")
    for argument, value, low in (("k", k, "> 0"), ("alpha", alpha, ">= 0"),
                                 ("beta", beta, ">= 0")):
        if not (value > 0 if low == "> 0" else value >= 0) or not np.isfinite(value):
            # k = 0 makes d = 0 and y = 0 / 0 wherever a window is all zeros
            raise ValueError(f"{name}: {argument} must be finite and {low}, got {value!r}")
    radius = size // 2

    def channel_window_sum(values):
        """sum_{j in window(c)} values[..., j], as `size` shifted slices of the zero-padded
        values (XLA:CPU's reduce_window over the channel axis took 2x as long)."""
        channels = values.shape[-1]
        padded = jnp.pad(values, ((0, 0), (0, 0), (0, 0), (radius, radius)))
        return sum(padded[..., j:j + channels] for j in range(size))

    def init(key, input_shape):
        del key
        check_image_input(name, input_shape, what="input_shape")
        return tuple(input_shape), ()

    def forward(params, x):
        del params
        check_image_input(name, x.shape)
        d = k + alpha * channel_window_sum(x * x)
        d_power = _negative_power(d, beta)
        return x * d_power, (x, d, d_power)

    def backward(params, residuals, dy):
        del params
        x, d, d_power = residuals
        check_gradient(name, dy, x.shape)
        scaled = dy * x * d_power / d
        return (), dy * d_power - 2 * alpha * beta * x * channel_window_sum(scaled)

    def curvature(params, residuals, d2y):
        del params
        x, d, d_power = residuals
        check_gradient(name, d2y, x.shape, "d2y")
        squared = d_power * d_power
        window_terms = channel_window_sum(d2y * x * x * squared / (d * d))
        return (), (d2y * squared * (1 - 4 * alpha * beta * x * x / d)
                    + 4 * (alpha * beta) ** 2 * x * x * window_terms)

    def tangent(params, x, dparams, dx):
        """dy = dx d^(-beta) - 2 alpha beta x d^(-beta - 1) sum_{j in window(c)} x[j] dx[j]."""
        y, (x, d, d_power) = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        if dx is None:
            return y, None
        return y, dx * d_power - 2 * alpha * beta * x * d_power / d * channel_window_sum(x * dx)

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        """With P = d^(-beta), q = P / d and W the channel window's sum, dx = dy P - 2 alpha
        beta x W(dy x q) moves with R{d} = 2 alpha W(x v_x), R{P} = -beta q R{d}, R{q} =
        -(beta + 1) (q / d) R{d}:
            R{dx} = R{dy} P + dy R{P} - 2 alpha beta (v_x W(dy x q)
                    + x W(R{dy} x q + dy v_x q + dy x R{q}))."""
        _, residuals = forward(params, x)
        check_direction(name, "v_params", v_params, params, "params")
        check_direction(name, "v_x", v_x, x, "x")
        _, g_x = backward(params, residuals, g_y)
        _, r_g_x = backward(params, residuals, r_g_y)
        if v_x is None:
            return (), g_x, (), r_g_x
        x, d, d_power = residuals
        q = d_power / d
        r_d = 2 * alpha * channel_window_sum(x * v_x)
        r_power, r_q = -beta * q * r_d, -(beta + 1) * q / d * r_d
        moved = (g_y * r_power - 2 * alpha * beta * (
            v_x * channel_window_sum(g_y * x * q)
            + x * channel_window_sum(g_y * v_x * q + g_y * x * r_q)))
        return (), g_x, (), r_g_x + moved

    return Layer(name, init, forward, backward, curvature=curvature, tangent=tangent,
                 backward_tangent=backward_tangent)


def Dropout(rate: float, name: str = "Dropout") -> Layer:
    """Inverted dropout (Srivastava et al. 2014; Krizhevsky et al. 2012, section 4.2).

    `forward(params, x, key=None)`: with a key, each unit is kept with probability
    p = 1 - rate, y = x * m / p with m ~ Bernoulli(p) of x's shape (the same m for a key in
    any dtype); with key None (inference)
    y = x. Backward: dx = dy * m / p (the same mask, from the residuals), or dy at inference.
    Any shape of x works; params are ().

    The layer is `stochastic` (nets/layers.py): `serial` hands it its own key split from the
    model's, and the engines take that key (`value_and_grad(params, x, targets, key)`), so a
    training step with dropout passes a fresh key each step; without one the model runs at
    inference. Departure from AlexNet, which multiplied outputs by 0.5 at test time:
    scaling by 1/p during training instead has the same expectation and makes inference the
    identity. Tangent: dy = dx * m / p with the mask of the same key.
    """
    if not is_finite_number(rate) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: rate must lie in [0, 1), got {rate!r}")
    keep = 1.0 - rate

    def init(key, input_shape):
        del key
        return tuple(input_shape), ()

    def forward(params, x, key=None):
        del params
        if key is None or rate == 0.0:
            return x, None
        # drawn in float32 whatever x's dtype and the x64 mode, so that a key gives the same
        # mask in float32 and float64 (a float64 p would draw other bits)
        kept = jax.random.bernoulli(key, jnp.float32(keep), x.shape).astype(x.dtype)
        scale = kept / jnp.asarray(keep, x.dtype)
        return x * scale, scale

    def backward(params, scale, dy):
        del params
        if scale is not None:
            check_gradient(name, dy, scale.shape)
        return (), dy if scale is None else dy * scale

    def curvature(params, scale, d2y):
        del params
        if scale is not None:
            check_gradient(name, d2y, scale.shape, "d2y")
        return (), d2y if scale is None else d2y * scale * scale

    def tangent(params, x, dparams, dx, key=None):
        """dy = dx * m / p, the mask drawn from key as the forward draws it (or dx)."""
        y, scale = forward(params, x, key)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        return y, dx if dx is None or scale is None else dx * scale

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y, key=None):
        """Linear in x for the mask of the key: dx = dy m / p, R{dx} = R{dy} m / p."""
        _, scale = forward(params, x, key)
        check_direction(name, "v_params", v_params, params, "params")
        check_direction(name, "v_x", v_x, x, "x")
        check_gradient(name, g_y, x.shape)  # backward checks them against a mask alone
        check_gradient(name, r_g_y, x.shape, "R{dy}")
        return (), backward(params, scale, g_y)[1], (), backward(params, scale, r_g_y)[1]

    return Layer(name, init, forward, backward, curvature=curvature, stochastic=True,
                 tangent=tangent, backward_tangent=backward_tangent)


def dropout_after(layer: Layer, rate: float, name: str | None = None) -> Layer:
    """`layer` followed by `Dropout(rate)` on its output, with `layer`'s params and no entry
    of its own, so that a model's parameters (checkpoints, conversions to PyTorch) stay those
    of the same model without dropout. Dropout on the non-recurrent connections of a
    recurrent stack (Zaremba et al. 2014) is `dropout_after(rnn(cell), rate)`.

    forward(params, x, key=None): y = layer(x) * m / (1 - rate), m ~ Bernoulli(1 - rate) of
    y's shape, under a key (an inner stochastic layer gets a key split from it); y = layer(x)
    without one. Backward: layer's backward of dy * m / (1 - rate); curvature: layer's
    curvature of d2y * (m / (1 - rate))^2; tangent: layer's dy times m / (1 - rate)."""
    name = name or layer.name
    dropout = Dropout(rate, name=f"{name}_dropout")

    def split(key):
        """(the inner layer's key, the dropout's): the inner one split off only when the
        layer itself is stochastic."""
        if key is not None and layer.stochastic:
            return tuple(jax.random.split(key))
        return None, key

    def forward(params, x, key=None):
        inner_key, key = split(key)
        y, residuals = forward_with_key(layer, params, x, inner_key)
        y, scale = dropout.forward((), y, key=key)
        return y, (residuals, scale)

    def backward(params, residuals, dy):
        inner, scale = residuals
        return layer.backward(params, inner, dropout.backward((), scale, dy)[1])

    def curvature(params, residuals, d2y):
        inner, scale = residuals
        return layer.curvature(params, inner, dropout.curvature((), scale, d2y)[1])

    def tangent(params, x, dparams, dx, key=None):
        inner_key, key = split(key)
        y, dy = tangent_with_key(layer, params, x, dparams, dx, inner_key)
        return dropout.tangent((), y, (), dy, key=key)

    def tangent_backward(params, x, v_params, v_x, upstream, key=None):
        """layer's tangent_backward with the dropout and upstream above it: R{dy} m / p."""
        inner_key, key = split(key)

        def through_dropout(y, v_y):
            _, g_y, _, r_g_y = tangent_backward_with_key(dropout, (), y, (), v_y, upstream, key)
            return g_y, r_g_y

        return tangent_backward_with_key(layer, params, x, v_params, v_x, through_dropout,
                                         inner_key)

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y, key=None):
        return tangent_backward(params, x, v_params, v_x, lambda y, v_y: (g_y, r_g_y), key)

    return Layer(name, layer.init, forward, backward, sublayers=layer.sublayers,
                 curvature=None if layer.curvature is None else curvature, stochastic=True,
                 tangent=None if layer.tangent is None else tangent,
                 backward_tangent=None if layer.backward_tangent is None else backward_tangent,
                 tangent_backward=None if layer.backward_tangent is None else tangent_backward)
