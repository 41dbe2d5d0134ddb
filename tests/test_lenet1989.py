"""experiments.lenet1989: one-pass smoke runs of each variant on small subsets."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import lenet1989
from tests.helpers import tolerance
from training import data, results
from training.config import ConfigError

SMALL = ["--train-examples", "300", "--test-examples", "100", "--passes", "2",
         "--progress-every", "0"]


# two passes of training beat chance (0.9) by far even on 300 digits; the bounds leave room
# for the seed's spread (seeds 0-3 measured: the first, second and last variants <= 0.36,
# the small modern net 0.42-0.47)
@pytest.mark.parametrize("extra, most_train_error", [
    ([], 0.5), (["--optimizer", "sdlm", "--curvature-examples", "50"], 0.5),
    (["--variant", "modern", "--batch-size", "8", "--lr", "0.003", "--h1-maps", "6",
      "--h2-maps", "8", "--h3-units", "20"], 0.7),
    (["--engine", "autodiff", "--activation", "scaled_tanh", "--target", "0.9"], 0.5)])
def test_each_variant_runs_and_reports_per_pass(tmp_path, extra, most_train_error):
    metrics = lenet1989.main(["--workdir", str(tmp_path), *SMALL, *extra])
    document = json.loads((tmp_path / "results.json").read_text())
    assert [h["pass"] for h in document["history"]] == [1, 2]
    for key in ("train_error", "test_error", "train_loss", "test_loss"):
        assert key in document["history"][0]
    assert metrics["train_misses"] == round(metrics["train_error"] * 300)
    assert 0 <= metrics["test_misses"] <= 100
    assert document["paper"]["test_misses"] == 102
    assert document["seconds"]["run"] > 0
    assert metrics["train_error"] < most_train_error
    note = "MSE is against targets +-0.9"
    assert (note in (tmp_path / "results.md").read_text()) == ("--target" in extra)
    wrong = document["misclassified"]
    assert len(wrong) == metrics["test_misses"]
    assert all(row["label"] != row["predicted"] for row in wrong)
    assert [row["index"] for row in wrong] == sorted({row["index"] for row in wrong})
    assert (tmp_path / "kernels.png").stat().st_size > 5_000
    outputs, labels = results.load_test_outputs(tmp_path)
    assert outputs.shape == (100, 10) and labels.shape == (100,)
    assert np.flatnonzero(outputs.argmax(axis=1) != labels).tolist() == [
        row["index"] for row in wrong]
    assert (tmp_path / "features.png").stat().st_size > 5_000
    assert (tmp_path / "misclassified.png").is_file() == bool(wrong)
    assert ("Most frequent confusions" in (tmp_path / "results.md").read_text()) == bool(wrong)


def test_modern_variant_with_dropout_trains_and_evaluates_without_it(tmp_path):
    """Dropout after H3 (a new mask each batch, none when measuring): two passes on 300 digits
    beat chance (90% error), though dropout slows these first passes (train error 0.48-0.72
    at rate 0.2 over seeds 0-3, against 0.42-0.47 without, measured)."""
    metrics = lenet1989.main(["--workdir", str(tmp_path), *SMALL, "--variant", "modern",
                              "--batch-size", "8", "--lr", "0.003", "--h1-maps", "6",
                              "--h2-maps", "8", "--h3-units", "20", "--dropout", "0.2"])
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["config"]["dropout"] == 0.2
    assert [h["pass"] for h in document["history"]] == [1, 2]
    assert metrics["train_error"] < 0.8


def test_subset_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--test-examples: got 5000; allowed: at most 2007"):
        lenet1989.main(["--workdir", str(tmp_path), "--test-examples", "5000"])


def test_held_out_digits_are_the_last_of_the_training_set_and_never_trained_on(tmp_path):
    """--held-out 100 of the first 400 training digits: the run trains on digits 0-299 exactly
    as --train-examples 300 does (the same losses), and measures digits 300-399, whose error and
    misses it reports; more held-out digits than training digits are refused."""
    base = ["--test-examples", "100", "--passes", "1", "--progress-every", "0"]
    held = lenet1989.main(["--workdir", str(tmp_path / "held"), "--train-examples", "400",
                           "--held-out", "100", *base])
    plain = lenet1989.main(["--workdir", str(tmp_path / "plain"), "--train-examples", "300",
                            *base])
    for key in ("train_loss", "test_loss", "train_misses", "test_misses"):
        assert held[key] == plain[key], key
    splits = lenet1989.load(lenet1989.Config(train_examples=400, held_out=100))
    x_all, labels = data.load_usps("train")
    np.testing.assert_array_equal(np.asarray(splits["held_out"][0]).reshape(100, 256),
                                  x_all[300:400])
    document = json.loads((tmp_path / "held" / "results.json").read_text())
    assert [set(h) for h in document["history"]] == [{
        "pass", "train_error", "test_error", "held_out_error", "train_loss", "test_loss",
        "held_out_loss"}]
    assert held["held_out_misses"] == round(held["held_out_error"] * 100)
    assert "held_out_error" not in plain
    assert (f"Held out (the last 100 training digits, not trained on): error "
            f"{held['held_out_error']:.4f}, {held['held_out_misses']} misses."
            in (tmp_path / "held" / "results.md").read_text())
    with pytest.raises(ConfigError, match="--held-out: got 400; allowed: fewer than the 400 "
                                          "training digits"):
        lenet1989.main(["--workdir", str(tmp_path / "bad"), "--train-examples", "400",
                        "--held-out", "400"])


def test_passes_default_per_variant():
    """--passes 0 (the default) becomes 23 for the 1989 recipe and MODERN_PASSES for the
    modern variant; an explicit count is kept."""
    assert lenet1989.resolve(lenet1989.Config()).passes == 23
    modern = lenet1989.Config(variant="modern")
    assert lenet1989.resolve(modern).passes == lenet1989.MODERN_PASSES == 60
    assert lenet1989.resolve(lenet1989.Config(variant="modern", passes=5)).passes == 5


def test_sdlm_with_a_huge_mu_and_constant_eta_is_sgd(tmp_path):
    """eta / (mu + h) = 0.006 / (1 + h / mu): with mu = 1e6 and a constant schedule the SDLM
    run takes SGD's steps up to a relative 1e-6, so both runs end at the same losses."""
    sgd = lenet1989.main(["--workdir", str(tmp_path / "sgd"), *SMALL])
    sdlm = lenet1989.main(["--workdir", str(tmp_path / "sdlm"), *SMALL, "--optimizer", "sdlm",
                           "--schedule", "constant", "--mu", "1e6", "--lr", "6e3",
                           "--curvature-examples", "50"])
    for key in ("train_loss", "test_loss"):
        assert sdlm[key] == pytest.approx(sgd[key], rel=1e-4), key


