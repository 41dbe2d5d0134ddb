"""Backpropagation is "slower, and needs more memory, than other methods": measured.

    python -m experiments.memory_time [--workdir DIR] [--methods logistic,mlp,lenet1989,...]
        [--passes 10] [--train-examples 0] [--no-isolate]

On the USPS digits (7,291 training, 2,007 test; 16x16 grey levels in [-1, 1]), each method is
trained and then tested, each in a fresh Python process (`--isolate`, the default) so that its
memory high-water mark is its own:

  logistic   the lecture's logistic-regression network: one sigmoid output unit per class on
             the 256 pixels (`nets.build_mlp(hidden_layers=0)`), the lecture's objective,
             --passes shuffled passes of mini-batch gradient descent (--batch-size, --lr),
             hand-written backward (manual engine);
  mlp        the lecture's STEP 0 MLP, 256 - 768 - 10 sigmoid, trained the same way;
  lenet1989  LeNet-1989 (`nets.lenet1989`) with the 1989 recipe of experiments.lenet1989:
             one example at a time in a constant order, MSE on +-1 targets, eta = 0.006,
             --passes passes (the paper's 23 give 5.8% test error);
  linear_svm scikit-learn's LinearSVC (liblinear, one-vs-rest, C = 1);
  knn        scikit-learn's KNeighborsClassifier (k = --knn-k, Euclidean, brute force).

What is measured, per method (results.json "table", results.md, memory_time.png):
  * accuracy on the training and test sets;
  * time: for the nets, the compilation of the whole training run (one jitted scan, the data
    as its arguments) and the run itself, apart; for scikit-learn, fit(); for all, prediction
    on the test digits (after a warm-up call for the nets);
  * peak_rss_mb: the growth of the process's peak resident set size during training: free
    heap pages are handed back (malloc_trim), the kernel's high-water mark is reset (writing 5
    to /proc/self/clear_refs) and VmHWM of /proc/self/status is read at the end, so that the
    imports, the data and whatever ran before do not hide it. For the nets it is split into
    compile_rss_mb (XLA's compiler) and run_rss_mb (the training run), and predict_rss_mb is
    the same growth while predicting the test set (where k-NN does its work);
  * xla_temp_mb and xla_argument_mb: XLA's own account of the compiled training run's buffers
    (`compiled.memory_analysis()`): temporaries (every intermediate buffer of the run, after
    XLA's fusion, which keeps many intermediates out of memory) and inputs (parameters,
    optimizer state and the training set);
  * tracemalloc_peak_mb: the peak of Python-heap and NumPy allocations during training
    (`tracemalloc`); XLA's buffers are not allocated through Python and are not counted;
  * stored_numbers: the numbers the trained model keeps (parameters; for k-NN the whole
    training set), and residuals_per_example: the numbers the backward pass keeps per example
    (the layers' `forward` residuals, `jax.eval_shape`).
Without --isolate every method runs in this process, one after another: the times stand, and
the resets keep the RSS figures apart, but memory that an earlier method still holds resident
can serve a later one without growth.

Measured on the 2-core CPU (jax 0.10.2), defaults, 2026-12-04: 31 s wall in all (five fresh
processes, each importing JAX and scikit-learn). Seconds and MiB:

    method      test acc  compile  train  predict  compile RSS  run RSS  predict RSS  XLA temp
    logistic      0.907     0.8     0.10   0.0010        89         9.7       0.0        0.21
    mlp           0.940     1.0     0.79   0.008        117        11.4       6.3        2.62
    lenet1989     0.936     1.4     2.11   0.011        126         0.3       0.5        0.20
    linear_svm    0.903      -      2.74   0.005          -        44.6       8.6          -
    knn (k=3)     0.945      -      0.01   0.130          -         0.9       5.6          -
    (10 passes for the nets; "run RSS" of scikit-learn is that of fit(); numbers kept by the
    trained model: 2,570, 205,066, 10,960, 2,570 and 1,873,787, the last the training set. The
    compiler's RSS growth varies by about 15 MiB from run to run; an earlier run, before
    LeNet-1989's "gather" convolutions, gave 66-101 MiB and LeNet-1989 6.3 s.)

What it shows: "slower" holds for training: LeNet-1989's 73,000 one-example updates take
2.1 s (23 passes, the paper's, about 5 s), the MLP 0.8 s plus 1.0 s of compilation, against
2.7 s for the linear SVM and nothing for k-NN, which pays at prediction instead (0.13 s for
2,007 digits against 0.001-0.011 s for the nets). Here k-NN is also the most accurate
(94.5%), with the MLP (94.0%) and LeNet-1989 after 10 passes (93.6%) just behind, and the two
linear models (logistic 90.7%, SVM 90.3%) behind them. "More memory" holds only for what this
software stack needs: XLA's compiler grows the process by 89-126 MiB per net, more than
LIBLINEAR's fit (45 MiB: tracemalloc sees 14.5 MiB of NumPy allocations, the float64 copy of
the data; the rest, about the size of LIBLINEAR's sparse copy at 16 bytes a pixel, is
allocated in C); the training runs themselves grow it by 0.3-11 MiB, and XLA's temporaries are
0.2-2.6 MiB. Per example, backpropagation keeps 266 (logistic), 1,802 (MLP) and 8,646
(LeNet-1989) numbers for the backward pass, which is what grows with the batch; k-NN keeps the
whole training set. Of LeNet-1989's count, 6,400 are its convolutions' patch matrices (each
input pixel once per window that reads it: H1 64 x 25, H2 16 x 25 x 12), which its "gather"
convolutions keep so that the backward needs no second gather; the other 2,246 are the layers'
inputs and outputs (the earlier count, 2,438, also held the flatten's input, which is now kept
as its shape alone, `nets.StaticShape`).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import multiprocessing
import resource
import time
import tracemalloc

import numpy as np

from training import data, results
from training.config import ConfigError, option, parse, run_main
from training.harness import open_run

EXPERIMENT = "memory_time"
METHODS = ("logistic", "mlp", "lenet1989", "linear_svm", "knn")
NETS = ("logistic", "mlp", "lenet1989")
MB = 2**20


@dataclasses.dataclass(frozen=True)
class Config:
    methods: tuple[str, ...] = option(METHODS, "methods to measure", choices=METHODS)
    passes: int = option(10, "passes over the training set for the nets", ge=1)
    batch_size: int = option(32, "logistic and mlp: mini-batch size", ge=1)
    lr: float = option(0.5, "logistic and mlp: learning rate of plain gradient descent", gt=0)
    hidden_units: int = option(768, "mlp: hidden units (STEP 0: 3 x 256)", ge=1)
    knn_k: int = option(3, "k of the k-nearest-neighbour classifier", ge=1)
    train_examples: int = option(0, "use only the first N training digits (0: all 7,291)",
                                 ge=0)
    test_examples: int = option(0, "use only the first N test digits (0: all 2,007)", ge=0)
    isolate: bool = option(True, "measure each method in a fresh process")
    seed: int = option(0, "seed of initialisations and orders", ge=0)


class PeakMemory:
    """The growth of this process's peak resident set size (RSS) over a stretch of code.

    `start()` first hands the heap's free pages back to the system (glibc's malloc_trim), so
    that new allocations show as growth instead of reusing pages already resident, then resets
    the kernel's high-water mark (writing 5 to /proc/self/clear_refs, Linux 4.0 and later) and
    returns the RSS then; `growth()` is the peak RSS since, minus that. Where the mark cannot be
    reset, the growth is counted from the old peak (`reset` is False), which hides any growth
    below an earlier, higher peak.
    """

    def __init__(self):
        self.reset, self.start_mb = False, 0.0

    @staticmethod
    def peak_mb() -> float:
        """Peak RSS in MiB: VmHWM of /proc/self/status, the mark that clear_refs resets.

        Not getrusage's ru_maxrss: it is the larger of that mark and the peak inherited at
        exec, which for a process spawned by a big parent is the parent's RSS at the fork.
        """
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def start(self) -> float:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: pages freed earlier may stay resident and hide some growth
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start_mb = self.peak_mb()  # after a reset, the peak is the current RSS
        return self.start_mb

    def growth(self) -> float:
        return max(0.0, self.peak_mb() - self.start_mb)


def load(config: dict):
    """((x_train, labels), (x_test, labels)) as NumPy arrays, cut to the configured sizes;
    a size beyond the digits there are is a ConfigError naming the option."""
    splits = []
    for split in ("train", "test"):
        images, labels = data.load_usps(split)
        limit = config[f"{split}_examples"]
        if limit > images.shape[0]:
            raise ConfigError(f"option --{split}-examples: got {limit}; allowed: at most "
                              f"{images.shape[0]}")
        splits.append((images[:limit], labels[:limit]) if limit else (images, labels))
    return tuple(splits)


def measure(method: str, config: dict, splits) -> dict:
    """Train and test one method in this process on `splits` (as `load` returns them); the
    record of the table."""
    if method in NETS:
        return _measure_net(method, config, splits)
    return _measure_sklearn(method, config, splits)


def _measure_sklearn(method, config, splits):
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import LinearSVC

    (x_train, y_train), (x_test, y_test) = splits
    model = (LinearSVC(C=1.0, max_iter=5000) if method == "linear_svm"
             else KNeighborsClassifier(n_neighbors=config["knn_k"], algorithm="brute"))
    memory = PeakMemory()
    memory.start()
    tracemalloc.start()
    tick = time.perf_counter()
    model.fit(x_train, y_train)
    fit_seconds = time.perf_counter() - tick
    traced_peak = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    peak = memory.growth()
    memory.start()
    tick = time.perf_counter()
    test_accuracy = float(np.mean(model.predict(x_test) == y_test))
    predict_seconds = time.perf_counter() - tick
    predict_growth = memory.growth()
    train_accuracy = float(np.mean(model.predict(x_train) == y_train))
    stored = (model.coef_.size + model.intercept_.size if method == "linear_svm"
              else x_train.size + y_train.size)
    return {"method": method, "train_accuracy": train_accuracy, "test_accuracy": test_accuracy,
            "compile_seconds": None, "train_seconds": fit_seconds,
            "predict_seconds": predict_seconds, "peak_rss_mb": peak,
            "compile_rss_mb": None, "run_rss_mb": None, "predict_rss_mb": predict_growth,
            "xla_temp_mb": None,
            "xla_argument_mb": None, "tracemalloc_peak_mb": traced_peak,
            "stored_numbers": int(stored), "residuals_per_example": None,
            "peak_reset": memory.reset}


def _net(method, config):
    """(model, input shape, targets(labels), make_procedure(x, targets)) for one of the nets."""
    import nets
    from training import optim, procedures

    if method == "lenet1989":
        model = nets.lenet1989()
        objective = nets.Objective(nets.mean_squared_error(), 0.0)
        shape = (-1, 16, 16, 1)

        def targets(labels):
            return 2 * data.one_hot(labels, 10) - 1

        optimizer, batch_size, shuffle = optim.gradient_descent(0.006), 1, False
    else:
        model = nets.build_mlp(256, 10, hidden_layers=0 if method == "logistic" else 1,
                               hidden_units=config["hidden_units"])
        objective = nets.lecture_objective(0.0)
        shape = (-1, 256)

        def targets(labels):
            return data.one_hot(labels, 10)

        optimizer, batch_size, shuffle = (optim.gradient_descent(config["lr"]),
                                          config["batch_size"], True)

    def make_procedure(x, t):
        return procedures.stochastic_passes(model, objective, optimizer, x, t,
                                            batch_size=min(batch_size, x.shape[0]),
                                            shuffle=shuffle)

    return model, shape, targets, make_procedure


def _measure_net(method, config, splits):
    import jax
    import jax.numpy as jnp

    from training import metrics, procedures

    model, shape, targets, make_procedure = _net(method, config)
    (x_train, y_train), (x_test, y_test) = splits
    x_train, x_test = (jnp.asarray(x.reshape(shape)) for x in (x_train, x_test))
    t_train, t_test = (jnp.asarray(targets(y)) for y in (y_train, y_test))
    key = jax.random.key(config["seed"])
    # jitted whole: op by op, every random and arithmetic op of the init would compile alone
    params = jax.jit(model.init, static_argnums=1)(key, shape)[1]
    state = jax.block_until_ready(jax.jit(lambda p, k, x, t: make_procedure(x, t).init(p, k))(
        params, jax.random.fold_in(key, 1), x_train, t_train))
    residuals = jax.eval_shape(model.forward, params, x_train[:1])[1]

    def train(state, x, t):
        # the data are arguments of the program, not constants folded into it
        return procedures.run_steps(make_procedure(x, t), state, 0, config["passes"])[0].params

    memory = PeakMemory()
    memory.start()
    tracemalloc.start()
    # timing.compile_and_run does the same, but does not hand back the compiled program,
    # whose memory_analysis() is XLA's account of the run's buffers.
    tick = time.perf_counter()
    compiled = jax.jit(train).lower(state, x_train, t_train).compile()
    compile_seconds = time.perf_counter() - tick
    compile_growth = memory.growth()
    memory.start()
    tick = time.perf_counter()
    trained = jax.block_until_ready(compiled(state, x_train, t_train))
    train_seconds = time.perf_counter() - tick
    run_growth = memory.growth()
    traced_peak = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    analysis = compiled.memory_analysis()
    accuracy = jax.jit(lambda p, x, t: metrics.accuracy(model, p, x, t))
    train_accuracy = float(accuracy(trained, x_train, t_train))
    accuracy(trained, x_test, t_test).block_until_ready()  # compile before timing
    memory.start()
    tick = time.perf_counter()
    test_accuracy = float(accuracy(trained, x_test, t_test))
    predict_seconds = time.perf_counter() - tick
    predict_growth = memory.growth()
    return {"method": method, "train_accuracy": train_accuracy, "test_accuracy": test_accuracy,
            "compile_seconds": compile_seconds, "train_seconds": train_seconds,
            "predict_seconds": predict_seconds, "peak_rss_mb": max(compile_growth, run_growth),
            "compile_rss_mb": compile_growth, "run_rss_mb": run_growth,
            "predict_rss_mb": predict_growth,
            "xla_temp_mb": analysis.temp_size_in_bytes / MB if analysis else None,
            "xla_argument_mb": analysis.argument_size_in_bytes / MB if analysis else None,
            "tracemalloc_peak_mb": traced_peak,
            "stored_numbers": int(sum(leaf.size for leaf in jax.tree.leaves(params))),
            "residuals_per_example": int(sum(leaf.size for leaf in jax.tree.leaves(residuals))),
            "peak_reset": memory.reset}


def measure_isolated(method: str, config: dict, splits) -> dict:
    """`measure` in a fresh (spawned) Python process, so that its peak RSS is its own; the
    data travel to it as NumPy arrays."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(measure, method, config, splits).result()


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    settings = dataclasses.asdict(config)
    splits = load(settings)  # its checks before config.json
    run = open_run(EXPERIMENT, config, args)
    rows = []
    for method in config.methods:
        row = (measure_isolated if config.isolate else measure)(method, settings, splits)
        rows.append(row)
        print(f"{method}: test accuracy {row['test_accuracy']:.4f}, train "
              f"{row['train_seconds']:.2f} s, peak RSS +{row['peak_rss_mb']:.0f} MB", flush=True)
    seconds = {"compile": sum(r["compile_seconds"] or 0.0 for r in rows),
               "run": sum(r["train_seconds"] + r["predict_seconds"] for r in rows)}
    metrics_out = {name: {r["method"]: r[name] for r in rows}
                   for name in ("test_accuracy", "train_accuracy", "train_seconds",
                                "compile_seconds", "predict_seconds", "peak_rss_mb",
                                "compile_rss_mb", "run_rss_mb", "predict_rss_mb", "xla_temp_mb",
                                "tracemalloc_peak_mb", "stored_numbers")}
    results.write_results(run.workdir, EXPERIMENT, settings, metrics_out, rows, seconds,
                          table=rows)
    save_plot(run.workdir, rows)
    results.save_and_print_table(run.workdir, render(config, rows, seconds, run.workdir))
    return metrics_out


