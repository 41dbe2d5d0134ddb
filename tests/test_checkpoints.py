"""Checkpoints: the orbax round trip, keeping the last K, and falling back past corrupt ones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training.checkpoints import MANIFEST, Checkpointer, CheckpointError


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
