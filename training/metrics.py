"""Metrics computed from a model's outputs."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nets.layers import Layer

__all__ = ["predicted_labels", "target_labels", "classification_error", "accuracy",
           "misclassified", "misclassified_outputs", "most_frequent_confusions", "confusions_line",
           "misclassified_confusions"]


def predicted_labels(outputs: jax.Array, threshold: float = 0.0) -> jax.Array:
    """Class index per example: argmax over outputs (batch, classes).

    A single output (batch, 1) is a binary classifier: label 1 where the output exceeds
    `threshold` (0 for logits or tanh outputs; pass 0.5 for sigmoid probabilities). Outputs
    with more leading axes (batch, time, classes) give a label per position; a 1-D array is
    a ValueError (its argmax would run over the batch).
    """
    _check_rows("predicted_labels", "outputs", outputs)
    if outputs.shape[-1] == 1:
        return (outputs[..., 0] > threshold).astype(jnp.int32)
    return jnp.argmax(outputs, axis=-1)


def target_labels(targets: jax.Array) -> jax.Array:
    """Class index per example from one-hot or +-1 rows; a single column (0/1 or +-1) is
    label 1 where the target exceeds 0.5. Integer labels (batch,) are a ValueError: pass
    them one-hot (`training.data.one_hot`)."""
    _check_rows("target_labels", "targets", targets)
    if targets.shape[-1] == 1:
        return (targets[..., 0] > 0.5).astype(jnp.int32)
    return jnp.argmax(targets, axis=-1)


def _check_rows(name: str, what: str, array: jax.Array) -> None:
    if jnp.ndim(array) < 2:
        raise ValueError(f"{name}: {what} have shape {tuple(jnp.shape(array))}, expected "
                         "(batch, classes), one row per example")


def classification_error(
    model: Layer, params: Any, x: jax.Array, targets: jax.Array, threshold: float = 0.0
) -> jax.Array:
    """Fraction of examples whose predicted label differs from the target's.

    Shapes: x (batch, ...), targets (batch, classes). See `predicted_labels` for threshold.
    """
    outputs = model.apply(params, x)
    return jnp.mean(predicted_labels(outputs, threshold) != target_labels(targets))


def accuracy(model: Layer, params: Any, x: jax.Array, targets: jax.Array,
             threshold: float = 0.0) -> jax.Array:
    """1 - classification_error."""
    return 1.0 - classification_error(model, params, x, targets, threshold)


def misclassified(model: Layer, params: Any, x: jax.Array, targets: jax.Array,
                  threshold: float = 0.0) -> list[dict]:
    """[{"index": i, "label": l, "predicted": p}, ...], one per example (in order) whose
    predicted label p differs from its target's l; as many as `classification_error` counts.

    Shapes: x (batch, ...), targets (batch, classes).
    """
    return misclassified_outputs(model.apply(params, x), targets, threshold)


def misclassified_outputs(outputs: jax.Array, targets: jax.Array,
                          threshold: float = 0.0) -> list[dict]:
    """`misclassified` from a model's outputs (batch, classes) already computed."""
    predicted = np.asarray(predicted_labels(outputs, threshold))
    labels = np.asarray(target_labels(targets))
    return [{"index": int(i), "label": int(labels[i]), "predicted": int(predicted[i])}
            for i in np.flatnonzero(predicted != labels)]


def most_frequent_confusions(counts: Iterable[tuple[int, int, int]],
                             top: int = 8) -> list[tuple[int, int, int]]:
    """(label, predicted, count) summed over repeated (label, predicted) pairs: the `top` most
    frequent, most frequent first, ties by label and then predicted label."""
    summed = {}
    for label, predicted, count in counts:
        summed[(label, predicted)] = summed.get((label, predicted), 0) + count
    ranked = sorted(summed.items(), key=lambda item: (-item[1], item[0]))
    return [(label, predicted, count) for (label, predicted), count in ranked[:top]]


def confusions_line(confusions: Sequence[tuple[int, int, int]]) -> str:
    """"3→5 12, 4→9 6, ..." for `most_frequent_confusions`' rows."""
    return ", ".join(f"{label}\u2192{predicted} {count}" for label, predicted, count in confusions)


def misclassified_confusions(wrong: Sequence[dict], top: int = 8) -> list[tuple[int, int, int]]:
    """`most_frequent_confusions` of the rows of `misclassified`."""
    return most_frequent_confusions(((row["label"], row["predicted"], 1) for row in wrong), top)
