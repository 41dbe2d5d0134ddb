"""Layers as pure functions with hand-written backward passes.

The contract (README, "The contracts"), shared by every layer and by the combinators
`serial`, `parallel`, `residual` and `remat` (gradient checkpointing):

    init(key, input_shape)          -> (output_shape, params)
    forward(params, x)              -> (y, residuals)
    backward(params, residuals, dy) -> (dparams, dx)
    apply(params, x)                -> y            # forward without the residuals
    curvature(params, residuals, d2y) -> (d2params, d2x)   # optional, see below
    tangent(params, x, dparams, dx) -> (y, dy)              # optional, see below
    backward_tangent(params, x, v_params, v_x, g_y, r_g_y)
                    -> (g_params, g_x, r_g_params, r_g_x)    # optional, see below
    tangent_backward(params, x, v_params, v_x, upstream)
                    -> (g_params, g_x, r_g_params, r_g_x)    # optional, see below

A layer that draws random numbers (dropout) is marked `stochastic` and its forward also takes
a keyword `key`: `forward(params, x, key=None)`, key None meaning inference (no draw). The
combinators pass keys on: `serial` splits its key into one per stochastic layer, so that each
draws its own numbers. `forward_with_key(layer, params, x, key)` below calls any layer with
or without one, and the engines (nets/engines.py) take the same optional key. The backward
pass needs no key: what was drawn is in the residuals.

`params` is a plain pytree of arrays (a dict per layer; `()` for layers without parameters);
`residuals` is exactly what `backward` needs (a layer that needs only its input's shape keeps
a `StaticShape`, which holds no array); `dparams` has the structure of `params` and
`dx` the shape of `x`. Shapes carry a leading batch axis; `input_shape` may use -1 for it.
Weights are stored under the key "w" and biases under "b": the lecture's L2 penalty applies
to the "w" leaves only (see `nets.losses.l2_penalty`).

Backward passes are written from each layer's math, never by differentiating the forward
pass. A layer checks the shape of its input once, at trace time, and raises a ValueError
naming the layer and both shapes.

`curvature` backpropagates diagonal second derivatives in the Gauss-Newton approximation
(LeCun 1987; LeCun et al. 1989, section 5; "Efficient BackProp" section 9.1): given d2y, the
diagonal of d2E/dy2 per example, it returns the diagonal d2E/dparams2 (summed over the batch)
and d2E/dx2, treating each layer's Jacobian J as if the second derivatives it connects were
diagonal: d2x_i = sum_j J_ji^2 d2y_j, and for an elementwise f, d2x = f'(x)^2 d2y (the f''
term dropped). Layers without it leave the field None.

`factors` (optional, Dense and Conv2D) writes each example's parameter gradient as a product,
for per-example gradient norms that never form it (`training.parallel.ghost_norms`):
`factors(params, x, dy) -> {leaf key: Factors(a, b, mask)}` for every leaf, x and dy the
layer's input and output gradient over a batch, such that example n's gradient of that leaf
is (mask * a[n]^T b[n]).reshape(leaf.shape), a (batch, T, K) and b (batch, T, C): a sum of T
outer products (T = 1 for Dense: x_n^T dy_n; a convolution's windows: patches^T dy).

`tangent` (optional) is the forward pass together with its directional derivative, written by
hand in forward mode: y and dy = J_params dparams + J_x dx, dparams shaped as params and dx as
x, where dx None stands for zero (the net's input, which no parameter moves); a stochastic
layer's tangent also takes a keyword `key`, drawing what its forward draws with that key
(`tangent_with_key`). Run through a
net it gives the Jacobian-vector product J v of the outputs for a parameter direction v, the
half of the Gauss-Newton product G v = J^T H J v that the backward pass cannot give
(`nets.engines.gauss_newton_product`; Schraudolph 2002). Layers without it leave it None.

`backward_tangent` (optional) is the backward pass together with its directional derivative
along a parameter direction v: Pearlmutter's (1994) R-operator applied to backpropagation,
written by hand. From the layer's input x, its tangent v_x = R{x} (None for zero: the net's
input), the parameters' direction v_params, the gradient arriving at the output g_y = dE/dy
and its tangent r_g_y = R{g_y}, it returns the backward pass's gradients g_params, g_x and
their tangents r_g_params = R{g_params}, r_g_x = R{g_x}. Each layer's R{backward} is the
derivative of its backward in all three of its inputs: for y = x w, g_w = x^T g_y moves to
v_x^T g_y + x^T r_g_y and g_x = g_y w^T to r_g_y w^T + g_y v_w^T; for y = f(x), g_x = g_y
f'(x) moves to r_g_y f'(x) + g_y f''(x) v_x, where the second derivatives that Gauss-Newton
drops come in. Run from the loss (r_g at the outputs = the loss's Hessian times J v) back
through a net, r_g_params is the exact Hessian's product H v
(`nets.engines.hessian_product`). The layer recomputes what it needs from x; under jit XLA
shares it with the forward pass. A stochastic layer's takes `key=` as its forward does
(`backward_tangent_with_key`). Layers without it leave it None.

`tangent_backward` (optional) is the tangent pass and the backward tangent pass in one, for a
layer whose forward XLA would not share between them (a scan through time): it runs its
tangent, asks `upstream(y, v_y) -> (g_y, r_g_y)` (the layers above and the loss) for the
gradient arriving at its output and its tangent, and runs its backward tangent from what its
own forward kept. `serial` passes each layer the layers above it as its upstream, so a net's
every forward runs once (`tangent_backward_with_key`, which runs `tangent`, then
`backward_tangent` for a layer without one). Layers without it leave it None.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nets import initializers
from nets.varying import batch_sharding, is_split, product_sharding

__all__ = [
    "Layer",
    "Dense",
    "Embedding",
    "EuclideanRBF",
    "Sigmoid",
    "Tanh",
    "Relu",
    "Identity",
    "LeakyRelu",
    "Elu",
    "Softplus",
    "Silu",
    "Gelu",
    "ACTIVATIONS",
    "elementwise",
    "serial",
    "layer_outputs",
    "parallel",
    "residual",
    "remat",
    "tie",
    "plain_layers",
    "check_input",
    "check_gradient",
    "check_parameter",
    "check_direction",
    "is_finite_number",
    "concrete_values",
    "forward_with_key",
    "tangent_with_key",
    "backward_tangent_with_key",
    "tangent_backward_with_key",
    "layer_keys",
    "StaticShape",
    "Factors",
    "linear_backward_tangent",
]

Shape = tuple[int, ...]
Params = Any
InitFn = Callable[[jax.Array, Shape], tuple[Shape, Params]]
ForwardFn = Callable[[Params, jax.Array], tuple[jax.Array, Any]]
BackwardFn = Callable[[Params, Any, jax.Array], tuple[Params, jax.Array]]


class Factors(NamedTuple):
    """One parameter leaf's per-example gradient as a product (module docstring, `factors`):
    example n's is (mask * a[n]^T b[n]).reshape(leaf.shape). a (batch, T, K), b (batch, T, C),
    mask (K, C) or None (a connection table's zeros)."""

    a: jax.Array
    b: jax.Array
    mask: jax.Array | None = None


FactorsFn = Callable[[Params, jax.Array, jax.Array], dict[str, Factors]]
TangentFn = Callable[[Params, jax.Array, Params, jax.Array | None],
                     tuple[jax.Array, jax.Array | None]]
BackwardTangentFn = Callable[[Params, jax.Array, Params, jax.Array | None, jax.Array, jax.Array],
                             tuple[Params, jax.Array, Params, jax.Array]]
UpstreamFn = Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]
TangentBackwardFn = Callable[[Params, jax.Array, Params, jax.Array | None, UpstreamFn],
                             tuple[Params, jax.Array, Params, jax.Array]]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StaticShape:
    """An array's shape kept among a layer's residuals in place of the array: a pytree with no
    leaves, so it costs no memory in any residual store (a `jax.custom_vjp`'s, a scan's, a
    caller's) and passes through jit and vmap as a constant."""

    shape: tuple[int, ...]


