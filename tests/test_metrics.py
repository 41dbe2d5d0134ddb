"""training/metrics.py against labels worked out by hand."""
import jax.numpy as jnp
import pytest

import nets
from training import metrics


def test_misclassified_lists_the_examples_the_error_counts():
    """The identity 'model' outputs its input: rows 1 and 3 point at the wrong class."""
    model = nets.Identity()
    outputs = jnp.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    targets = jnp.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]], jnp.float32) * 2.0 - 1.0
    wrong = metrics.misclassified(model, (), outputs, targets)
    assert wrong == [{"index": 1, "label": 0, "predicted": 1},
                     {"index": 3, "label": 2, "predicted": 0}]
    assert float(metrics.classification_error(model, (), outputs, targets)) == 0.5


def test_confusions_are_counted_and_ranked_by_hand():
    wrong = [{"index": 0, "label": 3, "predicted": 5}, {"index": 4, "label": 4, "predicted": 9},
             {"index": 7, "label": 3, "predicted": 5}, {"index": 8, "label": 1, "predicted": 7}]
    assert metrics.misclassified_confusions(wrong) == [(3, 5, 2), (1, 7, 1), (4, 9, 1)]
    assert metrics.misclassified_confusions(wrong, top=1) == [(3, 5, 2)]
    assert metrics.most_frequent_confusions([(2, 0, 3), (1, 6, 1), (2, 0, 1)]) == [
        (2, 0, 4), (1, 6, 1)]
    assert metrics.confusions_line([(3, 5, 2), (1, 7, 1)]) == "3\u21925 2, 1\u21927 1"


def test_labels_need_one_row_per_example():
    """1-D integer labels used to be read as one row: argmax over the batch, an error rate of
    0.75 for one mistake in four."""
    with pytest.raises(ValueError, match=r"target_labels: targets have shape \(4,\), expected "
                                         r"\(batch, classes\), one row per example"):
        metrics.target_labels(jnp.array([0, 1, 2, 1]))
    with pytest.raises(ValueError, match=r"predicted_labels: outputs have shape \(3,\)"):
        metrics.predicted_labels(jnp.array([0.2, 0.9, 0.1]))
    # a single column is a binary classifier, and a time axis gives a label per step
    assert metrics.predicted_labels(jnp.array([[0.3], [-0.2]])).tolist() == [1, 0]
    assert metrics.target_labels(jnp.array([[[0, 1], [1, 0]]])).tolist() == [[1, 0]]


def test_binary_labels_need_an_output_strictly_above_the_threshold():
    """A single output column is label 1 only where it exceeds the threshold: 0 -> 0, 1e-6 -> 1,
    -1e-6 -> 0 at the default 0; 0.5 -> 0 and 0.51 -> 1 at 0.5 (by hand). Fails if an output
    equal to the threshold counts as label 1."""
    assert metrics.predicted_labels(jnp.array([[0.0], [1e-6], [-1e-6]])).tolist() == [0, 1, 0]
    assert metrics.predicted_labels(jnp.array([[0.5], [0.51]]), 0.5).tolist() == [0, 1]


def test_single_column_targets_are_cut_at_one_half():
    """0/1 targets, their soft versions 0.1/0.9 and 0.2/0.8, and +-1 targets: label 1 where the
    target exceeds 0.5, so 0.2 and 0.1 are 0, 0.5 itself is 0 and 0.51 is 1 (by hand). Fails
    if the cut is elsewhere than 0.5 (to within 0.01) or counts 0.5 itself as label 1."""
    targets = jnp.array([[0.2], [0.8], [0.1], [0.9], [-1.0], [1.0], [0.5], [0.51], [0.0]])
    assert metrics.target_labels(targets).tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0]
