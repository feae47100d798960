"""Dynamic batching for the node: Triton-style `max_batch` / `max_wait_ms`.

Requests wait in one bounded queue. A batch is released when `max_batch` requests wait or
when the oldest has waited `max_wait_ms`. With `newest_only`, a camera has at most one
waiting request: a newer frame replaces the waiting one (which is counted as dropped) but
keeps its place and its deadline, so a fast camera cannot starve the others and latency
cannot grow without bound when the node falls behind.

Aligned drops: given the frames' sequence numbers, a newer frame replaces the waiting one
only when its number is divisible by at least as high a power of two (`seq_rank`). A slot
then holds the highest-ranked frame of those that arrived since the last batch: the one
frame of that run that the other nodes, falling behind each at its own pace, also keep.
Without it each node of a split fleet keeps a different newest frame and, with every node
behind, almost no frame gets all its features (bench boards: 8 complete predictions a
second of 600 offered). The kept frame can be older than the newest, which costs latency
when the node is behind (64 cameras on one node: p50 62 ms against 9), so the node asks for
it only when other nodes compute the rest of the frame.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Slot(Generic[T]):
    arrived: float
    item: T
    rank: int = -1


def seq_rank(seq: int) -> int:
    """How many times 2 divides ``seq`` (0 counts as the highest): the frame that aligned
    drops keep among consecutive numbers."""
    return 64 if seq == 0 else (seq & -seq).bit_length() - 1


# Weight of the newest gap in the moving average: about the last 5 arrivals count.
GAP_SMOOTHING = 0.2


class DynamicBatcher(Generic[T]):
    def __init__(
        self,
        *,
        max_batch: int = 4,
        max_wait_ms: float = 1.0,
        capacity: int = 256,
        newest_only: bool = True,
        adaptive: bool = True,
    ) -> None:
        """`adaptive`: wait up to max_wait_ms for a fuller batch only while requests arrive
        closer together than that (the mean gap of recent arrivals); a request arriving at an
        idle node, with nothing due soon after it, is served at once. Under load, batches
        still form from what queues up while the worker is busy."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if capacity < max_batch:
            raise ValueError("capacity must be at least max_batch")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.capacity = capacity
        self.newest_only = newest_only
        self.adaptive = adaptive
        self.dropped = 0
        self._last_put: float | None = None
        # Batches taken (or requests handed back) and not yet finished(): while any is in
        # hand nothing is handed back, so requests are served in the order they came.
        self._in_hand = 0
        self._mean_gap_s = float("inf")  # moving average of the gaps between arrivals
        self._slots: OrderedDict[object, _Slot[T]] = OrderedDict()
        self._serial = 0
        self._ready = threading.Condition()

    def __len__(self) -> int:
        with self._ready:
            return len(self._slots)

    def put(self, source: str, item: T, now: float | None = None, seq: int | None = None) -> None:
        """Queue a request from `source` (a camera id); `seq`, its frame number, aligns drops
        with the other nodes' (module doc)."""
        self.put_unless_quiet(source, item, now, serve_quiet=False, seq=seq)

    def put_unless_quiet(
        self, source: str, item: T, now: float | None = None, serve_quiet: bool = True,
        min_gap_s: float = 0.0, seq: int | None = None,
    ) -> bool:  # fmt: skip
        """Queue a request from `source`, or, when the queue is empty and requests arrive
        further apart than the batch wait and `min_gap_s` (adaptive only), return True
        without queueing it: the caller serves it at once, saving the hand-over to the
        consumer's thread. `min_gap_s` should be well above the time a request takes to
        serve: a caller serving requests itself cannot drop the ones that arrive meanwhile
        (they wait in its socket), so it must only do so when they are rare."""
        now = time.monotonic() if now is None else now
        with self._ready:
            if self._last_put is not None:
                gap = now - self._last_put
                if self._mean_gap_s == float("inf"):
                    self._mean_gap_s = gap
                else:
                    self._mean_gap_s += GAP_SMOOTHING * (gap - self._mean_gap_s)
            self._last_put = now
            quiet = self._wait_s() == 0.0 and self._mean_gap_s >= min_gap_s
            if serve_quiet and quiet and not self._slots and not self._in_hand:
                self._in_hand += 1
                return True
            rank = -1 if seq is None else seq_rank(seq)
            if self.newest_only and source in self._slots:
                slot = self._slots[source]
                if rank >= slot.rank:
                    slot.item, slot.rank = item, rank  # keeps its place and its deadline
                self.dropped += 1
            else:
                if len(self._slots) >= self.capacity:
                    self._slots.popitem(last=False)
                    self.dropped += 1
                key: object = source if self.newest_only else self._next_serial()
                self._slots[key] = _Slot(now, item, rank)
            self._ready.notify()
        return False

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def finished(self) -> None:
        """A batch from take(), or a request put_unless_quiet() handed back, is served."""
        with self._ready:
            self._in_hand = max(0, self._in_hand - 1)

    def take(self, timeout: float = 0.5) -> list[T]:
        """Wait (at most `timeout` seconds) for a due batch; [] if none became due. Call
        finished() once a non-empty batch is served."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while True:
                now = time.monotonic()
                if self._slots:
                    oldest = next(iter(self._slots.values())).arrived
                    due_at = oldest + self._wait_s()
                    if len(self._slots) >= self.max_batch or now >= due_at:
                        self._in_hand += 1
                        return self._pop(self.max_batch)
                    wait = min(due_at, deadline) - now
                else:
                    wait = deadline - now
                if wait <= 0:
                    return []
                self._ready.wait(wait)

    def _wait_s(self) -> float:
        if self.adaptive and self._mean_gap_s >= self.max_wait_s:
            return 0.0  # nothing else is likely to come within the wait
        return self.max_wait_s

    def _pop(self, count: int) -> list[T]:
        batch = []
        while self._slots and len(batch) < count:
            batch.append(self._slots.popitem(last=False)[1].item)
        return batch