class Layer(NamedTuple):
    """A layer: a name and three pure functions (see the module docstring).

    `sublayers` lists the parts of a combinator such as `serial` (empty for a plain layer),
    so that reports can name each layer's parameters. `curvature` is the optional
    Gauss-Newton diagonal backward (module docstring), with backward's signature.
    `stochastic` marks a forward that takes a keyword `key` (module docstring). `factors`
    is the optional per-example gradient as products (module docstring). `tangent` is the
    optional forward-mode pass `(params, x, dparams, dx) -> (y, dy)` (module docstring).
    `backward_tangent` is the optional R-operator of the backward pass, `(params, x,
    v_params, v_x, g_y, r_g_y) -> (g_params, g_x, r_g_params, r_g_x)` (module docstring).
    `tangent_backward` is the optional pair of both, `(params, x, v_params, v_x, upstream)
    -> (g_params, g_x, r_g_params, r_g_x)` (module docstring).
    """

    name: str
    init: InitFn
    forward: ForwardFn
    backward: BackwardFn
    sublayers: tuple["Layer", ...] = ()
    curvature: BackwardFn | None = None
    stochastic: bool = False
    factors: FactorsFn | None = None
    tangent: TangentFn | None = None
    backward_tangent: BackwardTangentFn | None = None
    tangent_backward: TangentBackwardFn | None = None

    def apply(self, params: Params, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The layer's output: `forward` without the residuals (key: `forward_with_key`)."""
        return forward_with_key(self, params, x, key)[0]


def forward_with_key(layer: Layer, params: Params, x: jax.Array,
            key: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """`layer.forward(params, x)`, or with `key=key` when a key is given.

    A key is for a stochastic layer (one that draws random numbers, such as dropout); given
    to a layer with none it would change nothing, which is taken for a mistake: ValueError.
    """
    return _with_key(layer, layer.forward, key, params, x)


def tangent_with_key(layer: Layer, params: Params, x: jax.Array, dparams: Params,
                     dx: jax.Array | None, key: jax.Array | None = None):
    """`layer.tangent(params, x, dparams, dx)`, with `key=key` when a key is given (the
    rule of `forward_with_key`: a key for a layer that draws nothing is a ValueError).
    dparams and dx shaped otherwise than params and x are a ValueError (`check_direction`),
    for every layer a combinator runs, whatever its own tangent checks."""
    check_direction(layer.name, "dparams", dparams, params, "params")
    check_direction(layer.name, "dx", dx, x, "x")
    return _with_key(layer, layer.tangent, key, params, x, dparams, dx)


def backward_tangent_with_key(layer: Layer, params: Params, x: jax.Array, v_params: Params,
                              v_x: jax.Array | None, g_y: jax.Array, r_g_y: jax.Array,
                              key: jax.Array | None = None):
    """`layer.backward_tangent(params, x, v_params, v_x, g_y, r_g_y)`, with `key=key` when a
    key is given (the rule of `forward_with_key`); v_params and v_x checked as
    `tangent_with_key` checks its directions."""
    check_direction(layer.name, "v_params", v_params, params, "params")
    check_direction(layer.name, "v_x", v_x, x, "x")
    return _with_key(layer, layer.backward_tangent, key, params, x, v_params, v_x, g_y, r_g_y)


def tangent_backward_with_key(layer: Layer, params: Params, x: jax.Array, v_params: Params,
                              v_x: jax.Array | None, upstream: UpstreamFn,
                              key: jax.Array | None = None):
    """`layer.tangent_backward(params, x, v_params, v_x, upstream)` (with `key=key` when a key
    is given), or, for a layer without one, its tangent, then upstream(y, v_y) = (g_y,
    r_g_y), then its backward tangent: (g_params, g_x, r_g_params, r_g_x)."""
    if layer.tangent_backward is not None:
        check_direction(layer.name, "v_params", v_params, params, "params")
        check_direction(layer.name, "v_x", v_x, x, "x")
        return _with_key(layer, layer.tangent_backward, key, params, x, v_params, v_x, upstream)
    y, v_y = tangent_with_key(layer, params, x, v_params, v_x, key)
    g_y, r_g_y = upstream(y, v_y)
    return backward_tangent_with_key(layer, params, x, v_params, v_x, g_y, r_g_y, key)


def _with_key(layer: Layer, function: Callable, key: jax.Array | None, *args):
    """function(*args), with `key=key` when a key is given; a key for a layer that draws
    nothing is a ValueError (`forward_with_key`)."""
    if key is None:
        return function(*args)
    if not layer.stochastic:
        raise ValueError(f"{layer.name}: a key was given, but no layer in it draws random "
                         "numbers (no Dropout)")
    return function(*args, key=key)


def layer_keys(layers: tuple[Layer, ...], key: jax.Array | None) -> list[jax.Array | None]:
    """One independent key for each stochastic layer of `layers` (split from `key`), None for
    the others and for all when key is None."""
    stochastic = [layer.stochastic for layer in layers]
    if key is None or not any(stochastic):
        return [None] * len(layers)
    keys = iter(jax.random.split(key, sum(stochastic)))
    return [next(keys) if is_stochastic else None for is_stochastic in stochastic]


def check_input(layer_name: str, x: jax.Array, expected: Shape) -> None:
    """Raise a ValueError unless `x.shape` matches `expected` (-1 matches any size)."""
    matches = len(x.shape) == len(expected) and all(
        want in (-1, got) for want, got in zip(expected, x.shape)
    )
    if not matches:
        pretty = "(" + ", ".join("batch" if d == -1 else str(d) for d in expected) + ")"
        raise ValueError(f"{layer_name}: input x has shape {tuple(x.shape)}, expected {pretty}")


def check_gradient(layer_name: str, dy: jax.Array, expected: Shape, what: str = "dy") -> None:
    """Raise a ValueError unless the gradient arriving at a layer's output (`what`: dy, or
    d2y for the curvature) has the output's shape, `expected`: the backward's products would
    broadcast a size-1 axis, or clamp an index past the end, silently."""
    if tuple(dy.shape) != tuple(expected):
        raise ValueError(f"{layer_name}: {what} has shape {tuple(dy.shape)}, expected the "
                         f"output's {tuple(expected)}")


def check_parameter(layer_name: str, params: Params, key: str, expected: Shape,
                    what: str = "params") -> None:
    """Raise a ValueError unless params[key] has shape `expected` (params from another init
    would be broadcast, or used with another kernel size, silently). `what` names params in
    the message (a nested group: "params qkv")."""
    found = tuple(params[key].shape)
    if found != tuple(expected):
        raise ValueError(f"{layer_name}: {what} {key!r} has shape {found}, expected "
                         f"{tuple(expected)}")


def check_direction(layer_name: str, what: str, direction: Any, primal: Any,
                    primal_name: str) -> None:
    """Raise a ValueError unless a tangent pass's direction (`what`: dx, v_x, dparams,
    v_params) has the structure and the shapes of its primal (`primal_name`: x, params): dx
    of one example was broadcast over the batch, a bias direction of one entry over the
    features, a weight direction of another width gave a dy of that width, and a tuple of
    fewer layers' directions was cut short by zip, all silently. None (a zero direction)
    passes."""
    if direction is None:
        return
    found, tree = jax.tree_util.tree_flatten_with_path(direction)
    wanted, wanted_tree = jax.tree_util.tree_flatten_with_path(primal)
    if tree != wanted_tree:
        def shapes(value):
            return jax.tree.map(lambda leaf: tuple(np.shape(leaf)), value)

        raise ValueError(f"{layer_name}: {what} is {shapes(direction)}, expected "
                         f"{primal_name}'s {shapes(primal)}")
    for (path, leaf), (_, like) in zip(found, wanted):
        if tuple(np.shape(leaf)) != tuple(np.shape(like)):
            where = jax.tree_util.keystr(path)
            raise ValueError(f"{layer_name}: {what}{where} has shape {tuple(np.shape(leaf))}, "
                             f"expected {primal_name}{where}'s {tuple(np.shape(like))}")


def is_finite_number(value) -> bool:
    """Whether value is one finite real number (Python's, NumPy's or a 0-d array's), not a
    bool or a str: a layer's constant such as a slope, an epsilon or a pad value."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
        return False
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def concrete_values(array: Any) -> np.ndarray | None:
    """array's values when they are known now (not traced by jit, grad, vmap or scan) and
    this process holds them whole (not a global array spread over several hosts' devices,
    which NumPy cannot fetch), else None: value checks run on concrete inputs and are
    skipped inside a trace."""
    if isinstance(array, jax.core.Tracer) or not getattr(array, "is_fully_addressable", True):
        return None
    return np.asarray(array)


# Up to this many examples a dense layer's weight gradient is a sum of outer products.
OUTER_PRODUCTS_MAX_BATCH = 4


def weight_gradient(x: jax.Array, dy: jax.Array, w: jax.Array | None = None) -> jax.Array:
    """dw = x^T dy, (in, out), from x (batch, in) and dy (batch, out), laid out as w.

    For a batch of at most OUTER_PRODUCTS_MAX_BATCH examples, the sum of the examples' outer
    products x_n^T dy_n, which XLA fuses into what reads dw (an SGD update then makes one pass
    over w). As a product with so short an inner dimension, XLA:CPU wrote dw at a few GB/s:
    AlexNet's fc6 (9216 x 4096) at batch 2, dw and the update, 60 ms against 12 ms (2-core CPU,
    2026-12-05). One example is a single outer product either way (XLA rewrites the product).
    A batch split over an Explicit mesh axis is summed by the product, into w's layout
    (`nets.varying.product_sharding`: w replicated, an all-reduce).
    """
    out_sharding = None if w is None else product_sharding(x, w)
    if out_sharding is None and 0 < x.shape[0] <= OUTER_PRODUCTS_MAX_BATCH:
        return sum(x[n][:, None] * dy[n][None, :] for n in range(x.shape[0]))
    return jnp.matmul(x.T, dy, out_sharding=out_sharding)


def is_count(value) -> bool:
    """Whether value is an int (Python's or NumPy's) and not a bool: a size, a stride, a pad.
    A float such as 2.5 would be truncated by int() and True read as 1, both silently."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def Dense(
    out_features: int,
    w_init: initializers.Initializer | None = None,
    b_init: initializers.Initializer = initializers.zeros,
    name: str = "Dense",
) -> Layer:
    """Fully connected layer y = x @ w + b (w_init defaults to U(+-2.4/sqrt(fan_in))).

    Shapes: x (batch, in), w (in, out), b (out,), y (batch, out).
    Backward, the lecture's recursion with dy = dE/d(pre-activation):
        dw = x^T @ dy,   db = sum_batch dy,   dx = dy @ w^T.
    """
    if not is_count(out_features) or out_features < 1:
        raise ValueError(f"{name}: out_features must be an int >= 1, got {out_features!r}")
    w_init = w_init or initializers.fan_in_uniform()

    def init(key, input_shape):
        if len(input_shape) != 2 or not is_count(input_shape[-1]) or input_shape[-1] < 1:
            raise ValueError(
                f"{name}: input_shape {tuple(input_shape)} must be (batch, features)"
            )
        in_features = input_shape[-1]
        key_w, key_b = jax.random.split(key)
        params = {
            "w": w_init(key_w, (in_features, out_features)),
            "b": b_init(key_b, (out_features,)),
        }
        return (input_shape[0], out_features), params

    def forward(params, x):
        check_parameter(name, params, "b", params["w"].shape[1:])
        check_input(name, x, (-1, params["w"].shape[0]))
        return x @ params["w"] + params["b"][None, :], x

    def backward(params, x, dy):
        check_gradient(name, dy, (x.shape[0], params["w"].shape[1]))
        dparams = {"w": weight_gradient(x, dy, params["w"]), "b": jnp.sum(dy, axis=0)}
        return dparams, dy @ params["w"].T

    def curvature(params, x, d2y):
        """d2w = (x^2)^T d2y, d2b = sum_batch d2y, d2x = d2y (w^2)^T."""
        check_gradient(name, d2y, (x.shape[0], params["w"].shape[1]), "d2y")
        return backward({"w": params["w"] ** 2}, x**2, d2y)

    def factors(params, x, dy):
        """Example n's dw = x_n^T dy_n and db = 1^T dy_n: one outer product each (T = 1)."""
        return {"w": Factors(x[:, None, :], dy[:, None, :]),
                "b": Factors(jnp.ones((x.shape[0], 1, 1), dy.dtype), dy[:, None, :])}

    def tangent(params, x, dparams, dx):
        """dy = x @ dw + db + dx @ w (y is linear in w and b, and in x)."""
        y, _ = forward(params, x)
        check_direction(name, "dparams", dparams, params, "params")
        check_direction(name, "dx", dx, x, "x")
        dy = x @ dparams["w"] + dparams["b"][None, :]
        return y, dy if dx is None else dy + dx @ params["w"]

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        """The backward's products, each moved in both factors: R{dw} = v_x^T g_y +
        x^T R{g_y}, R{db} = sum_batch R{g_y}, R{dx} = R{g_y} w^T + g_y v_w^T."""
        check_input(name, x, (-1, params["w"].shape[0]))
        check_direction(name, "v_params", v_params, params, "params")
        check_direction(name, "v_x", v_x, x, "x")
        g_params, g_x = backward(params, x, g_y)
        r_g_params, r_g_x = backward(params, x, r_g_y)
        if v_x is not None:
            r_g_params["w"] = r_g_params["w"] + weight_gradient(v_x, g_y, params["w"])
        return g_params, g_x, r_g_params, r_g_x + g_y @ v_params["w"].T

    return Layer(name, init, forward, backward, curvature=curvature, factors=factors,
                 tangent=tangent, backward_tangent=backward_tangent)


