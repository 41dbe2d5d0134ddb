"""The gradient report for every model the project has: hand-written backward vs jax.grad.

    python -m experiments.gradcheck [--workdir DIR] [--batch 16] [--seed 0] [--move 0.5]

For each model in `CASES` (the MLPs with each loss, one with every activation of
`nets.ACTIVATIONS` the others lack, and a residual one with LayerNorm, a conv
net with BatchNorm after its activations, a 2-block transformer on random token ids and a
1-block one with the tanh GELU and tied embeddings, two
stacks of recurrent cells (every cell: Elman, LSTM with and without peepholes, both GRUs) and
a bidirectional layer, Dense blocks in `nets.remat` and a stack with BPTT recomputing
segments (`recompute_every`), LeNet-1989 in its three forms, LeNet-5 (with a Dense output and with
the paper's RBF output and MAP criterion), and AlexNet at a reduced 67x67 input with its
dropout masks drawn), on a random batch, at the model's initial parameters moved by half
each tensor's RMS (`--move`; at the initial point a LayerNorm's gain is exactly 1, and a
backward that divided by it would pass): the manual engine's gradient against jax.grad in
float64 and float32, and both against central finite differences in float64, per layer and
parameter (nets/gradcheck.py has the tolerance table: float64 <= 1e-10, float32 <= 1e-5,
finite differences <= 1e-6; finite differences on up to 256 coordinates a tensor).

Each model's manual-engine program is also read for equations of JAX's differentiation
(`nets.gradcheck.jax_differentiated`): a backward computed by `jax.vjp` agrees with jax.grad
to rounding, and fails every row of its model ("by_hand" false); so does a float32 check
whose program computes in float64 anywhere ("wider_floats", `nets.gradcheck.wider_floats`).

Writes DIR/results.json with a list "checks" of {"model", "layer", "param", "dtype",
"rel_err_vs_autodiff", "rel_err_vs_finite_diff", "cosine", "by_hand", ...} and "passed",
results.md, and errors.png (every tensor's relative errors beside the tolerances). Exits
with status 1 if any check fails.

Measured on the 2-core CPU (jax 0.10.2, 2026-12-03, AlexNet's dropout on, the transformer on
token ids): 135 s, most of it compiling; all 252 checks pass, with float64 relative errors vs
jax.grad <= 1.1e-15 and vs finite differences <= 7.7e-8 (AlexNet's conv2 1.2e-4 and conv1
2.2e-5, within their rounding bounds); float32 <= 6.6e-7. Of 11,510 coordinates differenced,
one (AlexNet's conv1) was left out for a ReLU kink within the step (`fd_kinks`,
nets.gradcheck.smooth_coordinates). With the two recurrent stacks and the bidirectional layer
(2026-12-04): 302 checks pass in 79 s (a warm compilation cache), the same bounds; the
recurrent tensors' float64 errors <= 4.0e-16 against jax.grad and <= 1.4e-8 against finite
differences, float32 <= 1.1e-7; 12,596 coordinates differenced. With LeNet-5's RBF output
and MAP criterion too (later that day): 346 checks in 60 s, float64 <= 1.22e-15, float32
<= 7.31e-7, 14,076 coordinates differenced. With the BatchNorm net (2026-12-05, a slower
host): 366 checks in 103 s, float64 <= 1.52e-15 and float32 <= 8.18e-7 (both that net's),
14,485 coordinates differenced. With the remat blocks and the recomputing stack (2026-12-05,
a new session): 390 checks in 51 s, float64 <= 2.01e-15, float32 <= 8.18e-7; the two new
models' float64 <= 6.9e-16. With the MLP of the newer activations (2026-12-06): 418 checks
in 52 s, the same bounds; that model's float64 <= 5.6e-16, float32 <= 3.3e-7. With the tied
GELU transformer too (the same day): 452 checks in 53 s, the same bounds; its float64 <=
6.4e-16 against jax.grad and <= 1.3e-8 against finite differences, float32 <= 3.2e-7.
At the moved point (`--move 0.5`, 2026-12-07; every number above is at the initial one):
452 checks pass in 63 s (376 s beside a mutant run), float64 <= 4.9e-15, float32 <= 8.6e-7 (both
LeNet-5-RBF's S2), finite differences <= 6.7e-5 (AlexNet's conv2, bound 8.4e-4).
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

import nets
from nets import models
from nets.gradcheck import TOLERANCES, gradient_report, moved_parameters
from training import plots, results
from training.config import option, parse, run_main, to_dict
from training.harness import open_run

EXPERIMENT = "gradcheck"


class Case(NamedTuple):
    """A model and objective to check, on inputs of `input_shape` (no batch axis) and one-hot
    or +-1 targets."""

    name: str
    build: Callable[[], tuple[nets.Layer, nets.Objective]]
    input_shape: tuple[int, ...]
    classes: int
    target_kind: str = "one_hot"  # or "plus_minus_one", or "sequence" (class ids per step)
    fd_coordinates: int = 256  # finite differences on at most this many entries per tensor
    fd_step: float = 1e-6
    dropout: bool = False  # the model's Dropout layers active: all gradients with one key


# One Dense layer before each, in this order, in the case "mlp_smooth_activations".
SMOOTH_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "elu", "softplus", "leaky_relu")


def _mse(l2=0.0):
    return nets.Objective(nets.mean_squared_error(), l2)


CASES = [
    Case("mlp_lecture", lambda: (nets.build_mlp(64, 10), nets.lecture_objective(1.0)), (64,), 10),
    Case(
        "mlp_lecture_probabilities",
        lambda: (nets.build_mlp(8, 3, hidden_layers=2, output_activation="sigmoid"),
                 nets.lecture_objective(0.5, from_logits=False)),
        (8,), 3,
    ),
    Case(
        "mlp_tanh_mse",
        lambda: (nets.build_mlp(12, 4, hidden_layers=2, activation="tanh",
                                output_activation="tanh"), _mse(0.1)),
        (12,), 4, "plus_minus_one",
    ),
    Case(
        "mlp_relu_softmax",
        lambda: (nets.build_mlp(10, 5, hidden_layers=3, activation="relu",
                                w_init=nets.initializers.he_normal()),
                 nets.Objective(nets.softmax_cross_entropy(), 0.01)),
        (10,), 5,
    ),
    Case(
        "mlp_smooth_activations",
        lambda: (nets.serial(*[layer for index, activation in enumerate(SMOOTH_ACTIVATIONS)
                               for layer in (nets.Dense(6, name=f"dense{index}"),
                                             nets.ACTIVATIONS[activation](name=activation))],
                             nets.Dense(5, name="out"), name="mlp_smooth_activations"),
                 nets.Objective(nets.softmax_cross_entropy(), 0.01)),
        (10,), 5,
    ),
    Case(
        "residual_mlp_layernorm",
        lambda: (nets.residual_mlp(10, 5, width=12, blocks=2),
                 nets.Objective(nets.softmax_cross_entropy(), 0.01)),
        (10,), 5,
    ),
    # BatchNorm after each activation (so that no bias sits just before one, where its
    # gradient is exactly 0 and a relative error compares two roundings), with the batch's
    # statistics over (batch, H, W) and over the batch.
    Case(
        "conv_batchnorm",
        lambda: (nets.serial(nets.Conv2D(4, 3, name="conv"), nets.Tanh(name="conv_act"),
                             nets.BatchNorm(4, name="conv_bn"), nets.Flatten(name="flat"),
                             nets.Dense(8, name="hidden"), nets.Relu(name="hidden_act"),
                             nets.BatchNorm(8, name="hidden_bn"), nets.Dense(5, name="out"),
                             name="conv_batchnorm"),
                 nets.Objective(nets.softmax_cross_entropy(), 0.01)),
        (6, 6, 2), 5,
    ),
    # A sequence case: inputs token ids (batch, 6) of 7, targets the next-token ids (batch, 6).
    Case("transformer_lm",
         lambda: (nets.transformer_lm(7, context=6, features=8, heads=2, blocks=2),
                  nets.Objective(nets.sequence_cross_entropy())),
         (6,), 7, "sequence"),
    # The same with GPT-2's choices: the tanh GELU, and the output weights tied to the
    # embedding (`nets.tie`: one matrix, its gradient from both uses).
    Case("transformer_lm_tied_gelu",
         lambda: (nets.transformer_lm(7, context=6, features=8, heads=2, blocks=1,
                                      activation="gelu_tanh", tie_embeddings=True),
                  nets.Objective(nets.sequence_cross_entropy(), 0.01)),
         (6,), 7, "sequence"),
    # Recurrent stacks on sequences of 7 steps of 3 features, read out at the last step: every
    # cell, each one's BPTT through the steps and into the cell below.
    Case("rnn_lstm_peephole_elman_gru_reset_after",
         lambda: (nets.sequence_model([nets.lstm(6, peepholes=True), nets.elman(4),
                                       nets.gru_reset_after(5)], 4, last_step=True), _mse()),
         (7, 3), 4, "plus_minus_one"),
    Case("rnn_elman_sigmoid_lstm_gru",
         lambda: (nets.sequence_model([nets.elman(5, "sigmoid"), nets.lstm(4), nets.gru(5)], 4,
                                      last_step=True),
                  nets.Objective(nets.softmax_cross_entropy())),
         (7, 3), 4),
    Case("rnn_bidirectional_lstm_gru_reset_after",
         lambda: (nets.serial(nets.bidirectional(nets.lstm(4), nets.gru_reset_after(3)),
                              nets.recurrent.LastStep(), nets.Dense(4)), _mse()),
         (7, 3), 4, "plus_minus_one"),
    # A bidirectional stack: two layers of both directions, read at each direction's end,
    # with dropout between the layers (one key for all gradients).
    Case("rnn_bidirectional_stack_gru_elman_dropout",
         lambda: (nets.sequence_model([nets.gru(4), nets.elman(3)], 4, last_step=True,
                                      bidirectional=True, dropout=0.3),
                  nets.Objective(nets.softmax_cross_entropy())),
         (7, 3), 4, dropout=True),
    # The ways of keeping fewer numbers for the backward pass: Dense blocks each in
    # `nets.remat` (one with dropout, its masks drawn again from the same key), and a stack
    # with BPTT recomputing segments of 3 of the 7 steps (one step kept, two segments).
    Case("remat_blocks_dropout",
         lambda: (nets.serial(nets.remat(nets.serial(nets.Dense(8, name="block_0_dense"),
                                                     nets.Tanh())),
                              nets.remat(nets.serial(nets.Dense(8, name="block_1_dense"),
                                                     nets.Tanh(), nets.Dropout(0.3))),
                              nets.Dense(4, name="out")), _mse(0.1)),
         (6,), 4, "plus_minus_one", dropout=True),
    Case("rnn_lstm_gru_recompute_every_3",
         lambda: (nets.sequence_model([nets.lstm(4), nets.gru(3)], 4, last_step=True,
                                      recompute_every=3),
                  nets.Objective(nets.softmax_cross_entropy())),
         (7, 3), 4),
    Case("lenet1989", lambda: (models.lenet1989(), _mse()), (16, 16, 1), 10, "plus_minus_one"),
    Case("lenet1989_scaled_tanh", lambda: (models.lenet1989(scaled_tanh=True), _mse(0.1)),
         (16, 16, 1), 10, "plus_minus_one"),
    Case("lenet1989_modern",
         lambda: (models.lenet1989_modern(), nets.Objective(nets.softmax_cross_entropy())),
         (16, 16, 1), 10),
    Case("lenet5", lambda: (models.lenet5(), _mse()), (32, 32, 1), 10, "plus_minus_one"),
    # The paper's LeNet-5: RBF outputs with fixed centres (no parameters of their own), the
    # MAP criterion with a rubbish class near enough (j = 1) to take part.
    Case("lenet5_rbf_map",
         lambda: (models.lenet5(output="rbf"), nets.Objective(nets.lecun1998_map(1.0))),
         (32, 32, 1), 10),
    # AlexNet's layers at a reduced input size (67x67 is the smallest its strides allow), with
    # its dropout on, as in training. Its conv1 gradients are ~1e-5 of E: finite differences
    # there are limited by rounding (see nets.gradcheck.finite_difference_tolerance); a larger
    # step crosses ReLU kinks instead.
    Case("alexnet_67x67",
         lambda: (models.alexnet(num_classes=5), nets.Objective(nets.softmax_cross_entropy())),
         (67, 67, 3), 5, fd_coordinates=6, dropout=True),
]


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = option(16, "examples in the random batch of every check", ge=1)
    seed: int = option(0, "seed of the parameters and the batch", ge=0)
    move: float = option(0.5, "check at the initial parameters moved by this times each "
                         "tensor's RMS times N(0, 1) (nets.gradcheck.moved_parameters); 0: at "
                         "the initial point itself, where a gain of 1 hides a backward that "
                         "divides by it", ge=0)
    models: tuple[str, ...] = option((), "comma-separated models to check (default: all)",
                                     choices=tuple(case.name for case in CASES))


def case_batch(case: Case, batch: int, key: jax.Array):
    """Random inputs (batch, *input_shape) and targets: (batch, classes); for a sequence case
    token ids (batch, time) in and out, both in [0, classes)."""
    x_key, label_key = jax.random.split(key)
    if case.target_kind == "sequence":
        ids = jax.random.randint(label_key, (batch, case.input_shape[0] + 1), 0, case.classes)
        return ids[:, :-1], ids[:, 1:]
    x = jax.random.normal(x_key, (batch, *case.input_shape))
    targets = jax.nn.one_hot(jax.random.randint(label_key, (batch,), 0, case.classes),
                             case.classes)
    if case.target_kind == "plus_minus_one":
        targets = 2 * targets - 1
    return x, targets


def case_key(seed: int, case: Case) -> jax.Array:
    """The key of a case's parameters and batch: from the seed and the case's name, so that
    `--models NAME` checks the same point as the full run, whatever cases come before it."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(case.name.encode()) & 0x7FFFFFFF)


