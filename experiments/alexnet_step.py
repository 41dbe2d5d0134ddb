"""AlexNet at full size (227x227x3, 1000 classes): training steps with the hand-written backward.

    python -m experiments.alexnet_step [--workdir DIR] [--towers 2] [--batch 0] [--steps 5]

One compiled training step of `nets.models.alexnet` (61 M parameters) with the manual engine
and the paper's update rule (Krizhevsky et al. 2012, section 5: momentum 0.9, weight decay
5e-4, learning rate 0.01; `optax.chain(add_decayed_weights, sgd)`), on a batch of random
N(0, 1) images with random labels (no ImageNet here; the point is the full-size step, not
accuracy). --batch 0 takes the paper's 128 on a GPU and 2 on a CPU.

Reported: the compile time apart from the steady-state step time (median of --repeats timed
steps after the --steps of the loss curve, each taking the state the previous one returned,
with the parameters and momentum donated so that they are updated in place, as in a training
loop; `training.benchmark.time_chained`), examples per second, XLA's temporary
memory for the compiled step, and the softmax cross-entropy over --steps successive steps on
the same batch (it must fall: the net memorises the batch). Before training, the manual
gradient at full size is set beside jax.grad's on the same batch, leaf by leaf, in float64
and in float32 with the matmul precision "highest" (so that a GPU does not use TF32 for one
side only), each checked against its tolerance in `nets.gradcheck.TOLERANCES`.

Dropout: the paper's (rate 0.5 after fc6 and fc7, section 4.2), a fresh mask every step
(the step's key is the dropout key folded with the step number; `--no-dropout` trains
without). The gradient check holds one key's masks fixed in both engines.

Writes DIR/results.json (the README's keys; "metrics": params, batch, step_s, compile_s,
examples_per_s, temp_bytes, loss_first, loss_last, float64_max_error, float64_passed,
float32_max_error, float32_passed, float32_within_rounding, device; "history": the loss per
step; "gradient_errors": per leaf), results.md and loss.png.

Expected on the 2-core CPU (jax 0.10.2, batch 2, dropout, 2026-12-04): 35 s in all; the
step compiles in 3.3 s and takes 0.22 s (9.1 examples/s); the loss on the batch 8.47, 2.31,
1.19, 0.31, 1.26 over 5 steps (each step draws new masks); manual vs jax.grad at most 1.0e-15
in float64 and 4.6e-7 in float32 (conv1.w). Both float32 gradients are up to 1e-2 from the
float64 one, identically (`gradient_errors`: max-pool ties that only float32 has). XLA's
temporaries are 253 MB: updating in place, it keeps copies of weights the backward still
reads (fc6's are 151 MB); without donation they were 34 MB, and the new parameters and
momentum, 488 MB, were fresh outputs. At the paper's batch on the same CPU (--batch 128
--steps 3 --repeats 3 --no-check-gradient): a step 10.1 s (9.7-10.2 s; 12.7 examples/s),
2.18 GB of XLA temporaries, loss 7.99, 7.72, 7.67; the same step without donation took
9.4-11.3 s alternated with it in one process (9.4-9.7 s with). Before the grouped
convolutions ran group by group and the LRN without a power (both 2026-12-04) a step took
0.41-0.45 s at batch 2 and 20.2 s at 128.
On an NVIDIA H200 (jax 0.11.2, batch 128, dropout, 2026-12-04): a step 7.3 ms (17,511
examples/s), compile 7.6 s, 1.30 GB of temporaries, loss 7.99 -> 7.08 over 5 steps; manual vs
jax.grad 1.4e-15 in float64 and 6.7e-4 in float32 (conv2.w; every other leaf <= 7.3e-7), over
float32's tolerance: max-pool near-ties the two compiled programs likely round apart (that run
predates `float32_autodiff_one_ulp`, which would tell).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

import nets
from experiments.bench import temp_bytes
from nets.gradcheck import TOLERANCES, astype, named_parameters, relative_error
from nets.models import alexnet
from training import benchmark, plots, results
from training.config import option, parse, run_main, to_dict
from training.harness import open_run

EXPERIMENT = "alexnet_step"
INPUT_SHAPE = (227, 227, 3)
CLASSES = 1000
PAPER_BATCH, CPU_BATCH = 128, 2


@dataclasses.dataclass(frozen=True)
class Config:
    towers: int = option(2, "2: the paper's two towers (grouped conv2, conv4, conv5); 1: one",
                         choices=(1, 2))
    batch: int = option(0, f"examples a step (0: {PAPER_BATCH} on a GPU, {CPU_BATCH} on a CPU)",
                        ge=0)
    steps: int = option(5, "successive steps on the same batch, for the loss history", ge=1)
    repeats: int = option(10, "timed calls of the step (after warm-up)", ge=1)
    lr: float = option(0.001, "learning rate (the paper's initial 0.01 made the loss jump "
                              "between 0.96 and 50 on 2 random images)", gt=0)
    seed: int = option(0, "seed of the parameters and of the random batch", ge=0)
    check_gradient: bool = option(True, "compare the manual gradient with jax.grad first")
    dropout: bool = option(True, "the paper's dropout on fc6 and fc7, a new mask each step")


def resolved_batch(config: Config) -> int:
    if config.batch:
        return config.batch
    return CPU_BATCH if jax.default_backend() == "cpu" else PAPER_BATCH


def paper_optimizer(lr: float) -> optax.GradientTransformation:
    """Section 5: v <- 0.9 v - 0.0005 lr w - lr dL/dw; w <- w + v."""
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))


def random_batch(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """x: (batch, 227, 227, 3) N(0, 1); targets: (batch, 1000) one-hot random labels."""
    image_key, label_key = jax.random.split(key)
    x = jax.random.normal(image_key, (batch, *INPUT_SHAPE), jnp.float32)
    labels = jax.random.randint(label_key, (batch,), 0, CLASSES, dtype=jnp.int32)
    return x, jax.nn.one_hot(labels, CLASSES, dtype=jnp.float32)


def training_step(model, objective, optimizer):
    """step(params, opt_state, x, targets, key) -> (params, opt_state, loss before the
    update), the gradient by the hand-written backward passes; key: the dropout masks' (None:
    no dropout)."""
    value_and_grad = nets.manual(model, objective)

    def step(params, opt_state, x, targets, key):
        loss, grad = value_and_grad(params, x, targets, key)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def one_ulp_apart(x: jax.Array, key: jax.Array) -> jax.Array:
    """x with a random half of its entries moved up to the next representable value."""
    moved = jax.random.bernoulli(key, 0.5, x.shape)
    return jnp.where(moved, jnp.nextafter(x, jnp.asarray(jnp.inf, x.dtype)), x)


def gradient_errors(model, objective, params, x, targets, key=None) -> list[dict]:
    """Per parameter leaf, relative errors (matmul precision "highest" throughout; key: the
    dropout masks, the same for all five gradients):
    float64: the manual gradient against jax.grad's, both in float64;
    float32: the manual gradient against jax.grad's, both in float32 (the two checks of
    `nets.gradcheck.TOLERANCES`); and, for information, each float32 gradient against the
    float64 jax.grad, and jax.grad's float32 gradient against itself at inputs one ulp apart
    (`one_ulp_apart`): how far rounding alone moves this float32 gradient. Two programs that
    round their forward passes differently (a GPU compiles each with its own convolution
    algorithms) can differ by that much without either being wrong. Then both float32
    gradients computed in one jitted program (`float32_joint_manual_vs_autodiff`: XLA can
    share one forward pass between them there, so rounding no longer splits them but a
    different rule for max-pool ties, or a less precise backward algorithm, would), and
    jax.grad's from that program against its own
    (`float32_autodiff_joint_vs_alone`: nonzero when two compilations round apart).

    The last two are far larger (up to 1e-2 at batch 2 on the CPU) and equal to each other:
    at this initialisation conv5's pre-activations are its bias 1 plus terms near 1e-8, which
    float32 rounds to exactly 1, so its max-pool windows tie where float64's do not and the
    gradient is shared among the tied inputs instead of going to one. Both engines share the
    float32 forward pass and split ties alike (`nets.pooling.MaxPool`), so they agree."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        wide = astype((params, x, targets), jnp.float64)
        manual64 = jax.jit(nets.manual(model, objective))(*wide, key)[1]
        exact = jax.jit(nets.autodiff(model, objective))(*wide, key)[1]
    with jax.default_matmul_precision("highest"):
        manual32 = jax.jit(nets.manual(model, objective))(params, x, targets, key)[1]
        autodiff32 = jax.jit(nets.autodiff(model, objective))(params, x, targets, key)[1]
        nudged = one_ulp_apart(x, jax.random.key(1))
        autodiff32_nudged = jax.jit(nets.autodiff(model, objective))(params, nudged, targets,
                                                                     key)[1]
        manual32_joint, autodiff32_joint = jax.jit(lambda *args: (
            nets.manual(model, objective)(*args)[1],
            nets.autodiff(model, objective)(*args)[1]))(params, x, targets, key)
    rows = []
    for layer, name, path in named_parameters(model, params):
        def leaf(tree, path=path):
            for key in path:
                tree = tree[getattr(key, "key", getattr(key, "idx", None))]
            return tree

        rows.append({"parameter": f"{layer}.{name}", "shape": list(leaf(exact).shape),
                     "float64_manual_vs_autodiff": relative_error(leaf(manual64), leaf(exact)),
                     "float32_manual_vs_autodiff": relative_error(leaf(manual32),
                                                                  leaf(autodiff32)),
                     "float32_manual_vs_float64": relative_error(leaf(manual32), leaf(exact)),
                     "float32_autodiff_vs_float64": relative_error(leaf(autodiff32),
                                                                   leaf(exact)),
                     "float32_autodiff_one_ulp": relative_error(leaf(autodiff32_nudged),
                                                                leaf(autodiff32)),
                     "float32_joint_manual_vs_autodiff": relative_error(
                         leaf(manual32_joint), leaf(autodiff32_joint)),
                     "float32_autodiff_joint_vs_alone": relative_error(
                         leaf(autodiff32_joint), leaf(autodiff32))})
    return rows


