"""`edvit dashboard` end to end: a real mosquitto, the real app on a free port, headless
Chromium driven by Playwright. Set EDVIT_DASHBOARD_SCREENSHOT=docs/dashboard.png to save the
page (the README's picture) at the end of the test."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from edvit.broker.local import LocalBroker
from edvit.cli import build_parser
from edvit.mqtt import MqttClient, unique_client_id
from edvit.schemas import FrameMsg, PredictionMsg, StatusMsg, encode
from edvit.topics import Topics
from helpers import small_plan

if TYPE_CHECKING:
    from edvit.fleet.dashboard.app import Dashboard

CHROMIUM = Path("/usr/bin/chromium")
NODES = ("node-0", "node-1", "node-2")
WAIT_MS = 10_000


def test_the_dashboard_command_and_its_options() -> None:
    args = build_parser().parse_args(["dashboard", "--port", "9000", "--frames"])
    assert (args.host, args.port, args.frames) == ("127.0.0.1", 9000, True)
    assert build_parser().parse_args(["dashboard"]).frames is False  # frames are opt-in


def _need_browser() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is missing (pip install -e '.[dev]')")
    pytest.importorskip("starlette", reason="starlette is missing (pip install edvit[dashboard])")
    pytest.importorskip("uvicorn", reason="uvicorn is missing (pip install edvit[dashboard])")
    return sync_playwright


@pytest.fixture
def fleet_topics() -> Topics:
    """A prefix of its own: the session broker keeps other tests' retained messages."""
    return Topics(f"dash{uuid.uuid4().hex[:8]}")


@pytest.fixture
def publisher(mosquitto_broker: LocalBroker) -> Iterator[MqttClient]:
    client = MqttClient(unique_client_id("test-fleet"), mosquitto_broker.url)
    client.start(required=True)
    yield client
    client.stop()


@contextlib.contextmanager
def serving(dashboard: Dashboard) -> Iterator[str]:
    """The dashboard subscribed to its broker and served by uvicorn in a thread."""
    import uvicorn

    from edvit.fleet.dashboard.app import create_app

    dashboard.start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(dashboard), log_level="warning", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        dashboard.stop()  # ends open event streams first
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.fixture
def dashboard_url(mosquitto_broker: LocalBroker, fleet_topics: Topics) -> Iterator[str]:
    _need_browser()
    from edvit.fleet.dashboard.app import Dashboard

    with serving(Dashboard(mosquitto_broker.url, topics=fleet_topics)) as url:
        yield url


def publish_until(
    client: MqttClient, topic: str, payload: bytes, condition: Callable[[], bool]
) -> None:
    """Publish a non-retained message until the dashboard has it: `Dashboard.start` returns
    once connected, and its subscriptions may still be on their way to the broker."""
    for _ in range(50):
        client.publish_and_wait(topic, payload)
        for _ in range(4):
            if condition():
                return
            time.sleep(0.05)
    raise AssertionError(f"the dashboard never received the message on {topic}")


def _status(client: MqttClient, topics: Topics, node: str, status: StatusMsg) -> None:
    client.publish_and_wait(topics.node_status(node), encode(status), qos=1, retain=True)


def _prediction(seq: int, camera: str = "cam0", **fields: Any) -> PredictionMsg:
    values: dict[str, Any] = {
        "camera": camera, "seq": seq, "ts": 1.0, "label": 3, "class_name": "dress",
        "score": 0.91, "topk": (("dress", 0.91), ("coat", 0.05)), "latency_ms": 12.5,
        "submodels": ("sub0", "sub1", "sub2"), "plan_id": "plan-a",
    }  # fmt: skip
    return PredictionMsg(**(values | fields))


