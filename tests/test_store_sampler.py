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


def _global_order(size: int, world: int, seed: int, drop_last: bool) -> list[int]:
    """The epoch's samples in the order the ranks consume them together (interleaved)."""
    ranks = [
        list(ResumableDistributedSampler(size, num_replicas=world, rank=r, seed=seed,
                                         drop_last=drop_last))
        for r in range(world)
    ]  # fmt: skip
    return [i for group in zip(*ranks, strict=True) for i in group]


def _resume(state: dict, size: int, world: int, seed: int, drop_last: bool) -> list[list[int]]:
    out = []
    for rank in range(world):
        s = ResumableDistributedSampler(
            size, num_replicas=world, rank=rank, seed=seed, drop_last=drop_last
        )
        s.load_state_dict(state)
        s.set_epoch(state["epoch"])  # the trainer does this at the epoch start: keeps position
        out.append(list(s))
    return out


@pytest.mark.parametrize(("old", "new"), [(2, 3), (2, 1), (1, 2), (3, 2), (4, 3)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_on_any_world_size_at_any_position(old: int, new: int, drop_last: bool) -> None:
    """Issue 9 case 1: 2 ranks x 2 samples = 4 consumed, resumed on 3 ranks (4 % 3 != 0) and every
    other position: the rest of the epoch's order is split over the new ranks, nothing replayed,
    nothing skipped but the drop_last remainder."""
    size, seed = 17, 4
    order = _global_order(size, old, seed, drop_last)
    per_rank = len(order) // old
    for consumed in range(per_rank + 1):
        samplers = [
            ResumableDistributedSampler(size, num_replicas=old, rank=r, seed=seed,
                                        drop_last=drop_last)
            for r in range(old)
        ]  # fmt: skip
        for s in samplers:
            s.advance(consumed)
        state = samplers[0].state_dict()
        position = consumed * old
        assert state["consumed_global"] == position
        resumed = _resume(state, size, new, seed, drop_last)
        lengths = {len(r) for r in resumed}
        assert len(lengths) == 1, "every new rank gets the same number of samples"
        interleaved = [i for group in zip(*resumed, strict=True) for i in group]
        # The epoch's full shuffled order (the old world's drop_last cut it short: recompute).
        full = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        left = max(size - position, 0)
        if drop_last:
            assert interleaved == full[position:][: left // new * new]
        else:
            assert interleaved[:left] == full[position:]
            assert len(interleaved) - left < new  # only the padding wraps around


def test_chained_resumes_keep_the_global_position() -> None:
    """2 -> 3 -> 3 -> 2 ranks, saving mid-epoch each time, consume the epoch's order in order."""
    size, seed = 23, 9
    full = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    seen: list[int] = []
    state = None
    for world, steps in ((2, 2), (3, 1), (3, 2), (2, 1)):
        samplers = []
        for rank in range(world):
            s = ResumableDistributedSampler(
                size, num_replicas=world, rank=rank, seed=seed, drop_last=True
            )
            if state is not None:
                s.load_state_dict(state)
            samplers.append(s)
        streams = [list(s)[:steps] for s in samplers]
        seen += [i for group in zip(*streams, strict=True) for i in group]
        for s in samplers:
            s.advance(steps)
        state = samplers[0].state_dict()
    assert seen == full[: len(seen)] and len(seen) == 4 + 3 + 6 + 2
    assert state is not None and state["consumed_global"] == 15


def test_same_world_resume_is_the_uninterrupted_order() -> None:
    reference = ResumableDistributedSampler(13, num_replicas=3, rank=2, seed=3, drop_last=True)
    order = list(reference)
    reference.advance(2)
    again = ResumableDistributedSampler(13, num_replicas=3, rank=2, seed=3, drop_last=True)
    again.load_state_dict(reference.state_dict())
    assert list(again) == order[2:]


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
