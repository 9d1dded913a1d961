"""Exact resume: the sampler continues with the very next sample, the RNG streams
continue where they were, and the run record comes back as saved."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.resume import (
    META_KEY,
    ResumableSampler,
    RunRecord,
    capture_rng,
    python_rng_untouched,
    restore_rng,
)
from cloudckpt.versions import Version


def test_a_resumed_sampler_continues_with_the_very_next_index_across_epochs() -> None:
    uninterrupted = ResumableSampler(10, seed=7)
    expected = list(iter(uninterrupted)) + list(iter(uninterrupted))  # two epochs

    first = ResumableSampler(10, seed=7)
    drawn = list(itertools.islice(iter(first), 4))  # killed after 4 samples
    resumed = ResumableSampler(10, seed=123)  # the saved seed wins
    resumed.load_state_dict(first.state_dict())
    drawn += list(iter(resumed))  # the rest of epoch 0
    drawn += list(iter(resumed))  # epoch 1
    assert drawn == expected
    assert sorted(expected[:10]) == list(range(10)) and expected[:10] != expected[10:]


def test_each_epoch_is_the_permutation_of_seed_plus_epoch() -> None:
    sampler = ResumableSampler(6, seed=3)
    list(iter(sampler))
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 0
    second = list(iter(sampler))
    assert second == torch.randperm(6, generator=torch.Generator().manual_seed(4)).tolist()
    assert list(iter(ResumableSampler(6, shuffle=False))) == list(range(6))


def test_ranks_take_disjoint_shares_of_one_permutation() -> None:
    shares = [list(iter(ResumableSampler(10, seed=1, rank=r, world_size=3))) for r in range(3)]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1)).tolist()
    assert shares == [order[0:9:3], order[1:9:3], order[2:9:3]]  # 3 each, the rest dropped
    with pytest.raises(ValueError):
        ResumableSampler(10, rank=3, world_size=3)


def test_a_sampler_state_of_another_dataset_size_is_refused() -> None:
    with pytest.raises(ValueError, match="saved for 10 samples, this one has 12"):
        ResumableSampler(12).load_state_dict(ResumableSampler(10).state_dict())


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_restored_rng_streams_continue_where_they_were() -> None:
    seed_all(1)
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_all(2)
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_python_rng_untouched_hides_what_a_save_draws() -> None:
    random.seed(5)
    expected = random.random()
    random.seed(5)
    with python_rng_untouched():
        random.random()  # a retry's jitter
    assert random.random() == expected


def test_a_run_record_comes_back_as_saved_with_its_rng() -> None:
    torch.manual_seed(9)
    record = RunRecord(step=42, epoch=3, extra={"tokens": 1000})
    state = {META_KEY: record.dump()}
    expected = torch.rand(1).item()
    torch.manual_seed(0)
    assert RunRecord.restore(state, Version("v1", "main", step=42), "mem://r") == record
    assert torch.rand(1).item() == expected


def test_a_version_without_a_record_starts_at_its_own_step() -> None:
    restored = RunRecord.restore({"model": {}}, Version("v1", "main", step=17), "mem://r")
    assert restored == RunRecord(17, 0, None)


@pytest.mark.parametrize(
    "record", ["not a dict", {"step": -1}, {"step": "ten"}, {"rng": {"python": "junk"}}]
)
def test_a_malformed_record_is_corrupt_naming_the_version(record: object) -> None:
    with pytest.raises(CorruptCheckpoint, match=r"mem://r version v9: its step, epoch or RNG"):
        RunRecord.restore({META_KEY: record}, Version("v9", "main", step=1), "mem://r")