def test_conv_option_resolves_per_variant(capsys):
    """--conv auto takes each variant's fastest convolutions by measurement; a name is kept,
    an unknown one refused with the allowed names."""
    assert lenet1989.conv_implementation(lenet1989.Config()) == "gather"
    assert lenet1989.conv_implementation(lenet1989.Config(variant="modern")) == "patches"
    assert lenet1989.conv_implementation(lenet1989.Config(conv="rows")) == "rows"
    with pytest.raises(SystemExit):
        lenet1989.main(["--conv", "im2col"])
    assert ("--conv: got 'im2col'; allowed: one of auto, conv, patches, gather, rows"
            in capsys.readouterr().err)


def test_the_recipe_trains_alike_with_every_convolution(tmp_path):
    """One pass over 20 digits with each implementation: the same net, so the same losses up to
    float32 rounding compounded over 20 SGD steps (measured: 1e-7 relative apart), within the
    float32 gradient tolerance."""
    small = ["--train-examples", "20", "--test-examples", "50", "--passes", "1",
             "--progress-every", "0"]
    runs = {conv: lenet1989.main(["--workdir", str(tmp_path / conv), *small, "--conv", conv])
            for conv in ("gather", "rows", "patches", "conv")}
    document = json.loads((tmp_path / "rows" / "results.json").read_text())
    assert document["config"]["conv"] == "rows"
    for conv, metrics in runs.items():
        for key in ("train_loss", "test_loss"):
            assert metrics[key] == pytest.approx(runs["gather"][key],
                                                 rel=tolerance(jnp.float32)), (conv, key)


