"""Shared test utilities: the tolerance lookup and random problems."""
import re

import jax
import jax.numpy as jnp
import pytest

from nets.gradcheck import TOLERANCES, relative_error


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