def save_plot(workdir, rows):
    """Three bar panels: test error, training time (compile + run), peak RSS growth.

    (training.plots draws curves and histograms; bars are drawn here.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    panels = [("test error", [1 - r["test_accuracy"] for r in rows]),
              ("training seconds (compile + run)",
               [(r["compile_seconds"] or 0.0) + r["train_seconds"] for r in rows]),
              ("peak RSS growth, MB", [r["peak_rss_mb"] for r in rows])]
    figure, axes = plt.subplots(1, 3, figsize=(15, 0.4 * len(rows) + 2))
    for axis, (label, values) in zip(axes, panels):
        axis.barh(range(len(names)), values)
        axis.set_yticks(range(len(names)), names)
        axis.invert_yaxis()
        axis.set_xlabel(label)
        axis.grid(alpha=0.3, axis="x")
    figure.suptitle("USPS digits: backpropagation nets against linear SVM and k-NN")
    figure.tight_layout()
    figure.savefig(workdir / "memory_time.png", dpi=110)
    plt.close(figure)


def render(config, rows, seconds, workdir):
    columns = ["method", "test_accuracy", "train_accuracy", "compile_seconds", "train_seconds",
               "predict_seconds", "peak_rss_mb", "compile_rss_mb", "run_rss_mb",
               "predict_rss_mb", "xla_temp_mb", "xla_argument_mb", "tracemalloc_peak_mb",
               "stored_numbers", "residuals_per_example"]
    where = "each in a fresh process" if config.isolate else "all in one process"
    return "\n".join([
        f"## USPS digits: accuracy, time and memory ({where}; nets: {config.passes} passes)",
        results.markdown_table(rows, columns),
        "Memory in MiB. peak_rss_mb: growth of the peak resident set during training (VmHWM, "
        "reset at the start; nets: the larger of compile_rss_mb and run_rss_mb); "
        "predict_rss_mb: the same while predicting the test set; xla_*: XLA's buffers of the "
        "compiled training run (arguments: parameters, optimizer state and the training set); "
        "tracemalloc: Python and NumPy allocations only. stored_numbers: parameters (k-NN: "
        "the training set); residuals_per_example: numbers kept for the backward pass.",
        f"compile {seconds['compile']:.1f} s, run {seconds['run']:.1f} s. Results in {workdir}",
    ])


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