def test_the_dashboard_shows_the_fleet_live(
    publisher: MqttClient, fleet_topics: Topics, dashboard_url: str
) -> None:
    sync_playwright = _need_browser()
    from playwright.sync_api import expect

    topics = fleet_topics
    plan = small_plan({node: (f"sub{i}",) for i, node in enumerate(NODES)})
    publisher.publish_and_wait(topics.plan(), encode(plan), retain=True)
    for i, node in enumerate(NODES):
        _status(publisher, topics, node, StatusMsg(
            state="ready", plan_id=plan.plan_id, serving_plan_id=plan.plan_id,
            submodels=(f"sub{i}",), counters={"frames_served": 40 + i, "batches": 30 + i},
        ))  # fmt: skip

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(dashboard_url)
            expect(page).to_have_title("edvit fleet")
            for node in NODES:
                row = page.locator(f'tr[data-node="{node}"]')
                expect(row.locator(".node-state")).to_have_text("ready", timeout=WAIT_MS)
                expect(row.locator(".assigned")).to_have_text(f"sub{NODES.index(node)}")
            expect(page.locator("#plan-detail")).to_contain_text(plan.plan_id)
            expect(page.locator('[data-camera="cam0"]')).to_have_count(0)

            # A prediction arriving now shows up without a reload.
            publisher.publish_and_wait(topics.predictions("cam0"), encode(_prediction(1)))
            card = page.locator('[data-camera="cam0"]')
            expect(card.locator(".class")).to_have_text("dress", timeout=WAIT_MS)
            expect(card.locator(".score")).to_have_text("0.910")
            expect(card.locator(".latency")).to_have_text("12.5 ms")

            # node-1 loses power: its Will (an offline status) is shown.
            _status(publisher, topics, "node-1", StatusMsg(state="offline", ts=0.0))
            offline = page.locator('tr[data-node="node-1"] .node-state')
            expect(offline).to_have_text("offline", timeout=WAIT_MS)
            expect(page.locator('tr[data-node="node-0"] .node-state')).to_have_text("ready")

            # A garbage payload is counted, and the page keeps going.
            publisher.publish_and_wait(topics.predictions("cam0"), b"not json")
            expect(page.locator("#bad-payloads")).to_have_text("1 bad payloads", timeout=WAIT_MS)

            screenshot = os.environ.get("EDVIT_DASHBOARD_SCREENSHOT")
            if screenshot:
                _more_traffic(publisher, topics, plan.plan_id)
                expect(page.locator('[data-camera="cam1"] .class')).to_have_text(
                    "sneaker", timeout=WAIT_MS
                )
                expect(page.locator('[data-stage="fusion"]')).to_have_count(1, timeout=WAIT_MS)
                expect(page.locator("#plan-history li")).to_have_count(2, timeout=WAIT_MS)
                page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()


def _more_traffic(publisher: MqttClient, topics: Topics, plan_id: str) -> None:
    """The planner moves node-1's sub-model, the aggregator reports, and two cameras get
    predictions, some degraded, all with per-stage timings."""
    healed = small_plan({"node-0": ("sub0", "sub1"), "node-2": ("sub2",)})
    healed = healed.model_copy(update={"base_plan_id": plan_id})
    publisher.publish_and_wait(topics.plan(), encode(healed), retain=True)
    for node, submodels in healed.assignments.items():
        _status(publisher, topics, node, StatusMsg(
            state="ready", plan_id=healed.plan_id, serving_plan_id=healed.plan_id,
            submodels=submodels, counters={"frames_served": 80, "batches": 61},
        ))  # fmt: skip
    aggregator = StatusMsg(state="online", plan_id=healed.plan_id, counters={"predictions": 39})
    publisher.publish_and_wait(topics.aggregator_status(), encode(aggregator), retain=True)
    for seq in range(2, 40):
        camera = "cam1" if seq % 2 else "cam0"
        degraded = seq % 7 == 0
        latency = 6.0 + (seq * 37) % 30
        fields: dict[str, Any] = {"latency_ms": latency, "plan_id": healed.plan_id}
        if camera == "cam1":
            fields |= {"label": 7, "class_name": "sneaker", "score": 0.97}
        if degraded:
            fields |= {"degraded": True, "missing": ("sub1",), "score": 0.62}
        payload = json.loads(encode(_prediction(seq, camera, **fields)))
        payload["timings"] = {
            "camera": 1.2, "network": 2.0, "queue": latency * 0.2,
            "infer": latency * 0.5, "fusion": 0.4,
        }  # fmt: skip
        publisher.publish_and_wait(topics.predictions(camera), json.dumps(payload).encode())


