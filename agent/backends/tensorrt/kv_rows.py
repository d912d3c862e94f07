"""Which decode state owns which rows of the KV cache.

The KV buffers are allocated once with room for `max_batch` rows. Several states can be alive at
once (continuous batching prefills a joining job in its own state, then concatenates it with the
running batch), so each state leases a contiguous run of rows; its cache tensor
[B, H, past, D] lives, packed, at the start of that run. Leases end explicitly (a state that is
concatenated or narrowed hands its rows over) or when the state is garbage-collected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.errors import EngineError


@dataclass(eq=False)
class RowLease:
    """Rows [start, start + count) of the KV cache, while `active`."""

    start: int
    count: int
    active: bool = True


class RowPool:
    """First-fit allocation of contiguous row runs out of `capacity` rows."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._owner: list[RowLease | None] = [None] * capacity

    @property
    def free_rows(self) -> int:
        return sum(owner is None for owner in self._owner)

    def take(self, count: int, reuse: Sequence[RowLease] = ()) -> RowLease:
        """A run of `count` rows that are free or held by one of `reuse` (whose data the caller
        has finished reading from the rows it overwrites)."""
        usable = [owner is None or any(owner is lease for lease in reuse) for owner in self._owner]
        run = 0
        for row, ok in enumerate(usable):
            run = run + 1 if ok else 0
            if run == count:
                lease = RowLease(row - count + 1, count)
                for index in range(lease.start, lease.start + count):
                    self._owner[index] = lease
                return lease
        raise EngineError(
            f"{count} KV cache row(s) wanted, but only {self.free_rows} of {self.capacity} are "
            "free (or they are not contiguous): the engine was compiled for a batch of at most "
            f"{self.capacity}; finish running jobs first or compile with a larger --max-batch"
        )

    def release(self, lease: RowLease) -> None:
        """Free the rows `lease` still holds; idempotent (also runs from a state's finalizer)."""
        if not lease.active:
            return
        lease.active = False
        for index in range(lease.start, min(lease.start + lease.count, self.capacity)):
            if self._owner[index] is lease:
                self._owner[index] = None
