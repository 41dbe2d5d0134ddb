"""A character-level transformer on Tiny Shakespeare, beside the char-rnn LSTM.

    python -m experiments.char_transformer [--workdir DIR] [--context 64] [--features 128]
        [--heads 4] [--blocks 2] [--epochs 6] [--engine manual|autodiff]
        [--optimizer adam|sdlm [--mu 1e-3] [--curvature-every 10]] [--remat]
        [--activation relu|gelu|gelu_tanh|silu|...] [--tie-embeddings]

The same text, split and vocabulary as `experiments.char_rnn` (the first 90% of the
1,115,394 characters for training, the last 10% held out, 65 characters). The model is
`nets.transformer_lm`: an embedding of each character id (`nets.Embedding`), learned
positions, --blocks pre-norm blocks of causal multi-head self-attention and a 4x-wide ReLU
MLP, and a softmax over the next character at every step, every backward pass written by hand
(nets/attention.py; `--engine autodiff` takes jax.grad of the same forward).

Training: each step reads --batch-size windows of --context + 1 characters at random
offsets of the training text (inputs the first --context, targets the last); the loss is the
per-character cross-entropy in nats averaged over every position. Adam with the gradient's
global norm clipped to --clip; the learning rate decays by --lr-decay per epoch of
--steps-per-epoch steps. --dropout > 0 drops units after the positions and at the end of
every residual branch during training (a new key every step; none held out or sampling).
One epoch is one jitted `lax.scan`, checkpointed by the harness.

Held out, after every epoch: the held-out text cut into consecutive windows of --context
characters, each predicting its next characters from the window alone. Position t of a
window sees t + 1 characters, so on average about context / 2, where the LSTM of char_rnn
carries its state along the whole text: `held_out_nats` is the mean over all positions,
`held_out_nats_last` the last position's (a full window of context), and results.json's
`held_out_nats_by_position` the final curve (also plotted). After training,
`attention.png` shows every head's weights on the first held-out window, and results.json's
`attention_distance` how far back each head looks on average, sum_s p[t, s] (t - s) over the
first --eval-batch windows and their positions. `samples.txt` holds
--sample-chars characters generated after --prime at --temperature and at 1.0, the last
--context characters fed back.

Measured on the shared 2-core CPU (jax 0.10.2, float32, manual engine, 2026-12-03),
defaults (421,697 parameters): 156 s of training, 6 s compile, held-out loss in nats/char
(mean over positions; at position 64):

    epoch       1      2      3      4      5      6       12 (--epochs 12, 287 s)
    train     2.349  1.843  1.669  1.587  1.539  1.508    1.393
    held out  2.127  1.888  1.800  1.746  1.709  1.685    1.621
    last      2.226  1.854  1.780  1.713  1.685  1.659    1.607

The held-out loss by position falls to 1.60 by 16 characters seen and moves between 1.56
and 1.71 up to 64. char_rnn's 2x256 LSTM reaches 1.585 in 6 epochs (500 s). --dropout 0.1,
12 epochs: 1.701 (train 1.594; the one-hot model of before `nets.Embedding`): no gain at
this size. --optimizer sdlm (LeCun's diagonal Levenberg-Marquardt, h backpropagated through
attention on the step's windows every --curvature-every updates) with --lr 1e-3 --mu 1e-4:
1.683, 1.697 and 1.680 after 6 epochs at seeds 0-2 (158 s at seed 0), Adam's 1.685, 1.695 and
1.677. --activation (2026-12-06, seeds 0-2, 6 epochs, held out): relu 1.692, 1.699, 1.678;
gelu 1.677, 1.682, 1.663 (below relu at every seed); silu 1.703, 1.705, 1.688; gelu_tanh
1.677 at seed 0. --tie-embeddings (413,377 parameters; relu): 1.698, 1.692, 1.685, the
untied model's within the seeds' spread. README, "Attention and a small transformer".
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
from experiments.adding_problem import make_optimizer
from experiments.char_rnn import (
    LOG2,
    Corpus,
    TextOptions,
    epoch_history,
    epochs_of_updates,
    save_and_print_report,
    train_epochs,
    write_samples,
)
from nets import engines
from training import data, optim, plots, procedures, results
from training.config import ConfigError, check_applicable, option, parse, run_main
from training.harness import open_run

EXPERIMENT = "char_transformer"


@dataclasses.dataclass(frozen=True)
class Config(TextOptions):
    context: int = option(64, "characters a window holds (the attention's reach)", ge=1)
    features: int = option(128, "width of the model", ge=1)
    heads: int = option(4, "attention heads per block (must divide --features)", ge=1)
    blocks: int = option(2, "transformer blocks", ge=0)
    dropout: float = option(0.0, "dropout rate after the positions and at the end of every "
                            "residual branch, in training only", ge=0, lt=1)
    activation: str = option("relu", "the blocks' MLP activation (relu as in the original "
                             "transformer, gelu, GPT-2's gelu_tanh, silu, ...)",
                             choices=tuple(nets.ACTIVATIONS))
    tie_embeddings: bool = option(False, "the output layer's weights are the character "
                                  "embedding's, transposed (nets.tie; GPT-2's tying)")
    remat: bool = option(False, "manual engine: keep only each residual branch's input for "
                         "the backward and run the branch again there (nets.remat): less "
                         "memory, one more forward")
    batch_size: int = option(32, "windows per optimizer step", ge=1)
    steps_per_epoch: int = option(490, "optimizer steps per epoch", ge=1)
    epochs: int = option(6, "epochs", ge=1)
    optimizer: str = option("adam", "adam, or LeCun's diagonal Levenberg-Marquardt (sdlm)",
                            choices=("adam", "sdlm"))
    lr: float = option(1e-3, "learning rate (sdlm: eta)", gt=0)
    mu: float = option(1e-3, "sdlm: the damping mu of eta / (mu + h)", gt=0)
    curvature_every: int = option(10, "sdlm: updates between estimates of h", ge=1)
    lr_decay: float = option(0.9, "learning-rate factor per epoch", gt=0, le=1)
    clip: float = option(1.0, "clip the gradient's global norm to this (0: no clipping)", ge=0)
    eval_batch: int = option(64, "held-out windows evaluated together", ge=1)
    seed: int = option(0, "seed of initialisation, windows and samples", ge=0)


ONLY_WITH = {**dict.fromkeys(("mu", "curvature_every"), ("optimizer", "sdlm")),
             "remat": ("engine", "manual")}


def check_config(config: Config, corpus: Corpus) -> None:
    check_applicable(config, ONLY_WITH)
    if config.features % config.heads:
        raise ConfigError(f"option --heads: {config.heads} does not divide --features "
                          f"{config.features}")
    for name, ids in (("training", corpus.train), ("held-out", corpus.held_out)):
        if len(ids) < config.context + 1:
            raise ConfigError(f"option --context: {config.context} + 1 characters do not fit "
                              f"in the {len(ids)} {name} characters")
    if not 1 <= len(config.prime) <= config.context:
        raise ConfigError(f"option --prime: {len(config.prime)} characters; it needs 1 to "
                          f"--context {config.context}")


def random_windows(ids: jax.Array, key: jax.Array, batch: int, context: int) -> jax.Array:
    """(batch, context + 1) windows of ids starting at uniform random offsets."""
    starts = jax.random.randint(key, (batch,), 0, ids.shape[0] - context)
    return jax.vmap(lambda start: jax.lax.dynamic_slice(ids, (start,), (context + 1,)))(starts)


def held_out_windows(ids: np.ndarray, context: int) -> np.ndarray:
    """Consecutive windows (n, context + 1), each overlapping the next by one character: the
    inputs of window i are ids[i context : (i + 1) context], its targets one further on."""
    count = (len(ids) - 1) // context
    starts = np.arange(count)[:, None] * context
    return ids[starts + np.arange(context + 1)[None, :]]


def held_out_loss_by_position(model, params, windows: jax.Array, eval_batch: int) -> jax.Array:
    """Mean cross-entropy in nats at each position t of the windows, (context,): position t
    predicts from t + 1 characters. The last partial batch of windows is dropped."""
    batches = windows.shape[0] // eval_batch
    chunks = windows[: batches * eval_batch].reshape(batches, eval_batch, -1)

    def totals(chunk):
        logits = model.apply(params, chunk[:, :-1])
        log_p = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(log_p, chunk[:, 1:, None], axis=-1)[..., 0],
                        axis=0)

    return jnp.sum(jax.lax.map(totals, chunks), axis=0) / (batches * eval_batch)


def sdlm_optimizer(mu: float):
    """`make_optimizer` for `char_rnn.epochs_of_updates`: LeCun's diagonal Levenberg-Marquardt
    steps eta / (mu + h) after clipping the gradient's global norm."""
    def make(schedule, clip):
        sdlm = optim.diagonal_levenberg_marquardt(schedule, mu)
        return optax.chain(optax.clip_by_global_norm(clip), sdlm) if clip > 0 else sdlm

    return make


