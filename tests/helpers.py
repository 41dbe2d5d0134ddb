"""Shared test utilities: the tolerance lookup and random problems."""
import re

import jax
import jax.numpy as jnp
import pytest

from nets import gradcheck
from nets.gradcheck import TOLERANCES, relative_error
from nets.layers import Layer


def tolerance(dtype) -> float:
    """Manual vs jax.grad tolerance for dtype, from the one table in nets.gradcheck."""
    return TOLERANCES[jnp.dtype(dtype).name]["vs_autodiff"]


F64 = TOLERANCES["float64"]["vs_autodiff"]  # float64 against any exact reference


def assert_close_tree(actual, expected, dtype, what=""):
    """Every leaf pair within the relative tolerance of dtype; names the leaf on failure."""
    bound = tolerance(dtype)
    paths_actual = jax.tree_util.tree_flatten_with_path(actual)[0]
    leaves_expected = jax.tree.leaves(expected)
    assert len(paths_actual) == len(leaves_expected), f"{what}: tree structures differ"
    for (path, a), b in zip(paths_actual, leaves_expected):
        assert a.shape == b.shape, f"{what}{jax.tree_util.keystr(path)}: shapes differ"
        error = relative_error(a, b)
        assert error <= bound, f"{what}{jax.tree_util.keystr(path)}: rel err {error:.3e} > {bound}"


def random_batch(key, batch, features, classes, dtype):
    """x ~ N(0, 1) (batch, features) and one-hot targets (batch, classes)."""
    x_key, y_key = jax.random.split(key)
    x = jax.random.normal(x_key, (batch, features), dtype)
    labels = jax.random.randint(y_key, (batch,), 0, classes)
    return x, jax.nn.one_hot(labels, classes, dtype=dtype)


def backward_and_vjp(layer, params, x, dy):
    """In one jit: layer.backward's (dparams, dx), from its own forward's residuals, and
    jax.vjp's of layer.apply at the same point (the independent reference)."""

    @jax.jit
    def both(params, x, dy):
        _, residuals = layer.forward(params, x)
        _, pullback = jax.vjp(layer.apply, params, x)
        return layer.backward(params, residuals, dy), pullback(dy)

    return both(params, x, dy)


def assert_remat_matches_the_plain_model(model, plain, objective, args, what):
    """`model` (with `nets.remat` inside) against jax.grad of itself and against the same
    model unwrapped, `plain`, float64: the manual gradient equal to both, its curvature
    diagonal equal to plain's. args: (params, x, targets, key)."""
    from nets import engines

    @jax.jit
    def everything(*args):
        return (engines.manual(model, objective)(*args),
                engines.autodiff(model, objective)(*args),
                engines.manual(plain, objective)(*args),
                engines.curvature_diagonal(model, objective)(*args),
                engines.curvature_diagonal(plain, objective)(*args))

    manual, autodiff, unwrapped, curvature, plain_curvature = everything(*args)
    assert_close_tree(manual, autodiff, jnp.float64, f"{what} vs jax.grad")
    assert_close_tree(manual, unwrapped, jnp.float64, f"{what} vs unwrapped")
    assert_close_tree(curvature, plain_curvature, jnp.float64, f"{what}: curvature")


def assert_refused_before_the_run(main, tmp_path, argv, message):
    """An experiment's `main(["--workdir", tmp_path / "run", *argv])` raises a ConfigError
    whose text holds `message` (literally), and leaves no run directory behind: a refused
    config claims no workdir."""
    from training.config import ConfigError

    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape(message)):
        main(["--workdir", str(workdir), *argv])
    assert not workdir.exists()


def random_like(key, tree, dtype):
    leaves, structure = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(structure, [jax.random.normal(k, jnp.shape(leaf), dtype)
                                          for k, leaf in zip(keys, leaves)])


