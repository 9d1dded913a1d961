"""A consistent host copy of a state, made fast so training can go on while it uploads.

Tensors are copied into host buffers kept between saves (page-locked when the source is
on a GPU, so the device-to-host copy runs at full speed; figures in
``docs/design-notes.md``); containers are rebuilt, so later changes to the live state
(an optimizer's ``lr``) cannot leak into the snapshot.
"""

from __future__ import annotations

from typing import Any

import torch

from cloudckpt.tree import map_arrays


class Snapshotter:
    """Copies states into reused buffers. Not thread-safe; reuse a buffer only after the
    upload that read it is done."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, state: Any) -> Any:
        seen: dict[int, Any] = {}
        used_cuda = False

        def snapshot(value: Any, path: str) -> Any:
            nonlocal used_cuda
            if not isinstance(value, torch.Tensor):
                return value.copy()  # numpy arrays and scalars: small (RNG states)
            if id(value) in seen:  # tied weights stay tied
                return seen[id(value)]
            src = value.detach()
            cuda = src.device.type == "cuda"
            buf = self._buffers.get(path)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=cuda)
                self._buffers[path] = buf
            buf.copy_(src, non_blocking=cuda)
            used_cuda |= cuda
            seen[id(value)] = buf
            return buf

        out = map_arrays(state, snapshot)
        if used_cuda:
            torch.cuda.synchronize()
        return out