def epochs_of_windows(model, objective, train_ids: jax.Array, config,
                      monitor) -> procedures.Procedure:
    """One procedure step = one epoch of --steps-per-epoch updates on random windows; record
    as `char_rnn.epochs_of_updates`. Update i of an epoch draws its windows from the key
    (epoch, i) and its dropout masks from (epoch, steps + i). With --optimizer sdlm the
    diagonal h is backpropagated on the step's windows at updates 0, k, 2k, ... of every
    epoch (k = --curvature-every) and kept in between, at inference (no dropout)."""
    value_and_grad = engines.get_engine(config.engine)(model, objective)
    steps = config.steps_per_epoch
    sdlm = config.optimizer == "sdlm"
    diagonal = engines.curvature_diagonal(model, objective) if sdlm else None

    def gradient_step(epoch_key, index, params, h):
        windows = random_windows(train_ids, jax.random.fold_in(epoch_key, index),
                                 config.batch_size, config.context)
        dropout_key = jax.random.fold_in(epoch_key, steps + index)
        x, targets = windows[:, :-1], windows[:, 1:]
        energy, grad = value_and_grad(params, x, targets,
                                      dropout_key if config.dropout > 0 else None)
        if not sdlm:
            return energy, grad, h, {}
        h = jax.lax.cond(index % config.curvature_every == 0,
                         lambda: diagonal(params, x, targets), lambda: h)
        return energy, grad, h, {"curvature": h}

    def initial_h(params):
        return jax.tree.map(jnp.zeros_like, params) if sdlm else ()

    return epochs_of_updates(config, steps, gradient_step, initial_h, monitor,
                             sdlm_optimizer(config.mu) if sdlm else make_optimizer)


