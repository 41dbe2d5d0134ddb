"""A character-level language model on Tiny Shakespeare, trained by truncated BPTT.

    python -m experiments.char_rnn [--workdir DIR] [--cell lstm] [--layers 2] [--hidden 256]
        [--epochs 6] [--engine manual|autodiff] [--temperature 0.8]
    python -m experiments.char_rnn --hidden 512 --batch-size 64 --epochs 12   # for a GPU

After Karpathy's char-rnn (2015): the text (training.data.load_text(), 1,115,394 characters,
65 distinct) is split into its first 90% for training and last 10% held out. The model is
`sequence_model([cell] * layers, 65)` of nets.recurrent: one-hot characters in, a softmax over
the next character out at every step, the per-character cross-entropy in nats
(`sequence_cross_entropy`).

Truncated BPTT over windows (Williams and Peng 1990; Sutskever 2013, section 3.2.4 in its
common form): the training text is cut into --batch-size parallel streams; each optimizer step
reads the next --window characters of every stream, starting from the state the previous
window ended in (`stack_forward` from given states), and backpropagates within the window only
(`stack_backward`, or jax.grad with --engine autodiff). Each epoch starts the streams at a new
random offset in [0, window) from the zero state. Adam with the gradient's global norm clipped
to --clip; the learning rate decays by --lr-decay per epoch. One epoch is one jitted
`lax.scan` over its windows, checkpointed by the harness. --dropout drops each layer's
outputs (the next layer's input and the projection's; never the carried states) in
training, a mask per window from the epoch's key (Zaremba et al. 2014; Karpathy's char-rnn
used 0.5 for its 2x512 LSTM); the held-out loss and the samples run without it.

--optimizer sdlm steps by LeCun's diagonal Levenberg-Marquardt instead, eta / (mu + h), h
backpropagated on the step's window from its carried states every --curvature-every windows
(`stack_backward(curvature=True)`; without dropout's masks). It does not train this LSTM:
after one epoch every (eta, mu) tried ended at 3.06-3.61 nats held out or diverged, against
Adam's 2.20 (README, "Recurrent nets").

After every epoch: the held-out loss in nats and bits per character (nats / ln 2), run over
--eval-streams streams of the held-out text with the state carried from its start. At the end
`samples.txt` gets --sample-chars characters generated at --temperature (and at 1.0) after the
prompt --prime.

Published numbers: Karpathy's char-rnn, 2-layer LSTM of 512 with dropout, reaches a validation
loss of about 1.4 nats/char on Tiny Shakespeare; our target on a GPU is <= 1.55 nats/char for a
2-layer LSTM of 512 within 30 minutes.

Measured on the shared 2-core CPU (jax 0.10.2, float32, manual engine), defaults (2 layers of
256 LSTM units, 871,745 parameters, batch 32, window 64, 6 epochs of 490 windows, Adam 2e-3
decayed by 0.9 per epoch): 8 min 35 s in all (run 500 s, under a load of about 5 from other
jobs), held-out loss per epoch in nats/char (bits/char):

    epoch       1            2            3            4            5            6
    train    2.340        1.740        1.577        1.488        1.429        1.386
    held out 2.194 (3.17) 1.774 (2.56) 1.691 (2.44) 1.638 (2.36) 1.607 (2.32) 1.585 (2.29)

still falling by about 0.02 nats per epoch at the end.

On an NVIDIA H200 (jax 0.11.2, 2026-12-04, `bash .ci/device-check char_rnn`), the GPU
setting `--hidden 512 --batch-size 64 --epochs 12` (3,316,289 parameters, 244 windows an
epoch): held-out 1.5266 nats/char (2.20 bits) after 12 epochs, in 16.6 s of training (compile
8.3 s cold), under the 1.55 target from epoch 9 (1.5427). Without dropout the 2x512 model
overfits after that: run for 30 epochs (41.7 s) it ended at 1.5837 (train 1.0175), its lowest
1.5266 at epoch 12.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
from experiments import adding_problem
from nets import recurrent
from training import data, plots, procedures, results
from training.config import ConfigError, check_applicable, option, parse, run_main
from training.harness import open_run, train

EXPERIMENT = "char_rnn"
LOG2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """Options every Tiny Shakespeare experiment shares (data, engine, samples, progress)."""

    held_out: float = option(0.1, "fraction of the text held out, from its end", gt=0, lt=1)
    train_chars: int = option(0, "use only the first N training characters (0: all)", ge=0)
    eval_chars: int = option(0, "evaluate on the first N held-out characters (0: all)", ge=0)
    engine: str = option("manual", "gradient engine", choices=("manual", "autodiff"))
    temperature: float = option(0.8, "sampling temperature of samples.txt", gt=0)
    sample_chars: int = option(1000, "characters generated per sample", ge=1)
    prime: str = option("ROMEO:\n", "prompt the samples start from")
    progress_every: int = option(1, "epochs between progress lines off a terminal", ge=0)


@dataclasses.dataclass(frozen=True)
class Config(TextOptions):
    cell: str = option("lstm", "recurrent cell", choices=recurrent.CELLS)
    layers: int = option(2, "stacked recurrent layers", ge=1)
    hidden: int = option(256, "hidden units per layer", ge=1)
    batch_size: int = option(32, "parallel streams of training text", ge=1)
    window: int = option(64, "characters per truncated-BPTT window (one optimizer step)", ge=1)
    epochs: int = option(6, "passes over the training text", ge=1)
    dropout: float = option(0.0, "dropout rate on each layer's outputs in training (Zaremba "
                            "et al. 2014)", ge=0, lt=1)
    optimizer: str = option("adam", "adam, or LeCun's diagonal Levenberg-Marquardt (sdlm)",
                            choices=("adam", "sdlm"))
    lr: float = option(2e-3, "learning rate (sdlm: eta)", gt=0)
    mu: float = option(1e-3, "sdlm: the damping mu of eta / (mu + h)", gt=0)
    curvature_every: int = option(10, "sdlm: windows between estimates of h", ge=1)
    lr_decay: float = option(0.9, "learning-rate factor per epoch", gt=0, le=1)
    clip: float = option(5.0, "clip the gradient's global norm to this (0: no clipping)", ge=0)
    eval_streams: int = option(32, "parallel streams of held-out text", ge=1)
    unroll: int = option(1, "lax.scan unroll of the time loop", ge=1)
    recompute_every: int = option(0, "manual engine: keep the state every N steps of a window "
                                  "and recompute the steps between in the backward, for "
                                  "long windows (0: keep every step)", ge=0)
    seed: int = option(0, "seed of initialisation, stream offsets and samples", ge=0)


ONLY_WITH = {**dict.fromkeys(("mu", "curvature_every"), ("optimizer", "sdlm")),
             "recompute_every": ("engine", "manual")}


def first_chars(ids: np.ndarray, count: int, flag: str, part: str) -> np.ndarray:
    """The first `count` ids (0: all of them); more than there are is a ConfigError naming
    --flag, not a silently shorter text."""
    if count > len(ids):
        raise ConfigError(f"option --{flag}: got {count}; allowed: at most the {len(ids)} "
                          f"{part} characters")
    return ids[:count] if count else ids


class Corpus:
    """The text as integer ids: vocabulary (sorted characters), train and held-out ids."""

    def __init__(self, text: str, held_out: float, train_chars: int = 0, eval_chars: int = 0):
        self.vocabulary = sorted(set(text))
        self.index = {char: i for i, char in enumerate(self.vocabulary)}
        ids = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        lookup = np.zeros(max(map(ord, self.vocabulary)) + 1, np.int32)
        lookup[[ord(c) for c in self.vocabulary]] = np.arange(len(self.vocabulary))
        ids = lookup[ids]
        cut = int(round(len(ids) * (1 - held_out)))
        self.train = first_chars(ids[:cut], train_chars, "train-chars", "training")
        self.held_out = first_chars(ids[cut:], eval_chars, "eval-chars", "held-out")

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ConfigError(f"option --prime: characters {unknown!r} are not in the text")
        return np.array([self.index[c] for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.vocabulary[int(i)] for i in ids)


def as_streams(ids: np.ndarray, streams: int, flag: str = "batch-size",
               part: str = "training") -> np.ndarray:
    """ids (n,) as (streams, n // streams): stream b is the b-th contiguous part. Fewer than
    two characters a stream is a ConfigError naming --flag, the option that set `streams`."""
    length = len(ids) // streams
    if length < 2:
        raise ConfigError(f"option --{flag}: got {streams}; allowed: at most {len(ids) // 2}, "
                          f"two of the {len(ids)} {part} characters for each stream")
    return ids[: streams * length].reshape(streams, length)


def value_grad_and_carries(cells, objective, engine: str, dropout: float = 0.0,
                           recompute_every: int | None = None):
    """`f(params, xs, targets, carries0, key=None) -> (E, dE/dparams, carries_T)`: one window
    of truncated BPTT from the given states, by the hand-written backward (`manual`) or
    jax.grad (`autodiff`) of the same forward, `recurrent.stack_forward` (with a key, each
    layer's outputs dropped at rate `dropout`). (The engines of nets.engines have no state
    to carry in or out.) recompute_every: the manual backward keeps a carry every that many
    steps and recomputes the steps between (`recurrent.scan_cell`)."""
    loss = objective.loss

    def manual(params, xs, targets, carries0, key=None):
        outputs, carries_T, residuals = recurrent.stack_forward(
            cells, params, xs, carries0, dropout=dropout, key=key,
            recompute_every=recompute_every)
        dparams, _, _ = recurrent.stack_backward(cells, params, residuals,
                                                 loss.grad(outputs, targets))
        return loss.value(outputs, targets), dparams, carries_T

    def autodiff(params, xs, targets, carries0, key=None):
        def energy(params):
            outputs, carries_T, _ = recurrent.stack_forward(cells, params, xs, carries0,
                                                            dropout=dropout, key=key)
            return loss.value(outputs, targets), carries_T

        (value, carries_T), grad = jax.value_and_grad(energy, has_aux=True)(params)
        return value, grad, carries_T

    return {"manual": manual, "autodiff": autodiff}[engine]


def window_curvature(cells, objective):
    """`h(params, xs, targets, carries0)`: LeCun's Gauss-Newton diagonal of one window's loss
    (`stack_backward(curvature=True)`, as `engines.curvature_diagonal` for the model), the
    states carried in held constant as in the gradient, plus lambda/m per weight from the
    objective's L2 term."""
    loss = objective.loss

    def diagonal(params, xs, targets, carries0):
        outputs, _, residuals = recurrent.stack_forward(cells, params, xs, carries0)
        d2params = recurrent.stack_backward(cells, params, residuals,
                                            loss.curvature(outputs, targets), curvature=True)[0]
        penalty = nets.losses.l2_penalty_grad(jax.tree.map(jnp.ones_like, params),
                                               objective.l2, xs.shape[0])
        return jax.tree.map(jnp.add, d2params, penalty)

    return diagonal


def zero_carries(cells, batch: int, dtype) -> tuple:
    return tuple(cell.initial_carry(batch, dtype) for cell in cells)


def held_out_loss(cells, params, streams: jax.Array, vocabulary: int, window: int,
                  unroll: int = 1) -> jax.Array:
    """Mean cross-entropy in nats of predicting streams[:, t + 1] from streams[:, :t + 1], the
    state carried along each stream from its start; run window by window (bounded memory)."""
    batch, length = streams.shape
    windows = (length - 1) // window
    dtype = jax.tree.leaves(params)[0].dtype

    def one_window(carries, start):
        ids = jax.lax.dynamic_slice(streams, (0, start), (batch, window + 1))
        outputs, carries, _ = recurrent.stack_forward(
            cells, params, jax.nn.one_hot(ids[:, :-1], vocabulary, dtype=dtype), carries,
            unroll=unroll)
        log_p = jax.nn.log_softmax(outputs, axis=-1)
        return carries, -jnp.sum(jnp.take_along_axis(log_p, ids[:, 1:, None], axis=-1))

    _, totals = jax.lax.scan(one_window, zero_carries(cells, batch, dtype),
                             jnp.arange(windows) * window)
    return jnp.sum(totals) / (batch * windows * window)


def windows_per_epoch(stream_length: int, window: int) -> int:
    """Windows of `window` (+1 for the last target) that fit after any offset < window."""
    return (stream_length - window - 1) // window


def epochs_of_updates(config, steps: int, gradient_step, initial_extra, monitor,
                      make_optimizer=adding_problem.make_optimizer) -> procedures.Procedure:
    """One procedure step = one epoch: a `lax.scan` of `steps` optimizer updates at config.lr
    decayed by config.lr_decay per epoch, `make_optimizer(schedule, config.clip)` (Adam after
    clipping the gradient's global norm), a non-finite update skipped
    (`procedures.guarded_update`).

    `gradient_step(epoch_key, index, params, extra) -> (energy, grad, extra, update_args)`
    gives update `index` of the epoch its gradient and the keyword arguments of the
    optimizer's update ({} for Adam; curvature=h for LeCun's method); `extra` is carried from
    update to update (a recurrent net's states), starting each epoch at
    `initial_extra(params)`; epoch_key is new every epoch. Record: "energy" (the epoch's mean
    training loss), monitor(params).
    """
    schedule = optax.exponential_decay(config.lr, steps, config.lr_decay, staircase=True)
    optimizer = make_optimizer(schedule, config.clip)

    def init(params, key):
        return procedures.initial_state(params, optimizer.init(params), key)

    def step(state, epoch):
        next_key, epoch_key = jax.random.split(jax.random.wrap_key_data(state.key))

        def update(carry, index):
            params, opt_state, guard, extra = carry
            energy, grad, extra, update_args = gradient_step(epoch_key, index, params, extra)
            params, opt_state, guard = procedures.guarded_update(
                optimizer, params, opt_state, guard, energy, grad, epoch * steps + index,
                **update_args)
            return (params, opt_state, guard, extra), energy

        carry = (state.params, state.opt_state, state.guard, initial_extra(state.params))
        (params, opt_state, guard, _), energies = jax.lax.scan(
            update, carry, jnp.arange(steps, dtype=jnp.int32))
        energy = jnp.mean(energies).astype(state.energy.dtype)
        new_state = state._replace(params=params, opt_state=opt_state, guard=guard,
                                   energy=energy, key=jax.random.key_data(next_key))
        return new_state, {"energy": energy, **monitor(params)}

    return procedures.Procedure(init, step)


def tbptt_epochs(cells, objective, train_streams: jax.Array, vocabulary: int,
                 config, monitor) -> procedures.Procedure:
    """One procedure step = one epoch of truncated BPTT over the streams (module docstring),
    from a random offset in [0, window) drawn from the epoch's key; record as
    `epochs_of_updates`."""
    value_and_grad = value_grad_and_carries(cells, objective, config.engine, config.dropout,
                                            config.recompute_every or None)
    batch, length = train_streams.shape
    window = config.window
    steps = windows_per_epoch(length, window)
    if steps < 1:
        raise ConfigError(f"option --window: got {window}; the {length} characters per stream "
                          "do not hold two windows (use fewer --batch-size or more text)")

    sdlm = config.optimizer == "sdlm"
    diagonal = window_curvature(cells, objective) if sdlm else None

    def gradient_step(epoch_key, index, params, extra):
        carries, h = extra
        offset = jax.random.randint(epoch_key, (), 0, window)
        dtype = jax.tree.leaves(params)[0].dtype
        start = offset + index.astype(offset.dtype) * window
        ids = jax.lax.dynamic_slice(train_streams, (0, start), (batch, window + 1))
        xs = jax.nn.one_hot(ids[:, :-1], vocabulary, dtype=dtype)
        dropout_key = jax.random.fold_in(epoch_key, index) if config.dropout else None
        energy, grad, new_carries = value_and_grad(params, xs, ids[:, 1:], carries, dropout_key)
        update_args = {}
        if sdlm:
            h = jax.lax.cond(index % config.curvature_every == 0,
                             lambda: diagonal(params, xs, ids[:, 1:], carries), lambda: h)
            update_args = {"curvature": h}
        # a non-finite window restarts the streams from the zero state
        carries = jax.tree.map(lambda new, zero: jnp.where(jnp.isfinite(energy), new, zero),
                               new_carries, zero_carries(cells, batch, dtype))
        return energy, grad, (carries, h), update_args

    def initial_extra(params):
        """The zero states, and h = 0 until update 0 of the epoch estimates it."""
        return (zero_carries(cells, batch, jax.tree.leaves(params)[0].dtype),
                jax.tree.map(jnp.zeros_like, params) if sdlm else ())

    make_optimizer = adding_problem.make_optimizer
    if sdlm:
        def make_optimizer(schedule, clip):
            return adding_problem.sdlm_optimizer(schedule, config.mu, clip)

    return epochs_of_updates(config, steps, gradient_step, initial_extra, monitor,
                             make_optimizer)


def generate(cells, params, prime: np.ndarray, key: jax.Array, length: int,
             temperature: float, vocabulary: int) -> jax.Array:
    """`length` character ids sampled one at a time from softmax(logits / temperature), each
    fed back as the next input, after running the prompt `prime` (ids) through the net."""
    dtype = jax.tree.leaves(params)[0].dtype
    output = nets.Dense(vocabulary)
    xs = jax.nn.one_hot(jnp.asarray(prime)[None, :], vocabulary, dtype=dtype)
    outputs, carries, _ = recurrent.stack_forward(cells, params, xs)
    weights = [cell.step_weights(cell_params) for cell, cell_params in zip(cells, params[:-1])]

    def one_char(state, step_key):
        carries, logits = state
        char = jax.random.categorical(step_key, logits / temperature, axis=-1)
        h = jax.nn.one_hot(char, vocabulary, dtype=dtype)
        new_carries = []
        for cell, cell_weights, carry in zip(cells, weights, carries):
            carry, h, _ = cell.step(cell_weights, carry, h)
            new_carries.append(carry)
        return (tuple(new_carries), output.apply(params[-1], h)), char[0]

    _, chars = jax.lax.scan(one_char, (carries, outputs[:, -1]), jax.random.split(key, length))
    return chars


def epoch_history(records, extra_keys=()) -> list[dict]:
    """The harness's per-epoch records as rows: epoch, train and held-out loss in nats and
    bits per character, and `extra_keys` as recorded."""
    return [{"epoch": r["step"], "train_nats": r["energy"], "train_bpc": r["energy"] / LOG2,
             "held_out_nats": r["held_out_nats"], "held_out_bpc": r["held_out_bpc"],
             **{key: r[key] for key in extra_keys}} for r in records]


def train_epochs(run, procedure: procedures.Procedure, model, params, config):
    """config.epochs steps of `procedure` (one epoch each) from params, seeded by
    config.seed + 1, through the harness: a checkpoint after every epoch (two kept), progress
    on the held-out loss, the parameters named by layer in the logs. The harness's outcome."""
    return train(
        run, lambda state, start, length: procedures.run_steps(procedure, state, start, length),
        procedure.init(params, jax.random.key(config.seed + 1)),
        total_steps=config.epochs, checkpoint_every=1, keep=2,
        progress_every=config.progress_every, loss_name="held_out_nats",
        leaf_names=[f"{layer}.{name}" for layer, name, _ in
                    nets.gradcheck.named_parameters(model, params)])


def write_samples(workdir, config, corpus: Corpus, sample) -> tuple[dict, float]:
    """`sample(temperature) -> ids` at config.temperature and at 1.0, each after the prompt
    config.prime, decoded and written to workdir/samples.txt: ({temperature: text}, seconds)."""
    tick = time.perf_counter()
    samples = {temperature: config.prime + corpus.decode(np.asarray(sample(temperature)))
               for temperature in dict.fromkeys((config.temperature, 1.0))}
    seconds = time.perf_counter() - tick
    (workdir / "samples.txt").write_text("".join(
        f"=== temperature {t} ===\n{text}\n\n" for t, text in samples.items()))
    return samples, seconds


def save_and_print_report(workdir, heading: str, history, sample: str, temperature: float,
                          seconds: dict) -> None:
    """results.md (and stdout): the per-epoch table under `heading`, the start of the sample
    at `temperature`, and the compile, run and checkpoint seconds."""
    results.save_and_print_table(workdir, "\n".join([
        f"## {heading}, per epoch",
        results.markdown_table(history),
        f"Sample at temperature {temperature}:\n\n```\n{sample[:400]}\n```\n",
        f"compile {seconds['compile']:.1f} s, run {seconds['run']:.1f} s, checkpoints "
        f"{seconds['checkpoint']:.1f} s. Results in {workdir}"]))


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    check_applicable(config, ONLY_WITH)
    corpus = Corpus(data.load_text(), config.held_out, config.train_chars, config.eval_chars)
    prime = corpus.encode(config.prime)
    vocabulary = len(corpus.vocabulary)
    cells = [recurrent.make_cell(config.cell, config.hidden) for _ in range(config.layers)]
    model = recurrent.sequence_model(cells, vocabulary, name=f"{config.cell}x{config.layers}")
    objective = nets.Objective(recurrent.sequence_cross_entropy(), 0.0)
    params = model.init(jax.random.key(config.seed), (-1, config.window, vocabulary))[1]
    train_streams = jnp.asarray(as_streams(corpus.train, config.batch_size))
    eval_streams = jnp.asarray(as_streams(corpus.held_out, config.eval_streams,
                                          "eval-streams", "held-out"))
    eval_window = min(config.window, eval_streams.shape[1] - 1)

    def monitor(params):
        nats = held_out_loss(cells, params, eval_streams, vocabulary, eval_window, config.unroll)
        return {"held_out_nats": nats, "held_out_bpc": nats / LOG2}

    procedure = tbptt_epochs(cells, objective, train_streams, vocabulary, config, monitor)
    run = open_run(EXPERIMENT, config, args)  # after the checks of the streams and the window
    outcome = train_epochs(run, procedure, model, params, config)
    history = epoch_history(outcome.history)
    final = history[-1]
    sample = jax.jit(generate, static_argnums=(0, 4, 5, 6))
    samples, sample_seconds = write_samples(
        run.workdir, config, corpus,
        lambda temperature: sample(tuple(cells), outcome.state.params, prime,
                                   jax.random.key(config.seed + 2), config.sample_chars,
                                   temperature, vocabulary))
    parameters = sum(leaf.size for leaf in jax.tree.leaves(params))
    metrics = {"held_out_nats": final["held_out_nats"], "held_out_bpc": final["held_out_bpc"],
               "train_nats": final["train_nats"], "epochs": outcome.steps_done,
               "parameters": int(parameters), "vocabulary": vocabulary,
               "train_chars": int(train_streams.size), "held_out_chars": int(eval_streams.size),
               "windows_per_epoch": windows_per_epoch(train_streams.shape[1], config.window),
               "rejected_non_finite": int(outcome.state.guard.rejected)}
    seconds = {**outcome.seconds, "samples": sample_seconds}
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics, history,
                          seconds, samples={str(t): s for t, s in samples.items()},
                          resumed_from_step=outcome.resumed_from,
                          published={"karpathy_char_rnn_2x512_val_nats": 1.4,
                                     "gpu_target_2x512_nats": 1.55})
    epochs = np.array([h["epoch"] for h in history])
    plots.save_curves(run.workdir / "curves.png", [
        {"xlabel": "epoch", "ylabel": "bits per character", "series": {
            "train": (epochs, np.array([h["train_bpc"] for h in history])),
            "held out": (epochs, np.array([h["held_out_bpc"] for h in history]))}}],
        title=f"char-rnn on Tiny Shakespeare: {config.layers} x {config.hidden} {config.cell}")
    save_and_print_report(
        run.workdir, f"char-rnn, {config.layers} x {config.hidden} {config.cell}, "
        f"{parameters:,} parameters, window {config.window}, batch {config.batch_size}",
        history, samples[config.temperature], config.temperature, seconds)
    return metrics


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