def Embedding(
    vocabulary: int,
    features: int,
    w_init: initializers.Initializer | None = None,
    name: str = "Embedding",
) -> Layer:
    """A learned vector per token: y[..., :] = w[ids[...], :] (the one-hot product without it).

    Shapes: ids integers (batch, ...) in [0, vocabulary), w (vocabulary, features), y (batch,
    ..., features). The same function as a bias-free Dense on one-hot rows, at the cost of a
    gather rather than a product with the vocabulary. w_init defaults to Glorot uniform on
    (vocabulary, features), the Dense-on-one-hot's init.
    Backward: dw[v] = sum of dy over the positions whose id is v (a scatter-add); the ids get
    no gradient (dx is float0 zeros, as `jax.grad(..., allow_int=True)` gives an integer
    input). Curvature: d2w[v] = the sum of d2y at those positions, exact, since each output is
    one weight times 1.
    An id outside [0, vocabulary) cannot be caught at trace time: its row of y is NaN (not
    the nearest valid row, nor for -1 the last, as a plain gather would give) and it adds
    nothing to dw.
    """
    for argument, value in (("vocabulary", vocabulary), ("features", features)):
        if not is_count(value):
            raise ValueError(f"{name}: {argument} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name}: {argument} must be >= 1, got {value}")
    w_init = w_init or initializers.glorot_uniform()

    def init(key, input_shape):
        if len(input_shape) < 1:
            raise ValueError(f"{name}: input_shape {tuple(input_shape)} must be (batch, ...)")
        return (*input_shape, features), {"w": w_init(key, (vocabulary, features))}

    def rows_of(ids):
        """ids, with every id outside [0, vocabulary) (negative ones too) set to vocabulary,
        a row that the gather fills with NaN and the scatter drops."""
        return jnp.where((ids >= 0) & (ids < vocabulary), ids, vocabulary)

    def gather(w, ids, fill_value):
        """w's rows at ids, fill_value where an id is outside the vocabulary; split along the
        batch as ids are over an Explicit mesh axis."""
        if is_split(ids):
            return w.at[rows_of(ids)].get(mode="fill", fill_value=fill_value,
                                          out_sharding=batch_sharding(ids))
        return jnp.take(w, rows_of(ids), axis=0, mode="fill", fill_value=fill_value)

    def forward(params, ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name}: input ids must be integers in [0, {vocabulary}), got "
                             f"dtype {ids.dtype} with shape {tuple(ids.shape)}")
        return gather(params["w"], ids, jnp.nan), ids

    def backward(params, ids, dy):
        check_gradient(name, dy, (*ids.shape, params["w"].shape[1]))
        zeros = jnp.zeros_like(params["w"])
        if is_split(ids):  # the batch's scatter-add summed into w's layout
            dw = zeros.at[rows_of(ids)].add(dy, mode="drop",
                                            out_sharding=product_sharding(ids, params["w"]))
        else:
            dw = zeros.at[rows_of(ids).reshape(-1)].add(dy.reshape(-1, dy.shape[-1]),
                                                        mode="drop")
        return {"w": dw}, np.zeros(ids.shape, jax.dtypes.float0)

    def tangent(params, ids, dparams, dx):
        """dy = dw[ids] (ids are integers: nothing moves them, and dx is None)."""
        y, _ = forward(params, ids)
        check_direction(name, "dparams", dparams, params, "params")
        return y, gather(dparams["w"], ids, 0)

    def backward_tangent(params, ids, v_params, v_x, g_y, r_g_y):
        """dw is linear in dy for fixed ids: R{dw} = the scatter-add of R{dy}."""
        g_params, g_x = backward(params, ids, g_y)
        return g_params, g_x, backward(params, ids, r_g_y)[0], g_x

    return Layer(name, init, forward, backward, curvature=backward, tangent=tangent,
                 backward_tangent=backward_tangent)