def attention_summary(model, params, windows: jax.Array):
    """(maps of the first window {layer: (heads, T, T)}, mean distance looked back per head
    {layer: [heads]}: the average over windows and positions t of sum_s p[t, s] (t - s))."""
    dtype = jax.tree.leaves(params)[0].dtype
    maps = nets.attention.attention_maps(model, params, windows[:, :-1])
    steps = windows.shape[1] - 1
    back = (jnp.arange(steps)[:, None] - jnp.arange(steps)[None, :]).astype(dtype)
    distance = {name: jnp.mean(jnp.sum(p * back[None, None], axis=-1), axis=(0, 2))
                for name, p in maps.items()}
    return {name: p[0] for name, p in maps.items()}, distance


def generate(model, params, prime: np.ndarray, key: jax.Array, length: int,
             temperature: float, context: int) -> jax.Array:
    """`length` ids sampled one at a time from softmax(logits / temperature) after the prompt,
    each appended to a window of the last `context` ids that is run through the model whole
    (the causal mask makes the padding after the last id invisible to it)."""
    window = jnp.zeros((context,), jnp.int32).at[: len(prime)].set(
        jnp.asarray(prime, jnp.int32))

    def one_char(state, step_key):
        window, filled = state
        logits = model.apply(params, window[None])
        char = jax.random.categorical(step_key, logits[0, filled - 1] / temperature).astype(
            jnp.int32)
        full = filled == context
        window = jnp.where(full, jnp.roll(window, -1).at[-1].set(char),
                           window.at[jnp.minimum(filled, context - 1)].set(char))
        return (window, jnp.minimum(filled + 1, context)), char

    _, chars = jax.lax.scan(one_char, (window, jnp.asarray(len(prime), jnp.int32)),
                            jax.random.split(key, length))
    return chars


