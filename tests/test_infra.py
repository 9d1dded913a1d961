"""infra/: the CloudFormation template lints clean, its IAM policy grants exactly the S3
actions the store layer calls, and the local S3 script serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from conftest import S3Requests
from processes import exported_env, infra_script, reaped

from cloudckpt import Repo, RepoOptions, TransferOptions
from cloudckpt.lease import WriterLease
from cloudckpt.repo import StoreOptions

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "infra" / "cloudformation" / "checkpoint-bucket.yaml"

#: S3 API operation -> the IAM action that authorizes it (AWS service authorization docs).
ACTION_OF = {
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "ListObjectsV2": "s3:ListBucket",
    "ListObjects": "s3:ListBucket",
    "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    # The missing-bucket check; under the template's prefix condition AWS denies it, and
    # the store then learns of a missing bucket from the first NoSuchBucket instead.
    "HeadBucket": "s3:ListBucket",
}


class _Loader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (!Ref, !Sub...) read as plain values."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def test_template_passes_cfn_lint() -> None:
    cfn_lint = str(Path(sys.executable).with_name("cfn-lint"))
    out = subprocess.run([cfn_lint, str(TEMPLATE)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_template_aborts_incomplete_uploads_and_blocks_public_access() -> None:
    bucket = yaml.load(TEMPLATE.read_text(), Loader=_Loader)["Resources"]["CheckpointBucket"]
    rules = bucket["Properties"]["LifecycleConfiguration"]["Rules"]
    assert any("AbortIncompleteMultipartUpload" in r for r in rules)
    assert all(bucket["Properties"]["PublicAccessBlockConfiguration"].values())


def granted_actions() -> set[str]:
    doc = yaml.load(TEMPLATE.read_text(), Loader=_Loader)
    statements = doc["Resources"]["TrainingPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    return {a for s in statements if s["Effect"] == "Allow" for a in s["Action"]}


def test_iam_policy_grants_exactly_what_the_store_calls(seaweedfs: Any) -> None:
    """Every kind of call cloudckpt makes -- commit with multipart, load, verify, delete,
    gc with a stale upload to abort, a writer lease -- recorded at each client's level."""
    options = RepoOptions(
        transfer=TransferOptions(chunk_size=16 << 20), store=StoreOptions(part_size=5 << 20)
    )
    repo = Repo(seaweedfs.fresh_uri("iam"), seaweedfs.storage_options(), options=options)
    operations = S3Requests(repo.store).operations
    first = repo.commit({"big": torch.randn(4 << 20), "small": torch.ones(3)})
    repo.commit({"big": torch.randn(4 << 20), "small": torch.zeros(3)})
    repo.load(first.id)
    repo.verify()
    bucket, prefix = repo.uri.removeprefix("s3://").split("/", 1)
    seaweedfs.client().create_multipart_upload(Bucket=bucket, Key=f"{prefix}/blobs/00/orphan")
    repo.delete([first.id])
    repo.gc(grace=0, abandoned_after=0)
    with WriterLease(repo.store, "main"):
        pass
    unknown = operations - ACTION_OF.keys()
    assert not unknown, f"map these operations to IAM actions: {unknown}"
    assert {ACTION_OF[op] for op in operations} == granted_actions(), sorted(operations)


def test_local_s3_script_serves_until_stopped(tmp_path: Path) -> None:
    proc = infra_script("local-s3.sh", "--moto")
    with reaped(proc):
        env = exported_env(proc)
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        opts = {
            "endpoint_url": env["AWS_ENDPOINT_URL"],
            "key": env["AWS_ACCESS_KEY_ID"],
            "secret": env["AWS_SECRET_ACCESS_KEY"],
        }
        repo = Repo("s3://checkpoints/runs/x", opts)
        repo.commit({"w": torch.ones(2)})
        assert json.loads(json.dumps([v.id for v in repo.versions()]))
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_seaweedfs_ports_and_their_grpc_twins_are_all_distinct() -> None:
    """weed listens on each port and port + 10000; one port equal to another's twin
    kills it at start (seen once in CI: the S3 gRPC twin was the filer's port)."""
    from cloudckpt.testing.local_s3 import _weed_ports

    for _ in range(200):
        ports = _weed_ports()
        assert len({*ports, *(p + 10000 for p in ports)}) == 8