def run_checks(batch: int, seed: int, cases: list[Case] | None = None,
               move: float = 0.5) -> list[dict]:
    """Every case's gradient report in float64 and float32, as one list of rows, at its
    initial parameters moved by `move` (`nets.gradcheck.moved_parameters`)."""
    checks = []
    for case in CASES if cases is None else cases:
        model, objective = case.build()
        init_key, data_key = jax.random.split(case_key(seed, case))
        dropout_key = jax.random.fold_in(data_key, 1)
        initial = model.init(init_key, (-1, *case.input_shape))[1]
        params = moved_parameters(jax.random.fold_in(init_key, 1), initial, move)
        x, targets = case_batch(case, batch, data_key)
        for dtype in (jnp.float64, jnp.float32):
            checks += gradient_report(model, objective, params, x, targets, dtype, case.name,
                                      max_fd_coordinates=case.fd_coordinates,
                                      fd_step=case.fd_step,
                                      key=dropout_key if case.dropout else None)
    return checks


def save_error_plot(path, checks: list[dict]) -> None:
    """Every tensor's relative errors, one strip per model, beside the tolerances."""
    models_in_order = list(dict.fromkeys(check["model"] for check in checks))

    def points(dtype, key):
        return [(c["model"], c[key]) for c in checks
                if c["dtype"] == dtype and c[key] is not None]

    plots.save_strips(path, models_in_order, {
        "float64, manual vs jax.grad": points("float64", "rel_err_vs_autodiff"),
        "float32, manual vs jax.grad": points("float32", "rel_err_vs_autodiff"),
        "float64, manual vs finite differences": points("float64", "rel_err_vs_finite_diff"),
    }, "relative error per parameter tensor", title="hand-written backward passes",
        references={
        f"float64 tolerance {TOLERANCES['float64']['vs_autodiff']:.0e}":
            TOLERANCES["float64"]["vs_autodiff"],
        f"float32 tolerance {TOLERANCES['float32']['vs_autodiff']:.0e}":
            TOLERANCES["float32"]["vs_autodiff"],
        f"finite differences {TOLERANCES['float64']['vs_finite_diff']:.0e} (raised where "
        "rounding needs it)": TOLERANCES["float64"]["vs_finite_diff"],
    })


