"""Learning curves of many runs at once: random labelled subsets, vmapped inits and training.

A run is one seed's (params, key, training set); runs are stacked on a leading axis and trained
together by one vmapped, jitted program. Shapes: runs = the number of stacked runs, n = the
training examples of each run, features = the width of an input row, classes = the width of a
one-hot target row.

    keys = jax.random.split(jax.random.key(0), seeds)
    params = init_params(model, keys, features)                       # (seeds,) + params
    subset = labelled_subsets(x_train, y_train, 100, seeds, 0, classes=10)
    curve, seconds = learning_curves(model, objective, optimizer, params, keys, subset, test,
                                     updates=1500, batch_size=64, records=20)
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import nets
from training import data, metrics, procedures, timing

__all__ = ["passes_for", "labelled_subsets", "learning_curves", "init_params"]


def passes_for(updates: int, examples: int, batch_size: int, records: int) -> tuple[int, int]:
    """(passes per record, batch size): at least `updates` updates in `records` equal chunks.

    The batch is min(batch_size, examples); a pass over `examples` makes
    ceil(examples / batch) updates, and each chunk is a whole number of passes (at least one).
    Every argument must be >= 1 (ValueError).
    """
    for name, value in (("updates", updates), ("examples", examples),
                        ("batch_size", batch_size), ("records", records)):
        if value < 1:
            raise ValueError(f"passes_for: {name} must be >= 1, got {value}")
    batch = min(batch_size, examples)
    per_pass = math.ceil(examples / batch)
    return max(1, math.ceil(updates / (per_pass * records))), batch


def labelled_subsets(x_train, y_train, size, seeds, base_seed, *, classes):
    """(x, targets) of shape (seeds, size, ...) and (seeds, size, classes): a random subset of
    `size` examples per seed, without repeats, with one-hot targets.

    x_train: (n, ...); y_train: (n,) integer labels in 0..classes-1; 1 <= size <= n and
    seeds >= 1, else ValueError (as for labels and examples of different lengths). Seed s
    draws its subset from the numpy seed sequence [base_seed, s, size]: the same arguments
    give the same subsets.
    """
    if len(x_train) != len(y_train):
        raise ValueError(f"labelled_subsets: x_train has {len(x_train)} examples and y_train "
                         f"{len(y_train)} labels; expected one label per example")
    if seeds < 1:
        raise ValueError(f"labelled_subsets: seeds must be >= 1, got {seeds}")
    if not 1 <= size <= len(x_train):
        raise ValueError(f"labelled_subsets: size must be in [1, {len(x_train)}] (the examples "
                         f"given), got {size}")
    picks = [np.random.default_rng([base_seed, seed, size]).permutation(len(x_train))[:size]
             for seed in range(seeds)]
    return (jnp.asarray(np.stack([x_train[p] for p in picks])),
            jnp.asarray(np.stack([data.one_hot(y_train[p], classes) for p in picks])))


def learning_curves(model, objective, optimizer, params, keys, subset, test, *, updates,
                    batch_size, records):
    """Supervised training of one run per row of params, vmapped; errors along the way.

    params and keys have a leading run axis; subset = (x, targets) of shape (runs, n, ...), the
    training examples of each run; test = (x_test, targets_test), shared. Each run makes at
    least `updates` updates of min(batch_size, n) examples by `procedures.stochastic_passes`
    (shuffled passes), in `records` equal chunks, each followed by the train and test error:
    one jitted call. A model with BatchNorm layers is measured as at inference, with the
    statistics of its run's whole training set (`nets.with_population_statistics`).

    Returns ({"updates": [...], "train_error": (runs, records), "test_error": (runs, records)},
    {"compile": s, "run": s}).
    """
    (x, targets), (x_test, t_test) = subset, test
    if x_test.shape[0] != t_test.shape[0]:
        raise ValueError(f"learning_curves: the test set's x has shape {x_test.shape} and "
                         f"targets {t_test.shape}; expected as many targets as examples")
    passes, batch = passes_for(updates, x.shape[1], batch_size, records)

    def one(params, key, x, targets, x_test, t_test):
        procedure = procedures.stochastic_passes(model, objective, optimizer, x, targets,
                                                 batch_size=batch, shuffle=True)

        def chunk(state, record):
            state, _ = procedures.run_steps(procedure, state, record * passes, passes)
            measured = state.params
            if nets.batch_coupled_layers(model):
                measured = nets.with_population_statistics(model, measured, x)
            return state, (metrics.classification_error(model, measured, x, targets),
                           metrics.classification_error(model, measured, x_test, t_test))

        _, errors = jax.lax.scan(chunk, procedure.init(params, key), jnp.arange(records))
        return errors

    # The test set is an argument, not a constant of the program: XLA would try to fold it.
    (train_error, test_error), seconds = timing.compile_and_run(
        jax.vmap(one, in_axes=(0, 0, 0, 0, None, None)), params, keys, x, targets,
        jnp.asarray(x_test), jnp.asarray(t_test))
    updates_per_record = passes * math.ceil(x.shape[1] / batch)
    return ({"updates": [(r + 1) * updates_per_record for r in range(records)],
             "train_error": np.asarray(train_error), "test_error": np.asarray(test_error)},
            seconds)


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(model, keys, features):
    """model.init for each key, (runs,) + params: one jitted call, compiled once per model and
    shape (op by op, every random op of the init would be compiled on its own).

    keys: (runs,) typed PRNG keys; features: the width of an input row, (-1, features).
    """
    return jax.vmap(lambda key: model.init(key, (-1, features))[1])(keys)