def EuclideanRBF(centres, name: str = "rbf") -> Layer:
    """Euclidean radial basis units with fixed centres: LeNet-5's output layer.

    y_i = sum_j (x_j - c_ij)^2, the squared distance from the input to centre i, is the
    "penalty" of class i (LeCun et al. 1998, eq. 7). The layer returns the scores s = -y, so
    that the largest output names the class, as with every other model here (metrics take the
    argmax); `nets.losses.lecun1998_map` is the paper's criterion on them. The centres are
    constants of the layer, not parameters: the paper sets them by hand and keeps them fixed
    (params is ()).

    Shapes: x (batch, features), centres (classes, features), s (batch, classes).
    Forward s = 2 x c^T - |x|^2 - |c|^2 (two products rather than the (batch, classes,
    features) differences).
    Backward ds_i/dx_j = -2 (x_j - c_ij), so dx = -2 (x sum_i ds_i - ds c).
    Curvature: the Gauss-Newton term 4 sum_i (x_j - c_ij)^2 d2s_i = 4 (x^2 sum_i d2s_i -
    2 x (d2s c) + d2s c^2), plus 2/m for the quadratic's own second derivative, d2y_i/dx_j^2 =
    2, weighted by sum_i dE/dy_i. Gauss-Newton alone would drop that term as it drops f'' of
    an activation, but here it is the whole curvature of the correct class's penalty: under
    the MAP criterion (or the paper's eq. 8, E = mean of y_D), which is linear in y_D, d2s is
    q (1 - q)/m and vanishes while the classes' scores are far apart, and SDLM's steps
    eta/(mu + h) would then ignore the quadratic y_D. sum_i dE/dy_i = (1 - sum_i q_i)/m lies in
    [0, 1/m] for a loss averaged over m examples with one-hot targets (exactly 1/m for eq. 8);
    the layer cannot see q, and takes its bound 1/m, as treating the F6 outputs as regressed
    onto the correct centre by squared error would (the positive diagonal SDLM needs).
    """
    centres = np.asarray(centres)
    if centres.ndim != 2 or 0 in centres.shape:
        raise ValueError(f"{name}: centres must be a non-empty (classes, features) array, got "
                         f"shape {centres.shape}")
    if not np.isfinite(centres).all():
        raise ValueError(f"{name}: centres must be finite")
    classes, features = centres.shape

    def init(key, input_shape):
        del key
        if len(input_shape) != 2 or input_shape[-1] != features:
            raise ValueError(f"{name}: input_shape {tuple(input_shape)} must be (batch, "
                             f"{features})")
        return (input_shape[0], classes), ()

    def forward(params, x):
        del params
        check_input(name, x, (-1, features))
        c = jnp.asarray(centres, x.dtype)
        s = 2 * (x @ c.T) - jnp.sum(x**2, axis=1, keepdims=True) - jnp.sum(c**2, axis=1)[None, :]
        return s, x

    def backward(params, x, ds):
        del params
        check_gradient(name, ds, (x.shape[0], classes))
        c = jnp.asarray(centres, x.dtype)
        return (), -2 * (x * jnp.sum(ds, axis=1, keepdims=True) - ds @ c)

    def curvature(params, x, d2s):
        del params
        check_gradient(name, d2s, (x.shape[0], classes), "d2y")
        c = jnp.asarray(centres, x.dtype)
        gauss_newton = 4 * (x**2 * jnp.sum(d2s, axis=1, keepdims=True) - 2 * x * (d2s @ c)
                            + d2s @ c**2)
        return (), gauss_newton + 2 / x.shape[0]

    def tangent(params, x, dparams, dx):
        """ds = 2 dx c^T - 2 (x . dx) (no parameters: dparams is ())."""
        s, _ = forward(params, x)
        check_direction(name, "dx", dx, x, "x")
        if dx is None:
            return s, None
        c = jnp.asarray(centres, x.dtype)
        return s, 2 * (dx @ c.T) - 2 * jnp.sum(x * dx, axis=1, keepdims=True)

    def backward_tangent(params, x, v_params, v_x, g_s, r_g_s):
        """R{dx} = -2 (x sum_i R{ds_i} - R{ds} c) - 2 v_x sum_i ds_i (the quadratic's own
        second derivative, 2 per unit, times the gradient)."""
        check_input(name, x, (-1, features))
        check_direction(name, "v_x", v_x, x, "x")
        _, g_x = backward(params, x, g_s)
        _, r_g_x = backward(params, x, r_g_s)
        if v_x is not None:
            r_g_x = r_g_x - 2 * v_x * jnp.sum(g_s, axis=1, keepdims=True)
        return (), g_x, (), r_g_x

    return Layer(name, init, forward, backward, curvature=curvature, tangent=tangent,
                 backward_tangent=backward_tangent)


