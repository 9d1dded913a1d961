"""Every ```python block of the README runs, in order, against a real local S3 server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_code() -> None:
    assert len(python_blocks()) >= 3


def test_readme_python_blocks_run(moto_server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    try:
        moto_server.create_bucket("my-bucket")
    except Exception as e:  # created by an earlier run of this test in the same session
        assert "BucketAlreadyOwnedByYou" in str(e) or "BucketAlreadyExists" in str(e)
    namespace: dict = {}
    for i, block in enumerate(python_blocks()):
        exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
