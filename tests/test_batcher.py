"""The node's dynamic batcher: batches by size and by deadline, newest frame wins, nothing
lost or doubled when the consumer keeps up."""

from __future__ import annotations

import threading
import time

import pytest

from edvit.edge_node.batcher import DynamicBatcher, seq_rank


def test_batch_released_when_full() -> None:
    batcher: DynamicBatcher[int] = DynamicBatcher(max_batch=4, max_wait_ms=60_000)
    for i in range(6):
        batcher.put(f"cam{i}", i)
    started = time.monotonic()
    assert batcher.take(timeout=5) == [0, 1, 2, 3]
    assert time.monotonic() - started < 1.0  # did not wait for the 60 s deadline
    assert len(batcher) == 2


def test_partial_batch_released_at_deadline() -> None:
    batcher: DynamicBatcher[int] = DynamicBatcher(max_batch=8, max_wait_ms=50)
    started = time.monotonic()
    batcher.put("cam0", 1)
    batcher.put("cam1", 2)
    assert batcher.take(timeout=5) == [1, 2]
    assert time.monotonic() - started >= 0.05


def test_take_times_out_empty() -> None:
    batcher: DynamicBatcher[int] = DynamicBatcher(max_batch=2, max_wait_ms=1)
    assert batcher.take(timeout=0.05) == []


def test_newest_frame_wins_and_keeps_its_place() -> None:
    batcher: DynamicBatcher[str] = DynamicBatcher(max_batch=8, max_wait_ms=0)
    batcher.put("cam0", "cam0#1", now=10.0)
    batcher.put("cam1", "cam1#1", now=10.1)
    batcher.put("cam0", "cam0#2", now=10.2)
    assert batcher.dropped == 1
    assert batcher.take(timeout=1) == ["cam0#2", "cam1#1"]


def served_frames(every: int, offset: int, frames: int, aligned: bool) -> set[int]:
    """A node that is behind: it takes one frame per `every` arrivals of one camera."""
    batcher: DynamicBatcher[int] = DynamicBatcher(max_batch=1, max_wait_ms=0)
    served = set()
    for seq in range(1, frames + 1):
        batcher.put("cam0", seq, now=float(seq), seq=seq if aligned else None)
        if (seq + offset) % every == 0:
            served.update(batcher.take(timeout=0))
    return served