def elementwise(
    function: Callable[[jax.Array], jax.Array],
    derivative: Callable[[jax.Array], jax.Array],
    *,
    of: str = "output",
    second_derivative: Callable[[jax.Array], jax.Array] | None = None,
    piecewise_linear: bool = False,
    name: str = "elementwise",
) -> Layer:
    """A parameter-free layer y = f(x), applied entry by entry, from f and its derivative.

    of="output": `derivative(y)` gives f'(x) from the output (f invertible: sigmoid's
    y (1 - y)), and the residual is y; of="input": `derivative(x)`, and the residual is x.
    `second_derivative` gives f''(x) from the same (optional; without it the layer has no
    backward_tangent); `piecewise_linear=True` says f'' = 0 wherever it is defined (ReLU),
    and the backward_tangent then skips the term rather than multiply by zeros.
    backward: dx = dy * f'(x); curvature (Gauss-Newton, f'' dropped): d2x = d2y * f'(x)^2;
    tangent: dy = f'(x) dx; backward_tangent: R{dx} = R{dy} f'(x) + dy f''(x) R{x}.
    Shapes: any; y, dx and d2x have x's shape and dtype.
    """
    if of not in ("output", "input"):
        raise ValueError(f"{name}: of must be 'output' or 'input', got {of!r}")
    keeps_output = of == "output"

    def init(key, input_shape):
        del key
        return tuple(input_shape), ()

    def forward(params, x):
        del params
        y = function(x)
        return y, (y if keeps_output else x)

    def backward(params, kept, dy):
        del params
        check_gradient(name, dy, kept.shape)
        return (), dy * derivative(kept)

    def curvature(params, kept, d2y):
        del params
        check_gradient(name, d2y, kept.shape, "d2y")
        return (), d2y * derivative(kept) ** 2

    def tangent(params, x, dparams, dx):
        """dy = f'(x) dx: the Jacobian is diagonal, so this is backward's product."""
        y, kept = forward(params, x)
        check_direction(name, "dx", dx, x, "x")
        return y, None if dx is None else dx * derivative(kept)

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        """g_x = g_y f'(x); R{g_x} = R{g_y} f'(x) + g_y f''(x) v_x."""
        _, kept = forward(params, x)
        check_direction(name, "v_x", v_x, x, "x")
        check_gradient(name, g_y, x.shape)
        check_gradient(name, r_g_y, x.shape, "R{dy}")
        slope = derivative(kept)
        r_g_x = r_g_y * slope
        if v_x is not None and not piecewise_linear:
            r_g_x = r_g_x + g_y * second_derivative(kept) * v_x
        return (), g_y * slope, (), r_g_x

    if piecewise_linear and second_derivative is not None:
        raise ValueError(f"{name}: a piecewise linear f has f'' = 0; give no second_derivative")
    has_second = piecewise_linear or second_derivative is not None
    return Layer(name, init, forward, backward, curvature=curvature, tangent=tangent,
                 backward_tangent=backward_tangent if has_second else None)


def Sigmoid(name: str = "Sigmoid") -> Layer:
    """Logistic unit y = 1 / (1 + exp(-x)); backward: dx = dy * y * (1 - y) (the lecture's);
    f''(x) = y (1 - y) (1 - 2 y)."""
    return elementwise(jax.nn.sigmoid, lambda y: y * (1 - y),
                       second_derivative=lambda y: y * (1 - y) * (1 - 2 * y), name=name)


def Tanh(name: str = "Tanh") -> Layer:
    """y = tanh(x); backward: dx = dy * (1 - y^2); f''(x) = -2 y (1 - y^2)."""
    return elementwise(jnp.tanh, lambda y: 1 - y * y,
                       second_derivative=lambda y: -2 * y * (1 - y * y), name=name)


def Relu(name: str = "Relu") -> Layer:
    """y = max(x, 0); backward: dx = dy * [y > 0] (the subgradient at 0 is taken as 0);
    f'' = 0."""
    return elementwise(jax.nn.relu, lambda y: (y > 0).astype(y.dtype),
                       piecewise_linear=True, name=name)


def Identity(name: str = "Identity") -> Layer:
    """y = x; backward: dx = dy; f'' = 0."""
    return elementwise(lambda x: x, jnp.ones_like, piecewise_linear=True, name=name)


def LeakyRelu(negative_slope: float = 0.01, name: str = "LeakyRelu") -> Layer:
    """y = x for x >= 0, a x below (a = negative_slope > 0; a = 0 is `Relu`); backward:
    dx = dy for y >= 0, a dy below (jax.nn.leaky_relu's derivative 1 at x = 0); f'' = 0."""
    slope = _positive(name, "negative_slope", negative_slope)
    return elementwise(lambda x: jax.nn.leaky_relu(x, slope),
                       lambda y: jnp.where(y >= 0, 1.0, slope).astype(y.dtype),
                       piecewise_linear=True, name=name)


def Elu(alpha: float = 1.0, name: str = "Elu") -> Layer:
    """y = x for x > 0, alpha (exp(x) - 1) below (Clevert et al. 2015; alpha > 0); backward
    from the output: f'(x) = 1 for y > 0, alpha exp(x) = y + alpha below; f''(x) = 0 for
    y > 0, y + alpha below."""
    alpha = _positive(name, "alpha", alpha)
    return elementwise(lambda x: jax.nn.elu(x, alpha),
                       lambda y: jnp.where(y > 0, 1.0, y + alpha).astype(y.dtype),
                       second_derivative=lambda y: jnp.where(y > 0, 0.0, y + alpha).astype(
                           y.dtype), name=name)


def Softplus(name: str = "Softplus") -> Layer:
    """y = log(1 + exp(x)); backward from the output: f'(x) = sigmoid(x) = 1 - exp(-y),
    computed as -expm1(-y) so that it keeps its precision where y is tiny; f''(x) =
    sigmoid(x) (1 - sigmoid(x)) = -expm1(-y) exp(-y)."""
    return elementwise(jax.nn.softplus, lambda y: -jnp.expm1(-y),
                       second_derivative=lambda y: -jnp.expm1(-y) * jnp.exp(-y), name=name)


def Silu(name: str = "Silu") -> Layer:
    """y = x sigmoid(x) (SiLU, "swish"); not invertible, so the backward keeps x:
    f'(x) = s + x s (1 - s), s = sigmoid(x); f''(x) = s (1 - s) (2 + x (1 - 2 s))."""

    def derivative(x):
        s = jax.nn.sigmoid(x)
        return s * (1 + x * (1 - s))

    def second_derivative(x):
        s = jax.nn.sigmoid(x)
        return s * (1 - s) * (2 + x * (1 - 2 * s))

    return elementwise(jax.nn.silu, derivative, of="input",
                       second_derivative=second_derivative, name=name)


_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_GELU_CUBIC = 0.044715


def Gelu(approximate: bool = False, name: str = "Gelu") -> Layer:
    """y = x Phi(x) (Hendrycks and Gimpel 2016; Phi the standard normal CDF), or with
    approximate=True the tanh form 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
    (GPT-2's; `jax.nn.gelu`'s default). The backward keeps x:
        exact:   f'(x) = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
        tanh:    f'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) u',  u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    and the second derivatives
        exact:   f''(x) = phi(x) (2 - x^2)
        tanh:    f''(x) = (1 - t^2) (u' + 0.5 x (u'' - 2 t u'^2)),
                 u'' = sqrt(2/pi) 6 * 0.044715 x."""
    if not isinstance(approximate, bool):
        raise ValueError(f"{name}: approximate must be True or False, got {approximate!r}")

    def derivative(x):
        if approximate:
            t = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3))
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (
                1 + 3 * _GELU_CUBIC * x * x)
        cdf = 0.5 * jax.lax.erfc(-x * _SQRT_HALF)
        return cdf + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI

    def second_derivative(x):
        if approximate:
            t = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3))
            du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)
            d2u = _SQRT_2_OVER_PI * 6 * _GELU_CUBIC * x
            return (1 - t * t) * (du + 0.5 * x * (d2u - 2 * t * du * du))
        return jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI * (2 - x * x)

    return elementwise(lambda x: jax.nn.gelu(x, approximate=approximate), derivative,
                       of="input", second_derivative=second_derivative, name=name)


