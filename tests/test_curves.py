"""training/curves.py: chunks of passes, labelled subsets, vmapped inits and learning curves."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets
from training import curves


@pytest.mark.parametrize("updates, examples, batch_size, records, expected", [
    # the pretraining experiment's defaults (1,500 updates of 64, 20 records): 1,520, 1,600
    # and 2,280 updates for 100, 500 and 7,291 labelled examples, as its docstring reports
    (1500, 100, 64, 20, (38, 64)),   # 2 batches a pass, ceil(1500 / 40) passes a record
    (1500, 500, 64, 20, (10, 64)),   # 8 a pass, ceil(1500 / 160)
    (1500, 7291, 64, 20, (1, 64)),   # 114 a pass: one pass a record already makes 2,280
    (100, 50, 64, 3, (34, 50)),      # the batch shrinks to the set: 1 a pass, ceil(100 / 3)
    (1, 10, 4, 5, (1, 4)),           # at least one pass a record
    (12, 12, 4, 1, (4, 4)),          # exactly: 3 a pass, 4 passes
])
def test_passes_for(updates, examples, batch_size, records, expected):
    passes, batch = curves.passes_for(updates, examples, batch_size, records)
    assert (passes, batch) == expected
    assert passes * -(-examples // batch) * records >= updates


def labelled_data(n=40, features=3, classes=4):
    x = np.arange(n * features, dtype=np.float32).reshape(n, features)
    y = np.arange(n, dtype=np.int32) % classes
    return x, y


def test_labelled_subsets_shapes_one_hot_rows_and_matching_labels():
    x_train, y_train = labelled_data()
    x, targets = curves.labelled_subsets(x_train, y_train, 7, 3, 0, classes=4)
    assert x.shape == (3, 7, 3) and targets.shape == (3, 7, 4)
    targets = np.asarray(targets)
    assert set(np.unique(targets)) == {0.0, 1.0}
    np.testing.assert_array_equal(targets.sum(axis=-1), 1)
    for seed in range(3):
        # each row is a training row (x_train's first column is 3 * its index), without
        # repeats, with its own label's one-hot target
        rows = np.asarray(x[seed][:, 0]).astype(int) // 3
        assert len(set(rows.tolist())) == 7
        np.testing.assert_array_equal(np.asarray(x[seed]), x_train[rows])
        np.testing.assert_array_equal(targets[seed].argmax(axis=-1), y_train[rows])


def test_labelled_subsets_are_reproducible_and_differ_across_seeds():
    x_train, y_train = labelled_data()
    first = curves.labelled_subsets(x_train, y_train, 10, 2, 5, classes=4)
    again = curves.labelled_subsets(x_train, y_train, 10, 2, 5, classes=4)
    other_base = curves.labelled_subsets(x_train, y_train, 10, 2, 6, classes=4)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0][0], first[0][1])  # the two seeds' subsets differ
    assert not np.array_equal(first[0], other_base[0])   # and change with the base seed
    # seed s's subset does not depend on how many seeds are drawn
    np.testing.assert_array_equal(
        curves.labelled_subsets(x_train, y_train, 10, 1, 5, classes=4)[0][0], first[0][0])


def test_labelled_subsets_use_the_number_of_classes_given():
    x_train, y_train = labelled_data(classes=3)
    _, targets = curves.labelled_subsets(x_train, y_train, 5, 1, 0, classes=7)
    assert targets.shape == (1, 5, 7)
    assert not np.asarray(targets)[..., 3:].any()


def test_init_params_is_model_init_per_key():
    model = nets.build_mlp(4, 3, hidden_layers=1, hidden_units=5)
    keys = jax.random.split(jax.random.key(0), 2)
    params = curves.init_params(model, keys, 4)
    for run in range(2):
        expected = model.init(keys[run], (-1, 4))[1]
        for leaf, reference in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(leaf[run], reference)
    assert not np.array_equal(params[0]["w"][0], params[0]["w"][1])


def separable_problem(key, n, features=4, classes=3):
    """x ~ N(0, 1) (n, features); the class is the argmax of the first `classes` features."""
    x = jax.random.normal(key, (n, features), jnp.float32)
    return x, jax.nn.one_hot(jnp.argmax(x[:, :classes], axis=-1), classes, dtype=jnp.float32)


@pytest.mark.standard_promotion  # optax.adam
def test_learning_curves_shapes_updates_and_errors_and_runs_are_independent():
    model = nets.build_mlp(4, 3, hidden_layers=1, hidden_units=8)
    keys = jax.random.split(jax.random.key(1), 2)
    params = curves.init_params(model, keys, 4)
    x0, t0 = separable_problem(jax.random.key(2), 16)
    x1, t1 = separable_problem(jax.random.key(3), 16)
    subset = (jnp.stack([x0, x1]), jnp.stack([t0, t1]))
    test = separable_problem(jax.random.key(4), 9)
    settings = dict(updates=60, batch_size=8, records=3)
    objective, optimizer = nets.lecture_objective(), optax.adam(0.05)
    curve, seconds = curves.learning_curves(model, objective, optimizer, params, keys, subset,
                                            test, **settings)
    # 2 batches a pass, ceil(60 / 6) = 10 passes a record
    assert curve["updates"] == [20, 40, 60]
    assert curve["train_error"].shape == curve["test_error"].shape == (2, 3)
    assert {"compile", "run"} <= set(seconds)
    for name, n in (("train_error", 16), ("test_error", 9)):
        errors = curve[name]
        assert np.all((errors >= 0) & (errors <= 1))
        np.testing.assert_allclose(errors * n, np.round(errors * n), atol=1e-6)  # k / n
    # the problem is separable: both runs fit most of their training set
    assert np.all(curve["train_error"][:, -1] <= 0.25)
    # the two runs are different computations (their own data, init and order) ...
    assert not np.array_equal(np.stack([curve["train_error"][0], curve["test_error"][0]]),
                              np.stack([curve["train_error"][1], curve["test_error"][1]]))
    # ... and run 1 alone gives the same curve as run 1 beside run 0: the vmapped runs do not mix
    alone, _ = curves.learning_curves(
        model, objective, optimizer, jax.tree.map(lambda p: p[1:], params), keys[1:],
        (subset[0][1:], subset[1][1:]), test, **settings)
    np.testing.assert_allclose(alone["train_error"], curve["train_error"][1:], atol=1e-6)
    np.testing.assert_allclose(alone["test_error"], curve["test_error"][1:], atol=1e-6)


@pytest.mark.standard_promotion  # optax.adam
def test_learning_curves_measure_batch_norm_nets_with_the_training_statistics():
    """With BatchNorm, each test digit is measured with the statistics of its run's training
    set: the error of a one-example test set (which batch statistics cannot normalise: a
    ValueError) is the mean error of the test examples measured one by one."""
    model = nets.build_mlp(4, 3, hidden_layers=1, hidden_units=8, batch_norm=True)
    keys = jax.random.split(jax.random.key(1), 1)
    params = curves.init_params(model, keys, 4)
    x, t = separable_problem(jax.random.key(2), 16)
    subset = (x[None], t[None])
    x_test, t_test = separable_problem(jax.random.key(4), 5)
    settings = dict(updates=20, batch_size=8, records=1)
    objective, optimizer = nets.lecture_objective(), optax.adam(0.05)
    whole, _ = curves.learning_curves(model, objective, optimizer, params, keys, subset,
                                      (x_test, t_test), **settings)
    one_by_one = [curves.learning_curves(model, objective, optimizer, params, keys, subset,
                                         (x_test[i:i + 1], t_test[i:i + 1]), **settings)[0]
                  for i in range(5)]
    assert whole["test_error"][0, 0] == pytest.approx(
        np.mean([curve["test_error"][0, 0] for curve in one_by_one]))
    assert {curve["train_error"][0, 0] for curve in one_by_one} == {whole["train_error"][0, 0]}


@pytest.mark.parametrize("call, message", [
    (lambda: curves.labelled_subsets(*labelled_data(), 41, 2, 0, classes=4),
     "labelled_subsets: size must be in [1, 40] (the examples given), got 41"),
    (lambda: curves.labelled_subsets(*labelled_data(), 0, 2, 0, classes=4),
     "labelled_subsets: size must be in [1, 40] (the examples given), got 0"),
    (lambda: curves.labelled_subsets(labelled_data()[0], labelled_data(n=50)[1], 10, 2, 0,
                                     classes=4),
     "labelled_subsets: x_train has 40 examples and y_train 50 labels; expected one label per "
     "example"),
    (lambda: curves.labelled_subsets(*labelled_data(), 10, 0, 0, classes=4),
     "labelled_subsets: seeds must be >= 1, got 0"),
    (lambda: curves.passes_for(100, 10, 5, 0), "passes_for: records must be >= 1, got 0"),
    (lambda: curves.passes_for(100, 10, 0, 2), "passes_for: batch_size must be >= 1, got 0"),
    (lambda: curves.passes_for(100, 0, 5, 2), "passes_for: examples must be >= 1, got 0"),
    (lambda: curves.passes_for(-1, 10, 5, 2), "passes_for: updates must be >= 1, got -1"),
])
def test_sizes_outside_the_data_are_refused(call, message):
    """A subset larger than the data was silently the whole data, size 0 an empty subset; a
    zero batch or record count divided by zero. Labels more than the examples were silently
    cut to the first 40 (fewer an IndexError), and no seeds failed in np.stack."""
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_learning_curves_count_a_partial_last_batch_as_an_update():
    """10 examples in batches of 4 make 3 updates a pass (4, 4 and the last 2 completed), so
    12 updates in 2 records are 2 passes, 6 updates, a record: "updates" is [6, 12] (by
    hand). Fails if a pass is counted as floor(10 / 4) = 2 updates ([4, 8])."""
    model = nets.build_mlp(4, 3, hidden_layers=1, hidden_units=4)
    keys = jax.random.split(jax.random.key(1), 1)
    params = curves.init_params(model, keys, 4)
    x, targets = separable_problem(jax.random.key(2), 10)
    curve, _ = curves.learning_curves(model, nets.lecture_objective(), optax.sgd(0.1), params,
                                      keys, (x[None], targets[None]),
                                      separable_problem(jax.random.key(4), 5),
                                      updates=12, batch_size=4, records=2)
    assert curve["updates"] == [6, 12]


def test_learning_curves_refuse_test_targets_unlike_the_test_examples():
    """5 test examples with 4 targets was a TypeError from inside the jitted error count
    ('ne got incompatible shapes for broadcasting: (5,), (4,)'), after compiling the run."""
    model = nets.build_mlp(4, 3, hidden_layers=1, hidden_units=4)
    keys = jax.random.split(jax.random.key(1), 1)
    params = curves.init_params(model, keys, 4)
    x, targets = separable_problem(jax.random.key(2), 10)
    x_test, t_test = separable_problem(jax.random.key(4), 5)
    with pytest.raises(ValueError, match=re.escape(
            "learning_curves: the test set's x has shape (5, 4) and targets (4, 3); expected "
            "as many targets as examples")):
        curves.learning_curves(model, nets.lecture_objective(), optax.sgd(0.1), params, keys,
                               (x[None], targets[None]), (x_test, t_test[:4]), updates=4,
                               batch_size=4, records=1)
