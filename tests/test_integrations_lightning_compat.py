"""The private Lightning names the plugin relies on still mean what the shim says, in the
Lightning installed here, which lies in the range the shim was checked against."""

from __future__ import annotations

import os
import typing
from pathlib import Path

import pytest

lightning = pytest.importorskip("lightning")

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402

from cloudckpt.integrations import _lightning_compat as compat  # noqa: E402


def test_the_installed_lightning_is_in_the_checked_range() -> None:
    assert lightning.__version__ in SpecifierSet(compat.CHECKED_VERSIONS), (
        f"lightning {lightning.__version__} is not in {compat.CHECKED_VERSIONS}: check "
        "cloudckpt/integrations/_lightning_compat.py against it, then widen the range"
    )


def test_checkpoint_dir_is_the_trainers_default_root_without_a_logger(tmp_path: Path) -> None:
    trainer = Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    assert compat.checkpoint_dir(ModelCheckpoint(), trainer) == str(tmp_path / "checkpoints")


def test_checkpoint_dir_follows_the_logger_then_an_explicit_dirpath(tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path / "logs"), name="run", version=3)
    trainer = Trainer(default_root_dir=str(tmp_path), logger=logger, enable_progress_bar=False)
    expected = os.path.join(str(tmp_path / "logs"), "run", "version_3", "checkpoints")
    assert compat.checkpoint_dir(ModelCheckpoint(), trainer) == expected
    explicit = ModelCheckpoint(dirpath="s3://bucket/run/ckpts")
    assert compat.checkpoint_dir(explicit, trainer) == "s3://bucket/run/ckpts"


def test_lightning_still_calls_the_last_checkpoint_hook_the_plugin_overrides() -> None:
    from cloudckpt.integrations.lightning import ModelCheckpoint as Ours

    hook = "_find_last_checkpoints"
    assert callable(getattr(ModelCheckpoint, hook))
    assert getattr(Ours, hook) is not getattr(ModelCheckpoint, hook)


def test_checkpoint_path_is_what_lightnings_checkpoint_io_is_annotated_with() -> None:
    from lightning.pytorch.plugins.io import CheckpointIO

    hints = typing.get_type_hints(CheckpointIO.save_checkpoint)
    assert hints["path"] == compat.CheckpointPath