def gradient_verdict(errors: list[dict]) -> dict:
    """The largest manual-vs-jax.grad errors in float64 and float32 and whether each is within
    its tolerance in `nets.gradcheck.TOLERANCES` (None without a check). Apart from that
    verdict, `float32_within_rounding`: whether every leaf's float32 error is within the
    tolerance or within what one ulp of input rounding moves jax.grad's own float32 gradient
    (`float32_autodiff_one_ulp`): a failed float32 check that passes this one is rounding's
    doing, not the backward's."""
    if not errors:
        return {"float64_max_error": None, "float64_passed": None,
                "float32_max_error": None, "float32_passed": None,
                "float32_within_rounding": None}
    verdict = {}
    for dtype in ("float64", "float32"):
        largest = max(e[f"{dtype}_manual_vs_autodiff"] for e in errors)
        verdict[f"{dtype}_max_error"] = largest
        verdict[f"{dtype}_passed"] = largest <= TOLERANCES[dtype]["vs_autodiff"]
    tolerance = TOLERANCES["float32"]["vs_autodiff"]
    verdict["float32_within_rounding"] = all(
        e["float32_manual_vs_autodiff"] <= max(tolerance, e["float32_autodiff_one_ulp"])
        for e in errors)
    return verdict


def main(argv=None) -> dict:
    config, harness_args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    workdir = open_run(EXPERIMENT, config, harness_args).workdir
    batch = resolved_batch(config)
    model = alexnet(towers=config.towers)
    objective = nets.Objective(nets.softmax_cross_entropy(), 0.0)
    params_key, batch_key, dropout_key = jax.random.split(jax.random.key(config.seed), 3)
    params = jax.jit(lambda key: model.init(key, (-1, *INPUT_SHAPE))[1])(params_key)
    x, targets = random_batch(batch_key, batch)

    def step_key(index):
        return jax.random.fold_in(dropout_key, index) if config.dropout else None

    errors = (gradient_errors(model, objective, params, x, targets, step_key(0))
              if config.check_gradient else [])

    parameter_count = sum(leaf.size for leaf in jax.tree.leaves(params))
    optimizer = paper_optimizer(config.lr)
    opt_state = optimizer.init(params)
    # The parameters and the optimizer state are donated: each step updates them in place,
    # as a training loop would (at batch 2, 228-230 against 274-284 ms a step without).
    step, compile_s = benchmark.compile_jitted(training_step(model, objective, optimizer),
                                               params, opt_state, x, targets, step_key(0),
                                               donate_argnums=(0, 1))
    history, state = [], (params, opt_state)
    for index in range(config.steps):
        *state, loss = step(*state, x, targets, step_key(index))
        history.append({"step": index, "loss": float(loss)})
    timing, *_ = benchmark.time_chained(step, tuple(state), (x, targets, step_key(0)),
                                        config.repeats, compile_s=compile_s)

    metrics = {"params": parameter_count, "batch": batch,
               "step_s": timing.median_s, "step_p10_s": timing.p10_s,
               "step_p90_s": timing.p90_s, "compile_s": compile_s,
               "examples_per_s": batch / timing.median_s,
               "temp_bytes": temp_bytes(step), "loss_first": history[0]["loss"],
               "loss_last": history[-1]["loss"], **gradient_verdict(errors),
               "device": str(jax.devices()[0].device_kind)}
    results.write_results(workdir, EXPERIMENT, to_dict(config), metrics, history,
                          {"compile": compile_s, "run": timing.median_s * config.steps},
                          gradient_errors=errors)
    plots.save_curves(workdir / "loss.png", [{"ylabel": "softmax cross-entropy", "series": {
        "same batch": ([h["step"] for h in history], [h["loss"] for h in history])}}],
        title=f"AlexNet {config.towers} tower(s), batch {batch}, "
              f"{'dropout 0.5' if config.dropout else 'no dropout'}, {metrics['device']}")
    results.save_and_print_table(workdir, render(metrics, errors, workdir))
    return metrics


