"""A child process that commits a large random state, for tests that kill it or measure it.

Usage: python child_commit.py URI MEGABYTES CHUNK_BYTES
Endpoint and credentials come from the standard AWS environment. Prints one JSON line
when the state is built ("ready") and one when the commit is done.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from cloudckpt import Repo, RepoOptions, TransferOptions


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    uri, megabytes, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    repo = Repo(uri, options=RepoOptions(transfer=TransferOptions(chunk_size=chunk)))
    repo.versions()  # connect first, so the client's own memory is in the baseline
    torch.manual_seed(0)
    n = megabytes * (1 << 20) // 4 // 4
    state = {"model": {f"w{i}": torch.randn(n) for i in range(4)}, "step": 2}
    print(json.dumps({"ready": True, "rss": peak_rss()}), flush=True)
    version = repo.commit(state, step=2)
    print(json.dumps({"committed": version.id, "rss": peak_rss()}), flush=True)


if __name__ == "__main__":
    main()