def _positive(layer_name: str, argument: str, value: float) -> float:
    if not (is_finite_number(value) and value > 0):
        raise ValueError(f"{layer_name}: {argument} must be a finite number > 0, got {value!r}")
    return float(value)


ACTIVATIONS: dict[str, Callable[..., Layer]] = {
    "sigmoid": Sigmoid, "tanh": Tanh, "relu": Relu, "identity": Identity,
    "leaky_relu": LeakyRelu, "elu": Elu, "softplus": Softplus, "silu": Silu, "gelu": Gelu,
    "gelu_tanh": lambda name="Gelu": Gelu(approximate=True, name=name),
}
"""The elementwise activations by name, each called with `name=` (`nets.mlp`,
`nets.residual_mlp` and `nets.transformer_lm` take these names); the parameters of
LeakyRelu (0.01) and Elu (1.0) are at their defaults."""


def linear_backward_tangent(forward: ForwardFn, backward: BackwardFn,
                            name: str | None = None) -> BackwardTangentFn:
    """The backward_tangent of a layer without parameters whose output is linear in x, or
    piecewise linear with pieces that an infinitesimal change does not switch (max pooling's
    maxima): the backward is then the same linear map of dy at x + t v_x, so R{dx} =
    backward(R{dy}). With the layer's `name`, v_params and v_x are checked to be shaped as
    params and x (`check_direction`), as a direct call's other directions are."""

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y):
        _, residuals = forward(params, x)
        if name is not None:
            check_direction(name, "v_params", v_params, params, "params")
            check_direction(name, "v_x", v_x, x, "x")
        _, g_x = backward(params, residuals, g_y)
        _, r_g_x = backward(params, residuals, r_g_y)
        return (), g_x, (), r_g_x

    return backward_tangent


def serial(*layers: Layer, name: str = "serial") -> Layer:
    """Compose layers: forward left to right, backward right to left, tangent (forward mode)
    left to right.

    params and residuals are tuples with one entry per layer. Stochastic when any layer is;
    its forward's key is then split into one key per stochastic layer (`layer_keys`).
    """
    if not layers:
        raise ValueError(f"{name}: needs at least one layer")

    def init(key, input_shape):
        params = []
        for layer, layer_key in zip(layers, jax.random.split(key, len(layers))):
            input_shape, layer_params = layer.init(layer_key, input_shape)
            params.append(layer_params)
        return input_shape, tuple(params)

    def forward_all(params, x, key=None):
        _check_param_count(name, params, len(layers))
        residuals = []
        for layer, layer_params, layer_key in zip(layers, params, layer_keys(layers, key)):
            x, layer_residuals = forward_with_key(layer, layer_params, x, layer_key)
            residuals.append(layer_residuals)
        return x, tuple(residuals)

    def backward_through(method):
        def run_backward(params, residuals, dy):
            _check_param_count(name, params, len(layers))
            if not isinstance(residuals, tuple) or len(residuals) != len(layers):
                found = len(residuals) if isinstance(residuals, tuple) else type(
                    residuals).__name__
                raise ValueError(f"{name}: residuals must hold {len(layers)} layer entries, "
                                 f"got {found}")
            dparams = []
            for layer, layer_params, layer_residuals in reversed(
                list(zip(layers, params, residuals))
            ):
                layer_dparams, dy = getattr(layer, method)(layer_params, layer_residuals, dy)
                dparams.append(layer_dparams)
            return tuple(reversed(dparams)), dy

        return run_backward

    def tangent(params, x, dparams, dx, key=None):
        _check_param_count(name, params, len(layers))
        _check_param_count(name, dparams, len(layers), "dparams")
        for layer, layer_params, layer_dparams, layer_key in zip(
                layers, params, dparams, layer_keys(layers, key)):
            x, dx = tangent_with_key(layer, layer_params, x, layer_dparams, dx, layer_key)
        return x, dx

    def tangent_backward(params, x, v_params, v_x, upstream, key=None):
        """Each layer's `tangent_backward_with_key` with the layers above it (and upstream at
        the top) as its upstream: the tangent passes left to right, the backward tangents
        right to left, each stochastic layer with its key both ways."""
        _check_param_count(name, params, len(layers))
        _check_param_count(name, v_params, len(layers), "v_params")
        keys = layer_keys(layers, key)
        g_params, r_g_params = [None] * len(layers), [None] * len(layers)

        def from_layer(i, x, v_x):
            if i == len(layers):
                return upstream(x, v_x)
            g_params[i], g_x, r_g_params[i], r_g_x = tangent_backward_with_key(
                layers[i], params[i], x, v_params[i], v_x,
                lambda y, v_y: from_layer(i + 1, y, v_y), keys[i])
            return g_x, r_g_x

        g_x, r_g_x = from_layer(0, x, v_x)
        return tuple(g_params), g_x, tuple(r_g_params), r_g_x

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y, key=None):
        return tangent_backward(params, x, v_params, v_x, lambda y, v_y: (g_y, r_g_y), key)

    has_curvature = all(layer.curvature is not None for layer in layers)
    has_tangent = all(layer.tangent is not None for layer in layers)
    has_backward_tangent = has_tangent and all(
        layer.backward_tangent is not None for layer in layers)
    return Layer(name, init, forward_all, backward_through("backward"), sublayers=tuple(layers),
                 curvature=backward_through("curvature") if has_curvature else None,
                 stochastic=any(layer.stochastic for layer in layers),
                 tangent=tangent if has_tangent else None,
                 backward_tangent=backward_tangent if has_backward_tangent else None,
                 tangent_backward=tangent_backward if has_backward_tangent else None)


def is_serial(model: Layer) -> bool:
    """Whether model was built by `serial` (its params then a tuple, one entry a sublayer)."""
    return model.forward.__qualname__.startswith("serial.")


def layer_outputs(model: Layer, params: Params, x: jax.Array) -> list[tuple[str, jax.Array]]:
    """[(name, output)] of every layer of a `serial` model for inputs x, in order (a layer's
    output is the next one's input; the last output is model.apply(params, x)).

    Stochastic layers run as when measuring (no key): dropout passes its input through.
    """
    if not is_serial(model):
        raise ValueError(f"layer_outputs: {model.name!r} is not a serial model")
    _check_param_count(model.name, params, len(model.sublayers))
    outputs = []
    for layer, layer_params in zip(model.sublayers, params):
        x = layer.apply(layer_params, x)
        outputs.append((layer.name, x))
    return outputs


COMBINES = ("concat", "sum")


