"""S3 multipart uploads with a retry per part, aborted on failure.

s3fs retries nothing once its own retries are off, and restarts a whole object on any
failed part; here a flaky part costs one part, and an upload that gives up is aborted so
no parts linger (``gc`` and the bucket's lifecycle rule catch any whose abort failed).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Callable
from typing import Any

from fsspec.asyn import sync

from cloudckpt.store.retry import error_code

log = logging.getLogger("cloudckpt.store")
#: ``run(what, fn)``: the caller's retrying call.
Run = Callable[[str, Callable[[], Any]], Any]


def _s3(fs: Any, method: str, path: str, **kwargs: Any) -> Any:
    bucket, key, _ = fs.split_path(path)
    return sync(fs.loop, fs._call_s3, method, Bucket=bucket, Key=key, **kwargs)


def upload(fs: Any, path: str, data: bytes | memoryview, part_size: int, run: Run) -> None:
    """Write ``data`` to ``path`` in parts of ``part_size`` bytes (the last may be shorter)."""
    upload_id = run("create-upload", lambda: _s3(fs, "create_multipart_upload", path))["UploadId"]
    view = memoryview(data)
    try:
        parts = []
        for number, start in enumerate(range(0, len(view), part_size), 1):
            body = bytes(view[start : start + part_size])
            out = run(
                f"upload-part {number}",
                lambda body=body, number=number: _s3(
                    fs, "upload_part", path, UploadId=upload_id, PartNumber=number, Body=body
                ),
            )
            parts.append({"PartNumber": number, "ETag": out["ETag"]})
        run("complete-upload", lambda: _complete(fs, path, upload_id, parts, len(view)))
    except BaseException:
        try:
            run("abort-upload", lambda: abort(fs, path, upload_id))
        except Exception as e:  # the original failure matters more
            log.warning("could not abort the upload of %s (%s); gc removes it later", path, e)
        raise
    fs.invalidate_cache(path)


def _complete(fs: Any, path: str, upload_id: str, parts: list[dict[str, Any]], size: int) -> None:
    try:
        _s3(
            fs,
            "complete_multipart_upload",
            path,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
    except OSError as e:
        # A retried complete whose first attempt took effect finds no upload; the
        # object is then there with its full size.
        gone = error_code(e)[0] == "NoSuchUpload" or isinstance(e, FileNotFoundError)
        if gone and _s3(fs, "head_object", path).get("ContentLength") == size:
            return
        raise


def abort(fs: Any, path: str, upload_id: str) -> None:
    """Abort one incomplete upload (gone already is fine)."""
    with contextlib.suppress(FileNotFoundError):
        _s3(fs, "abort_multipart_upload", path, UploadId=upload_id)


def stale_uploads(fs: Any, root: str, older_than: float) -> list[tuple[str, str]]:
    """(path, upload id) of incomplete uploads under ``root`` started before ``older_than``
    (compared in whole seconds: the store's other timestamps have that resolution)."""
    bucket, prefix, _ = fs.split_path(root)
    found: list[tuple[str, str]] = []
    marker: dict[str, str] = {}
    for _ in range(10_000):  # pages of 1000
        page = sync(
            fs.loop,
            fs._call_s3,
            "list_multipart_uploads",
            Bucket=bucket,
            Prefix=prefix.rstrip("/") + "/",
            **marker,
        )
        for up in page.get("Uploads", []):
            started = up.get("Initiated")
            if isinstance(started, datetime.datetime) and int(started.timestamp()) <= older_than:
                found.append((f"{bucket}/{up['Key']}", up["UploadId"]))
        if not page.get("IsTruncated"):
            break
        marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
    return found
