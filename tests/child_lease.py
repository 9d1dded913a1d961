"""A job that holds a branch's writer lease until told to stop.

Usage: python child_lease.py URI BRANCH [HOSTNAME TTL] (endpoint and credentials from the
AWS environment). HOSTNAME makes the job look like one on another machine. Prints one JSON
line once the lease is held; closes the manager when stdin closes.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from torch import nn

from cloudckpt import CheckpointManager


def main() -> None:
    uri, branch = sys.argv[1], sys.argv[2]
    ttl = 60.0
    if len(sys.argv) > 3:
        socket.gethostname = lambda: sys.argv[3]  # the holder identity of another machine
        ttl = float(sys.argv[4])
    with CheckpointManager(uri, branch=branch, save_every_steps=1, lease_ttl=ttl) as mgr:
        mgr.restore(model=nn.Linear(4, 4))
        mgr.step(1)
        print(json.dumps({"held": True, "pid": os.getpid()}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
