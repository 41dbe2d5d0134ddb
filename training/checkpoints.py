"""Checkpoints with orbax, verified by a manifest, that never lose the last good state.

Layout: `DIR/<step>/` is an orbax checkpoint of one pytree of arrays (the training state),
and `DIR/<step>/nets_manifest.json` lists the sha256 of every file in it. The manifest is
written last, after orbax has finalised the checkpoint, so a checkpoint without one (a kill in
between) or whose files do not match it (truncated, corrupted) is invalid. Old checkpoints are
deleted only after a newer one is complete and verified, so the only good checkpoint is never
removed first. An invalid checkpoint found on restore is moved to `DIR/../corrupt/<step>/`
(kept for inspection; `corrupt/<step>.1/`, `.2/`, ... if that step was set aside before, so no
earlier copy is overwritten), and restore falls back to the previous one, saying so.

A valid checkpoint whose arrays differ from the state to restore (another tree structure, a
shape or a dtype: another model or config, or a float64 run resumed without x64) is not
corrupt: restore raises `training.config.ConfigError` naming the first leaf that differs and
leaves every checkpoint in place. Orbax would otherwise fail on it, or cast it silently.

PRNG keys are saved as raw key data (`jax.random.key_data`): the state holds them that way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from training.config import ConfigError

__all__ = ["CheckpointError", "Checkpointer"]

MANIFEST = "nets_manifest.json"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No valid checkpoint where one was required."""


def _digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: pathlib.Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): _digest(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def _leaf_path(path: tuple) -> str:
    """A jax key path as orbax names the stored leaf: 'params/0/w'."""
    return "/".join(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
                    for key in path)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{leaf path: (shape, dtype)} of a tree whose leaves have .shape and .dtype (arrays,
    ShapeDtypeStructs, orbax's array metadata), in the tree's leaf order."""
    return {_leaf_path(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _differences(stored: dict, expected: dict) -> list[str]:
    """'path stored S, expected E' for every leaf whose shape or dtype differs, or that only
    one side has ('nothing' on the other): `expected`'s leaves in order, then stored-only."""
    def describe(spec):
        return "nothing" if spec is None else f"{spec[0]} {spec[1].name}"

    paths = list(expected) + [path for path in stored if path not in expected]
    return [f"{path} stored {describe(stored.get(path))}, expected "
            f"{describe(expected.get(path))}"
            for path in paths if stored.get(path) != expected.get(path)]


class Checkpointer:
    """Save and restore numbered checkpoints of one pytree in `directory`, keeping `keep`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3,
                 say: Callable[[str], None] = print):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        self.keep = keep
        self.say = say
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None,
                                                 enable_async_checkpointing=False),
            item_handlers=ocp.StandardCheckpointHandler(),  # so that item_metadata reads
        )

    def steps(self) -> list[int]:
        """Steps with a checkpoint directory on disk, valid or not, ascending."""
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.is_dir() and p.name.isdigit())

    def is_valid(self, step: int) -> bool:
        """Whether DIR/<step> has a manifest and every file matches it."""
        root = self.directory / str(step)
        manifest = root / MANIFEST
        if not manifest.is_file():
            return False
        try:
            expected = json.loads(manifest.read_text())
            return expected == _files(root)
        except (OSError, ValueError):  # unreadable, or removed while being read
            return False

    def save(self, step: int, state: Any) -> None:
        """Write checkpoint `step`, verify it, then drop all but the newest `keep` valid ones.
        ValueError for a step that is not an integer >= 0, which `steps` would not list."""
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral) \
                or step < 0:
            raise ValueError(f"Checkpointer.save: step must be an integer >= 0, got {step!r} "
                             f"(it would be saved as {self.directory / str(step)} and never "
                             "restored)")
        step = int(step)
        if (self.directory / str(step)).exists():
            self._set_aside(step, "replaced by a new save of the same step")
            self._manager.reload()
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
        if jax.process_index() != 0:  # orbax saves collectively; one process verifies and prunes
            self._manager.reload()
            return
        root = self.directory / str(step)
        temporary = root / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(_files(root), indent=0))
        os.replace(temporary, root / MANIFEST)
        valid = [s for s in self.steps() if self.is_valid(s)]
        for old in valid[:-self.keep]:
            shutil.rmtree(self.directory / str(old))
        self._manager.reload()

    def restore_latest(self, like: Any) -> tuple[int, Any] | None:
        """(step, state) of the newest valid checkpoint, or None if there is none at all.

        `like` is a pytree with the structure, shapes and dtypes of the state. Invalid
        checkpoints newer than the one restored are set aside with a message. If checkpoints
        exist but none is valid, raises CheckpointError. If the newest valid checkpoint's
        tree structure, shapes or dtypes differ from `like`'s, raises ConfigError naming the
        first leaf that differs, its stored and expected shape and dtype, and moves nothing.
        """
        found = self.steps()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        for step in reversed(found):
            if self.is_valid(step):
                try:
                    return step, self._restore(step, abstract)
                except ConfigError:
                    raise
                except Exception as error:  # noqa: BLE001 - any other failure means unusable
                    self._set_aside(step, f"unusable, orbax could not read it ({error}); "
                                          "falling back to an earlier checkpoint")
                    continue
            self._set_aside(step, "unusable, its files are missing, truncated or corrupt; "
                                  "falling back to an earlier checkpoint")
        if found:
            raise CheckpointError(
                f"no valid checkpoint in {self.directory}: steps {found} were all truncated or "
                f"corrupt (set aside in {self.directory.parent / 'corrupt'}); start a new run "
                "or pass a fresh --workdir")
        return None

    def _restore(self, step: int, abstract: Any) -> Any:
        """Valid checkpoint `step` as the tree `abstract` (ShapeDtypeStruct leaves) describes;
        ConfigError if its stored leaves differ from those, before orbax reads or casts
        anything. Any other exception means orbax could not read the checkpoint."""
        self._manager.reload()
        metadata = self._manager.item_metadata(step)
        if metadata is None:
            raise CheckpointError(f"checkpoint {step} has no metadata")
        stored = _leaf_specs(getattr(metadata, "tree", metadata))
        expected = _leaf_specs(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True))
        differences = _differences(stored, expected)
        if differences:
            more = f" (and {len(differences) - 1} more leaves)" if len(differences) > 1 else ""
            raise ConfigError(
                f"Checkpointer.restore_latest: checkpoint {step} in {self.directory} does not "
                f"match the state to restore: {differences[0]}{more}; the checkpoint is left "
                "in place. Resume with the config and precision (jax_enable_x64) it was saved "
                "with, or pass a fresh --workdir")
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def _set_aside(self, step: int, reason: str) -> None:
        """Move DIR/<step> to corrupt/<step>/, or corrupt/<step>.1/, .2/, ... where an earlier
        copy of that step was set aside already: that one is kept, never overwritten."""
        corrupt = self.directory.parent / "corrupt"
        target, copies = corrupt / str(step), 0
        while target.exists():
            copies += 1
            target = corrupt / f"{step}.{copies}"
        corrupt.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), target)
        earlier = (f" (an earlier copy of step {step} stays in {corrupt / str(step)})"
                   if copies else "")
        self.say(f"checkpoint {step} in {self.directory}: {reason}; moved to {target}{earlier}")
