"""Layer and batch normalisation with hand-written backward passes.

Both standardise x over some axes and then scale and shift each feature:

    mu = mean(x),  s = sqrt(mean((x - mu)^2) + eps),  xhat = (x - mu) / s,  y = g xhat + b,

`LayerNorm` (Ba, Kiros and Hinton 2016) over the last axis of x, of length n, row by row (an
MLP's features, an NHWC map's channels at each position, a sequence's features at each step);
`BatchNorm` (Ioffe and Szegedy 2015) over every other axis, feature by feature: the n values of
one feature across the batch (and across the positions of an NHWC map), so that an example's
output depends on the other examples of its batch, unless it is given fixed statistics for
inference (`with_population_statistics`; `BatchNorm` has that form's math).

Backward, with dxhat = dy g, the means over the same n values:

    dg = sum of dy xhat,   db = sum of dy,
    dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) / s,

from the Jacobian J[j, i] = dy_j / dx_i = (g_j / s) (delta_ij - (1 + xhat_i xhat_j) / n) within
one group of n (zero across groups). Curvature (Gauss-Newton diagonal, `nets.layers`): d2g and
d2b as dg and db with xhat^2 and 1 in place of xhat and dy, and d2x_i = sum_j J[j, i]^2 d2y_j,
which expands to

    d2x_i = a_i (1 - 2 (1 + xhat_i^2) / n) + (A_0 + 2 xhat_i A_1 + xhat_i^2 A_2) / n^2,
    a_j = g_j^2 d2y_j / s^2,   A_k = sum_j a_j xhat_j^k,

O(n) a group although J is a dense n x n block. For a group of 2 values (xhat = +-1 up to
eps) d2x is a difference of O(a) terms that nearly cancel: in float64 within ~1e-9 of the
squared Jacobian's, in float32 not to be trusted (groups that small have no spread anyway).
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp

from nets.layers import (
    Layer,
    check_direction,
    check_gradient,
    check_parameter,
    is_count,
    is_finite_number,
)

__all__ = ["LayerNorm", "BatchNorm", "batch_coupled_layers", "with_population_statistics"]


def _group_mean(values, axes, axis_name=None):
    """The mean over `axes` (kept as size 1) of an array or a tuple of them, and over the
    devices of the mapped axis `axis_name` too when one is given (every device holding as
    many values; one all-reduce for the tuple)."""
    mean = jax.tree.map(lambda v: jnp.mean(v, axis=axes, keepdims=True), values)
    return mean if axis_name is None else jax.lax.pmean(mean, axis_name)


def _standardise(x, axes, eps, axis_name=None):
    """(xhat, s): x minus its mean over `axes` (and `axis_name`), over s = sqrt(variance +
    eps); s keeps the reduced axes as size 1."""
    centred = x - _group_mean(x, axes, axis_name)
    s = jnp.sqrt(_group_mean(centred * centred, axes, axis_name) + eps)
    return centred / s, s


def _standardise_backward(xhat, s, dxhat, axes, axis_name=None):
    """dx of xhat = (x - mean(x)) / s over `axes` (and `axis_name`), given dxhat (module
    docstring)."""
    mean_dxhat, mean_dxhat_xhat = _group_mean((dxhat, dxhat * xhat), axes, axis_name)
    return (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) / s


def _standardise_backward_tangent(xhat, s, dxhat, r_dxhat, v_x, axes, axis_name=None):
    """(dx, R{dx}) of `_standardise_backward` when dxhat moves by R{dxhat} and x by v_x (None:
    it does not): with m(.) the mean over `axes` (and `axis_name`), dx = (u - m(u) - xhat
    m(u xhat)) / s for u = dxhat, and, R{xhat} = `_standardise_backward`(v_x) (the Jacobian
    of xhat is symmetric) and R{s} = m(xhat v_x),

        R{dx} = (R{u} - m(R{u}) - R{xhat} m(u xhat) - xhat m(R{u} xhat + u R{xhat})) / s
                - dx R{s} / s."""
    dx = _standardise_backward(xhat, s, dxhat, axes, axis_name)
    if v_x is None:
        return dx, _standardise_backward(xhat, s, r_dxhat, axes, axis_name)
    r_xhat = _standardise_backward(xhat, s, v_x, axes, axis_name)
    r_s, mean_u_xhat, mean_r_u, mean_moved = _group_mean(
        (xhat * v_x, dxhat * xhat, r_dxhat, r_dxhat * xhat + dxhat * r_xhat), axes, axis_name)
    r_dx = (r_dxhat - mean_r_u - r_xhat * mean_u_xhat - xhat * mean_moved) / s
    return dx, r_dx - dx * r_s / s


def _standardise_curvature(xhat, a, axes, n, axis_name=None):
    """d2x_i = sum_j J[j, i]^2 d2y_j over groups of n along `axes` (n counts every device's
    values when `axis_name` is given), with a = g^2 d2y / s^2 (module docstring)."""
    a0, a1, a2 = (jnp.sum(a * xhat**k, axis=axes, keepdims=True) for k in range(3))
    if axis_name is not None:
        a0, a1, a2 = jax.lax.psum((a0, a1, a2), axis_name)
    return a * (1 - 2 * (1 + xhat * xhat) / n) + (a0 + 2 * xhat * a1 + xhat * xhat * a2) / n**2


def _along_features(vector, ndim):
    """(features,) -> (1, ..., 1, features), so that it multiplies x without rank promotion."""
    return vector.reshape((1,) * (ndim - 1) + vector.shape)


def _check_arguments(name, features, eps):
    if not is_count(features) or features < 1:
        raise ValueError(f"{name}: features must be an int >= 1, got {features!r}")
    if not is_finite_number(eps):  # inf made every output b, a str was a TypeError
        raise ValueError(f"{name}: eps must be a finite number > 0, got {eps!r}")
    if not eps > 0:
        raise ValueError(f"{name}: eps must be > 0, got {eps}")


def _shape_check(name, features):
    def check(shape, what="input x"):
        if len(shape) < 2 or shape[-1] != features:
            raise ValueError(f"{name}: {what} has shape {tuple(shape)}, expected "
                             f"(batch, ..., {features})")
    return check


def _check_gain_and_bias(name, params, features):
    """g and b of (features,): one of (1,) would be broadcast over the features silently."""
    for key in ("g", "b"):
        check_parameter(name, params, key, (features,))


def _check_backward_tangent(name, params, x, v_params, v_x, g_y, r_g_y):
    """The directions shaped as params and x, and dy and R{dy} as the output (x's shape):
    one of (1,) or of one example would be broadcast silently."""
    check_direction(name, "v_params", v_params, params, "params")
    check_direction(name, "v_x", v_x, x, "x")
    check_gradient(name, g_y, x.shape)
    check_gradient(name, r_g_y, x.shape, "R{dy}")


def _gain_and_bias_init(check, features):
    def init(key, input_shape):
        del key
        check(input_shape, "input_shape")
        return tuple(input_shape), {"g": jnp.ones((features,), jnp.float32),
                                     "b": jnp.zeros((features,), jnp.float32)}
    return init


def LayerNorm(features: int, eps: float = 1e-5, name: str = "LayerNorm") -> Layer:
    """Normalise each row of the last axis to mean 0 and variance 1, then scale and shift.

    Shapes: x (batch, ..., features), g and b (features,), y like x. g starts at 1 and b at
    0; they are named "g" and "b", so the lecture's L2 penalty (on "w") leaves them alone.
    The module docstring gives the math of the forward, backward and curvature passes.
    """
    _check_arguments(name, features, eps)
    check = _shape_check(name, features)

    def over_rows(values):
        return jnp.sum(values.reshape(-1, features), axis=0)

    def forward(params, x):
        _check_gain_and_bias(name, params, features)
        check(x.shape)
        xhat, s = _standardise(x, -1, eps)
        y = _along_features(params["g"], x.ndim) * xhat + _along_features(params["b"], x.ndim)
        return y, (xhat, s)

    def backward(params, residuals, dy):
        xhat, s = residuals
        check_gradient(name, dy, xhat.shape)
        dx = _standardise_backward(xhat, s, dy * _along_features(params["g"], dy.ndim), -1)
        return {"g": over_rows(dy * xhat), "b": over_rows(dy)}, dx

    def curvature(params, residuals, d2y):
        xhat, s = residuals
        check_gradient(name, d2y, xhat.shape, "d2y")
        a = _along_features(params["g"], d2y.ndim) ** 2 * d2y / (s * s)
        d2x = _standardise_curvature(xhat, a, -1, features)
        return {"g": over_rows(d2y * xhat * xhat), "b": over_rows(d2y)}, d2x

    def tangent(params, x, dparams, dx):
        """dy = dg xhat + db + g dxhat; the row's Jacobian of xhat is symmetric, so dxhat is
        backward's product applied to dx."""
        y, (xhat, s) = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        dy = (_along_features(dparams["g"], x.ndim) * xhat
              + _along_features(dparams["b"], x.ndim))
        if dx is not None:
            dy = dy + _along_features(params["g"], x.ndim) * _standardise_backward(
                xhat, s, dx, -1)
        return y, dy

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        """R{dg} = rows' sum of R{dy} xhat + dy R{xhat}, R{db} = rows' sum of R{dy}; dx moves
        with dxhat = dy g (R{dxhat} = R{dy} g + dy v_g) and with xhat and s
        (`_standardise_backward_tangent`)."""
        _, (xhat, s) = forward(params, x)
        _check_backward_tangent(name, params, x, v_params, v_x, g_y, r_g_y)
        gain, v_gain = (_along_features(p["g"], x.ndim) for p in (params, v_params))
        g_x, r_g_x = _standardise_backward_tangent(xhat, s, g_y * gain,
                                                   r_g_y * gain + g_y * v_gain, v_x, -1)
        moved_xhat = r_g_y * xhat
        if v_x is not None:
            moved_xhat = moved_xhat + g_y * _standardise_backward(xhat, s, v_x, -1)
        return ({"g": over_rows(g_y * xhat), "b": over_rows(g_y)}, g_x,
                {"g": over_rows(moved_xhat), "b": over_rows(r_g_y)}, r_g_x)

    return Layer(name, init=_gain_and_bias_init(check, features), forward=forward,
                 backward=backward, curvature=curvature, tangent=tangent,
                 backward_tangent=backward_tangent)


def BatchNorm(features: int, eps: float = 1e-5, name: str = "BatchNorm", *,
              axis_name: str | None = None) -> Layer:
    """Normalise each feature over the batch to mean 0 and variance 1, then scale and shift.

    Shapes: x (batch, ..., features), g and b (features,), y like x. Each feature is
    standardised over all the other axes: the batch of an MLP's (batch, features), the batch
    and the positions of an NHWC map (the convolutional form of Ioffe and Szegedy 2015,
    section 3.2). g starts at 1 and b at 0, named so that the lecture's L2 penalty (on "w")
    leaves them alone. The module docstring gives the math of the three passes; the sums of
    dg and db run over the same axes.

    The statistics are the batch's own (as `jax.example_libraries.stax.BatchNorm`'s): there
    are no running averages, no state and no modes, so that the layer stays a pure function
    of (params, x). Because one example's output depends on the rest of its batch,
    per-example gradients are not defined (`batch_coupled_layers`;
    `training.parallel.per_example_value_and_grad` refuses such a model). A group of fewer
    than 2 values (a batch of one example without positions) has no spread: ValueError.

    Over devices the statistics are those of what each device's program sees: its shard
    under `training.parallel`'s "shard_map" and "pmap" (PyTorch's BatchNorm under
    DistributedDataParallel), the global batch under "jit". With `axis_name` (the name of a
    mapped axis: `training.parallel.BATCH_AXIS` for those two forms, or a `jax.vmap`
    axis_name) the means are also averaged over that axis's devices (`lax.pmean`; each holds
    as many values), so that every shard is normalised with the global batch's statistics
    (SyncBatchNorm) and the data-parallel step equals the single-device step on the global
    batch. The backward averages its two means the same way and the curvature sums its
    three; this is exact for the data-parallel convention of `training.parallel`, where each
    device differentiates its own shard's mean loss and the gradients are then averaged over
    devices (the module docstring's dx is then the number of devices times the global
    loss's). Where no mapping binds `axis_name` (a single-device call, "jit",
    `with_population_statistics`), the batch is whole and the layer uses its statistics.

    Fixed statistics, for inference: when params also hold "mean" and "var" (features,),
    as `with_population_statistics` sets them from a training set, the layer is the
    per-feature affine map y = g (x - mean) / sqrt(var + eps) + b on any batch, one example
    included, the same for every example (Ioffe and Szegedy's inference network). Its
    backward, from s = sqrt(var + eps) and xhat = (x - mean) / s: dx = dy g / s, dg and db
    as above, dmean = -sum(dy g) / s, dvar = -sum(dy g xhat) / (2 s^2); its curvature the
    squares: d2x = d2y g^2 / s^2, d2mean = sum(d2y) g^2 / s^2, d2var = sum(d2y xhat^2)
    g^2 / (4 s^4).
    """
    _check_arguments(name, features, eps)
    if axis_name is not None and not isinstance(axis_name, str):
        raise ValueError(f"{name}: axis_name must be the name (a str) of a mapped axis or None, "
                         f"got {axis_name!r}")
    check = _shape_check(name, features)

    def bound_axis():
        """(axis_name, its size) when a mapping binds it here (at trace time), else (None, 1)."""
        if axis_name is None:
            return None, 1
        try:
            return axis_name, jax.lax.axis_size(axis_name)
        except NameError:
            return None, 1

    def batch_axes(x):
        """(the axes reduced on this device, the mapped axis or None, the whole group's
        size)."""
        axes = tuple(range(x.ndim - 1))
        mapped, devices = bound_axis()
        group = math.prod(x.shape[:-1]) * devices
        if group < 2:
            raise ValueError(f"{name}: input x has shape {tuple(x.shape)}: {group} value per "
                             "feature, expected at least 2 to normalise over (batch x "
                             "positions >= 2)")
        return axes, mapped, group

    def fixed(params):
        """Whether params hold fixed statistics (checked to be a pair of (features,))."""
        given = [key for key in ("mean", "var") if key in params]
        if given and (len(given) == 1 or any(
                params[key].shape != (features,) for key in given)):
            shapes = {key: tuple(params[key].shape) for key in given}
            raise ValueError(f"{name}: params hold statistics {shapes}, expected both 'mean' "
                             f"and 'var' of shape ({features},)")
        return bool(given)

    def forward(params, x):
        _check_gain_and_bias(name, params, features)
        check(x.shape)
        if fixed(params):
            s = jnp.sqrt(_along_features(params["var"], x.ndim) + eps)
            xhat = (x - _along_features(params["mean"], x.ndim)) / s
        else:
            axes, mapped, _ = batch_axes(x)
            xhat, s = _standardise(x, axes, eps, mapped)
        y = _along_features(params["g"], x.ndim) * xhat + _along_features(params["b"], x.ndim)
        return y, (xhat, s)

    def backward(params, residuals, dy):
        xhat, s = residuals
        check_gradient(name, dy, xhat.shape)
        axes = tuple(range(dy.ndim - 1))
        dxhat = dy * _along_features(params["g"], dy.ndim)
        dparams = {"g": jnp.sum(dy * xhat, axis=axes), "b": jnp.sum(dy, axis=axes)}
        if not fixed(params):
            axes, mapped, _ = batch_axes(xhat)
            return dparams, _standardise_backward(xhat, s, dxhat, axes, mapped)
        s_row = s.reshape(features)
        return {**dparams, "mean": -jnp.sum(dxhat, axis=axes) / s_row,
                "var": -jnp.sum(dxhat * xhat, axis=axes) / (2 * s_row**2)}, dxhat / s

    def curvature(params, residuals, d2y):
        xhat, s = residuals
        check_gradient(name, d2y, xhat.shape, "d2y")
        axes = tuple(range(d2y.ndim - 1))
        a = _along_features(params["g"], d2y.ndim) ** 2 * d2y / (s * s)
        d2params = {"g": jnp.sum(d2y * xhat * xhat, axis=axes), "b": jnp.sum(d2y, axis=axes)}
        if not fixed(params):
            axes, mapped, group = batch_axes(xhat)
            return d2params, _standardise_curvature(xhat, a, axes, group, mapped)
        s_row = s.reshape(features)
        return {**d2params, "mean": jnp.sum(a, axis=axes),
                "var": jnp.sum(a * xhat * xhat, axis=axes) / (4 * s_row**2)}, a

    def tangent(params, x, dparams, dx):
        """dy = dg xhat + db + g dxhat. With the batch's statistics dxhat is backward's
        product applied to dx (the group's Jacobian is symmetric); with fixed ones, dxhat =
        (dx - dmean) / s - xhat dvar / (2 s^2)."""
        y, (xhat, s) = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        dy = (_along_features(dparams["g"], x.ndim) * xhat
              + _along_features(dparams["b"], x.ndim))
        if fixed(params):
            dxhat = (-_along_features(dparams["mean"], x.ndim) / s
                     - xhat * _along_features(dparams["var"], x.ndim) / (2 * s * s))
            if dx is not None:
                dxhat = dxhat + dx / s
        elif dx is None:
            return y, dy
        else:
            axes, mapped, _ = batch_axes(x)
            dxhat = _standardise_backward(xhat, s, dx, axes, mapped)
        return y, dy + _along_features(params["g"], x.ndim) * dxhat

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        """R{dg} = sum R{dy} xhat + dy R{xhat}, R{db} = sum R{dy}, with R{xhat} the tangent's
        dxhat. Batch statistics: dx moves as LayerNorm's (`_standardise_backward_tangent`,
        over the batch). Fixed ones, with u = dy g, R{u} = R{dy} g + dy v_g and R{s} =
        v_var / (2 s): R{dx} = R{u} / s - u v_var / (2 s^3), R{dmean} = -sum(R{u}) / s +
        sum(u) v_var / (2 s^3), R{dvar} = -sum(R{u} xhat + u R{xhat}) / (2 s^2) + sum(u xhat)
        v_var / (2 s^4)."""
        _, (xhat, s) = forward(params, x)
        _check_backward_tangent(name, params, x, v_params, v_x, g_y, r_g_y)
        axes = tuple(range(x.ndim - 1))
        gain, v_gain = (_along_features(p["g"], x.ndim) for p in (params, v_params))
        u, r_u = g_y * gain, r_g_y * gain + g_y * v_gain
        if fixed(params):
            v_mean, v_var = (_along_features(v_params[k], x.ndim) for k in ("mean", "var"))
            r_xhat = (v_x if v_x is not None else 0) / s - v_mean / s - xhat * v_var / (2 * s * s)
        elif v_x is None:
            r_xhat = jnp.zeros_like(xhat)
        else:
            r_xhat = _standardise_backward(xhat, s, v_x, *batch_axes(x)[:2])
        g_params = {"g": jnp.sum(g_y * xhat, axis=axes), "b": jnp.sum(g_y, axis=axes)}
        r_g_params = {"g": jnp.sum(r_g_y * xhat + g_y * r_xhat, axis=axes),
                      "b": jnp.sum(r_g_y, axis=axes)}
        if not fixed(params):
            reduced, mapped, _ = batch_axes(x)
            g_x, r_g_x = _standardise_backward_tangent(xhat, s, u, r_u, v_x, reduced, mapped)
            return g_params, g_x, r_g_params, r_g_x
        s_row, v_var_row = s.reshape(features), v_params["var"]
        g_params.update(mean=-jnp.sum(u, axis=axes) / s_row,
                        var=-jnp.sum(u * xhat, axis=axes) / (2 * s_row**2))
        r_g_params.update(
            mean=-jnp.sum(r_u, axis=axes) / s_row
            + jnp.sum(u, axis=axes) * v_var_row / (2 * s_row**3),
            var=-jnp.sum(r_u * xhat + u * r_xhat, axis=axes) / (2 * s_row**2)
            + jnp.sum(u * xhat, axis=axes) * v_var_row / (2 * s_row**4))
        v_var = _along_features(v_var_row, x.ndim)
        return g_params, u / s, r_g_params, r_u / s - u * v_var / (2 * s**3)

    return Layer(name, init=_gain_and_bias_init(check, features), forward=forward,
                 backward=backward, curvature=curvature, tangent=tangent,
                 backward_tangent=backward_tangent)


def _made_by(layer: Layer, builder: str) -> bool:
    return layer.forward.__qualname__.startswith(f"{builder}.")


def _wrapped_layers(layer: Layer) -> list[Layer]:
    """The layers a wrapper without `sublayers` calls (`dropout_after`, `TimeDistributed`,
    ...): those its forward holds in its closure, alone or in a tuple or list."""
    captured = inspect.getclosurevars(layer.forward).nonlocals.values()
    found = []
    for value in captured:
        # a Layer is a tuple itself (a NamedTuple)
        values = value if isinstance(value, (tuple, list)) and not isinstance(
            value, Layer) else (value,)
        found += [item for item in values if isinstance(item, Layer)]
    return found


def batch_coupled_layers(model: Layer, params: Any = None) -> list[str]:
    """The names of the layers of `model` (itself, its sublayers, and the layers a wrapper
    such as `dropout_after` or `TimeDistributed` calls; depth first) whose output for one
    example depends on the other examples of the batch: those made by `BatchNorm`, unless
    `params` are given and hold their fixed statistics (`with_population_statistics`)."""
    if _made_by(model, "BatchNorm"):
        return [] if isinstance(params, dict) and "mean" in params else [model.name]
    if not model.sublayers:  # a wrapper calls its layers with its own params
        return [name for layer in _wrapped_layers(model)
                for name in batch_coupled_layers(layer, params)]
    inner = params if isinstance(params, tuple) and len(params) == len(model.sublayers) else (
        (None,) * len(model.sublayers))
    return [name for layer, layer_params in zip(model.sublayers, inner)
            for name in batch_coupled_layers(layer, layer_params)]


def with_population_statistics(model: Layer, params: Any, x: jax.Array,
                               batch_size: int | None = None) -> Any:
    """params with every BatchNorm's "mean" and "var" set to the statistics of its inputs
    over all of x, so that the model then normalises any batch, one example too, the same way.

    The model runs on x as in training (each BatchNorm on its batch statistics, dropout
    passing its input through), and each BatchNorm records the mean and the variance of its
    input over the batch and position axes: the population statistics of Ioffe and Szegedy
    (2015, Algorithm 2), computed exactly over x (the training set, or a large sample of it)
    rather than as running averages ("precise BN", Wu and Johnson 2021). Statistics already
    in params are replaced. The statistics are leaves of params like g and b, with gradients
    of their own: they are for inference, not for an optimizer to move. The walk goes
    through `serial`, `parallel` (so `residual`) and `dropout_after`; a BatchNorm inside any
    other combinator (`TimeDistributed`, ...) is a ValueError naming it, and so is x with
    fewer than 2 values per feature at a BatchNorm.

    batch_size: None runs x as one batch. An int runs it in consecutive batches of that many
    examples (the last may be shorter), so that memory holds one batch's activations: the
    BatchNorms are measured one after another, each in one pass over x through the layers
    before it (whose statistics are then fixed, which makes their outputs the same as on
    the whole of x), its batches' counts, means and variances merged pairwise (Chan, Golub
    and LeVeque 1979):

        n = n_a + n_b,  mean = mean_a + (mean_b - mean_a) n_b / n,
        var = (n_a var_a + n_b var_b + (mean_b - mean_a)^2 n_a n_b / n) / n.

    The same statistics as one batch, up to rounding.
    """
    if batch_size is None:
        return _population_statistics(model, params, lambda: iter((x,)))
    if not is_count(batch_size) or batch_size < 1:
        raise ValueError(f"with_population_statistics: batch_size must be a positive int or "
                         f"None, got {batch_size!r}")
    return _population_statistics(
        model, params,
        lambda: (x[start:start + batch_size]  # x of no examples: one empty batch, refused
                 for start in range(0, max(x.shape[0], 1), batch_size)))


def _merged_moments(batches):
    """(count, mean, var) per feature over every value of the batches but the last axis."""
    count = 0
    for x in batches:
        axes = tuple(range(x.ndim - 1))
        n_b, mean_b, var_b = math.prod(x.shape[:-1]), jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
        if count == 0:
            count, mean, var, shape = n_b, mean_b, var_b, x.shape
            continue
        n = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        var = (count * var + n_b * var_b + delta ** 2 * (count * n_b / n)) / n
        count, shape = n, (shape[0] + x.shape[0], *shape[1:])
    return count, mean, var, shape


def _population_statistics(model: Layer, params: Any, batches) -> Any:
    """with_population_statistics over `batches()`, a fresh iterator of the model's input
    batches each time it is called."""
    if _made_by(model, "BatchNorm"):
        count, mean, var, shape = _merged_moments(batches())
        if count < 2:
            raise ValueError(f"with_population_statistics: {model.name}: input x has shape "
                             f"{tuple(shape)}, expected at least 2 values per feature")
        plain = {key: value for key, value in params.items() if key not in ("mean", "var")}
        return {**plain, "mean": mean, "var": var}
    if not batch_coupled_layers(model):
        return params
    if _made_by(model, "serial"):
        updated = []
        for index, (layer, layer_params) in enumerate(zip(model.sublayers, params)):
            if not any(batch_coupled_layers(later) for later in model.sublayers[index:]):
                return (*updated, *params[index:])  # no BatchNorm left to measure
            updated.append(_population_statistics(layer, layer_params, batches))
            # with the statistics of x itself, a BatchNorm's output is its training output
            batches = _through(layer, updated[-1], batches)
        return tuple(updated)
    if _made_by(model, "parallel"):
        return tuple(_population_statistics(branch, branch_params, batches)
                     for branch, branch_params in zip(model.sublayers, params))
    if _made_by(model, "dropout_after"):  # its params are its layer's; dropout passes x on
        inner = inspect.getclosurevars(model.forward).nonlocals["layer"]
        return _population_statistics(inner, params, batches)
    raise ValueError(f"with_population_statistics: {model.name!r} holds BatchNorm layers "
                     f"{batch_coupled_layers(model)} inside a combinator other than serial, "
                     "parallel or dropout_after; set their statistics by hand")


def _through(layer: Layer, params: Any, batches):
    """The batches of layer's outputs, as `batches` gives its inputs."""
    return lambda: (layer.apply(params, x) for x in batches())