def test_nodes_behind_at_their_own_pace_keep_the_same_frames() -> None:
    """Three nodes of a split fleet, each behind by a different factor and out of phase: a
    prediction is complete only for the frames all three served. Aligned drops keep the
    frame with the highest power of two of each run, which the others keep too."""
    paces = [(3, 0), (4, 1), (5, 2)]
    complete = {}
    for aligned in (False, True):
        sets = [served_frames(every, offset, 600, aligned) for every, offset in paces]
        complete[aligned] = len(set.intersection(*sets))
        assert all(len(s) >= 600 // every - 1 for s, (every, _) in zip(sets, paces, strict=True))
    assert complete[False] <= 20
    assert complete[True] >= 3 * complete[False] and complete[True] >= 60


def test_an_aligned_slot_keeps_the_higher_power_of_two() -> None:
    assert [seq_rank(s) for s in (1, 2, 3, 4, 6, 8, 12, 0)] == [0, 1, 0, 2, 1, 3, 2, 64]
    batcher: DynamicBatcher[int] = DynamicBatcher(max_batch=8, max_wait_ms=0)
    for seq in (5, 6, 7, 8, 9, 10):
        batcher.put("cam0", seq, seq=seq)
    assert batcher.take(timeout=0) == [8] and batcher.dropped == 5
    batcher.put("cam0", 11, seq=11)
    assert batcher.take(timeout=0) == [11]  # a fresh slot takes whatever comes first


def test_keep_all_frames_and_capacity() -> None:
    batcher: DynamicBatcher[int] = DynamicBatcher(
        max_batch=2, max_wait_ms=0, capacity=3, newest_only=False
    )
    for i in range(5):
        batcher.put("cam0", i)
    assert batcher.dropped == 2  # the two oldest
    assert batcher.take(timeout=1) == [2, 3]
    assert batcher.take(timeout=1) == [4]


@pytest.mark.parametrize("newest_only", [True, False])
def test_nothing_lost_or_doubled_when_consumer_keeps_up(newest_only: bool) -> None:
    batcher: DynamicBatcher[tuple[str, int]] = DynamicBatcher(
        max_batch=8, max_wait_ms=1, capacity=512, newest_only=newest_only
    )
    cameras, per_camera = 4, 200
    received: list[tuple[str, int]] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set() or len(batcher):
            received.extend(batcher.take(timeout=0.05))

    consumer = threading.Thread(target=consume)
    consumer.start()
    for seq in range(per_camera):
        for cam in range(cameras):
            batcher.put(f"cam{cam}", (f"cam{cam}", seq))
        # Not overloaded: a camera's next frame comes after its previous one was taken.
        deadline = time.monotonic() + 5
        while len(batcher) and time.monotonic() < deadline:
            time.sleep(0.0005)
    done.set()
    consumer.join(timeout=10)
    assert sorted(received) == sorted(
        (f"cam{c}", s) for c in range(cameras) for s in range(per_camera)
    )
    assert batcher.dropped == 0


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(max_batch=0)
    with pytest.raises(ValueError):
        DynamicBatcher(max_batch=4, capacity=2)


def test_adaptive_serves_a_lone_request_at_once() -> None:
    """An idle node (nothing arrived before, or arrivals far apart) does not wait for a batch
    that will not come; fixed waiting does."""
    adaptive: DynamicBatcher[int] = DynamicBatcher(max_batch=8, max_wait_ms=200)
    started = time.monotonic()
    adaptive.put("cam0", 1)
    assert adaptive.take(timeout=5) == [1]
    assert time.monotonic() - started < 0.1
    for i in range(3):  # arrivals 250 ms apart, more than the 200 ms the batch could wait
        adaptive.put("cam0", i)
        assert adaptive.take(timeout=5) == [i]
        time.sleep(0.25)
    started = time.monotonic()
    adaptive.put("cam0", 9)
    assert adaptive.take(timeout=5) == [9]
    assert time.monotonic() - started < 0.1

    fixed: DynamicBatcher[int] = DynamicBatcher(max_batch=8, max_wait_ms=200, adaptive=False)
    started = time.monotonic()
    fixed.put("cam0", 1)
    assert fixed.take(timeout=5) == [1]
    assert time.monotonic() - started >= 0.2


def test_adaptive_waits_while_requests_come_close_together() -> None:
    batcher: DynamicBatcher[int] = DynamicBatcher(max_batch=8, max_wait_ms=100)
    for i in range(5):  # 5 ms apart: more is likely within the wait
        batcher.put(f"cam{i}", i)
        time.sleep(0.005)
    assert batcher.take(timeout=5) == [0, 1, 2, 3, 4]
    started = time.monotonic()
    batcher.put("cam9", 9)
    assert batcher.take(timeout=5) == [9]
    assert time.monotonic() - started >= 0.09  # waited for company


def test_a_quiet_request_is_handed_back_to_serve_at_once() -> None:
    """put_unless_quiet: an empty queue, nothing in hand and sparse arrivals mean the caller
    serves the request itself; otherwise it is queued as put() would."""
    batcher: DynamicBatcher[int] = DynamicBatcher(max_batch=8, max_wait_ms=100)

    def offer(source: str, item: int, now: float) -> bool:
        handed_back = batcher.put_unless_quiet(source, item, now=now)
        if handed_back:
            batcher.finished()
        return handed_back

    assert offer("cam0", 1, now=10.0)  # the first ever: nothing to wait for
    assert len(batcher) == 0
    assert offer("cam0", 2, now=11.0)  # a second later
    # Requests 1 ms apart: once the moving average of the gaps is under the wait, they queue.
    served_at_once = [offer(f"c{i}", i, now=11.0 + i / 1000) for i in range(20)]
    assert served_at_once[0] and not served_at_once[-1]
    first_queued = served_at_once.index(False)
    assert not any(served_at_once[first_queued:])
    assert batcher.take(timeout=1) == list(range(first_queued, first_queued + 8))
    fixed: DynamicBatcher[int] = DynamicBatcher(max_batch=8, max_wait_ms=100, adaptive=False)
    assert not fixed.put_unless_quiet("cam0", 1, now=10.0)
    assert len(fixed) == 1


def test_nothing_is_handed_back_while_a_batch_is_in_hand() -> None:
    """A request must not overtake a batch the consumer took but has not served yet."""
    batcher: DynamicBatcher[int] = DynamicBatcher(max_batch=1, max_wait_ms=0)
    batcher.put("cam0", 1, now=10.0)
    assert batcher.take(timeout=1) == [1]
    assert not batcher.put_unless_quiet("cam1", 2, now=20.0)  # queued behind batch [1]
    batcher.finished()
    assert batcher.take(timeout=1) == [2]
    batcher.finished()
    assert batcher.put_unless_quiet("cam2", 3, now=30.0)