def parallel(*branches: Layer, combine: str = "concat", name: str = "parallel") -> Layer:
    """Branches side by side on one input: y = [f_1(x), ..., f_n(x)] or f_1(x) + ... + f_n(x).

    Shapes: x (batch, ...); branch b maps x to (batch, ..., C_b). combine="concat" joins the
    outputs along the last axis (the other axes must agree; an Inception block),
    combine="sum" adds them (equal shapes; `residual` is the sum with the identity).
    params and the branches' residuals are tuples with one entry per branch; "concat" also
    keeps x, whose shape tells backward each branch's width C_b.
    Backward: branch b gets its slice of dy ("concat") or all of dy ("sum"), and since x fans
    out to every branch, dx = sum_b dx_b. Curvature (Gauss-Newton diagonal): the same, with
    d2x = sum_b d2x_b: the cross terms between branches are dropped like every off-diagonal
    term. Tangent: the branches' dy_b joined like their outputs. Stochastic when a branch
    is; the key is split into one per stochastic branch.
    """
    if not branches:
        raise ValueError(f"{name}: needs at least one branch")
    if combine not in COMBINES:
        raise ValueError(f"{name}: combine must be one of {COMBINES}, got {combine!r}")

    def joined_shape(shapes):
        shapes = [tuple(shape) for shape in shapes]
        if combine == "sum":
            if len(set(shapes)) != 1:
                raise ValueError(f"{name}: combine='sum' needs equal branch output shapes, got "
                                 f"{shapes}")
            return shapes[0]
        if len({shape[:-1] for shape in shapes}) != 1:
            raise ValueError(f"{name}: combine='concat' needs branch outputs equal in all but "
                             f"the last axis, got {shapes}")
        return (*shapes[0][:-1], sum(shape[-1] for shape in shapes))

    def init(key, input_shape):
        shapes, params = [], []
        for branch, branch_key in zip(branches, jax.random.split(key, len(branches))):
            shape, branch_params = branch.init(branch_key, input_shape)
            shapes.append(shape)
            params.append(branch_params)
        return joined_shape(shapes), tuple(params)

    def forward(params, x, key=None):
        _check_param_count(name, params, len(branches))
        outputs, residuals = [], []
        for branch, branch_params, branch_key in zip(branches, params,
                                                     layer_keys(branches, key)):
            y, branch_residuals = forward_with_key(branch, branch_params, x, branch_key)
            outputs.append(y)
            residuals.append(branch_residuals)
        joined_shape([y.shape for y in outputs])
        y = jnp.concatenate(outputs, axis=-1) if combine == "concat" else sum_all(outputs)
        return y, (tuple(residuals), x if combine == "concat" else None)

    def split(params, x, dy):
        """dy's share of each branch: its slice along the last axis, or all of it."""
        if combine == "sum":
            return [dy] * len(branches)
        widths = [jax.eval_shape(branch.apply, branch_params, x).shape[-1]
                  for branch, branch_params in zip(branches, params)]
        return split_by(widths, dy)

    def backward_through(method):
        def run_backward(params, residuals, dy):
            branch_residuals, x = residuals
            dparams, dxs = [], []
            for branch, branch_params, residual_b, dy_b in zip(
                    branches, params, branch_residuals, split(params, x, dy)):
                dparams_b, dx_b = getattr(branch, method)(branch_params, residual_b, dy_b)
                dparams.append(dparams_b)
                dxs.append(dx_b)
            return tuple(dparams), sum_all(dxs)

        return run_backward

    def join(pairs):
        """The branches' (y_b, dy_b) joined as the outputs are (dy None if every dy_b is)."""
        outputs = [y for y, _ in pairs]
        joined_shape([y.shape for y in outputs])
        if all(dy is None for _, dy in pairs):
            return (jnp.concatenate(outputs, axis=-1) if combine == "concat"
                    else sum_all(outputs)), None
        moved = [dy if dy is not None else jnp.zeros_like(y) for y, dy in pairs]
        if combine == "concat":
            return jnp.concatenate(outputs, axis=-1), jnp.concatenate(moved, axis=-1)
        return sum_all(outputs), sum_all(moved)

    def tangent(params, x, dparams, dx, key=None):
        """Each branch's (y_b, dy_b) on the same (x, dx), joined as the outputs are."""
        _check_param_count(name, params, len(branches))
        _check_param_count(name, dparams, len(branches), "dparams")
        return join([tangent_with_key(branch, branch_params, x, branch_dparams, dx, branch_key)
                     for branch, branch_params, branch_dparams, branch_key in zip(
                         branches, params, dparams, layer_keys(branches, key))])

    def tangent_backward(params, x, v_params, v_x, upstream, key=None):
        """Each branch's tangent_backward on (x, v_x), nested: branch b's upstream runs the
        later branches' forwards, then upstream on the joined outputs, and hands each branch
        its share of (g_y, R{g_y}); so every forward runs before any backward, each once.
        g_x and R{g_x} summed over the branches, as x fans out to each."""
        _check_param_count(name, params, len(branches))
        _check_param_count(name, v_params, len(branches), "v_params")
        keys = layer_keys(branches, key)
        shares, parts = [], [None] * len(branches)

        def from_branch(b, pairs):
            if b == len(branches):
                g_y, r_g_y = upstream(*join(pairs))
                widths = [y.shape[-1] for y, _ in pairs]
                shares.extend(zip(split_by(widths, g_y), split_by(widths, r_g_y)))
                return

            def above(y_b, v_y_b):
                from_branch(b + 1, [*pairs, (y_b, v_y_b)])
                return shares[b]

            parts[b] = tangent_backward_with_key(branches[b], params[b], x, v_params[b], v_x,
                                                 above, keys[b])

        from_branch(0, [])
        return (tuple(part[0] for part in parts), sum_all([part[1] for part in parts]),
                tuple(part[2] for part in parts), sum_all([part[3] for part in parts]))

    def split_by(widths, dy):
        """dy's share of each branch (of these output widths): its slice, or all of it."""
        if combine == "sum":
            return [dy] * len(branches)
        return jnp.split(dy, np.cumsum(widths)[:-1].tolist(), axis=-1)

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y, key=None):
        return tangent_backward(params, x, v_params, v_x, lambda y, v_y: (g_y, r_g_y), key)

    has_curvature = all(branch.curvature is not None for branch in branches)
    has_tangent = all(branch.tangent is not None for branch in branches)
    has_backward_tangent = has_tangent and all(
        branch.backward_tangent is not None for branch in branches)
    return Layer(name, init, forward, backward_through("backward"), sublayers=tuple(branches),
                 curvature=backward_through("curvature") if has_curvature else None,
                 stochastic=any(branch.stochastic for branch in branches),
                 tangent=tangent if has_tangent else None,
                 backward_tangent=backward_tangent if has_backward_tangent else None,
                 tangent_backward=tangent_backward if has_backward_tangent else None)


def residual(block: Layer, name: str = "residual") -> Layer:
    """y = x + block(x) (He et al. 2016): `parallel(Identity(), block, combine="sum")`.

    block must keep the shape of x. params is ((), block's params); backward: dx = dy + the
    block's dx.
    """
    return parallel(Identity(name=f"{name}_identity"), block, combine="sum", name=name)


def remat(layer: Layer, name: str | None = None) -> Layer:
    """`layer` keeping only its input for the backward pass, which runs the layer's forward
    again to get the rest (gradient checkpointing, or rematerialisation: Griewank 1992; Chen
    et al. 2016). The same params, outputs, gradients and curvature; residuals (x, key)
    instead of the layer's; one more forward pass in the backward. Wrap blocks of several
    layers (a `serial`), whose inner residuals are then never kept. The tangent and
    backward_tangent are the layer's own (they keep nothing between calls).

    The second forward and the backward run as one `lax.cond` whose two branches are both
    that same function, so the predicate changes nothing. A conditional runs only once all
    its operands, dy among them, exist, and XLA does not merge what is inside it with what
    is outside. Without it, XLA:CPU ran every block's second forward as soon as its input
    existed, during the first forward, and kept the results. With an optimization barrier
    on (x, dy) instead, it still did. The predicate comes from the params, which vmap over
    examples does not batch; a batched one (vmap over params, as random restarts do) makes
    the cond compute both branches, the same values at twice the cost. A stochastic layer's
    forward gets the same key again, so dropout draws the same masks.
    """
    name = name or layer.name

    def forward(params, x, key=None):
        y, _ = forward_with_key(layer, params, x, key)
        return y, (x, key)

    def backward_through(method):
        def again_then_back(params, x, key, dy):
            _, layer_residuals = forward_with_key(layer, params, x, key)
            return getattr(layer, method)(params, layer_residuals, dy)

        def run_backward(params, residuals, dy):
            x, key = residuals
            return jax.lax.cond(_unfoldable_true(params, x), again_then_back, again_then_back,
                                params, x, key, dy)

        return run_backward

    return Layer(name, layer.init, forward, backward_through("backward"),
                 sublayers=layer.sublayers,
                 curvature=None if layer.curvature is None else backward_through("curvature"),
                 stochastic=layer.stochastic, factors=layer.factors, tangent=layer.tangent,
                 backward_tangent=layer.backward_tangent)