def main(argv=None) -> int:
    config, harness_args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    workdir = open_run(EXPERIMENT, config, harness_args).workdir
    start = time.perf_counter()
    cases = [case for case in CASES if not config.models or case.name in config.models]
    checks = run_checks(config.batch, config.seed, cases, config.move)
    seconds = {"compile": None, "run": time.perf_counter() - start}
    passed = all(check["passed"] for check in checks)
    failed = [c for c in checks if not c["passed"]]
    metrics = {
        "checks": len(checks), "failed": len(failed), "passed": passed,
        "max_rel_err_vs_autodiff": {
            dtype: max(c["rel_err_vs_autodiff"] for c in checks if c["dtype"] == dtype)
            for dtype in TOLERANCES
        },
        "max_rel_err_vs_finite_diff": max(
            c["rel_err_vs_finite_diff"] for c in checks if c["dtype"] == "float64"
        ),
        "fd_coordinates": sum(c["fd_coordinates"] for c in checks),
        "fd_kinks": sum(c["fd_kinks"] for c in checks),
        "by_hand": all(c["by_hand"] for c in checks),
        # equations of a float32 check that compute in float64 (each fails its model's rows)
        "wider_floats": sorted({f"{c['model']}: {e}" for c in checks for e in c["wider_floats"]}),
    }
    config = {**to_dict(config), "tolerances": TOLERANCES,
              "models": sorted({check["model"] for check in checks})}
    results.write_results(workdir, EXPERIMENT, config, metrics, [], seconds,
                          checks=checks, passed=passed)
    save_error_plot(workdir / "errors.png", checks)
    columns = ["model", "layer", "param", "dtype", "rel_err_vs_autodiff",
               "rel_err_vs_finite_diff", "autodiff_rel_err_vs_finite_diff", "fd_kinks", "cosine",
               "by_hand", "passed"]
    verdict = "all checks passed" if passed else f"{len(failed)} of {len(checks)} checks FAILED"
    results.save_and_print_table(
        workdir, results.markdown_table(checks, columns) + f"\n{verdict}; results in {workdir}\n"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