@pytest.mark.broker
def test_the_dashboard_identity_over_tls_sees_the_fleet_but_no_frames(tmp_path: Path) -> None:
    """`edvit secure init` without --dashboard-sees-frames: the `dashboard` login reads node
    statuses and predictions through the ACL, and a frame never reaches it even with
    --frames (mosquitto's acl_file filters the delivery)."""
    from edvit.broker.local import mosquitto_path
    from edvit.fleet.dashboard.app import Dashboard
    from edvit.fleet.ops import secure
    from helpers import wait_until

    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    directory = tmp_path / "fleet"
    secure.init(directory, secure.parse_identities(["node-0"], ["cam0"]), port=8883)
    broker = LocalBroker(
        kind="mosquitto", log_path=tmp_path / "broker.log",
        secure_config=directory / "broker/mosquitto.conf",
    )  # fmt: skip
    broker.start()
    url = f"mqtts://localhost:{broker.port}"
    clients = [
        MqttClient(unique_client_id(identity), secure.login(directory, identity, url))
        for identity in ("node-0", "aggregator", "cam0")
    ]
    dashboard = Dashboard(secure.login(directory, "dashboard", url), frames=True)
    try:
        for client in clients:
            client.start(required=True)
        dashboard.start()
        node, aggregator, camera = clients
        topics = Topics()
        ready = StatusMsg(state="ready", plan_id="plan-a", submodels=("sub0",))
        node.publish_and_wait(topics.node_status("node-0"), encode(ready), retain=True)
        publish_until(
            aggregator, topics.predictions("cam0"), encode(_prediction(5)),
            lambda: bool(dashboard.state()["cameras"]),
        )  # fmt: skip
        frame = FrameMsg(camera="cam0", seq=5, ts=1.0, enc="png", data=b"\x89PNG not shown")
        camera.publish_and_wait(topics.frame("cam0"), encode(frame))
        # After the frame, from the same client: once this is seen, the frame would have been.
        online = encode(StatusMsg(state="online"))
        camera.publish_and_wait(topics.camera_status("cam0"), online, retain=True)

        def seen() -> bool:
            state = dashboard.state()
            cameras = state["cameras"]
            return bool(state["nodes"]) and bool(cameras) and cameras[0]["status"] is not None

        wait_until(seen, what="the dashboard to see node-0 and cam0")
        state = dashboard.state()
        assert state["nodes"][0]["id"] == "node-0" and state["nodes"][0]["state"] == "ready"
        state = dashboard.state()
        assert state["cameras"][0]["latest"]["seq"] == 5
        assert state["cameras"][0]["frame_seq"] is None
        assert dashboard.view.latest_frame("cam0") is None
    finally:
        dashboard.stop()
        for client in clients:
            client.stop()
        broker.stop()


def test_frames_are_served_only_with_frames_on(
    mosquitto_broker: LocalBroker, publisher: MqttClient, fleet_topics: Topics
) -> None:
    pytest.importorskip("starlette", reason="starlette is missing (pip install edvit[dashboard])")
    pytest.importorskip("uvicorn", reason="uvicorn is missing (pip install edvit[dashboard])")
    from edvit.fleet.dashboard.app import Dashboard

    pixels = bytes(range(256)) * 3
    frame = FrameMsg(camera="cam0", seq=9, ts=1.0, enc="raw", data=pixels, shape=(24, 32),
                     dtype="uint8")  # fmt: skip
    shown = Dashboard(mosquitto_broker.url, topics=fleet_topics, frames=True)
    with serving(shown) as url:
        publish_until(
            publisher, fleet_topics.frame("cam0"), encode(frame),
            lambda: shown.view.latest_frame("cam0") is not None,
        )  # fmt: skip
        with urllib.request.urlopen(f"{url}/frames/cam0") as response:
            assert response.headers["Content-Type"] == "image/png"
            assert response.read().startswith(b"\x89PNG")
        with urllib.request.urlopen(f"{url}/api/state") as response:
            assert json.load(response)["cameras"][0]["frame_seq"] == 9

    hidden = Dashboard(mosquitto_broker.url, topics=fleet_topics)  # the default: no frames
    with serving(hidden) as url:
        publisher.publish_and_wait(fleet_topics.frame("cam0"), encode(frame))
        with urllib.request.urlopen(f"{url}/api/state") as response:
            state = json.load(response)
        assert state["frames_enabled"] is False and state["cameras"] == []
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/frames/cam0")
        assert refused.value.code == 404
