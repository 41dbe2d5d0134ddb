"""experiments.lenet5: the input normalisation, and a short run of each optimizer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import lenet5
from tests.helpers import assert_close_tree, assert_refused_before_the_run
from training import data, procedures, results
from training.config import ConfigError


def test_inputs_are_centred_with_the_papers_levels():
    image = np.zeros((1, 784), np.float32)
    image[0, 0] = 1.0
    x = np.asarray(lenet5.to_lenet5_input(image))
    assert x.shape == (1, 32, 32, 1)
    np.testing.assert_allclose(x[0, 2, 2, 0], 1.175, rtol=1e-6)  # the first pixel, moved in by 2
    np.testing.assert_allclose(x[0, 0, 0, 0], -0.1, rtol=1e-6)
    assert np.sum(np.isclose(x, 1.175)) == 1


@pytest.mark.standard_promotion  # optax.adamw and optax's schedules
@pytest.mark.parametrize("optimizer,output", [
    ("sgd", "dense"), ("sdlm", "dense"), ("adamw", "dense"), ("sdlm", "rbf")])
def test_short_runs_report_per_pass(tmp_path, optimizer, output):
    """Each optimizer, and the paper's whole recipe: SDLM with the RBF output and the MAP
    criterion (its curvature backpropagated through the RBF units)."""
    extra = {"adamw": ["--batch-size", "16"], "sdlm": ["--curvature-examples", "50"]}.get(
        optimizer, [])
    metrics = lenet5.main(["--workdir", str(tmp_path), "--split", "test-only", "--passes", "2",
                           "--train-examples", "300", "--test-examples", "100",
                           "--optimizer", optimizer, "--output", output,
                           "--progress-every", "0", *extra])
    document = json.loads((tmp_path / "results.json").read_text())
    assert "not the paper's protocol" in document["protocol"]
    assert [h["pass"] for h in document["history"]] == [1, 2]
    assert metrics["train_examples"] == 300 and metrics["test_examples"] == 100
    assert metrics["train_error"] < 0.6  # far better than chance after 600 updates
    assert len(document["misclassified"]) == metrics["test_misses"]
    outputs, labels = results.load_test_outputs(tmp_path)
    assert outputs.shape == (100, 10)
    assert int(np.sum(outputs.argmax(axis=1) != labels)) == metrics["test_misses"]
    assert (tmp_path / "kernels.png").stat().st_size > 5_000
    assert (tmp_path / "features.png").stat().st_size > 5_000
    assert (tmp_path / "centres.png").exists() == (output == "rbf")
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert header.endswith("RBF output, MAP criterion (j = 10); the loss columns are that "
                           "criterion" if output == "rbf" else
                           "Dense output, softmax cross-entropy"), header


def test_conv_option_resolves_by_batch_size():
    """--conv auto: "gather" for per-example updates, the model's default "tiles" for
    mini-batches; a name is kept."""
    assert lenet5.conv_implementation(lenet5.Config()) == "gather"
    assert lenet5.conv_implementation(lenet5.Config(batch_size=16)) == "tiles"
    assert lenet5.conv_implementation(lenet5.Config(batch_size=16, conv="patches")) == "patches"


def test_learning_rate_defaults_per_optimizer_and_output():
    """Per-example SGD on the RBF output takes the smaller default (0.01 diverged there); an
    explicit --lr is kept."""
    assert lenet5.learning_rate(lenet5.Config()) == 0.01
    assert lenet5.learning_rate(lenet5.Config(output="rbf")) == lenet5.RBF_SGD_LR == 0.002
    assert lenet5.learning_rate(lenet5.Config(output="rbf", optimizer="sdlm")) == 5e-4
    assert lenet5.learning_rate(lenet5.Config(output="rbf", lr=0.03)) == 0.03


def test_an_sdlm_option_without_sdlm_is_refused(tmp_path):
    assert_refused_before_the_run(lenet5.main, tmp_path, ["--optimizer", "adamw", "--mu", "0.1"],
                                  "--mu: got 0.1; it applies only with --optimizer sdlm (got "
                                  "--optimizer adamw)")
    assert_refused_before_the_run(lenet5.main, tmp_path, ["--map-j", "3"],
                                  "--map-j: got 3.0; it applies only with --output rbf (got "
                                  "--output dense)")


def test_more_curvature_examples_than_training_images_are_refused(tmp_path):
    """An explicit --curvature-examples above the training images is refused before any
    work, not cut to them (the default 500 takes them all: tests/test_lenet1989.py)."""
    assert_refused_before_the_run(
        lenet5.main, tmp_path, ["--split", "test-only", "--train-examples", "300",
                                "--test-examples", "100", "--optimizer", "sdlm",
                                "--curvature-examples", "301"],
        "--curvature-examples: got 301; allowed: at most the 300 training images")


def test_held_out_images_are_the_last_training_images_and_never_trained_on(tmp_path):
    """--held-out 50 of the first 250 training images: the run trains on images 0-199 exactly
    as --train-examples 200 does (the same losses) and measures images 200-249; more held-out
    images than training images are refused before any work."""
    base = ["--split", "test-only", "--passes", "1", "--test-examples", "100",
            "--progress-every", "0"]
    held = lenet5.main(["--workdir", str(tmp_path / "held"), "--train-examples", "250",
                        "--held-out", "50", *base])
    plain = lenet5.main(["--workdir", str(tmp_path / "plain"), "--train-examples", "200",
                         *base])
    for key in ("train_loss", "test_loss", "train_misses", "test_misses", "train_examples"):
        assert held[key] == plain[key], key
    assert held["held_out_examples"] == 50
    assert held["held_out_misses"] == round(held["held_out_error"] * 50)
    assert (f"Held out (the last 50 training images, not trained on): error "
            f"{held['held_out_error']:.4f} ({held['held_out_misses']} misses)."
            in (tmp_path / "held" / "results.md").read_text())
    splits, _ = lenet5.load(lenet5.Config(split="test-only", train_examples=250, held_out=50))
    images = data.load_mnist("test")[0]
    np.testing.assert_array_equal(np.asarray(splits["held_out"][0]),
                                  np.asarray(lenet5.to_lenet5_input(images[200:250])))
    history = json.loads((tmp_path / "held" / "results.json").read_text())["history"]
    assert {"held_out_error", "held_out_loss"} <= set(history[0])
    with pytest.raises(ConfigError, match="--held-out: got 250; allowed: fewer than the 250 "
                                          "training images"):
        lenet5.main(["--workdir", str(tmp_path / "bad"), "--train-examples", "250",
                     "--held-out", "250", *base])
    assert not (tmp_path / "bad" / "results.json").exists()


def write_idx(path, array, magic):
    """An uncompressed IDX file (big-endian header: magic, then each dimension)."""
    header = np.array([magic, *array.shape], ">i4").tobytes()
    path.write_bytes(header + np.asarray(array, np.uint8).tobytes())


def test_auto_split_takes_the_full_files_when_the_training_set_is_present(tmp_path,
                                                                          monkeypatch):
    """--split auto: the standard train/test split once MNIST's training files are found
    (here a small stand-in, uncompressed), the 8,000/2,000 split of the test set otherwise."""
    shared = data.data_dirs()[0]
    directory = tmp_path / "data" / "mnist"
    directory.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (directory / name).symlink_to(shared / "mnist" / name)
    monkeypatch.setenv("NETS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NETS_CACHE_DIR", str(tmp_path / "cache"))
    config = lenet5.Config(split="auto", train_examples=0, test_examples=0)

    splits, protocol = lenet5.load(config)
    assert "test set only" in protocol
    assert splits["train"][0].shape[0] == 8000 and splits["test"][0].shape[0] == 2000

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, 28, 28))
    labels = np.arange(120) % 10
    write_idx(directory / "train-images-idx3-ubyte", images, 2051)
    write_idx(directory / "train-labels-idx1-ubyte", labels, 2049)
    splits, protocol = lenet5.load(config)
    assert protocol == "standard 60,000 / 10,000 split"
    (x_train, t_train), (x_test, _) = splits["train"], splits["test"]
    assert x_train.shape == (120, 32, 32, 1) and x_test.shape == (10000, 32, 32, 1)
    np.testing.assert_array_equal(np.asarray(t_train).argmax(axis=1), labels)
    expected = lenet5.to_lenet5_input(images[:1].reshape(1, 784).astype(np.float32) / 255)
    np.testing.assert_array_equal(np.asarray(x_train[:1]), np.asarray(expected))


@pytest.mark.parametrize("present, message", [
    (("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"), "checksum mismatch"),
    (("train-images-idx3-ubyte",), "train-labels-idx1-ubyte.gz not found")])
def test_auto_split_refuses_a_corrupt_or_half_present_training_set(tmp_path, monkeypatch,
                                                                    present, message):
    """--split auto with MNIST's training files found but corrupt, or only one of the two:
    a DataError naming the file, not a silent fall back to the test-only split."""
    shared = data.data_dirs()[0]
    directory = tmp_path / "data" / "mnist"
    directory.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (directory / name).symlink_to(shared / "mnist" / name)
    for name in present:
        (directory / name).write_bytes(b"not MNIST")
    monkeypatch.setenv("NETS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NETS_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(data.DataError, match=message):
        lenet5.load(lenet5.Config(split="auto"))
    assert not (tmp_path / "cache").exists()  # nothing downloaded: auto takes what it finds


def test_test_only_split_is_the_first_8000_and_last_2000_images_of_the_test_file():
    """--split test-only: training images are the MNIST test file's images 0-7,999 and test
    images 8,000-9,999, each with its own label, read here straight from the file
    (data.load_mnist) and padded to 32x32 by hand (28x28 at rows and columns 2-29, -0.1
    around, pixels -0.1 + 1.275 v). It fails if the cut moves, overlaps, or the labels are
    taken from another slice than their images."""
    splits, _ = lenet5.load(lenet5.Config(split="test-only"))
    images, labels = data.load_mnist("test")
    for name, rows in (("train", slice(0, 8000)), ("test", slice(8000, 10000))):
        x, t = (np.asarray(a) for a in splits[name])
        expected = np.full((rows.stop - rows.start, 32, 32, 1), -0.1, np.float32)
        expected[:, 2:30, 2:30, 0] = -0.1 + 1.275 * images[rows].reshape(-1, 28, 28)
        np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(t, np.eye(10)[labels[rows]])


@pytest.mark.parametrize("output, map_j", [("rbf", 3.0), ("dense", None)])
def test_reported_test_loss_is_the_criterion_of_the_saved_outputs(tmp_path, output, map_j):
    """The final test_loss is, recomputed in NumPy from the saved test outputs and labels,
    the MAP criterion of LeCun et al. 1998 eq. 9 with the run's j for --output rbf (outputs
    are the scores -y_i: E = mean_p [y_Dp + log(e^-j + sum_i e^-y_ip)]), and the softmax
    cross-entropy for --output dense. It fails if --map-j is ignored (j = 10 instead of 3),
    or if the output layer or the criterion is not the one asked for."""
    extra = ["--map-j", str(map_j)] if map_j else []
    metrics = lenet5.main(["--workdir", str(tmp_path), "--split", "test-only", "--passes", "1",
                           "--train-examples", "20", "--test-examples", "50",
                           "--output", output, "--progress-every", "0", *extra])
    scores, labels = results.load_test_outputs(tmp_path)
    scores = np.asarray(scores, np.float64)
    correct = scores[np.arange(50), labels]
    if output == "rbf":
        assert np.all(scores <= 0)  # penalties y_i >= 0
        rubbish = np.exp(-map_j)
        expected = np.mean(-correct + np.log(rubbish + np.exp(scores).sum(axis=1)))
    else:
        expected = np.mean(-correct + np.log(np.exp(scores).sum(axis=1)))
    assert metrics["test_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.standard_promotion  # float64 params on the float32 images
def test_per_example_sgd_steps_through_the_training_images_in_the_files_order():
    """--optimizer sgd at its default eta, 0.01, over 3 images: one pass ends at the weights
    of three steps p <- p - eta grad E_n(p) taken by hand on images 0, 1, 2 in turn, E_n the
    softmax cross-entropy of one image (log-sum-exp of the outputs minus the correct one),
    differentiated by jax.grad. It fails if the images are batched, shuffled or taken in
    another order, or the step is not eta times that gradient (another order ends 0.035
    away, measured). Float64 params."""
    config = lenet5.Config(split="test-only", passes=1, train_examples=3,
                           test_examples=2)
    splits, _ = lenet5.load(config)
    model, procedure, lr = lenet5.build(config, splits)
    assert lr == 0.01
    params = nets.gradcheck.astype(model.init(jax.random.key(0), (-1, 32, 32, 1))[1],
                                   jnp.float64)
    state, _ = procedures.run_steps(procedure, procedure.init(params, jax.random.key(1)), 0, 1)

    def error(p, x, t):
        s = model.apply(p, x)[0]
        return jax.nn.logsumexp(s) - jnp.sum(t[0] * s)

    gradient = jax.jit(jax.grad(error))

    x, t = splits["train"]

    def steps(order):
        p = params
        for n in order:
            grads = gradient(p, x[n:n + 1], t[n:n + 1])
            p = jax.tree_util.tree_map(lambda a, g: a - 0.01 * g, p, grads)
        return jax.tree_util.tree_leaves(p)

    want, other = steps((0, 1, 2)), steps((2, 0, 1))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(want, other)) > 1e-2
    assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(state.params))
    assert_close_tree(jax.tree_util.tree_leaves(state.params), want, jnp.float64,
                      "three SGD steps")
