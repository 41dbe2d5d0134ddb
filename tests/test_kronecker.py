"""K-FAC: the Kronecker blocks of `nets.kronecker` against the Gauss-Newton matrix built by jax
(`jax.jacobian` of the outputs, `jax.hessian` of the loss), and the preconditioned step of
`training.optim` against a dense solve in NumPy. Float64 throughout (conftest enables it)."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets
from experiments import kfac as kfac_experiment
from nets import losses
from nets.engines import gauss_newton_product
from nets.gradcheck import relative_error
from nets.kronecker import DiagonalBlock, KroneckerBlock, kronecker_factors
from tests.helpers import F64, assert_refused_before_the_run, tolerance
from training import optim, procedures


def _f64(tree):
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float64), tree)


def _init(model, input_shape, seed=0):
    _, params = model.init(jax.random.PRNGKey(seed), input_shape)
    return _f64(params)


def _with_leaf(params, index, key, value):
    chain = list(params)
    chain[index] = {**chain[index], key: value}
    return tuple(chain)


def _loss_hessian(objective, outputs, targets):
    """d2E/do2 of the data term, (m k, m k), by jax."""
    size = outputs.size
    return jax.hessian(lambda flat: objective.loss.value(flat.reshape(outputs.shape), targets))(
        outputs.reshape(-1)).reshape(size, size)


def exact_block(model, objective, params, x, targets, index, key):
    """J^T H J for one leaf, J = d outputs / d leaf by `jax.jacobian`, plus the L2 term's
    (lambda/m) I for a weight."""
    leaf = params[index][key]
    outputs = model.apply(params, x)
    jacobian = jax.jit(jax.jacobian(lambda flat: model.apply(  # compiled: faster than op by op
        _with_leaf(params, index, key, flat.reshape(leaf.shape)), x).reshape(-1)))(
        leaf.reshape(-1))
    block = jacobian.T @ _loss_hessian(objective, outputs, targets) @ jacobian
    if key == "w":
        block = block + objective.l2 / x.shape[0] * jnp.eye(leaf.size)
    return np.asarray(block)


def kronecker_block(block: KroneckerBlock):
    """A (x) G + penalty I, the leaf read row-major as (K, C)."""
    return np.kron(block.a, block.g) + float(block.penalty) * np.eye(block.mask.size)


MLP = nets.serial(nets.Dense(6, name="hidden"), nets.Tanh(name="tanh"),
                  nets.Dense(4, name="out"), name="mlp")
PROBABILITY_MLP = nets.serial(nets.Dense(6, name="hidden"), nets.Tanh(name="tanh"),
                              nets.Dense(4, name="out"), nets.Sigmoid(name="sigmoid"),
                              name="probability_mlp")
# Kernels as large as their padded inputs: one window each (T = 1), as a Dense layer.
ONE_WINDOW_CONV = nets.serial(
    nets.Conv2D(3, kernel_size=4, padding=((1, 0), (0, 1)), pad_value=-1.0,
                unshared_bias=True, name="conv1"),
    nets.Tanh(name="act1"), nets.Flatten(name="flat"), nets.Dense(4, name="out"),
    name="one_window_conv")
OBJECTIVES = {
    "softmax": losses.Objective(losses.softmax_cross_entropy(), 0.0),
    "squared": losses.Objective(losses.mean_squared_error(), 0.0),
    "sigmoid_logits_l2": losses.lecture_objective(l2=0.3),
}


def _targets(key, batch, classes=4):
    return jax.nn.one_hot(jax.random.randint(key, (batch,), 0, classes), classes,
                          dtype=jnp.float64)


@pytest.mark.parametrize("objective_name", sorted(OBJECTIVES))
@pytest.mark.parametrize("model, input_shape", [(MLP, (1, 5)), (ONE_WINDOW_CONV, (1, 3, 3, 2))],
                         ids=["mlp", "one_window_conv"])
def test_one_example_blocks_are_the_exact_gauss_newton_blocks(model, input_shape,
                                                               objective_name):
    """With one example and one window, sum_n a a^T (x) b b^T has one term: K-FAC is exact."""
    objective = OBJECTIVES[objective_name]
    params = _init(model, (-1,) + input_shape[1:])
    x = jax.random.normal(jax.random.PRNGKey(1), input_shape, jnp.float64)
    targets = _targets(jax.random.PRNGKey(2), 1)
    blocks = kronecker_factors(model, objective)(params, x, targets)
    for index, layer_params in enumerate(params):
        for key in layer_params:
            expected = exact_block(model, objective, params, x, targets, index, key)
            assert relative_error(kronecker_block(blocks[index][key]), expected) <= F64, (
                model.sublayers[index].name, key)


def test_the_lecture_objective_from_probabilities_with_l2():
    """The sigmoid output and the cross-entropy of probabilities (the lecture's net): G is
    taken in the probabilities' Hessian, as `gauss_newton_product` takes it."""
    objective = losses.lecture_objective(l2=0.5, from_logits=False)
    params = _init(PROBABILITY_MLP, (-1, 5))
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 5), jnp.float64)
    targets = _targets(jax.random.PRNGKey(4), 1)
    blocks = kronecker_factors(PROBABILITY_MLP, objective)(params, x, targets)
    for index in (0, 2):
        for key in ("w", "b"):
            expected = exact_block(PROBABILITY_MLP, objective, params, x, targets, index, key)
            assert relative_error(kronecker_block(blocks[index][key]), expected) <= F64


