"""The obstore data path for blobs: when it serves, and that its bytes are the store's."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from processes import wait_forked

from cloudckpt import Repo
from cloudckpt.store import Store, StoreOptions
from cloudckpt.store.s3_transport import ObstoreTransport
from cloudckpt.testing.local_s3 import ACCESS_KEY, SECRET_KEY


def test_blob_bytes_round_trip_through_obstore_and_s3fs_sees_them(seaweedfs: Any) -> None:
    uri = seaweedfs.fresh_uri("fast")
    fast = Store(uri, seaweedfs.storage_options())
    assert fast.backend.transport is not None
    data = bytes(range(256)) * 4096
    fast.put("blobs/ab/x", memoryview(data))
    view = fast.get_buffer("blobs/ab/x")
    assert isinstance(view, memoryview) and view.readonly and view == data
    slow = Store(uri, seaweedfs.storage_options(), StoreOptions(fast_path=False))
    assert slow.backend.transport is None
    assert slow.get("blobs/ab/x") == data  # one store, whichever client wrote it
    slow.put("blobs/cd/y", b"written by s3fs")
    assert fast.get("blobs/cd/y") == b"written by s3fs"
    info = fast.stat("blobs/ab/x")
    assert info is not None and info.size == len(data) and info.modified > 0
    assert fast.stat("blobs/none") is None


def test_a_checkpoint_written_by_one_client_loads_through_the_other(seaweedfs: Any) -> None:
    uri = seaweedfs.fresh_uri("fast-repo")
    state = {"w": torch.randn(300, 300), "step": torch.tensor(7)}
    slow = Repo(uri, seaweedfs.storage_options(), options=_no_fast_path())
    v1 = slow.commit(state)
    fast = Repo(uri, seaweedfs.storage_options())
    assert torch.equal(fast.load(v1.id)["w"], state["w"])
    state["w"] += 1
    v2 = fast.commit(state)
    assert torch.equal(slow.load(v2.id)["w"], state["w"])
    assert fast.verify(v2.id).ok


def test_credentials_from_the_aws_environment_serve_the_fast_path(
    seaweedfs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    store = Store(seaweedfs.fresh_uri("fast-env"))  # no storage options at all
    assert store.backend.transport is not None
    store.put("blobs/00/z", b"z" * 1000)
    assert store.get("blobs/00/z") == b"z" * 1000


@pytest.mark.parametrize(
    "opts",
    [
        {"requester_pays": True},
        {"client_kwargs": {"verify": False}},
        {"config_kwargs": {"s3": {"use_accelerate_endpoint": True}}},
        {"endpoint_url": "http://user:pw@127.0.0.1:9000"},
        {"endpoint_url": "http://127.0.0.1:9000/behind/a/path"},
    ],
)
def test_options_without_an_obstore_equivalent_keep_s3fs(opts: dict[str, Any]) -> None:
    base = {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": "http://127.0.0.1:9000"}
    assert ObstoreTransport.for_s3("bucket/run", {**base, **opts}, 1.0, 1.0) is None
    assert ObstoreTransport.for_s3("bucket/run", base, 1.0, 1.0) is not None


def test_a_child_forked_after_the_fast_path_ran_falls_back_to_s3fs(seaweedfs: Any) -> None:
    """obstore's runtime threads do not survive fork(): such a child would hang."""
    store = Store(seaweedfs.fresh_uri("fast-fork"), seaweedfs.storage_options())
    store.put("blobs/00/parent", b"parent")  # obstore's runtime is running now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if a store made here works
        try:
            again = Store(store.uri, seaweedfs.storage_options())
            again.put("blobs/00/child", again.get("blobs/00/parent") + b"+child")
            os._exit(0)
        finally:
            os._exit(1)
    code, in_time = wait_forked(pid, timeout=60)
    assert in_time, "the forked child hung on the store"
    assert code == 0
    assert store.get("blobs/00/child") == b"parent+child"


def _no_fast_path() -> Any:
    from cloudckpt.repo import RepoOptions

    return RepoOptions(store=StoreOptions(fast_path=False))


