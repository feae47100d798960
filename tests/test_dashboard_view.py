"""The dashboard's view of the fleet, from decoded and raw messages (no broker, no browser)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edvit.fleet.dashboard.app import FleetView, histogram, node_state, stage_timings
from edvit.schemas import FrameMsg, PlanMsg, PredictionMsg, StatusMsg, decode, encode
from helpers import small_plan

NODE_STATUS = "edvit/nodes/{}/status"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def prediction(
    seq: int = 0, *, camera: str = "cam0", latency_ms: float = 10.0, degraded: bool = False
) -> PredictionMsg:
    return PredictionMsg(
        camera=camera, seq=seq, ts=1.0, label=3, class_name="dress", score=0.9,
        topk=(("dress", 0.9),), latency_ms=latency_ms, submodels=("sub0", "sub1"),
        missing=("sub1",) if degraded else (), degraded=degraded, plan_id="p1",
    )  # fmt: skip


def nodes_by_id(view: FleetView) -> dict[str, dict[str, Any]]:
    return {node["id"]: node for node in view.snapshot()["nodes"]}


def plan(assignments: dict[str, tuple[str, ...]]) -> PlanMsg:
    return small_plan(assignments, submodels=2)


def test_bad_payloads_are_counted_by_kind_and_change_nothing_else() -> None:
    view = FleetView()
    view.node_status_payload(NODE_STATUS.format("n0"), b"not json")
    view.node_status_payload(NODE_STATUS.format("n0"), b'{"state": "asleep"}')
    view.prediction_payload("edvit/predictions/cam0", b"[1, 2]")
    view.plan_payload("edvit/plan", b"\xff\xfe")
    view.node_status_payload("edvit/nodes//status", encode(StatusMsg(state="ready")))

    state = view.snapshot()
    assert state["bad_payloads"] == {"total": 5, "node_status": 3, "prediction": 1, "plan": 1}
    assert state["nodes"] == [] and state["cameras"] == [] and state["plan"] is None


def test_node_states_from_their_retained_status() -> None:
    assert node_state(StatusMsg(state="ready", plan_id="p1")) == "ready"
    assert node_state(StatusMsg(state="online", plan_id="p1")) == "loading"
    assert node_state(StatusMsg(state="online")) == "idle"
    assert node_state(StatusMsg(state="online", plan_id="p1", error="bad signature")) == "error"
    assert node_state(StatusMsg(state="offline", error="gone")) == "offline"


def test_a_node_going_offline_and_its_status_cleared() -> None:
    view = FleetView()
    ready = StatusMsg(
        state="ready", plan_id="p1", submodels=("sub0",), counters={"frames_served": 7}
    )
    view.node_status_payload(NODE_STATUS.format("n0"), encode(ready))
    node = nodes_by_id(view)["n0"]
    assert node["state"] == "ready"
    assert node["submodels"] == ["sub0"] and node["counters"] == {"frames_served": 7}

    view.node_status_payload(NODE_STATUS.format("n0"), encode(StatusMsg(state="offline", ts=0)))
    node = nodes_by_id(view)["n0"]
    assert node["state"] == "offline" and node["age_s"] is None  # the Will has no time

    view.node_status_payload(NODE_STATUS.format("n0"), b"")  # retained status cleared
    assert view.snapshot()["nodes"] == []


def test_nodes_of_the_plan_are_listed_with_their_assignments_even_unheard() -> None:
    view = FleetView()
    view.plan(plan({"n0": ("sub0",), "n1": ("sub1",)}))
    view.node_status("n0", StatusMsg(state="ready", submodels=("sub0",)))
    nodes = nodes_by_id(view)
    assert nodes["n0"]["assigned"] == ["sub0"] and nodes["n0"]["state"] == "ready"
    assert nodes["n1"]["assigned"] == ["sub1"] and nodes["n1"]["state"] == "unknown"


def test_degraded_rate_over_the_last_predictions() -> None:
    view = FleetView(window=4)
    assert view.snapshot()["predictions"]["degraded_rate"] is None
    for seq, degraded in enumerate([True, True, False, False, True, False]):
        view.prediction(prediction(seq, degraded=degraded))
    answers = view.snapshot()["predictions"]
    # The last four: False, False, True, False.
    assert answers["window"] == 4 and answers["degraded"] == 1
    assert answers["degraded_rate"] == 0.25 and answers["seen"] == 6


def test_latency_histogram_buckets() -> None:
    assert [b["count"] for b in histogram([0.5, 1.0, 1.5, 7.0, 9.0, 5000.0], (1.0, 2.0, 10.0))] == [
        2, 1, 2, 1,
    ]  # fmt: skip
    assert histogram([], (1.0,)) == [{"le": 1.0, "count": 0}, {"le": None, "count": 0}]

    view = FleetView()
    for seq, latency in enumerate([3.0, 4.0, 15.0, 15.0, 2500.0]):
        view.prediction(prediction(seq, latency_ms=latency))
    latency = view.snapshot()["predictions"]["latency_ms"]
    counts = {b["le"]: b["count"] for b in latency["histogram"]}
    assert counts[5.0] == 2 and counts[20.0] == 2 and counts[None] == 1
    assert sum(counts.values()) == 5
    assert latency["p50"] == 15.0 and latency["p95"] == 2500.0
    json.dumps(view.snapshot(), allow_nan=False)  # the snapshot is plain JSON


def test_cameras_show_their_latest_prediction() -> None:
    view = FleetView()
    view.prediction_payload("edvit/predictions/cam0", encode(prediction(1)))
    view.prediction_payload("edvit/predictions/cam0", encode(prediction(2, degraded=True)))
    view.camera_status_payload("edvit/cameras/cam1/status", encode(StatusMsg(state="online")))
    cameras = {c["id"]: c for c in view.snapshot()["cameras"]}
    latest = cameras["cam0"]["latest"]
    assert cameras["cam0"]["predictions"] == 2
    assert latest["seq"] == 2 and latest["class"] == "dress" and latest["score"] == 0.9
    assert latest["degraded"] is True and latest["missing"] == ["sub1"]
    assert cameras["cam1"]["latest"] is None and cameras["cam1"]["status"]["state"] == "online"


def test_plan_and_its_history() -> None:
    clock = Clock()
    view = FleetView(clock=clock)
    first = plan({"n0": ("sub0",), "n1": ("sub1",)})
    second = plan({"n0": ("sub0", "sub1")})
    view.plan_payload("edvit/plan", encode(first))
    clock.now = 1010.0
    view.plan_payload("edvit/plan", encode(first))  # the same plan again: no new entry
    clock.now = 1020.0
    view.plan_payload("edvit/plan", encode(second))
    state = view.snapshot()
    assert state["plan"]["plan_id"] == second.plan_id
    assert state["plan"]["assignments"] == {"n0": ["sub0", "sub1"]}
    assert state["plan_history"] == [
        {"plan_id": first.plan_id, "seen": 1000.0},
        {"plan_id": second.plan_id, "seen": 1020.0},
    ]
    view.plan_payload("edvit/plan", b"")  # cleared: no current plan, the history stays
    assert view.snapshot()["plan"] is None and len(view.snapshot()["plan_history"]) == 2


def test_stage_timings_when_present_and_ignored_when_odd() -> None:
    payload = json.loads(encode(prediction()))
    assert stage_timings(prediction()) == {}
    timed = json.dumps(payload | {"timings": {"queue": 1.5, "infer": 4, "fusion": 0.5}}).encode()
    assert stage_timings(decode(PredictionMsg, timed)) == {
        "queue": 1.5,
        "infer": 4.0,
        "fusion": 0.5,
    }
    for odd in ({"queue": -1}, {"": 1.0}):
        message = decode(PredictionMsg, json.dumps(payload | {"timings": odd}).encode())
        assert stage_timings(message) == {}
    for odd in ([1, 2], {"queue": "fast"}, "x"):  # the schema refuses these: a bad payload
        view = FleetView()
        view.prediction_payload(
            "edvit/predictions/cam0", json.dumps(payload | {"timings": odd}).encode()
        )
        assert view.snapshot()["bad_payloads"]["total"] == 1

    view = FleetView()
    view.prediction_payload("edvit/predictions/cam0", timed)
    view.prediction_payload(
        "edvit/predictions/cam0",
        json.dumps(payload | {"timings": {"queue": 2.5, "infer": 6}}).encode(),
    )
    view.prediction_payload("edvit/predictions/cam0", encode(prediction()))  # no timings
    stages = {s["stage"]: s for s in view.snapshot()["stages"]}
    assert list(stages) == ["queue", "infer", "fusion"]
    assert stages["queue"]["count"] == 2 and stages["queue"]["mean_ms"] == 2.0
    assert stages["fusion"]["count"] == 1
    assert view.snapshot()["bad_payloads"]["total"] == 0


def test_frames_only_when_enabled_and_raw_ones_become_png() -> None:
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    raw = FrameMsg(camera="cam0", seq=4, ts=1.0, enc="raw", data=pixels.tobytes(), shape=(28, 28),
                   dtype="uint8")  # fmt: skip
    hidden = FleetView()
    hidden.frame_payload("edvit/cameras/cam0/frame", encode(raw))
    assert hidden.latest_frame("cam0") is None and hidden.snapshot()["cameras"] == []

    view = FleetView(frames_enabled=True)
    view.frame_payload("edvit/cameras/cam0/frame", encode(raw))
    view.frame_payload("edvit/cameras/cam1/frame", b"\x93garbage")
    image = view.latest_frame("cam0")
    assert image is not None and image[1] == "image/png" and image[0].startswith(b"\x89PNG")
    state = view.snapshot()
    assert state["cameras"][0]["frame_seq"] == 4 and state["bad_payloads"]["frame"] == 1
    assert view.latest_frame("cam1") is None


def test_version_changes_with_every_message() -> None:
    view = FleetView()
    before = view.version
    view.node_status("n0", StatusMsg(state="online"))
    view.node_status_payload(NODE_STATUS.format("n0"), b"junk")
    assert view.version == before + 2


def test_a_port_in_use_is_one_clear_line() -> None:
    import socket

    from edvit.errors import ConfigError
    from edvit.fleet.dashboard.app import listen

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}: cannot listen \\(Address already"):
            listen("127.0.0.1", port)