def main(argv=None):
    config, args = parse(Config, argv, __doc__, prog=f"python -m experiments.{EXPERIMENT}")
    corpus = Corpus(data.load_text(), config.held_out, config.train_chars, config.eval_chars)
    check_config(config, corpus)
    prime = corpus.encode(config.prime)
    run = open_run(EXPERIMENT, config, args)
    vocabulary = len(corpus.vocabulary)
    model = nets.transformer_lm(vocabulary, config.context, config.features, config.heads,
                                config.blocks, config.dropout, remat=config.remat,
                                activation=config.activation,
                                tie_embeddings=config.tie_embeddings)
    objective = nets.Objective(nets.sequence_cross_entropy(), 0.0)
    params = model.init(jax.random.key(config.seed), (-1, config.context))[1]
    train_ids = jnp.asarray(corpus.train)
    eval_windows = jnp.asarray(held_out_windows(corpus.held_out, config.context))
    eval_batch = min(config.eval_batch, eval_windows.shape[0])

    def by_position(params):
        return held_out_loss_by_position(model, params, eval_windows, eval_batch)

    def monitor(params):
        nats = by_position(params)
        return {"held_out_nats": jnp.mean(nats), "held_out_bpc": jnp.mean(nats) / LOG2,
                "held_out_nats_last": nats[-1]}

    procedure = epochs_of_windows(model, objective, train_ids, config, monitor)
    outcome = train_epochs(run, procedure, model, params, config)
    history = epoch_history(outcome.history, ("held_out_nats_last",))
    final = history[-1]
    position_nats = np.asarray(jax.jit(by_position)(outcome.state.params))
    sample = jax.jit(generate, static_argnums=(0, 4, 5, 6))
    samples, sample_seconds = write_samples(
        run.workdir, config, corpus,
        lambda temperature: sample(model, outcome.state.params, prime,
                                   jax.random.key(config.seed + 2), config.sample_chars,
                                   temperature, config.context))
    first_maps, distance = jax.jit(attention_summary, static_argnums=0)(
        model, outcome.state.params, eval_windows[:eval_batch])
    attention_distance = {name: [float(d) for d in value] for name, value in distance.items()}
    parameters = sum(leaf.size for leaf in jax.tree.leaves(params))
    metrics = {"held_out_nats": final["held_out_nats"], "held_out_bpc": final["held_out_bpc"],
               "held_out_nats_last": final["held_out_nats_last"],
               "train_nats": final["train_nats"], "epochs": outcome.steps_done,
               "parameters": int(parameters), "vocabulary": vocabulary,
               "train_chars": int(train_ids.size),
               "held_out_chars": int(eval_batch * (eval_windows.shape[0] // eval_batch)
                                     * config.context),
               "rejected_non_finite": int(outcome.state.guard.rejected)}
    seconds = {**outcome.seconds, "samples": sample_seconds}
    results.write_results(run.workdir, EXPERIMENT, dataclasses.asdict(config), metrics, history,
                          seconds, samples={str(t): s for t, s in samples.items()},
                          held_out_nats_by_position=[float(v) for v in position_nats],
                          attention_distance=attention_distance,
                          resumed_from_step=outcome.resumed_from)
    epochs = np.array([h["epoch"] for h in history])
    title = (f"{config.blocks} blocks of {config.features}, {config.heads} heads, context "
             f"{config.context}")
    plots.save_curves(run.workdir / "curves.png", [
        {"xlabel": "epoch", "ylabel": "bits per character", "series": {
            "train": (epochs, np.array([h["train_bpc"] for h in history])),
            "held out": (epochs, np.array([h["held_out_bpc"] for h in history])),
            "held out, last position": (
                epochs, np.array([h["held_out_nats_last"] / LOG2 for h in history]))}},
         {"xlabel": "characters seen (position + 1)", "ylabel": "held-out bits per character",
          "series": {"after training": (np.arange(1, config.context + 1),
                                        position_nats / LOG2)}}],
        title=f"char transformer on Tiny Shakespeare: {title}")
    if first_maps:
        plots.save_heatmaps(
            run.workdir / "attention.png", [list(np.asarray(p)) for p in first_maps.values()],
            list(first_maps), [f"head {h + 1}" for h in range(config.heads)],
            "attended step s", "step t", title="attention weights p[t, s], first held-out "
            "window")
    save_and_print_report(
        run.workdir, f"char transformer, {title}, {parameters:,} parameters, batch "
        f"{config.batch_size}", history, samples[config.temperature], config.temperature,
        seconds)
    return metrics


if __name__ == "__main__":
    run_main(main, EXPERIMENT)
