"""PyTorch Lightning: checkpoints through cloudckpt, with ``Trainer`` unchanged.

    from cloudckpt.integrations.lightning import CloudCheckpointIO, ModelCheckpoint

    trainer = Trainer(default_root_dir="s3://bucket/run", logger=False,
                      plugins=[CloudCheckpointIO()],
                      callbacks=[ModelCheckpoint(save_last=True, every_n_epochs=1)])
    trainer.fit(model, ckpt_path="last")   # on a new machine: resumes from the bucket

Each checkpoint Lightning writes becomes a version of a repository beside the checkpoint
files (``<checkpoint dir>/.cloudckpt``), and the ``.ckpt`` path holds a small pointer to it,
so Lightning's own listing and ``last`` logic work. Unchanged tensors are never uploaded
twice. Use this module's ``ModelCheckpoint``: Lightning's drops the ``s3://`` of
``last.ckpt`` when it looks for it, so ``ckpt_path="last"`` finds nothing on a bucket.
"""

from __future__ import annotations

import logging
import posixpath
import re
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO

from cloudckpt import (
    BackgroundSaver,
    CheckpointNotFound,
    CommitConflict,
    CorruptCheckpoint,
    Repo,
    RepoOptions,
)
from cloudckpt.integrations import pointer
from cloudckpt.integrations._lightning_compat import CheckpointPath, checkpoint_dir
from cloudckpt.redact import redact

log = logging.getLogger("cloudckpt")

__all__ = ["AsyncCloudCheckpointIO", "CloudCheckpointIO", "ModelCheckpoint"]


class CloudCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that stores checkpoints as cloudckpt versions.

    ``repo_uri``: one repository for every checkpoint path (default: ``.cloudckpt`` in
    each checkpoint's directory). ``storage_options`` go to fsspec (S3 endpoint, keys).
    The checkpoint a run resumed from is never removed by it, whatever ``save_top_k``
    decides, so a crash right after resuming cannot leave the run with nothing.
    """

    def __init__(
        self,
        repo_uri: str | None = None,
        storage_options: dict[str, Any] | None = None,
        options: RepoOptions | None = None,
    ) -> None:
        super().__init__()
        self.repo_uri = repo_uri
        self.resumed_from: str | None = None
        self._clients = pointer.ClientCache(storage_options, options)

    def repo_for(self, path: CheckpointPath) -> Repo:
        return self._clients.repo(self.repo_uri or f"{pointer.split(str(path))[0]}/.cloudckpt")

    def _pointer(self, path: str) -> pointer.Pointer | None:
        """The pointer at ``path`` if it is one of ours; None if there is none, or if the
        object there is something else (overwritten or removed, never followed)."""
        try:
            found = self._clients.pointer(path)
            return None if found is None else self._check(path, found)
        except CorruptCheckpoint as e:
            log.warning("%s: %s", path, e)
            return None

    def _check(self, path: str, found: pointer.Pointer) -> pointer.Pointer:
        """A pointer acts only on the repository this plugin writes ``path``'s versions
        to: one naming another (a copied or altered file) is refused."""
        repo = self.repo_for(path)
        if found.repo.rstrip("/") != repo.uri:
            raise CorruptCheckpoint(
                f"{path} points into {redact(found.repo)!r}, not {redact(repo.uri)!r} where "
                "this CheckpointIO keeps its versions; refused (load it with a "
                "CloudCheckpointIO(repo_uri=...) of that repository if you trust it)"
            )
        return found

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: CheckpointPath, storage_options: Any | None = None
    ) -> None:
        path = str(path)
        repo = self.repo_for(path)
        old = self._pointer(path)
        version = repo.commit(
            checkpoint,
            step=checkpoint.get("global_step"),
            fast_forward=True,
            message=pointer.split(path)[1],
            meta={"lightning_path": path},
        )
        directory, name = pointer.split(path)
        self._clients.store(directory).put(name, pointer.Pointer(repo.uri, version.id).dumps())
        if old is not None and old.version != version.id:
            self._forget(path, old)  # an overwritten last.ckpt

    def load_checkpoint(
        self,
        path: CheckpointPath,
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load the version ``path`` points to (never unpickles, whatever ``weights_only``)."""
        directory, name = pointer.split(str(path))
        found = self._check(str(path), pointer.read(self._clients.store(directory), name))
        state = self.repo_for(path).load(found.version)
        self.resumed_from = str(path)
        if map_location is not None and not callable(map_location):
            state = move_data_to_device(state, map_location)
        return state

    def remove_checkpoint(self, path: CheckpointPath) -> None:
        path = str(path)
        if path == self.resumed_from:
            log.info("keeping %s: this run resumed from it", path)
            return
        found = self._pointer(path)
        if found is None:
            return
        directory, name = pointer.split(path)
        self._clients.store(directory).delete([name])
        self._forget(path, found)

    def _forget(self, path: str, old: pointer.Pointer) -> None:
        """Drop a version no pointer names any more (its data goes at the next gc)."""
        if self.resumed_from and self._pointer(self.resumed_from) == old:
            return
        if self._named_elsewhere(path, old):  # a copied pointer (cp best.ckpt last.ckpt)
            log.info("keeping %s: another checkpoint file still names it", old.version)
            return
        try:
            self.repo_for(path).delete([old.version])
        except (CheckpointNotFound, CommitConflict) as e:  # the branch head stays
            log.debug("not deleting %s (%s): %s", old.version, path, e)

    def _named_elsewhere(self, path: str, old: pointer.Pointer) -> bool:
        """Whether another checkpoint file of ``path``'s directory points to ``old``."""
        directory, name = pointer.split(path)
        store = self._clients.store(directory)
        names = {posixpath.basename(p.rstrip("/")) for p in store.fs.ls(store.root, detail=False)}
        return any(
            self._pointer(f"{directory}/{other}") == old
            for other in names
            if other != name and other.endswith(".ckpt")
        )


class AsyncCloudCheckpointIO(CloudCheckpointIO):
    """Like :class:`CloudCheckpointIO`, but ``save_checkpoint`` only snapshots the state
    into reused host buffers and uploads in the background. One save is in flight at a
    time; a failure is raised by the next save or at teardown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._saver = BackgroundSaver[None]("cloudckpt-lightning")

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: CheckpointPath, storage_options: Any | None = None
    ) -> None:
        self._saver.wait()  # the buffers are reused: the previous upload must be done
        snapshot = self._saver.snapshot(checkpoint)
        self._saver.submit(super().save_checkpoint, snapshot, path, storage_options)

    def remove_checkpoint(self, path: CheckpointPath) -> None:
        self._saver.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        self._saver.close()


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, finding ``last.ckpt`` on object stores too.

    Lightning looks for it with the filesystem of the callback's ``dirpath``, which is
    still the local one when ``fit(ckpt_path="last")`` starts, and drops the protocol of
    what it lists; this lists the checkpoint directory on its own filesystem.
    """

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        directory = checkpoint_dir(self, trainer)
        fs = get_filesystem(directory)
        if isinstance(fs, LocalFileSystem):
            return super()._find_last_checkpoints(trainer)
        pattern = re.compile(rf"^{re.escape(self.CHECKPOINT_NAME_LAST)}(-(\d+))?$")
        if not fs.exists(directory):
            return set()
        found = set()
        for listed in fs.ls(directory, detail=False):
            name = posixpath.basename(listed.rstrip("/"))
            stem, ext = posixpath.splitext(name)
            if ext == self.FILE_EXTENSION and pattern.match(stem):
                found.add(f"{directory.rstrip('/')}/{name}")
        return found