def test_target_scales_the_plus_minus_one_targets(capsys):
    """--target 0.6: the true class's output is trained towards +0.6, the others towards -0.6
    (the 1989 paper keeps its targets inside the sigmoid's quadratic range); 0 and values above
    1 are refused."""
    _, targets = lenet1989.load(lenet1989.Config(target=0.6, train_examples=7,
                                                 test_examples=3))["train"]
    labels = data.load_usps("train")[1][:7]
    expected = np.where(np.arange(10) == labels[:, None], 0.6, -0.6).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(targets), expected)
    for value in ("0", "1.5"):
        with pytest.raises(SystemExit):
            lenet1989.main(["--target", value])
        assert f"--target: got '{value}'; allowed: > 0 and <= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--variant", "modern", "--optimizer", "sdlm"],
     "--optimizer: got 'sdlm'; it applies only with --variant 1989 (got --variant modern)"),
    (["--variant", "modern", "--target", "0.6"],
     "--target: got 0.6; it applies only with --variant 1989"),
    (["--mu", "0.05"], "--mu: got 0.05; it applies only with --optimizer sdlm (got --optimizer "
                       "sgd)"),
    (["--schedule", "constant"],
     "--schedule: got 'constant'; it applies only with --optimizer sdlm"),
    (["--dropout", "0.5"], "--dropout: got 0.5; it applies only with --variant modern"),
    (["--variant", "modern", "--order", "shuffled"],
     "--order: got 'shuffled'; it applies only with --variant 1989"),
    (["--h3-units", "32"], "--h3-units: got 32; it applies only with --variant modern"),
    (["--variant", "modern", "--h2-table", "cyclic"],
     "--h2-table: got 'cyclic'; it applies only with --variant 1989 (got --variant modern)"),
])
def test_an_option_that_would_do_nothing_is_refused(tmp_path, argv, message):
    """Each option of one variant or optimizer, changed from its default under another, stops
    the run before any work instead of being silently ignored."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        lenet1989.main(["--workdir", str(tmp_path / "run"), *argv])
    assert not (tmp_path / "run").exists()


def test_shuffled_order_presents_a_new_permutation_each_pass_from_the_seed(tmp_path):
    """--order shuffled (the 1989 variant): the same seed gives the same run, and it is not
    the constant-order run (the same initial weights, the same 300 digits in another
    order)."""
    def run(name, *extra):
        return lenet1989.main(["--workdir", str(tmp_path / name), *SMALL, *extra])

    constant = run("constant")
    shuffled, again = run("shuffled", "--order", "shuffled"), run("again", "--order", "shuffled")
    assert shuffled["train_loss"] == again["train_loss"]
    assert abs(shuffled["train_loss"] - constant["train_loss"]) > 1e-6


def test_permuted_order_is_one_permutation_of_the_training_digits_from_the_seed():
    """--order permuted: the training digits (after --held-out takes the file's last ones)
    come in one order drawn from the seed, kept for every pass; the same digits with their
    own targets, the test and held-out digits in the file's order."""
    def splits(**options):
        return lenet1989.load(lenet1989.Config(train_examples=60, test_examples=5, held_out=10,
                                               **options))

    constant = splits()
    permuted, again, other = (splits(order="permuted", seed=s) for s in (0, 0, 1))
    x, t = (np.asarray(a) for a in constant["train"])
    px, pt = (np.asarray(a) for a in permuted["train"])
    rows = {row.tobytes(): target.tobytes() for row, target in zip(x, t)}
    assert len(rows) == 50
    assert {row.tobytes(): target.tobytes() for row, target in zip(px, pt)} == rows
    assert not np.array_equal(px, x)
    np.testing.assert_array_equal(np.asarray(again["train"][0]), px)
    assert not np.array_equal(np.asarray(other["train"][0]), px)
    for split in ("test", "held_out"):
        np.testing.assert_array_equal(np.asarray(permuted[split][0]),
                                      np.asarray(constant[split][0]))


@pytest.mark.parametrize("scheme", ["blocks", "cyclic"])
def test_h2_table_option_connects_h2_as_its_table_says(scheme):
    """--h2-table: H2's weights from H1 map i to H2 map o are nonzero exactly where the
    table of that scheme says o sees i."""
    config = lenet1989.Config(h2_table=scheme, train_examples=8, test_examples=4)
    model = lenet1989.build(config, lenet1989.load(config))[0]
    _, params = model.init(jax.random.key(0), (-1, 16, 16, 1))
    connected = np.any(np.asarray(params[2]["w"]) != 0, axis=(0, 1))  # (H1 map, H2 map)
    np.testing.assert_array_equal(connected, nets.lenet1989_h2_table(scheme))
