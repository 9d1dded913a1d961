"""The manager's local tier in a job spanning hosts (torchrun, gloo, one process per
"host", each host with a tier directory of its own): a replaced host -- its directory
wiped, or a new machine with a new host id -- restores the run's newest step from its
partner's copy instead of the bucket, bit-exact, and the job goes on."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from processes import torchrun

HERE = Path(__file__).resolve().parent


def run_job(
    uri: str, base: Path, hosts: list[str], steps: int, env: dict[str, str], *extra: str
) -> list[Any]:
    out = base / "out"
    child = str(HERE / "child_tiered.py")
    proc = subprocess.run(
        torchrun(len(hosts), child, uri, str(base), ",".join(hosts), str(steps), str(out), *extra),
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    if not extra:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(len(hosts))]


def test_a_replaced_host_restores_from_its_partner_not_the_bucket(
    seaweedfs: Any, tmp_path: Path
) -> None:
    import os

    env = {**os.environ, **seaweedfs.env(), "OMP_NUM_THREADS": "1"}
    uri = seaweedfs.fresh_uri("tiered-hosts")
    first = run_job(uri, tmp_path, ["h0", "h1"], 6, env)  # bucket step 4, local steps 5, 6
    assert {r["final_step"] for r in first} == {6}
    assert first[0]["final"] == first[1]["final"]

    # The same hosts restart: each resumes step 6 from its own tier.
    again = run_job(uri, tmp_path, ["h0", "h1"], 1, env)
    assert [r["resumed_step"] for r in again] == [6, 6]
    assert [r["restored"] for r in again] == [first[0]["final"]] * 2
    assert not any(r["loaded_in_bucket"] for r in again)  # a local-only version
    assert {r["received"] for r in again} == {0}  # nothing moved between hosts

    # h1's machine is replaced: its directory is gone. It gets step 7 from h0.
    shutil.rmtree(tmp_path / "h1")
    replaced = run_job(uri, tmp_path, ["h0", "h1"], 1, env)
    assert [r["resumed_step"] for r in replaced] == [7, 7]
    assert replaced[0]["restored"] == replaced[1]["restored"] == again[0]["final"]
    assert replaced[1]["received"] > 0 and not replaced[1]["loaded_in_bucket"]
    # ... and, once loaded, re-created its replica of h0's saves (step 7, the target).
    assert 7 in replaced[1]["replica_steps"], replaced[1]

    # A new machine under a new host id (a new hostname) takes h1's place. Step 8 was a
    # bucket save: each host's own local copy of it stands for it, so it still comes from
    # the partner (checked against the bucket's manifest), not the bucket.
    newcomer = run_job(uri, tmp_path, ["h0", "h2"], 1, env)
    assert [r["resumed_step"] for r in newcomer] == [8, 8]
    assert newcomer[1]["restored"] == replaced[0]["final"]
    assert newcomer[1]["received"] > 0 and not newcomer[1]["loaded_in_bucket"]

    # Every host's tier gone: the bucket's newest step (8 is a bucket save).
    for host in ("h0", "h1", "h2"):
        shutil.rmtree(tmp_path / host, ignore_errors=True)
    fresh = run_job(uri, tmp_path, ["h3", "h4"], 1, env)
    assert [r["resumed_step"] for r in fresh] == [8, 8]
    assert all(r["loaded_in_bucket"] for r in fresh)
    assert fresh[0]["restored"] == newcomer[0]["restored"]  # step 9 was local only


def test_two_machines_under_one_host_id_are_told_to_name_themselves(
    seaweedfs: Any, tmp_path: Path
) -> None:
    # Containers may share a hostname: two "machines" (tier directories) say "h0".
    import os

    env = {**os.environ, **seaweedfs.env(), "OMP_NUM_THREADS": "1"}
    uri = seaweedfs.fresh_uri("tiered-same-id")
    records = run_job(uri, tmp_path, ["h0", "h0"], 1, env, "per-rank")
    for r in records:
        assert "ranks [1] share a host id" in r["error"] and "LocalTier(host=...)" in r["error"]
