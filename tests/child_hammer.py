"""Commits N versions to one branch, retrying on CommitConflict; prints what it did.

Usage: python child_hammer.py URI N NAME  (endpoint and credentials from the AWS env)
"""

from __future__ import annotations

import json
import sys

import torch

from cloudckpt import CommitConflict, Repo


def main() -> None:
    uri, n, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    repo = Repo(uri)
    committed, conflicts = [], 0
    for i in range(n):
        state = {"writer": name, "i": i, "w": torch.full((64,), float(i))}
        for _attempt in range(100):
            try:
                committed.append(repo.commit(state, message=f"{name}-{i}").id)
                break
            except CommitConflict:
                conflicts += 1
        else:
            raise SystemExit(f"{name}: gave up after 100 conflicts")
    print(json.dumps({"committed": committed, "conflicts": conflicts}), flush=True)


if __name__ == "__main__":
    main()
