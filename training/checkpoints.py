"""Checkpoints with orbax, verified by a manifest, that never lose the last good state.

Layout: `DIR/<step>/` is an orbax checkpoint of one pytree of arrays (the training state),
and `DIR/<step>/nets_manifest.json` lists the sha256 of every file in it. The manifest is
written last, after orbax has finalised the checkpoint, so a checkpoint without one (a kill in
between) or whose files do not match it (truncated, corrupted) is invalid. Old checkpoints are
deleted only after a newer one is complete and verified, so the only good checkpoint is never
removed first. An invalid checkpoint found on restore is moved to `DIR/../corrupt/<step>/`
(kept for inspection), and restore falls back to the previous one, saying so.

PRNG keys are saved as raw key data (`jax.random.key_data`): the state holds them that way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

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
        except (OSError, ValueError):
            return False
        return expected == _files(root)

    def save(self, step: int, state: Any) -> None:
        """Write checkpoint `step`, verify it, then drop all but the newest `keep` valid ones."""
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
        exist but none is valid, raises CheckpointError.
        """
        found = self.steps()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        for step in reversed(found):
            if self.is_valid(step):
                try:
                    self._manager.reload()
                    state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
                    return step, state
                except Exception as error:  # noqa: BLE001 - any failure means unusable
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

    def _set_aside(self, step: int, reason: str) -> None:
        target = self.directory.parent / "corrupt" / str(step)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), target)
        self.say(f"checkpoint {step} in {self.directory}: {reason}; moved to {target}")