def plain_layers(model: Layer, params: Params, prefix: tuple = ()):
    """(layer, its params, the pytree path of those params in `params`) for every plain layer
    of `model`, in order: combinators (layers with `sublayers`) are descended into. A
    combinator's params must hold one entry per sublayer (ValueError): zip cut params of
    another number of layers short, silently."""
    if model.sublayers:
        _check_param_count(model.name, params, len(model.sublayers))
        for index, (layer, layer_params) in enumerate(zip(model.sublayers, params)):
            yield from plain_layers(layer, layer_params,
                                    prefix + (jax.tree_util.SequenceKey(index),))
        return
    yield model, params, prefix


def tie(model: Layer, source: tuple[str, str], target: tuple[str, str],
        transpose: bool = False, name: str | None = None) -> Layer:
    """`model` with one parameter used in two places: the leaf `target` = (layer name,
    parameter name) is not a parameter any more but `source`'s value (transposed if
    `transpose`), e.g. a language model's output weights tied to its token embedding (Press
    and Wolf 2017): tie(model, ("embed", "w"), ("output", "w"), transpose=True).

    params: the model's, without the target's entry (params or a direction holding it, the
    untied model's, are a ValueError: the entry was overwritten silently). Forward: the model's,
    with the target filled in from the source. Backward: the model's, and since the shared value
    is used twice, its gradient is the sum of both uses, d source + d target (transposed back);
    the curvature pass sums the two diagonals the same way (a shared weight's rule, as for a
    convolution's). The names, the engines and the reports see one parameter.
    """
    name = name or model.name
    if source == target:
        raise ValueError(f"{name}: source and target are the same parameter {source}")

    def path_of(params, layer_name, param_name, must_exist=True):
        found = [path for layer, _, path in plain_layers(model, params)
                 if layer.name == layer_name]
        names = [layer.name for layer, _, _ in plain_layers(model, params)]
        if len(found) != 1:
            raise ValueError(f"{name}: {len(found)} layers are named {layer_name!r} (one is "
                             f"needed); the layers are {names}")
        path = found[0] + tuple(jax.tree_util.DictKey(key) for key in param_name.split("."))
        if must_exist and _leaf_at(params, path) is None:
            raise ValueError(f"{name}: layer {layer_name!r} has no parameter {param_name!r}")
        return path

    def shared(value):
        return value.T if transpose else value

    def init(key, input_shape):
        output_shape, params = model.init(key, input_shape)
        source_path = path_of(params, *source)
        target_path = path_of(params, *target)
        source_shape = shared(_leaf_at(params, source_path)).shape
        target_shape = _leaf_at(params, target_path).shape
        if source_shape != target_shape:
            raise ValueError(f"{name}: {source[0]}.{source[1]} gives shape {source_shape}"
                             f"{' transposed' if transpose else ''}, but {target[0]}."
                             f"{target[1]} has shape {target_shape}")
        return output_shape, _with_leaf(params, target_path, None)

    def filled(params):
        value = _leaf_at(params, path_of(params, *source))
        return _with_leaf(params, path_of(params, *target, must_exist=False), shared(value))

    def untied(params, what="params"):
        """params (or a direction) as the tied params hold them, without the target, filled
        in: a target left in them (the untied model's params, or one of its directions) would
        be overwritten with the source's value silently."""
        if _leaf_at(params, path_of(params, *target, must_exist=False)) is not None:
            raise ValueError(f"{name}: {what} holds {target[0]}.{target[1]}, which is tied to "
                             f"{source[0]}.{source[1]}; expected the tied params' entries, "
                             "without it (the source's value is used in both places)")
        return filled(params)

    def forward(params, x, key=None):
        return forward_with_key(model, untied(params), x, key)

    def folded(dparams):
        """The target's gradient added to the source's, the target's entry None again."""
        target_path = path_of(dparams, *target)
        source_path = path_of(dparams, *source)
        from_target = shared(_leaf_at(dparams, target_path))
        dparams = _with_leaf(dparams, target_path, None)
        return _with_leaf(dparams, source_path, _leaf_at(dparams, source_path) + from_target)

    def backward_through(method):
        def run_backward(params, residuals, dy):
            dparams, dx = getattr(model, method)(untied(params), residuals, dy)
            return folded(dparams), dx

        return run_backward

    def tangent(params, x, dparams, dx, key=None):
        """The model's tangent with the target filled in both params and dparams: a direction
        moves the shared value in both of its places."""
        return tangent_with_key(model, untied(params), x, untied(dparams, "dparams"), dx, key)

    def backward_tangent(params, x, v_params, v_x, g_y, r_g_y, key=None):
        """The model's, with the target filled in params and v_params, and both the gradient
        and its tangent folded onto the source."""
        g_params, g_x, r_g_params, r_g_x = backward_tangent_with_key(
            model, untied(params), x, untied(v_params, "v_params"), v_x, g_y, r_g_y, key)
        return folded(g_params), g_x, folded(r_g_params), r_g_x

    return Layer(name, init, forward, backward_through("backward"), sublayers=model.sublayers,
                 curvature=None if model.curvature is None else backward_through("curvature"),
                 stochastic=model.stochastic,
                 tangent=None if model.tangent is None else tangent,
                 backward_tangent=None if model.backward_tangent is None else backward_tangent)


def _leaf_at(tree: Params, path: tuple) -> Any:
    """The entry of nested tuples and dicts at a pytree path; None where a key is absent."""
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            if not isinstance(tree, dict) or key.key not in tree:
                return None
            tree = tree[key.key]
        else:
            tree = tree[key.idx]
    return tree


def _with_leaf(tree: Params, path: tuple, value: Any) -> Params:
    """A copy of nested tuples and dicts with the entry at `path` set to value (removed from
    its dict where value is None)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(key, jax.tree_util.DictKey):
        updated = dict(tree)
        inner = _with_leaf(tree.get(key.key, {}), rest, value)
        if inner is None:
            updated.pop(key.key, None)
        else:
            updated[key.key] = inner
        return updated
    items = list(tree)
    items[key.idx] = _with_leaf(items[key.idx], rest, value)
    return type(tree)(items)


def _unfoldable_true(params: Params, x: jax.Array) -> jax.Array:
    """A scalar that is True, or False only where a NaN is read, and that XLA cannot
    compute at compile time: whether the first entry of params' first nonempty leaf (of x,
    for a layer without params) equals itself."""
    first = next((leaf for leaf in jax.tree.leaves(params) if leaf.size), x).reshape(-1)[0]
    return first == first


def sum_all(arrays: list[jax.Array]) -> jax.Array:
    """The elementwise sum of equally shaped arrays."""
    total = arrays[0]
    for array in arrays[1:]:
        total = total + array
    return total


def _check_param_count(name: str, params: Params, expected: int, what: str = "params") -> None:
    if not isinstance(params, (tuple, list)) or len(params) != expected:
        found = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
        raise ValueError(f"{name}: {what} must hold {expected} layer entries, got {found}")
