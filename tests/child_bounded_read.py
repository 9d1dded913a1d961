"""Load a version whose blob object is far longer than its manifest says, and report the
peak memory it took, for test_bounded_reads.

Usage: python child_bounded_read.py URI OPTIONS_JSON GOOD_ID BAD_ID {load,reader}
OPTIONS_JSON: {"storage_options": {...}, "fast_path": bool}. Loads GOOD_ID first (imports,
thread pools, the S3 clients: everything a load needs is up), then BAD_ID through
``Repo.load`` or straight through ``BlobReader.read``; prints one JSON line: peak RSS in
bytes before and after, and the error's type and message.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from cloudckpt import Repo, RepoOptions, StoreOptions
from cloudckpt.blobs import BlobReader


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    uri, options, good, bad, how = sys.argv[1:6]
    opts = json.loads(options)
    repo = Repo(
        uri,
        opts["storage_options"],
        options=RepoOptions(store=StoreOptions(fast_path=opts["fast_path"])),
    )
    repo.load(good)
    before = peak_rss()
    try:
        if how == "load":
            repo.load(bad)
        else:
            doc = json.loads(repo.store.get(f"manifests/{bad}.json"))
            entry = next(e for e in doc["tensors"] if e["chunks"])
            BlobReader(repo.store, repo.options.transfer).read(
                [(entry, torch.empty(entry["shape"]))]
            )
        error = None
    except Exception as e:  # reported to the test
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"before": before, "after": peak_rss(), "error": error}), flush=True)


if __name__ == "__main__":
    main()
