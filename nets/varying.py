"""The mesh axes a value varies over inside `jax.shard_map`, or is split over under Explicit
mesh axes: what hand-written code needs so that it runs in both as `jax.grad` does.

Under `jax.shard_map(..., check_vma=True)`, JAX's default, every value is typed by the mesh
axes over which it differs from device to device (`jax.typeof(x)`: `{V:batch}` for a batch
split over the axis "batch"; a replicated parameter varies over none). Two consequences for
code that is not `jax.grad`:

- A `lax.scan` carry must keep its type: a carry that starts from zeros (varying over no
  axis) and comes back varying over "batch" is a TypeError. `vary_like` gives the initial
  carry the axes that the scan's inputs vary over (`nets.recurrent`'s scans).
- `jax.grad` of a replicated parameter through values that vary over an axis sums the
  gradient over that axis (the transpose of making the parameter varying is a psum), so the
  gradient has its parameter's type. A hand-written backward computes each device's own
  gradient; `sum_over_added_axes` sums it over the axes it varies over and its parameter
  does not, so that the manual engines return what `jax.grad` returns (`nets.engines`).

Outside `shard_map`, and under `check_vma=False`, nothing varies and every function here
returns its input unchanged.

Under `jax.jit` with a mesh of Explicit axes (`jax.set_mesh`, `jax.sharding.AxisType.
Explicit`) every value's type names the mesh axes it is split over (`float32[8@batch,4]`),
and a product that contracts a split axis (a weight gradient x^T dy over a split batch) must
say how its result is laid out. `product_sharding` gives the layout of the parameter it is
the gradient of, as `jax.grad`'s transpose does; with no axis split (Auto axes, shard_map,
one device) it gives None, which changes nothing. `batch_product` is such a product with a
replicated result; `split_like` lays a state that starts from zeros (a scan's carry) out
along the batch as the inputs are, so that it keeps its type through the scan;
`reshape_keeping_batch` and `batch_sharding` give a reshape or a gather the layout JAX asks
for. Every layout is built on the operand's own mesh, so no `jax.set_mesh` is needed.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["varying_axes", "vary_like", "sum_over_added_axes", "is_split",
           "product_sharding", "batch_product", "split_like", "reshape_keeping_batch",
           "batch_sharding"]


def _axes_of(leaf: Any) -> frozenset:
    aval = jax.typeof(leaf)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def varying_axes(tree: Any) -> frozenset:
    """The mesh axes over which any leaf of tree varies (empty outside shard_map)."""
    return functools.reduce(frozenset.union, map(_axes_of, jax.tree.leaves(tree)), frozenset())


def vary_like(tree: Any, axes: Any) -> Any:
    """tree with every leaf also varying over `axes` (mesh axis names; the same values:
    `lax.pcast`)."""
    axes = frozenset(axes)

    def cast(leaf):
        missing = tuple(sorted(axes - _axes_of(leaf)))
        return lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree)


def sum_over_added_axes(cotangents: Any, primals: Any) -> Any:
    """Each cotangent leaf summed (`lax.psum`) over the axes it varies over and its primal
    leaf (the same structure) does not: the gradient of a replicated parameter summed over
    the devices, as `jax.grad` sums it."""
    def total(cotangent, primal):
        added = tuple(sorted(_axes_of(cotangent) - _axes_of(primal)))
        return lax.psum(cotangent, added) if added else cotangent

    return jax.tree.map(total, cotangents, primals)


def is_split(x: Any) -> bool:
    """Whether x's type names a mesh axis it is split over (only under Explicit axes)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    return any(axis is not None for axis in getattr(sharding, "spec", ()))


def product_sharding(operand: Any, like: Any):
    """The `out_sharding` of a product that contracts `operand`'s split axes into something
    laid out as `like` (a parameter): like's layout on operand's mesh where operand is split
    over an Explicit mesh axis (a constant like, on no mesh, gives a replicated result), else
    None (the product as it would be written without meshes)."""
    if not is_split(operand):
        return None
    return jax.sharding.NamedSharding(jax.typeof(operand).sharding.mesh,
                                      jax.typeof(like).sharding.spec)


def batch_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T b = sum_n a_n^T b_n over the leading (batch) axis of a (batch, i) and b (batch, j):
    (i, j), replicated where the batch is split over an Explicit mesh axis (the parameters'
    layout of data parallelism)."""
    if not is_split(a):
        return a.T @ b
    replicated = jax.sharding.NamedSharding(jax.typeof(a).sharding.mesh,
                                            jax.sharding.PartitionSpec())
    return jnp.matmul(a.T, b, out_sharding=replicated)


def split_like(tree: Any, x: Any) -> Any:
    """tree's leaves (batch, ...) split along their batch axis as x's (batch, ...) is over
    Explicit mesh axes (`jax.sharding.reshard`); unchanged where x's batch is not split."""
    if not is_split(x):
        return tree
    return jax.tree.map(lambda leaf: jax.sharding.reshard(leaf, batch_sharding(x)), tree)


def reshape_keeping_batch(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x.reshape(shape), shape[0] x's batch, the result split along its batch as x is (JAX
    asks for the layout of a reshape of a split array)."""
    if not is_split(x):
        return x.reshape(shape)
    return jnp.reshape(x, shape, out_sharding=batch_sharding(x))


def batch_sharding(x: Any) -> jax.sharding.NamedSharding | None:
    """The layout of a (batch, ...) value split along its batch as x's (batch, ...) is over
    Explicit mesh axes, on x's mesh (no `jax.set_mesh` needed); None where x is not split."""
    if not is_split(x):
        return None
    sharding = jax.typeof(x).sharding
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
