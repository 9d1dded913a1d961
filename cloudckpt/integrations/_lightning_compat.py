"""Every private name of Lightning that :mod:`cloudckpt.integrations.lightning` relies on,
in one place, each checked against the Lightning releases in :data:`CHECKED_VERSIONS`.

- ``lightning.fabric.utilities.types._PATH``: the type of a checkpoint path in Lightning's
  ``CheckpointIO`` signatures (``str | os.PathLike``).
- ``ModelCheckpoint.__resolve_ckpt_dir`` (name-mangled): where the callback saves, from
  its ``dirpath``, the first logger's directory or the trainer's ``default_root_dir``.
- ``ModelCheckpoint._find_last_checkpoints(trainer)``: the hook ``ckpt_path="last"``
  calls to list ``last.ckpt`` candidates, overridden to list object stores.

A Lightning release outside the range may have renamed any of them: re-run
``tests/test_integrations_lightning_compat.py`` against it and widen the range.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint

#: The Lightning releases this module was checked against (``pip show lightning``).
CHECKED_VERSIONS = ">=2.6,<2.7"

#: A checkpoint path as Lightning passes it: ``str`` or ``os.PathLike``.
CheckpointPath = _PATH


def checkpoint_dir(callback: ModelCheckpoint, trainer: Any) -> str:
    """The directory ``callback`` saves checkpoints into for ``trainer``, resolved the
    way Lightning resolves it."""
    return str(callback._ModelCheckpoint__resolve_ckpt_dir(trainer))  # type: ignore[attr-defined]
