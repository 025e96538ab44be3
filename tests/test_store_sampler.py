"""ResumableDistributedSampler: DistributedSampler's order, with exact save and restore."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from giblet_ds.store import ResumableDistributedSampler


@pytest.mark.parametrize("drop_last", [False, True])
def test_same_order_as_torch(drop_last: bool) -> None:
    data = list(range(11))
    for rank in range(3):
        ours = ResumableDistributedSampler(
            11, num_replicas=3, rank=rank, seed=7, drop_last=drop_last
        )
        ref = DistributedSampler(data, num_replicas=3, rank=rank, seed=7, drop_last=drop_last)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref)


def test_resume_mid_epoch_continues_exactly() -> None:
    full = ResumableDistributedSampler(13, num_replicas=2, rank=1, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert len(order) == 7
    full.advance(4)
    state = full.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == 4 and state["consumed_global"] == 8

    fresh = ResumableDistributedSampler(13, num_replicas=2, rank=1, seed=3)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)  # the trainer calls this at every epoch start; keeps the position
    assert list(fresh) == order[4:]
    assert len(fresh) == 3
    fresh.set_epoch(3)
    assert fresh.consumed == 0 and len(list(fresh)) == 7


def test_resume_on_another_world_size() -> None:
    samplers = [ResumableDistributedSampler(16, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    global_order = [i for pair in zip(*(list(s) for s in samplers), strict=True) for i in pair]
    for s in samplers:
        s.advance(3)
    state = samplers[0].state_dict()  # 6 samples consumed globally
    resumed = []
    for rank in range(3):
        s = ResumableDistributedSampler(16, num_replicas=3, rank=rank, seed=1)
        s.load_state_dict(state)
        resumed.append(list(s))
    # Next global positions 6, 7, 8 go to ranks 0, 1, 2.
    assert [r[0] for r in resumed] == global_order[6:9]
    four = ResumableDistributedSampler(16, num_replicas=4, rank=0, seed=1)
    with pytest.raises(ValueError, match="cannot resume 6 consumed samples on 4 ranks"):
        four.load_state_dict(state)


def test_mismatched_state_is_refused() -> None:
    state = ResumableDistributedSampler(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 but this sampler has 2"):
        ResumableDistributedSampler(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_size=10 but this sampler has 12"):
        ResumableDistributedSampler(12, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot advance by 11"):
        ResumableDistributedSampler(10).advance(11)


def test_with_dataloader_and_prefetch() -> None:
    """The trainer advances by what it trained on, not by what the loader prefetched."""
    data = torch.arange(20)
    sampler = ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=5)
    loader = DataLoader(data, batch_size=3, sampler=sampler)
    seen = []
    for step, batch in enumerate(loader):
        seen.extend(batch.tolist())
        sampler.advance(len(batch))
        if step == 2:
            state = sampler.state_dict()
            break
    rest = ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=5)
    rest.load_state_dict(state)
    for batch in DataLoader(data, batch_size=3, sampler=rest):
        seen.extend(batch.tolist())
    assert sorted(seen) == list(range(20))
    assert seen == list(ResumableDistributedSampler(20, seed=5))