def test_lenet1989_bias_blocks_are_exact_at_any_batch():
    """A bias has A = 1 and G = sum_n J_n^T H_n J_n: exact for Dense biases and for the 1989
    net's unshared biases (one per unit), at a batch of 3."""
    model = nets.lenet1989()
    objective = OBJECTIVES["squared"]
    params = _init(model, (-1, 16, 16, 1))
    x = jax.random.uniform(jax.random.PRNGKey(5), (3, 16, 16, 1), jnp.float64, -1, 1)
    targets = 2 * _targets(jax.random.PRNGKey(6), 3, 10) - 1
    blocks = kronecker_factors(model, objective)(params, x, targets)
    for index in (0, 2, 5, 7):  # H1, H2, H3, output
        expected = exact_block(model, objective, params, x, targets, index, "b")
        assert relative_error(kronecker_block(blocks[index]["b"]), expected) <= F64, index


def _layer_output_jacobians(model, params, x, index):
    """(the layer's input, d outputs_n / d the layer's output) by jax, the latter (m, k, m,
    ...): the rest of the net as a function of the layer's output."""
    before = nets.serial(*model.sublayers[:index]) if index else None
    layer_input = x if before is None else before.apply(params[:index], x)
    layer_output = model.sublayers[index].apply(params[index], layer_input)
    after = nets.serial(*model.sublayers[index + 1:])
    jacobian = jax.jit(jax.jacobian(lambda y: after.apply(params[index + 1:], y)))(layer_output)
    return layer_input, layer_output, jacobian