def random_layer_point(layer, input_shape, dtype, scale=1.0, seed=0, params=None, more=0):
    """(params, x, dparams, dx, keys): the layer's initial params moved by 0.5 N(0, 1) each
    (or the given ones) in dtype, x ~ scale N(0, 1) of input_shape, random directions of both,
    and `more` further keys split from the same seed. Initial params alone hid mistakes: a
    LayerNorm's gain starts at 1, so a backward that divided by it passed."""
    keys = jax.random.split(jax.random.key(seed), 5 + more)
    if params is None:
        params = layer.init(keys[0], (-1, *input_shape[1:]))[1]
        params = jax.tree.map(lambda p, d: p + 0.5 * d.astype(p.dtype), params,
                              random_like(keys[4], params, jnp.float64))
    params = gradcheck.astype(params, dtype)
    x = scale * jax.random.normal(keys[1], input_shape, dtype)
    dparams, dx = random_like(keys[2], params, dtype), jax.random.normal(keys[3], x.shape, dtype)
    return params, x, dparams, dx, keys[5:]


def assert_tangent_is_jvp(layer, input_shape, dtype, scale=1.0, seed=0, params=None):
    """layer.tangent against jax.jvp of layer.apply in params and x, and with dx None
    against jax.jvp with a zero dx, at random x, dparams and dx and the layer's moved initial (or
    the given) params."""
    params, x, dparams, dx, _ = random_layer_point(layer, input_shape, dtype, scale, seed,
                                                   params)

    @jax.jit
    def both(params, x, dparams, dx):
        return (layer.tangent(params, x, dparams, dx), layer.tangent(params, x, dparams, None),
                jax.jvp(layer.apply, (params, x), (dparams, dx)),
                jax.jvp(layer.apply, (params, x), (dparams, jnp.zeros_like(dx))))

    with jax.default_matmul_precision("highest"):
        (y, dy), (y_alone, dy_alone), (y_ref, dy_ref), (_, dy_alone_ref) = both(
            params, x, dparams, dx)
    bound = tolerance(dtype)
    assert max(gradcheck.relative_error(y, y_ref),
               gradcheck.relative_error(y_alone, y_ref)) <= bound
    assert dy.shape == y.shape and dy.dtype == y.dtype
    assert gradcheck.relative_error(dy, dy_ref) <= bound, layer.name
    if dy_alone is None:  # nothing but x moves the output
        assert not jax.tree.leaves(params) and float(jnp.max(jnp.abs(dy_alone_ref))) == 0
    else:
        assert gradcheck.relative_error(dy_alone, dy_alone_ref) <= bound, layer.name


def scale_layer(differentiate: str, name="scale"):
    """y = x * g, shapes x (batch, n), g (n,): its backward by `jax.vjp` of its apply
    (differentiate="vjp"), by `jax.linear_transpose` of apply in x and in g, which is linear
    in each ("linear_transpose": JAX's transposition without a jvp), or its tangent by
    `jax.jvp` ("jvp"), the other written by hand, a layer that cheats; None, both by hand.
    The same numbers every way."""

    def init(key, input_shape):
        del key
        return tuple(input_shape), {"g": jnp.full((input_shape[-1],), 1.5)}

    def apply(params, x):
        return x * params["g"][None, :]

    def forward(params, x):
        return apply(params, x), x

    def backward(params, x, dy):
        if differentiate == "vjp":
            _, pullback = jax.vjp(apply, params, x)
            return pullback(dy)
        if differentiate == "linear_transpose":
            (dx,) = jax.linear_transpose(lambda u: apply(params, u), x)(dy)
            (dparams,) = jax.linear_transpose(lambda p: apply(p, x), params)(dy)
            return dparams, dx
        return {"g": jnp.sum(dy * x, axis=0)}, dy * params["g"][None, :]

    def tangent(params, x, dparams, dx):
        if differentiate == "jvp":
            dx = jnp.zeros_like(x) if dx is None else dx
            return jax.jvp(apply, (params, x), (dparams, dx))
        moved = x * dparams["g"][None, :] + (0 if dx is None else dx * params["g"][None, :])
        return apply(params, x), moved

    return Layer(name, init, forward, backward, tangent=tangent)
