"""K-repeat group sampler (spec E.1, C.2, H.1, H.15).

Per sampling batch: draw ``M = groups_per_batch`` distinct rows uniformly without replacement among the rows
not banned, repeat each ``K = group_size`` times, shuffle the ``M*K`` slots; host p of P takes the contiguous
slots ``[p*M*K/P, (p+1)*M*K/P)``. The draw depends only on ``(seed, epoch, batch_index)`` and the ban set, so
every host computes the same global batch without communication. The group key of a sample is its row id.

State (``get_state``/``set_state``): ``{"epoch", "batch", "banned"}`` -- small, JSON-serialisable, for checkpoints.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["SampleBatch", "GroupSampler", "InsufficientRowsError"]


class InsufficientRowsError(RuntimeError):
    """Fewer eligible (non-banned) rows than groups per batch."""


@dataclasses.dataclass(frozen=True)
class SampleBatch:
    epoch: int
    batch: int
    row_ids: np.ndarray          # [local] int64 dataset row id per local slot (= group id)
    slot_ids: np.ndarray         # [local] int64 slot index in the global batch, 0..M*K-1 (global sample index)
    global_row_ids: np.ndarray   # [M*K] the whole batch (identical on all hosts)


class GroupSampler:
    def __init__(self, num_rows: int, groups_per_batch: int, group_size: int, batches_per_epoch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if groups_per_batch < 1 or group_size < 1 or batches_per_epoch < 1:
            raise ValueError("groups_per_batch, group_size and batches_per_epoch must be >= 1, got "
                             f"{groups_per_batch}, {group_size}, {batches_per_epoch}")
        total = groups_per_batch * group_size
        if total % process_count:
            raise ValueError(f"groups_per_batch * group_size = {total} slots cannot be split evenly over "
                             f"{process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
        self.num_rows = int(num_rows)
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = int(seed)
        self.process_index = process_index
        self.process_count = process_count
        self.epoch = 0
        self.batch = 0
        self.banned: set[int] = set()

    @property
    def global_batch_size(self) -> int:
        return self.groups_per_batch * self.group_size

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def eligible_rows(self) -> np.ndarray:
        banned = np.fromiter(self.banned, np.int64, len(self.banned))
        return np.setdiff1d(np.arange(self.num_rows, dtype=np.int64), banned)

    def ban(self, row_ids) -> None:
        """Permanently exclude ``row_ids`` from future draws."""
        for r in np.asarray(row_ids, np.int64).ravel():
            if not 0 <= r < self.num_rows:
                raise ValueError(f"cannot ban row {r}: dataset has {self.num_rows} rows")
            self.banned.add(int(r))

    def sample(self, epoch: int, batch: int) -> SampleBatch:
        """The batch for ``(epoch, batch)`` under the current ban set (pure; does not advance counters)."""
        eligible = self.eligible_rows()
        m = self.groups_per_batch
        if len(eligible) < m:
            raise InsufficientRowsError(
                f"only {len(eligible)} eligible rows ({len(self.banned)} of {self.num_rows} banned) but "
                f"{m} distinct groups per sampling batch are needed; lower groups_per_batch or disable banning")
        rng = np.random.default_rng([self.seed, epoch, batch])
        chosen = rng.choice(eligible, size=m, replace=False)
        slots = rng.permutation(np.repeat(chosen, self.group_size))
        n = self.local_batch_size
        lo = self.process_index * n
        return SampleBatch(epoch, batch, slots[lo:lo + n].astype(np.int64), np.arange(lo, lo + n, dtype=np.int64),
                           slots.astype(np.int64))

    def next_batch(self) -> SampleBatch:
        """The batch at the current counters, then advance (``batch`` wraps into ``epoch``)."""
        out = self.sample(self.epoch, self.batch)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return out

    def get_state(self) -> dict:
        return {"epoch": int(self.epoch), "batch": int(self.batch), "banned": sorted(int(b) for b in self.banned)}

    def set_state(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.banned = set()
        self.ban(state.get("banned", []))
