"""A distributed sampler whose position in an epoch can be saved and restored exactly.

Same order as ``torch.utils.data.DistributedSampler`` (a permutation seeded by ``seed + epoch``,
padded or cropped to a multiple of the world size, rank ``r`` taking every ``world``-th index from
``r``), but it knows how far the epoch has got, so a resumed run continues with the very next
sample instead of replaying or skipping part of the epoch, on any number of ranks: the position is
global (samples of the epoch's order consumed by all ranks together), and the rest of the order,
from that position on, is split over the new ranks the same way. On the same world size this is
exactly the order an uninterrupted run takes. No ``torch.distributed`` import: the trainer passes
``num_replicas`` and ``rank``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(Sampler[int]):
    """Shard ``range(len(data))`` over ranks, resumable mid-epoch.

    The position counts samples this rank has *consumed*. A DataLoader with workers draws indices
    ahead of what training has used (prefetch), so the trainer reports consumption with
    ``advance(n)`` after each batch it actually trains on; ``state_dict()`` then records exactly
    that. ``set_epoch(e)`` at the start of every epoch (as with DistributedSampler); calling it with
    the epoch just restored keeps the restored position.
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        size = data if isinstance(data, int) else len(data)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.dataset_size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        if drop_last:
            self.num_samples = size // num_replicas
            if self.num_samples == 0:
                raise ValueError(
                    f"{size} samples cannot give every one of {num_replicas} ranks one"
                )
        else:
            self.num_samples = math.ceil(size / num_replicas)
        self.epoch = 0
        self.start = 0  # global position in the epoch's order where this split begins
        self.consumed = 0  # samples this rank has consumed since ``start``
        self._split(0)

    def _split(self, start: int) -> None:
        """Share the epoch's order from global position ``start`` over the ranks."""
        rest = max(self.dataset_size - start, 0)
        if self.drop_last:
            self.num_samples = rest // self.num_replicas
        else:
            self.num_samples = math.ceil(rest / self.num_replicas)
        self.start = start
        self.total_size = start + self.num_samples * self.num_replicas
        self.consumed = 0

    def __len__(self) -> int:
        """Samples this rank still has to yield in the current epoch."""
        return self.num_samples - self.consumed

    @property
    def consumed_global(self) -> int:
        """Samples of the epoch's order consumed by all ranks together."""
        return self.start + self.consumed * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is the epoch already in progress."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._split(0)

    def advance(self, n: int) -> None:
        """Record that training consumed ``n`` more samples on this rank."""
        if n < 0 or self.consumed + n > self.num_samples:
            raise ValueError(
                f"cannot advance by {n}: {self.consumed} of {self.num_samples} samples consumed"
            )
        self.consumed += n

    def epoch_indices(self) -> list[int]:
        """This rank's index sequence for the current epoch, from the split's start."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        padding = self.total_size - len(order)
        if padding > 0:  # wrap around to the epoch's first samples, as DistributedSampler does
            order += (order * math.ceil(padding / len(order)))[:padding]
        return order[self.start + self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.consumed :])

    def state_dict(self) -> dict[str, Any]:
        """Position to save in a checkpoint (plain ints and bools)."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "consumed_global": self.consumed_global,
            "start": self.start,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "dataset_size": self.dataset_size,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError if ``state`` cannot be continued by this sampler (other data or
        sampler settings); the world size may differ. Cheap: call it before converting anything."""
        for key in ("seed", "shuffle", "drop_last", "dataset_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state.get(key)!r} but this sampler has "
                    f"{getattr(self, key)!r}; resume with the same data and sampler settings"
                )
        consumed_global = int(state["consumed_global"])
        if consumed_global < 0:
            raise ValueError(f"sampler state has a negative position {consumed_global}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position, on any world size: the rest of the epoch's order, from the saved
        global position, is split over this sampler's ranks (:meth:`_split`). A position inside
        the padded tail (``drop_last=False``) means the epoch's real samples are all consumed."""
        self.check_state(state)
        self.epoch = int(state["epoch"])
        consumed_global = int(state["consumed_global"])
        start = int(state.get("start", 0))
        if state["num_replicas"] == self.num_replicas and start <= consumed_global:
            # Same world: keep the saved split (identical to an uninterrupted run, padded tail
            # included).
            self._split(start)
            self.consumed = min((consumed_global - start) // self.num_replicas, self.num_samples)
        else:
            self._split(min(consumed_global, self.dataset_size))