@pytest.mark.parametrize("index, name", [(0, "H1"), (5, "H3")])
def test_lenet1989_weight_factors_follow_their_definitions(index, name):
    """At a batch of 4: A = (1/m) sum_n sum_t a_nt a_nt^T with a_nt = d y_ntc / d w_:c (the
    -1 border included), G = (1/T) sum_n sum_t J_nt^T H_n J_nt with J_nt = d o_n / d y_nt,
    both from jax's derivatives of the forward pass."""
    model = nets.lenet1989()
    objective = OBJECTIVES["squared"]
    params = _init(model, (-1, 16, 16, 1))
    batch = 4
    x = jax.random.uniform(jax.random.PRNGKey(7), (batch, 16, 16, 1), jnp.float64, -1, 1)
    targets = 2 * _targets(jax.random.PRNGKey(8), batch, 10) - 1
    block = kronecker_factors(model, objective)(params, x, targets)[index]["w"]
    layer = model.sublayers[index]
    layer_input, layer_output, jacobian = _layer_output_jacobians(model, params, x, index)
    w = params[index]["w"]
    channels = w.shape[-1]
    # a_nt: the output's first channel in the first column of w
    inputs = jax.jit(jax.jacobian(lambda w0: layer.apply(
        {**params[index], "w": w.at[..., 0].set(w0)}, layer_input)[..., 0]))(w[..., 0])
    a = inputs.reshape(batch, -1, w.size // channels)
    windows = a.shape[1]
    expected_a = np.einsum("ntk,ntl->kl", a, a) / batch
    hessian = _loss_hessian(objective, model.apply(params, x), targets).reshape(
        batch, 10, batch, 10)
    per_window = jacobian.reshape(batch, 10, batch, windows, channels)
    expected_g = sum(np.einsum("kta,kl,ltb->ab", per_window[n, :, n], hessian[n, :, n, :],
                               per_window[n, :, n]) for n in range(batch)) / windows
    assert layer_output.shape[0] == batch
    assert relative_error(block.a, expected_a) <= F64
    assert relative_error(block.g, expected_g) <= F64


def test_sampled_columns_estimate_g_without_bias():
    """One N(0, I) column per example: over 4,000 keys the mean of G is the exact G within
    five standard errors of that mean, entry by entry."""
    objective = OBJECTIVES["softmax"]
    params = _init(MLP, (-1, 5))
    x = jax.random.normal(jax.random.PRNGKey(9), (6, 5), jnp.float64)
    targets = _targets(jax.random.PRNGKey(10), 6)
    blocks = kronecker_factors(MLP, objective)
    exact = blocks(params, x, targets)[0]["w"].g
    keys = jax.random.split(jax.random.PRNGKey(11), 4000)
    sampled = jax.jit(jax.vmap(lambda k: blocks(params, x, targets, sample_key=k)[0]["w"].g))(keys)
    mean = np.mean(sampled, axis=0)
    standard_error = np.std(sampled, axis=0) / np.sqrt(len(keys))
    assert np.all(np.abs(mean - exact) <= 5 * standard_error + 1e-15)
    assert relative_error(blocks(params, x, targets, sample_key=keys[0])[0]["w"].a,
                          blocks(params, x, targets)[0]["w"].a) <= F64  # A needs no sample


def _dense_step(a, g, mask, penalty, damping, gradient):
    """The damped Kronecker solve by NumPy: kron(A + pi s I, G + s/pi I)^-1 vec(V), masked."""
    k, c = mask.shape
    s = np.sqrt(damping + penalty)
    pi = np.sqrt((np.trace(a) / k) / (np.trace(g) / c))
    matrix = np.kron(a + pi * s * np.eye(k), g + s / pi * np.eye(c))
    return np.linalg.solve(matrix, gradient.reshape(-1)).reshape(k, c) * mask


def _spd(key, size):
    m = jax.random.normal(key, (size, size), jnp.float64)
    return np.asarray(m @ m.T / size)


def test_the_step_is_the_damped_kronecker_solve_and_blocks_are_averaged():
    keys = jax.random.split(jax.random.PRNGKey(12), 6)
    a1, a2, g1, g2 = _spd(keys[0], 3), _spd(keys[1], 3), _spd(keys[2], 4), _spd(keys[3], 4)
    mask = np.array([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], np.float64)
    params = {"w": jnp.zeros((3, 4), jnp.float64)}
    gradient = {"w": jax.random.normal(keys[4], (3, 4), jnp.float64) * mask}
    damping, penalty, decay = 0.1, 0.05, 0.25
    transform = optim.scale_by_kronecker_factors(damping, decay)
    state = transform.init(params)
    before, _ = transform.update(gradient, state, params)  # identity blocks
    assert relative_error(before["w"], gradient["w"] / (1 + np.sqrt(damping)) ** 2) <= F64

    def blocks(a, g):
        return {"w": KroneckerBlock(jnp.asarray(a), jnp.asarray(g), jnp.asarray(mask),
                                    jnp.asarray(penalty))}

    first, state = transform.update(gradient, state, params, blocks=blocks(a1, g1))
    assert relative_error(first["w"], _dense_step(a1, g1, mask, penalty, damping,
                                                  np.asarray(gradient["w"]))) <= F64
    second, state = transform.update(gradient, state, params, blocks=blocks(a2, g2))
    a, g = decay * a1 + (1 - decay) * a2, decay * g1 + (1 - decay) * g2
    expected = _dense_step(a, g, mask, penalty, damping, np.asarray(gradient["w"]))
    assert relative_error(second["w"], expected) <= F64
    # no new blocks: the same average, and the state still counts two estimates
    kept, kept_state = transform.update(gradient, state, params)
    assert relative_error(kept["w"], expected) <= F64
    assert [int(state.estimates), int(kept_state.estimates)] == [2, 2]


def test_one_step_solves_least_squares_with_centred_inputs():
    """A linear model under squared error: its Gauss-Newton matrix is its Hessian, and with
    centred inputs the weight and bias blocks do not couple, so K-FAC's blocks are exact and
    one undamped step lands on the least-squares solution (numpy.linalg.lstsq)."""
    model = nets.serial(nets.Dense(3, name="linear"), name="linear_model")
    objective = OBJECTIVES["squared"]
    x = jax.random.normal(jax.random.PRNGKey(13), (50, 4), jnp.float64)
    x = x - x.mean(axis=0)[None]
    targets = jax.random.normal(jax.random.PRNGKey(14), (50, 3), jnp.float64)
    params = _init(model, (-1, 4))
    _, grads = nets.manual(model, objective)(params, x, targets)
    optimizer = optim.kfac(1.0, damping=1e-24)
    state = optimizer.init(params)
    blocks = kronecker_factors(model, objective)(params, x, targets)
    updates, _ = optimizer.update(grads, state, params, blocks=blocks)
    solved = optax.apply_updates(params, updates)[0]
    design = np.concatenate([np.asarray(x), np.ones((50, 1))], axis=1)
    expected = np.linalg.lstsq(design, np.asarray(targets), rcond=None)[0]
    assert relative_error(solved["w"], expected[:4]) <= F64
    assert relative_error(solved["b"], expected[4]) <= F64


def test_refusals_name_the_layer_and_the_value():
    with_norm = nets.serial(nets.Dense(4, name="hidden"), nets.BatchNorm(4, name="norm"),
                            nets.Dense(2, name="out"), name="normed")
    params = _init(with_norm, (-1, 3))
    x = jnp.ones((2, 3), jnp.float64)
    with pytest.raises(ValueError, match=r"layer 'norm' has no `factors` and its layers "
                                         r"\['norm'\] normalise with their batch's"):
        kronecker_factors(with_norm, OBJECTIVES["squared"])(params, x, jnp.ones((2, 2)))
    dropped = nets.serial(nets.dropout_after(nets.LayerNorm(3, name="norm"), 0.5,
                                             name="dropped"), nets.Dense(2, name="out"))
    with pytest.raises(ValueError, match="layer 'dropped' has no `factors` and draws random"):
        kronecker_factors(dropped, OBJECTIVES["squared"])(
            _init(dropped, (-1, 3)), x, jnp.ones((2, 2)), jax.random.PRNGKey(0))
    maps = nets.serial(nets.Conv2D(2, kernel_size=1, name="pointwise"), name="maps")
    map_params = _init(maps, (-1, 2, 2, 1))
    with pytest.raises(ValueError, match=r"outputs of shape \(2, 2, 2, 2\), expected"):
        kronecker_factors(maps, OBJECTIVES["squared"])(map_params, jnp.ones((2, 2, 2, 1)),
                                                       jnp.ones((2, 2)))
    for damping in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="damping must be > 0 and finite"):
            optim.kfac(0.1, damping)
    for decay in (1.0, -0.1, True, "0.5"):  # "0.5" was a bare comparison TypeError
        with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
            optim.scale_by_kronecker_factors(0.1, decay)


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.slow
def test_experiment_writes_every_run_and_kfac_descends(tmp_path):
    """`experiments.kfac` on 256 digits, one epoch of 4 batches: the schema, a run per step
    size, each optimiser's best picked by its final training loss, K-FAC's loss falling."""
    metrics = kfac_experiment.main([
        "--workdir", str(tmp_path), "--model", "mlp", "--epochs", "1", "--batch-size", "64",
        "--train-examples", "256", "--test-examples", "100", "--sgd-lr", "0.01,0.1",
        "--adam-lr", "0.01", "--kfac-lr", "0.1", "--refresh-every", "2",
        "--quality-examples", "8"])
    document = json.loads((tmp_path / "results.json").read_text())
    runs = document["runs"]
    assert [(run["optimizer"], run["learning_rate"]) for run in runs] == [
        ("sgd", 0.01), ("sgd", 0.1), ("adam", 0.01), ("kfac", 0.1), ("kfac_adaptive", 1.0)]
    for run in runs:
        assert [row["epoch"] for row in run["history"]] == [0, 1]
        assert set(run["history"][1]) == {"epoch", "seconds", "train_loss", "test_error",
                                          "test_misses"}
        assert run["history"][1]["test_misses"] == round(100 * run["history"][1]["test_error"])
    sgd_losses = [run["final_train_loss"] for run in runs[:2]]
    assert metrics["sgd_train_loss"] == min(sgd_losses)
    assert metrics["sgd_learning_rate"] == runs[int(np.argmin(sgd_losses))]["learning_rate"]
    for kfac_run in runs[3:]:
        assert kfac_run["history"][1]["train_loss"] < kfac_run["history"][0]["train_loss"]
    assert metrics["kfac_seconds_per_step"] == pytest.approx(runs[3]["seconds"] / 4)
    assert (tmp_path / "kfac.png").stat().st_size > 10_000
    assert "kfac" in (tmp_path / "results.md").read_text()
    quality = document["block_quality"]
    assert set(quality) == {"initial", "after_kfac"}
    for rows in quality.values():
        by_leaf = {(row["layer"], row["leaf"]): row for row in rows}
        assert by_leaf["hidden1", "w"]["kfac_relative_error"] is None  # 25,600: too large
        assert by_leaf["hidden1", "w"]["parameters"] == 25_600
        for leaf in ("hidden1", "b"), ("output", "b"):  # a bias block is exact (float32)
            assert by_leaf[leaf]["kfac_relative_error"] <= tolerance(jnp.float32)
        output = by_leaf["output", "w"]  # 8 examples of 100 inputs: approximate
        assert 1e-3 < output["kfac_relative_error"] < 1
        assert 0 < output["diagonal_relative_error"] < 1


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.slow
def test_experiment_on_lenet5_takes_mnist_and_diagonal_blocks(tmp_path):
    """`--model lenet5`: MNIST's first test images for training and its last for testing,
    K-FAC's runs with the subsampling layers' diagonal blocks, whose quality row is the
    exact block's own diagonal (the two errors equal up to float32)."""
    kfac_experiment.main([
        "--workdir", str(tmp_path), "--model", "lenet5", "--epochs", "1", "--batch-size", "16",
        "--train-examples", "32", "--test-examples", "20", "--optimizers", "kfac",
        "--kfac-lr", "0.01", "--quality-examples", "2"])
    document = json.loads((tmp_path / "results.json").read_text())
    (run,) = document["runs"]
    assert run["history"][1]["test_misses"] == round(20 * run["history"][1]["test_error"])
    rows = {(row["layer"], row["leaf"]): row for row in document["block_quality"]["initial"]}
    for leaf in ("S2", "w"), ("S2", "b"), ("S4", "w"), ("S4", "b"):
        row = rows[leaf]
        assert row["kfac_relative_error"] == pytest.approx(row["diagonal_relative_error"],
                                                           rel=tolerance(jnp.float32)), leaf
    assert rows["C5", "b"]["kfac_relative_error"] <= tolerance(jnp.float32)  # a Dense-like bias
    assert_refused_before_the_run(kfac_experiment.main, tmp_path,
                                  ["--model", "lenet5", "--train-examples", "8001"],
                                  "option --train-examples: got 8001; allowed: at most 8000 "
                                  "with --model lenet5")
    assert_refused_before_the_run(kfac_experiment.main, tmp_path,
                                  ["--model", "mlp", "--test-examples", "2008"],
                                  "option --test-examples: got 2008; allowed: at most 2007")