def render(metrics: dict, errors: list[dict], workdir) -> str:
    columns = ["device", "params", "batch", "compile_s", "step_s", "examples_per_s",
               "temp_bytes", "loss_first", "loss_last"]
    text = "## AlexNet at 227x227, one training step (manual backward)\n"
    text += results.markdown_table([metrics], columns)
    if errors:
        text += ("\n## Manual gradient vs jax.grad at full size, matmul precision highest\n"
                 + "; ".join(
                     f"{dtype} manual vs jax.grad: max {metrics[f'{dtype}_max_error']:.2e} "
                     f"(tolerance {TOLERANCES[dtype]['vs_autodiff']:g}: "
                     f"{'pass' if metrics[f'{dtype}_passed'] else 'FAIL'})"
                     for dtype in ("float64", "float32"))
                 + f"; float32 within jax.grad's own one-ulp sensitivity: "
                 f"{'yes' if metrics['float32_within_rounding'] else 'no'}\n\n")
        text += results.markdown_table(errors, ["parameter", "shape",
                                                "float64_manual_vs_autodiff",
                                                "float32_manual_vs_autodiff",
                                                "float32_manual_vs_float64",
                                                "float32_autodiff_vs_float64",
                                                "float32_autodiff_one_ulp",
                                                "float32_joint_manual_vs_autodiff",
                                                "float32_autodiff_joint_vs_alone"])
    return text + f"\nResults in {workdir}\n"


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