PROFILE_CHILD = """
import sys, time
import torch
from cloudckpt import Repo, RepoOptions, StoreOptions
from cloudckpt.store import RetryPolicy

opts = RepoOptions(store=StoreOptions(retry=RetryPolicy(attempts=1, total_seconds=10)))
repo = Repo(sys.argv[1], options=opts)
fast = repo.store.backend.transport
start = time.monotonic()
version = repo.commit({"w": torch.arange(1000.0)})
assert torch.equal(Repo(sys.argv[1]).load(version.id)["w"], torch.arange(1000.0))
print(fast is not None and fast.endpoint, repo.store.backend.endpoint, time.monotonic() - start,
      sep="|")
"""


def test_a_profiles_endpoint_and_region_reach_the_fast_path(seaweedfs: Any, tmp_path) -> None:
    """Issue 16 item 4: with AWS_PROFILE naming a profile whose config sets endpoint_url
    and region (as ``aws s3 ls`` honours), blob bytes went to AWS itself."""
    import os
    import subprocess
    import sys

    from cloudckpt.testing.local_s3 import ACCESS_KEY, SECRET_KEY

    (tmp_path / "config").write_text(
        f"[profile lab]\nendpoint_url = {seaweedfs.endpoint}\nregion = eu-west-3\n"
    )
    (tmp_path / "credentials").write_text(
        f"[lab]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "config"),
        AWS_PROFILE="lab",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "credentials"),
    )
    out = subprocess.run(
        [sys.executable, "-c", PROFILE_CHILD, seaweedfs.fresh_uri("profile")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    endpoint, named, seconds = out.stdout.strip().split("|")
    assert endpoint == seaweedfs.endpoint and seaweedfs.endpoint.split("//")[1] in named
    assert float(seconds) < 10


ENDPOINT_SETTINGS: list[tuple[dict[str, str], str, str | None]] = [
    ({}, "", None),
    ({"AWS_REGION": "eu-west-3"}, "", None),
    ({"AWS_DEFAULT_REGION": "us-gov-west-1"}, "", None),
    ({"AWS_REGION": "cn-north-1"}, "", None),  # not *.amazonaws.com: botocore is asked
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, "", None),
    ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9001", "AWS_ENDPOINT_URL": "http://x:1"}, "", None),
    ({"AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:9002"}, "", None),  # another service's
    (
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true",
        },
        "",
        None,
    ),
    ({}, "[profile lab]\nendpoint_url = http://127.0.0.1:9003\nregion = ap-south-1\n", "lab"),
    (
        {},
        "[profile lab]\nservices = local\n[services local]\ns3 =\n"
        "  endpoint_url = http://127.0.0.1:9004\n",
        "lab",
    ),
    ({}, "[default]\nregion = eu-central-1\n", None),
]


@pytest.mark.parametrize(("env", "config", "profile"), ENDPOINT_SETTINGS)
def test_the_fast_paths_endpoint_is_the_one_botocores_client_resolves(
    env: dict[str, str], config: str, profile: str | None, tmp_path, monkeypatch
) -> None:
    """Blob bytes must go where s3fs's botocore sends everything else: the endpoint read
    from the configuration alone equals a real botocore client's, in every setting."""
    import botocore.session

    from cloudckpt.store.s3_transport import _botocore_settings, _client_settings

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    (tmp_path / "config").write_text(config)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    session = botocore.session.Session(profile=profile)
    slow = _client_settings(session, session.get_config_variable("region"))
    assert _botocore_settings(profile) == slow


@pytest.mark.parametrize("fast", [True, False])
def test_a_conditional_put_to_a_missing_key_or_bucket_is_not_found(
    moto_server: Any, fast: bool
) -> None:
    """AWS (and moto) answer ``If-Match`` on a missing key with 404, not 412: a writer
    lease deleted behind the job's back must read as lost, and a swap into a missing
    bucket must name the bucket, on either client."""
    from cloudckpt.errors import CheckpointNotFound, StoreError
    from cloudckpt.lease import WriterLease

    options = StoreOptions(fast_path=fast)
    store = Store(moto_server.fresh_uri("gone"), moto_server.storage_options(), options)
    assert (store.backend.transport is not None) == fast
    lease = WriterLease(store, "main", ttl=600).acquire()
    store.backend.delete([lease.key], None)
    with pytest.raises(CheckpointNotFound):
        store.put_if_match(lease.key, b"{}", '"an-etag"')
    lease.renew()
    assert lease.lost is not None and "lost" in lease.lost
    lease.release()  # nothing left to release: no error
    nowhere = Store("s3://no-such-bucket-here/p", moto_server.storage_options(), options)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        nowhere.put_if_match("k", b"x", '"an-etag"')