SPLIT_CASES = {
    "mlp": (MLP, (5,), OBJECTIVES["softmax"], 4),
    "lenet1989": (nets.lenet1989(), (16, 16, 1), losses.Objective(losses.mean_squared_error(),
                                                                  0.1), 10),
}


def _split_case(name):
    model, shape, objective, classes = SPLIT_CASES[name]
    params = _init(model, (-1,) + shape)
    x = jax.random.normal(jax.random.PRNGKey(15), (4,) + shape, jnp.float64)
    return model, objective, params, x, _targets(jax.random.PRNGKey(16), 4, classes)


def _sampled_or_exact(blocks, sampled):
    if sampled:
        return lambda p, x, t: blocks(p, x, t, sample_key=jax.random.PRNGKey(17))
    return blocks


@pytest.mark.parametrize("sampled", [False, True], ids=["exact", "sampled"])
@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
def test_blocks_on_a_batch_split_over_explicit_axes_are_the_whole_batchs(name, sampled):
    """Under `jax.set_mesh` with the batch of 4 split over 2 devices (Explicit axes), the
    blocks equal those of the whole batch on one device (the columns then run back one after
    another: JAX's batching of the layers' reshapes loses their layouts)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    model, objective, params, x, targets = _split_case(name)
    blocks = _sampled_or_exact(kronecker_factors(model, objective), sampled)
    mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        split, whole = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
        got = jax.jit(blocks)(jax.device_put(params, whole), jax.device_put(x, split),
                              jax.device_put(targets, split))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(blocks(params, x, targets))):
        assert relative_error(a, b) <= F64


@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
def test_blocks_inside_shard_map_averaged_over_devices(name):
    """Inside `jax.shard_map` (check_vma) each device's blocks are its half's; their `pmean`
    is the mean of the two halves' blocks on one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    model, objective, params, x, targets = _split_case(name)
    blocks = kronecker_factors(model, objective)
    mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Explicit,))

    def averaged(p, x, t):
        return jax.tree.map(lambda leaf: jax.lax.pmean(leaf, "batch"), blocks(p, x, t))

    mapped = jax.jit(jax.shard_map(averaged, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                                   out_specs=P(), check_vma=True))
    split = NamedSharding(mesh, P("batch"))
    got = mapped(jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(x, split),
                 jax.device_put(targets, split))
    halves = [blocks(params, x[:2], targets[:2]), blocks(params, x[2:], targets[2:])]
    for a, b, c in zip(jax.tree.leaves(got), *map(jax.tree.leaves, halves)):
        assert relative_error(a, (b + c) / 2) <= F64


