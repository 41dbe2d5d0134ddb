"""Checkpoints: the orbax round trip, keeping the last K, and falling back past corrupt ones."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from training import checkpoints
from training.checkpoints import MANIFEST, Checkpointer, CheckpointError
from training.config import ConfigError


def state(value):
    return {"params": ({"w": jnp.full((3, 2), value, jnp.float32), "b": jnp.zeros(2)}, ()),
            "step": jnp.array(int(value), jnp.int32),
            "key": jax.random.key_data(jax.random.key(int(value))),
            "flags": jnp.array([True, False])}


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bitwise(tmp_path):
    original = state(1.2345678)
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2, say=lambda m: None)
    checkpointer.save(10, original)
    step, restored = checkpointer.restore_latest(state(0.0))
    assert step == 10
    assert_bitwise_equal(restored, original)


def test_empty_nodes_between_arrays_round_trip(tmp_path):
    """Parameter-free layers (()) between layers with weights, and optax's EmptyState: the
    comparison with `like` sees the same leaves as orbax stores."""
    original = {"params": ({"w": jnp.ones((2, 2))}, (), {"w": jnp.zeros(3)}, ()),
                "opt_state": (optax.EmptyState(), {"count": jnp.array(3, jnp.int32)})}
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2, say=lambda m: None)
    checkpointer.save(1, original)
    step, restored = checkpointer.restore_latest(jax.tree.map(jnp.zeros_like, original))
    assert step == 1
    assert_bitwise_equal(restored, original)


def test_keeps_the_newest_k(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2, say=lambda m: None)
    for step in (1, 2, 3, 4):
        checkpointer.save(step, state(step))
    assert checkpointer.steps() == [3, 4]
    assert checkpointer.restore_latest(state(0.0))[0] == 4


def test_no_checkpoint_is_none(tmp_path):
    assert Checkpointer(tmp_path / "ckpt").restore_latest(state(0.0)) is None


def largest_file(root):
    return max((p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST),
               key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    messages = []
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3, say=messages.append)
    checkpointer.save(1, state(1.0))
    checkpointer.save(2, state(2.0))
    newest = tmp_path / "ckpt" / "2"
    if damage == "no_manifest":
        (newest / MANIFEST).unlink()  # as if killed between orbax's commit and the manifest
    else:
        victim = largest_file(newest)
        raw = victim.read_bytes()
        victim.write_bytes(raw[: len(raw) // 2] if damage == "truncate"
                           else raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    assert not checkpointer.is_valid(2) and checkpointer.is_valid(1)
    step, restored = checkpointer.restore_latest(state(0.0))
    assert step == 1
    assert_bitwise_equal(restored, state(1.0))
    assert any("checkpoint 2" in m and "falling back" in m for m in messages)
    assert (tmp_path / "corrupt" / "2").is_dir() and not newest.exists()


def test_all_damaged_is_a_clear_error(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", say=lambda m: None)
    checkpointer.save(5, state(5.0))
    (tmp_path / "ckpt" / "5" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no valid checkpoint .*steps \[5\]"):
        checkpointer.restore_latest(state(0.0))


def test_the_only_good_checkpoint_survives_a_failed_save(tmp_path, monkeypatch):
    """A save that dies before its manifest leaves the previous checkpoint in place."""
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=1, say=lambda m: None)
    checkpointer.save(1, state(1.0))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the manifest")

    monkeypatch.setattr("training.checkpoints._files", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(2, state(2.0))
    monkeypatch.undo()
    assert checkpointer.is_valid(1)
    assert checkpointer.restore_latest(state(0.0))[0] == 1


def test_a_checkpoint_removed_while_it_is_checked_is_not_valid(tmp_path, monkeypatch):
    """Another process (a run dropping an old checkpoint) may delete the files that
    `is_valid` is hashing: that reads as not valid, not as a FileNotFoundError."""
    checkpointer = Checkpointer(tmp_path / "ckpt", say=lambda m: None)
    checkpointer.save(1, state(1.0))

    def removed_meanwhile(root):
        raise FileNotFoundError(root / "params" / "0")

    monkeypatch.setattr("training.checkpoints._files", removed_meanwhile)
    assert checkpointer.is_valid(1) is False


def test_saving_a_step_again_replaces_it(tmp_path):
    messages = []
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2, say=messages.append)
    checkpointer.save(3, state(1.0))
    checkpointer.save(3, state(2.0))
    assert checkpointer.steps() == [3]
    step, restored = checkpointer.restore_latest(state(0.0))
    assert step == 3
    assert_bitwise_equal(restored, state(2.0))
    assert any("checkpoint 3" in m and "replaced" in m for m in messages)


def test_an_unreadable_manifest_or_contents_fall_back(tmp_path):
    """A manifest that is not JSON makes its checkpoint invalid; one that matches files orbax
    cannot read (damaged, then the manifest rewritten to match) is set aside at restore."""
    messages = []
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3, say=messages.append)
    for step in (1, 2, 3):
        checkpointer.save(step, state(float(step)))
    (tmp_path / "ckpt" / "3" / MANIFEST).write_text("{not json")
    assert not checkpointer.is_valid(3)
    second = tmp_path / "ckpt" / "2"
    for path in (p for p in second.rglob("*") if p.is_file() and p.name != MANIFEST):
        path.write_bytes(b"\0" * 16)
    (second / MANIFEST).write_text(json.dumps(checkpoints._files(second)))
    assert checkpointer.is_valid(2)
    step, restored = checkpointer.restore_latest(state(0.0))
    assert step == 1
    assert_bitwise_equal(restored, state(1.0))
    assert any("checkpoint 2" in m and "orbax could not read it" in m for m in messages)
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["2", "3"]


def test_a_step_set_aside_twice_keeps_both_copies(tmp_path):
    """A second corrupt checkpoint of a step already in corrupt/ goes beside it, numbered,
    and the message says where the earlier copy is: nothing set aside is overwritten."""
    messages = []
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3, say=messages.append)
    checkpointer.save(1, state(1.0))
    for value in (2.0, 3.0):
        checkpointer.save(2, state(value))
        (tmp_path / "ckpt" / "2" / MANIFEST).write_text(json.dumps({"value": value}))
        assert checkpointer.restore_latest(state(0.0))[0] == 1
    corrupt = tmp_path / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == ["2", "2.1"]
    assert json.loads((corrupt / "2" / MANIFEST).read_text()) == {"value": 2.0}
    assert json.loads((corrupt / "2.1" / MANIFEST).read_text()) == {"value": 3.0}
    assert f"moved to {corrupt / '2.1'} (an earlier copy of step 2 stays in " \
           f"{corrupt / '2'})" in messages[-1]


@pytest.mark.parametrize("step", [-1, 2.5, True])
def test_a_step_that_restore_would_not_see_is_refused(tmp_path, step):
    """Steps -1 and 2.5 were saved as directories '-1' and '2.5', which `steps` skips: never
    restored, never pruned. A numpy integer is a step like any other."""
    checkpointer = Checkpointer(tmp_path / "ckpt", say=lambda m: None)
    with pytest.raises(ValueError, match=re.escape(
            f"Checkpointer.save: step must be an integer >= 0, got {step!r}")):
        checkpointer.save(step, state(1.0))
    assert checkpointer.steps() == [] and list((tmp_path / "ckpt").iterdir()) == []
    checkpointer.save(np.int64(4), state(4.0))
    assert checkpointer.steps() == [4] and checkpointer.restore_latest(state(0.0))[0] == 4


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="Checkpointer: keep must be >= 1, got 0"):
        Checkpointer(tmp_path / "ckpt", keep=0)


def with_leaf(tree, path, leaf):
    """`tree` with the leaf at `path` (dict keys and sequence indices) replaced by `leaf`, or
    removed where leaf is None."""
    head, *rest = path
    if rest:
        child = with_leaf(tree[head], rest, leaf)
    if isinstance(tree, dict):
        tree = dict(tree)
        if not rest and leaf is None:
            del tree[head]
        else:
            tree[head] = child if rest else leaf
        return tree
    items = list(tree)
    items[head] = child if rest else leaf
    return type(tree)(items)


@pytest.mark.parametrize("path, leaf, stored, expected", [
    (("params", 0, "w"), jnp.zeros((3, 3), jnp.float32), "(3, 2) float32", "(3, 3) float32"),
    (("params", 0, "w"), jnp.zeros((3, 2), jnp.bfloat16), "(3, 2) float32", "(3, 2) bfloat16"),
    (("params", 0, "w"), jnp.zeros((3, 2), jnp.float64), "(3, 2) float32", "(3, 2) float64"),
    # a float64 run (x64 on: jnp.zeros is float64) resumed without x64: a float32 template
    (("params", 0, "b"), jnp.zeros(2, jnp.float32), "(2,) float64", "(2,) float32"),
    (("flags",), None, "(2,) bool", "nothing"),
    (("extra",), jnp.zeros(2, jnp.float32), "nothing", "(2,) float32"),
])
def test_a_checkpoint_unlike_the_state_is_refused_and_left_in_place(tmp_path, path, leaf,
                                                                     stored, expected):
    """A shape, dtype or structure that differs from `like` is a ConfigError naming the leaf,
    not a corrupt checkpoint: nothing is set aside, converted or restored."""
    messages = []
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3, say=messages.append)
    checkpointer.save(1, state(1.0))
    checkpointer.save(2, state(2.0))
    name = "/".join(str(key) for key in path)
    with pytest.raises(ConfigError, match=re.escape(
            f"checkpoint 2 in {tmp_path / 'ckpt'} does not match the state to restore: "
            f"{name} stored {stored}, expected {expected}")):
        checkpointer.restore_latest(with_leaf(state(0.0), path, leaf))
    assert checkpointer.steps() == [1, 2] and checkpointer.is_valid(2)
    assert not (tmp_path / "corrupt").exists() and messages == []
    step, restored = checkpointer.restore_latest(state(0.0))
    assert step == 2
    assert_bitwise_equal(restored, state(2.0))