def test_relative_damping_scales_gamma_by_each_blocks_mean_eigenvalue():
    keys = jax.random.split(jax.random.PRNGKey(18), 3)
    a, g = _spd(keys[0], 3), _spd(keys[1], 4) * 1e-6  # G far smaller than A
    mask = np.ones((3, 4))
    gradient = {"w": jax.random.normal(keys[2], (3, 4), jnp.float64)}
    transform = optim.scale_by_kronecker_factors(0.1, relative=True)
    params = {"w": jnp.zeros((3, 4), jnp.float64)}
    step, _ = transform.update(gradient, transform.init(params), params, blocks={
        "w": KroneckerBlock(jnp.asarray(a), jnp.asarray(g), jnp.asarray(mask),
                            jnp.asarray(0.0))})
    gamma = 0.1 * (np.trace(a) / 3) * (np.trace(g) / 4)
    expected = _dense_step(a, g, mask, 0.0, gamma, np.asarray(gradient["w"]))
    assert relative_error(step["w"], expected) <= F64


def _quadratic_problem(seed=19):
    """A 3 x 4 weight under E(w) = 1/2 vec(w)^T H vec(w) + c^T vec(w), G = H, and blocks whose
    Kronecker product is not H (so the preconditioned direction is not Newton's)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    hessian = _spd(keys[0], 12) + np.eye(12)
    c = np.asarray(jax.random.normal(keys[1], (12,), jnp.float64))
    blocks = {"w": KroneckerBlock(jnp.asarray(_spd(keys[2], 3) + np.eye(3)),
                                  jnp.asarray(_spd(keys[3], 4) + np.eye(4)),
                                  jnp.ones((3, 4), jnp.float64), jnp.asarray(0.0))}

    def energy(params):
        w = params["w"].reshape(-1)
        return 0.5 * w @ jnp.asarray(hessian) @ w + jnp.asarray(c) @ w

    def gauss_newton(v):
        return {"w": (jnp.asarray(hessian) @ v["w"].reshape(-1)).reshape(3, 4)}

    w0 = {"w": jax.random.normal(keys[4], (3, 4), jnp.float64)}
    return hessian, c, blocks, energy, gauss_newton, w0


def test_adaptive_kfac_steps_minimise_the_quadratic_model_over_direction_and_last_step():
    """First step: alpha d with alpha = -g^T d / d^T (G + lambda I) d; second: alpha d + mu p
    with (alpha, mu) NumPy's solution of the 2 x 2 model, d the damped Kronecker direction
    (NumPy's dense solve) and p the first step. E is quadratic and G its Hessian, so the
    undamped model is exact and the reduction ratio 1 at both steps (at the second only with
    the model's cross term 2 alpha mu d^T G p and mu^2 p^T G p right: the first has mu = 0),
    and the state counts the two estimates."""
    hessian, c, blocks, energy, gauss_newton, params = _quadratic_problem()
    damping = 0.5
    transform = optim.kfac_adaptive(initial_damping=damping, decay=0.0)
    state = transform.init(params)
    previous = np.zeros(12)
    for step_number in range(2):
        w = np.asarray(params["w"]).reshape(-1)
        g = hessian @ w + c
        damping = float(state.damping)
        a, gg = np.asarray(blocks["w"].a), np.asarray(blocks["w"].g)
        d = -_dense_step(a, gg, np.ones((3, 4)), 0.0, damping, g.reshape(3, 4)).reshape(-1)
        curvature = hessian + damping * np.eye(12)
        if step_number == 0:
            expected = -(g @ d) / (d @ curvature @ d) * d
        else:
            m = np.array([[d @ curvature @ d, d @ curvature @ previous],
                          [d @ curvature @ previous, previous @ curvature @ previous]])
            alpha, mu = np.linalg.solve(m, -np.array([g @ d, g @ previous]))
            expected = alpha * d + mu * previous
        updates, state = transform.update({"w": jnp.asarray(g.reshape(3, 4))}, state, params,
                                          blocks=blocks, gauss_newton=gauss_newton,
                                          batch_energy=energy)
        assert relative_error(updates["w"].reshape(-1), expected) <= F64
        # (E(w + delta) - E(w)) / q_0(delta), kept in float32 by the state
        assert float(state.ratio) == pytest.approx(1.0, rel=tolerance(jnp.float32))
        assert int(state.estimates) == step_number + 1
        params = optax.apply_updates(params, updates)
        previous = expected


def test_adaptive_kfac_damping_follows_the_reduction_ratio():
    """On E equal to its quadratic model the ratio is 1 (> 3/4): lambda shrinks by omega; on
    E plus a term the model does not see that raises E, the ratio is < 1/4: lambda grows."""
    hessian, c, blocks, energy, gauss_newton, params = _quadratic_problem()
    g = {"w": jnp.asarray((hessian @ np.asarray(params["w"]).reshape(-1) + c).reshape(3, 4))}
    transform = optim.kfac_adaptive(initial_damping=0.5, omega=0.8)
    state = transform.init(params)
    _, trusted = transform.update(g, state, params, blocks=blocks, gauss_newton=gauss_newton,
                                  batch_energy=energy)
    assert float(trusted.ratio) == pytest.approx(1.0, rel=1e-9)
    assert float(trusted.damping) == pytest.approx(0.5 * 0.8, rel=1e-6)

    def raised(at):
        return energy(at) + 100 * jnp.sum((at["w"] - params["w"]) ** 2)

    _, refused = transform.update(g, state, params, blocks=blocks, gauss_newton=gauss_newton,
                                  batch_energy=raised)
    assert float(refused.ratio) < 0.25
    assert float(refused.damping) == pytest.approx(0.5 / 0.8, rel=1e-6)
    for options, message in ((dict(initial_damping=0.0), "initial_damping must be > 0"),
                             (dict(omega=1.0), r"omega must be in \(0, 1\)"),
                             (dict(decay=1.0), r"decay must be in \[0, 1\)"),
                             (dict(decay="0.5"), r"decay must be in \[0, 1\), got '0.5'"),
                             (dict(omega="0.5"), r"omega must be in \(0, 1\), got '0.5'")):
        with pytest.raises(ValueError, match="kfac_adaptive: " + message):
            optim.kfac_adaptive(**options)


def test_a_kfac_pass_of_one_batch_is_one_adaptive_update_with_that_batchs_parts():
    """`procedures.kfac_passes` with the whole data as its one batch (no shuffling, every
    curvature column): each pass is `optim.kfac_adaptive`'s update given the batch's
    Kronecker blocks, `gauss_newton_product` and E, applied by hand (float64, L2 on)."""
    model = nets.build_mlp(5, 3, hidden_layers=2, hidden_units=4, activation="sigmoid")
    objective = nets.lecture_objective(0.2)
    x = jax.random.normal(jax.random.PRNGKey(20), (12, 5), jnp.float64)
    targets = _targets(jax.random.PRNGKey(21), 12, 3)
    params = _init(model, (-1, 5))
    procedure = procedures.kfac_passes(model, objective, x, targets, batch_size=12,
                                       initial_damping=0.3, sampled=False, shuffle=False,
                                       guard=None)
    state = procedure.init(params, jax.random.key(22))
    state, _ = jax.jit(procedures.run_steps, static_argnums=(0, 3))(procedure, state, 0, 2)
    transform = optim.kfac_adaptive(initial_damping=0.3)
    by_hand, by_hand_state = params, transform.init(params)
    for _ in range(2):
        _, grads = nets.manual(model, objective)(by_hand, x, targets)
        updates, by_hand_state = transform.update(
            grads, by_hand_state, by_hand,
            blocks=kronecker_factors(model, objective)(by_hand, x, targets),
            gauss_newton=lambda v, at=by_hand: gauss_newton_product(model, objective)(
                at, x, targets, v),
            batch_energy=lambda at: objective.value(at, model.apply(at, x), targets))
        by_hand = optax.apply_updates(by_hand, updates)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(by_hand)):
        assert relative_error(a, b) <= F64


# Layers with parameters but no `factors`, each beside Kronecker-blocked ones: LeNet-5's
# subsampling and LayerNorm after a convolution; a grouped convolution; an LSTM under a Dense
# readout.
DIAGONAL_CASES = {
    "subsampling_layer_norm": (nets.serial(
        nets.Conv2D(3, kernel_size=3, name="conv"), nets.Tanh(name="conv_act"),
        nets.Subsampling(2, name="sub"), nets.Tanh(name="sub_act"), nets.Flatten(name="flat"),
        nets.LayerNorm(12, name="norm"), nets.Dense(4, name="out"), name="sub_norm"),
        (6, 6, 2), ("sub", "norm")),
    "grouped_conv": (nets.serial(
        nets.Conv2D(4, kernel_size=3, feature_group_count=2, name="grouped"), nets.Tanh(name="act"),
        nets.Flatten(name="flat"), nets.Dense(4, name="out"), name="grouped_conv"),
        (4, 4, 2), ("grouped",)),
    "lstm_readout": (nets.serial(nets.rnn(nets.lstm(3), name="lstm"), nets.LastStep(),
                                 nets.Dense(4, name="out"), name="lstm_readout"),
                     (5, 2), ("lstm",)),
}


def _diagonal_case(name, batch=3):
    model, shape, diagonal_layers = DIAGONAL_CASES[name]
    params = _init(model, (-1,) + shape)
    x = jax.random.normal(jax.random.PRNGKey(20), (batch,) + shape, jnp.float64)
    indices = [i for i, layer in enumerate(model.sublayers) if layer.name in diagonal_layers]
    return model, params, x, _targets(jax.random.PRNGKey(21), batch), indices


def _flat_leaves(layer_params):
    return jax.tree_util.tree_flatten_with_path(layer_params)[0]


def exact_diagonal(model, objective, params, x, targets, index, path):
    """diag(J^T H J) (+ lambda/m on a weight) of one leaf (any depth in its layer's params)
    by `jax.jacobian` and `jax.hessian`."""
    def with_leaf(flat):
        chain = list(params)
        chain[index] = jax.tree_util.tree_map_with_path(
            lambda p, leaf: flat.reshape(leaf.shape) if p == path else leaf, chain[index])
        return model.apply(tuple(chain), x).reshape(-1)

    leaf = dict(_flat_leaves(params[index]))[path]
    jacobian = jax.jacobian(with_leaf)(leaf.reshape(-1))
    hessian = _loss_hessian(objective, model.apply(params, x), targets)
    diagonal = jnp.einsum("oi,op,pi->i", jacobian, hessian, jacobian)
    share = objective.l2 / x.shape[0] if losses.is_weight(path) else 0.0
    return np.asarray(diagonal + share)


@pytest.mark.parametrize("objective_name", ["softmax", "sigmoid_logits_l2"])
@pytest.mark.parametrize("name", sorted(DIAGONAL_CASES))
def test_layers_without_factors_get_the_exact_gauss_newton_diagonal(name, objective_name):
    """At a batch of 3 each leaf of a layer without `factors` gets a `DiagonalBlock` equal to
    the diagonal of its exact Gauss-Newton block; the other layers keep Kronecker blocks."""
    objective = OBJECTIVES[objective_name]
    model, params, x, targets, indices = _diagonal_case(name)
    blocks = kronecker_factors(model, objective)(params, x, targets)
    assert isinstance(blocks[-1]["w"], KroneckerBlock)
    for index in indices:
        got = dict(jax.tree_util.tree_flatten_with_path(
            blocks[index], is_leaf=lambda b: isinstance(b, DiagonalBlock))[0])
        for path, leaf in _flat_leaves(params[index]):
            block = got[path]
            assert isinstance(block, DiagonalBlock) and block.diagonal.shape == leaf.shape
            expected = exact_diagonal(model, objective, params, x, targets, index, path)
            assert relative_error(block.diagonal.reshape(-1) + block.penalty, expected) <= F64, (
                model.sublayers[index].name, path)


def test_sampled_columns_estimate_the_diagonal_without_bias():
    """One sampled column per example: the diagonal's mean over 2,000 keys lies within five
    standard errors of the exact diagonal, leaf by leaf and element by element."""
    objective = OBJECTIVES["softmax"]
    model, params, x, targets, (index, *_) = _diagonal_case("subsampling_layer_norm")
    blocks = kronecker_factors(model, objective)
    exact = blocks(params, x, targets)[index]
    draws = jax.vmap(lambda key: blocks(params, x, targets, sample_key=key)[index])(
        jax.random.split(jax.random.PRNGKey(22), 2000))
    for key in ("w", "b"):
        samples = np.asarray(draws[key].diagonal)
        error = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
        assert np.all(np.abs(samples.mean(axis=0) - np.asarray(exact[key].diagonal))
                      <= 5 * error), key
        assert np.all(error > 0)


def test_a_diagonal_block_steps_by_the_damped_diagonal_and_is_averaged():
    """gradient / (d + gamma), gamma = damping (times mean(d) when relative) + the L2 share,
    d the running average; the optimiser given the model starts from diagonal identities, and
    without it refuses a diagonal block by name."""
    model = nets.serial(nets.Subsampling(2, name="sub"), nets.Flatten(name="flat"),
                        nets.Dense(2, name="out"), name="sub_out")
    params = _init(model, (-1, 4, 4, 3))
    keys = jax.random.split(jax.random.PRNGKey(23), 4)
    gradient = jax.tree.map(lambda leaf: jax.random.normal(keys[0], leaf.shape, leaf.dtype),
                            params)
    d1, d2 = (jax.random.uniform(k, (3,), jnp.float64, 0.1, 2) for k in keys[1:3])
    damping, penalty, decay = 0.1, 0.05, 0.25

    def blocks(d):
        full = kronecker_factors(model, OBJECTIVES["squared"])(
            params, jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2)))
        return (
            {"w": DiagonalBlock(d, jnp.asarray(penalty)), "b": DiagonalBlock(2 * d, jnp.zeros(()))},
            (), full[2])

    for relative in (False, True):
        transform = optim.scale_by_kronecker_factors(damping, decay, relative, model=model)
        state = transform.init(params)
        before, _ = transform.update(gradient, state, params)
        assert relative_error(before[0]["w"], gradient[0]["w"] / (1 + damping)) <= F64
        _, state = transform.update(gradient, state, params, blocks=blocks(d1))
        step, _ = transform.update(gradient, state, params, blocks=blocks(d2))
        for key, d, share in (("w", decay * d1 + (1 - decay) * d2, penalty),
                              ("b", 2 * (decay * d1 + (1 - decay) * d2), 0.0)):
            gamma = damping * (float(np.mean(d)) if relative else 1) + share
            expected = np.asarray(gradient[0][key]) / (np.asarray(d) + gamma)
            assert relative_error(step[0][key], expected) <= F64, (relative, key)
    plain = optim.scale_by_kronecker_factors(damping)
    with pytest.raises(ValueError, match="a DiagonalBlock arrived for a leaf the optimiser "
                                         "holds a KroneckerBlock for"):
        plain.update(gradient, plain.init(params), params, blocks=blocks(d1))


def test_lenet5_gets_kronecker_blocks_and_diagonal_ones_and_a_kfac_step_descends():
    """LeNet-5: its subsampling layers' blocks diagonal, the convolutions' (C3 with its
    table) and the Dense layers' Kronecker; a K-FAC step from them (the optimiser given the
    model), relative damping 1, lowers E on its batch of 8 random images to below a tenth
    (3.53 to 0.065; at damping 1e-3 such a step overshoots to 4.6)."""
    model = nets.lenet5()
    params = _init(model, (-1, 32, 32, 1))
    x = jax.random.normal(jax.random.PRNGKey(24), (8, 32, 32, 1), jnp.float64)
    targets = _targets(jax.random.PRNGKey(25), 8, 10)
    objective = OBJECTIVES["softmax"]
    blocks = jax.jit(kronecker_factors(model, objective))(params, x, targets,
                                                          sample_key=jax.random.PRNGKey(26))
    kinds = {layer.name: {type(b).__name__ for b in jax.tree.leaves(
        block, is_leaf=lambda b: isinstance(b, (KroneckerBlock, DiagonalBlock)))}
        for layer, block in zip(model.sublayers, blocks) if block != ()}
    assert kinds == {"C1": {"KroneckerBlock"}, "S2": {"DiagonalBlock"}, "C3": {"KroneckerBlock"},
                     "S4": {"DiagonalBlock"}, "C5": {"KroneckerBlock"},
                     "F6": {"KroneckerBlock"}, "output": {"KroneckerBlock"}}
    assert float(jnp.sum(blocks[4]["w"].mask)) == 1516 - 16  # C3's table: 60 of 96 kernels
    optimizer = optim.kfac(0.1, damping=1.0, relative=True, model=model)

    @jax.jit
    def energies(params, blocks):
        energy, grads = nets.manual(model, objective)(params, x, targets)
        updates, _ = optimizer.update(grads, optimizer.init(params), params, blocks=blocks)
        after = optax.apply_updates(params, updates)
        return energy, objective.value(after, model.apply(after, x), targets)

    before, after = energies(params, blocks)
    assert float(after) < float(before) / 10


def test_kronecker_factors_refuse_params_of_another_number_of_layers_and_a_negative_lambda():
    """Params of the first 4 of a 6-layer MLP's layers were zipped with its layers: the blocks
    ran the 4 layers forward and then raised a raw IndexError, and identity_blocks returned 4
    blocks, silently. The L2 share lambda/m is read from the objective here, not through
    l2_penalty, so a negative or NaN lambda became every weight block's penalty."""
    model = nets.build_mlp(5, 3, hidden_layers=2, hidden_units=3)
    _, params = model.init(jax.random.key(0), (-1, 5))
    x, targets = jnp.ones((8, 5), jnp.float32), jnp.zeros((8, 3), jnp.float32)
    objective = nets.Objective(losses.mean_squared_error(), 0.1)
    blocks = kronecker_factors(model, objective)
    assert len(blocks(params, x, targets)) == 6
    message = "kronecker_factors: mlp2x3_sigmoid: params must hold one entry per layer (6), got 4"
    with pytest.raises(ValueError, match=re.escape(message)):
        blocks(params[:4], x, targets)
    with pytest.raises(ValueError, match=re.escape(message)):
        nets.kronecker.identity_blocks(model, params[:4])
    for l2 in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=re.escape(
                f"kronecker_factors: the L2 coefficient lambda must be >= 0, got {l2}")):
            kronecker_factors(model, nets.Objective(losses.mean_squared_error(), l2))
