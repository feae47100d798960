"""`edvit deploy`: publish a bundle's model files and its plan as retained messages.

Models go out first and the plan last, so a node that sees the plan finds every model
it names already retained on the broker. With a signing key the plan is signed
(edvit/signing.py); it pins every model by sha256, so the signature covers them too, and
it gets a sequence (edvit/replay.py) above the retained plan's: the time in milliseconds, or
the retained plan's sequence + 1 when that is larger.

Before publishing anything, deploy reads the broker's retained plan. When that plan is
signed and deploy has no signing key, it stops with one line saying so (exit 2): the
fleet's followers would refuse an unsigned plan, and a silent deploy would change nothing
they serve. `--force` publishes the unsigned plan anyway.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable

from edvit.bundle import Bundle
from edvit.command import (
    connection,
    plan_keys,
    positive_float,
    positive_int,
    sign_key_option,
)
from edvit.errors import ConfigError
from edvit.limits import max_payload_bytes
from edvit.mqtt import Connection, MqttClient, unique_client_id
from edvit.replay import sequence_of
from edvit.schemas import (
    FUSION_MODEL_ID,
    ModelMsg,
    PlanMsg,
    StatusMsg,
    StemRef,
    SubmodelRef,
    decode,
    encode,
    plan_id_for,
)
from edvit.signing import SigningKey
from edvit.topics import Topics, validate_id

log = logging.getLogger("edvit.fleet.ops.deploy")

# How long deploy waits for the retained plan once its subscription is granted: the broker
# sends a retained message right behind the grant, so its absence by then means none.
RETAINED_PLAN_WAIT_S = 0.5

UNTRAINED_WARNING = (
    "bundle %s is UNTRAINED (edvit build --untrained: random weights): its predictions mean "
    "nothing; deploy it to measure sizes and frame rates only"
)


def default_nodes(bundle: Bundle) -> list[str]:
    return [f"node-{i}" for i in range(len(bundle.manifest.submodels))]


def round_robin(submodel_ids: list[str], nodes: list[str]) -> dict[str, tuple[str, ...]]:
    """Spread sub-models over nodes in order; every node gets at least one when it can."""
    check_nodes(nodes)
    assigned: dict[str, list[str]] = {node: [] for node in nodes}
    for i, sid in enumerate(submodel_ids):
        assigned[nodes[i % len(nodes)]].append(sid)
    return {node: tuple(ids) for node, ids in assigned.items()}


def check_nodes(nodes: list[str]) -> None:
    if not nodes:
        raise ConfigError("at least one node id is needed")
    for node in nodes:
        try:
            validate_id("node", node)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"node ids must be unique: {nodes}")


def over_nodes(submodel_ids: list[str], nodes: list[str]) -> dict[str, tuple[str, ...]]:
    """Round-robin while there are no more nodes than sub-models; beyond that node i runs
    sub-model i mod S, so the nodes past the first S are replicas (shared frames), not idle."""
    if len(nodes) <= len(submodel_ids):
        return round_robin(submodel_ids, nodes)
    check_nodes(nodes)
    return {node: (submodel_ids[i % len(submodel_ids)],) for i, node in enumerate(nodes)}


def with_replicas(
    assignments: dict[str, tuple[str, ...]], replicas: int
) -> dict[str, tuple[str, ...]]:
    """Each node followed by `replicas - 1` more nodes with its sub-models, `NODE-r1`, ...:
    nodes the plan gives the same sub-models split the frames between them (README,
    "Scale-out")."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, not {replicas}")
    placed: dict[str, tuple[str, ...]] = {}
    for node, ids in assignments.items():
        placed[node] = ids
        for k in range(1, replicas if ids else 1):
            placed[f"{node}-r{k}"] = ids
    return placed


def make_plan(bundle: Bundle, assignments: dict[str, tuple[str, ...]]) -> PlanMsg:
    m = bundle.manifest
    once = {tuple(sorted(ids)) for ids in assignments.values() if ids}
    placed = sorted(sid for ids in once for sid in ids)
    if placed != sorted(s.id for s in m.submodels):
        raise ConfigError(
            "the assignment must place every sub-model exactly once (nodes given the same "
            "sub-models are replicas and count once)"
        )
    stem = None
    if m.stem is not None:
        tail_files = set(m.stem.tails.values())
        stem = StemRef(
            blocks=m.stem.blocks,
            token_shape=m.stem.token_shape,
            slices={
                slice_id: bundle.file_sha256(f)
                for slice_id, f in stem_files(bundle).items()
                if f not in tail_files
            },
            tails={sid: bundle.file_sha256(f) for sid, f in m.stem.tails.items()},
        )
    return PlanMsg(
        plan_id=plan_id_for(bundle.sha256, assignments),
        bundle_sha256=bundle.sha256,
        classes=m.class_names,
        submodels=tuple(
            SubmodelRef(
                id=s.id,
                classes=s.classes,
                sha256=bundle.file_sha256(s.file),
                feature_dim=s.feature_dim,
                bytes=bundle.path(s.file).stat().st_size,
            )
            for s in m.submodels
        ),
        assignments=assignments,
        fusion_sha256=bundle.file_sha256(m.fusion.file),
        preprocessing=m.preprocessing,
        stem=stem,
        untrained=m.untrained,
    )


def bundle_assignments(bundle: Bundle, nodes: list[str] | None) -> dict[str, tuple[str, ...]]:
    """Named nodes get the sub-models round-robin; otherwise the bundle's assignment.json
    (from `edvit build --devices` or `edvit plan`); otherwise node-i runs sub-model i."""
    ids = [s.id for s in bundle.manifest.submodels]
    if nodes:
        return round_robin(ids, nodes)
    from edvit.placement.plan import read_assignment  # torch-free

    placed = read_assignment(bundle)
    if placed is not None:
        for node in placed.assignments:
            try:
                validate_id("node", node)
            except ValueError as exc:
                raise ConfigError(f"assignment.json: {exc}") from None
        return dict(placed.assignments)
    return round_robin(ids, default_nodes(bundle))


def stem_files(bundle: Bundle) -> dict[str, str]:
    """Slice id (as the plan names it) -> bundle file, for sliced bundles; else empty."""
    stem = bundle.manifest.stem
    if stem is None:
        return {}
    files = {StemRef.EMBED_ID: stem.embed}
    for i in range(stem.blocks):
        files[StemRef.block_id(i)] = stem.block_files[i]
        files[StemRef.from_id(i)] = stem.from_files[i]
    files.update({StemRef.tail_id(sid): f for sid, f in stem.tails.items()})
    return files


def model_files(bundle: Bundle) -> dict[str, str]:
    """Model id -> bundle file of every model a plan of this bundle names (plan.model_ids())."""
    m = bundle.manifest
    files = {s.id: s.file for s in m.submodels}
    files[FUSION_MODEL_ID] = m.fusion.file
    files |= stem_files(bundle)
    return files


def deploy(
    bundle: Bundle,
    broker: str | Connection,
    nodes: list[str] | None = None,
    topics: Topics | None = None,
    timeout: float = 30.0,
    sign_key: SigningKey | None = None,
    replicas: int = 1,
    wait_nodes: int | None = None,
    wait_timeout: float = 120.0,
    force: bool = False,
) -> PlanMsg:
    """Publish the bundle with the plan. With `wait_nodes`, first wait up to `wait_timeout`
    seconds until that many nodes have announced a status that is not offline, and place
    the sub-models over every node announced by then (`over_nodes`, instead of `nodes`).
    ConfigError when the retained plan is signed and there is no `sign_key`, unless `force`."""
    topics = topics or Topics()
    if bundle.manifest.untrained:
        log.warning(UNTRAINED_WARNING, bundle.root)
    client = MqttClient(unique_client_id("deploy"), broker, logger=log)
    retained = RetainedPlan()
    client.route(topics.plan(), retained.on_plan, qos=1)
    if wait_nodes is not None:
        if nodes:
            raise ConfigError("name the nodes or wait for them, not both")
        if wait_nodes < 1:
            raise ConfigError(f"--wait-nodes must be at least 1, not {wait_nodes}")
        announced = NodeStatuses(topics)
        client.route(topics.all_node_statuses(), announced.on_status, qos=1)
    client.start(wait=timeout, required=True)
    try:
        current = retained.wait(client, topics, timeout)
        if current is not None and current.signature is not None and sign_key is None:
            if not force:
                raise ConfigError(
                    f"the broker's plan {current.plan_id} is signed (key {current.key_id}) and "
                    "this deploy has no --sign-key: the fleet would refuse an unsigned plan; "
                    "give --sign-key (or --force to publish it unsigned anyway)"
                )
            log.warning("publishing an unsigned plan over the signed plan %s (--force)",
                        current.plan_id)  # fmt: skip
        if wait_nodes is None:
            assignments = bundle_assignments(bundle, nodes)
        else:
            ids = [s.id for s in bundle.manifest.submodels]
            assignments = over_nodes(ids, announced.wait_for(wait_nodes, wait_timeout))
        plan = make_plan(bundle, with_replicas(assignments, replicas))
        plan = plan.model_copy(update={"seq": next_sequence(current)})
        if sign_key is not None:
            plan = sign_key.sign(plan)
        publish_bundle(
            lambda topic, payload: client.publish_and_wait(
                topic, payload, qos=1, retain=True, timeout=timeout
            ),
            bundle, plan, topics,
        )  # fmt: skip
    finally:
        client.stop()
    return plan


def next_sequence(current: PlanMsg | None, now_s: float | None = None) -> int:
    """A new plan's sequence: the time in milliseconds, or above the current plan's."""
    now_ms = int((time.time() if now_s is None else now_s) * 1000)
    return now_ms if current is None else max(now_ms, sequence_of(current) + 1)


class RetainedPlan:
    """The plan the broker holds, read once before deploying."""

    def __init__(self) -> None:
        self.plan: PlanMsg | None = None
        self._heard = threading.Event()

    def on_plan(self, _topic: str, payload: bytes) -> None:
        self._heard.set()
        self.plan = decode(PlanMsg, payload)  # BadPayload: dropped and logged, as no plan

    def wait(self, client: MqttClient, topics: Topics, timeout: float) -> PlanMsg | None:
        """The retained plan, None when the broker holds none (or only a bad one)."""
        deadline = time.monotonic() + timeout
        while not client.subscribed(topics.plan()):
            if time.monotonic() >= deadline:
                raise ConfigError(f"the broker granted no subscription to {topics.plan()}")
            time.sleep(0.01)
        self._heard.wait(RETAINED_PLAN_WAIT_S)
        return self.plan


class NodeStatuses:
    """The nodes that announce themselves: every node keeps a retained status, so a
    subscriber hears the ones already up at once and the others as they come."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._live: set[str] = set()
        self._changed = threading.Condition()

    def on_status(self, topic: str, payload: bytes) -> None:
        node = self.topics.node_of(topic)
        status = decode(StatusMsg, payload)
        with self._changed:
            if status is None or status.state == "offline":
                self._live.discard(node)
            else:
                self._live.add(node)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[str]:
        """The live nodes, sorted, once there are at least `count`; ConfigError after
        `timeout` seconds with fewer."""
        deadline = time.monotonic() + timeout
        log.info("waiting for %d nodes to announce themselves", count)
        with self._changed:
            while len(self._live) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConfigError(
                        f"{len(self._live)} of {count} nodes announced themselves within "
                        f"{timeout:.0f} s: {sorted(self._live)}"
                    )
                self._changed.wait(left)
            return sorted(self._live)


MESSAGE_OVERHEAD_BYTES = 4096  # a model message's header and hash, beside its ONNX bytes


def check_model_sizes(bundle: Bundle, plan: PlanMsg, limit: int | None = None) -> None:
    """ConfigError, one line, when a model file the plan names is too large for one model
    message (edvit/limits.py), before anything is published."""
    limit = max_payload_bytes("model") if limit is None else limit
    files = model_files(bundle)
    for model_id in plan.model_ids():
        size = bundle.path(files[model_id]).stat().st_size
        if size + MESSAGE_OVERHEAD_BYTES > limit:
            raise ConfigError(
                f"{files[model_id]} is {size / 2**20:.1f} MB: a model message carries at most "
                f"{limit / 2**20:.0f} MB (MQTT caps a packet at 256 MB); split the model in "
                f"more sub-models (edvit build --num-devices) to deploy it"
            )


def publish_bundle(
    publish: Callable[[str, bytes], None], bundle: Bundle, plan: PlanMsg, topics: Topics
) -> None:
    """Every model file the plan names, then the plan, each through `publish(topic, payload)`
    (retained, acknowledged); nothing when a model file is too large for its message."""
    check_model_sizes(bundle, plan)
    files = model_files(bundle)
    for model_id, sha256 in plan.model_ids().items():
        relative = files[model_id]
        message = ModelMsg(sha256=sha256, onnx=bundle.path(relative).read_bytes())
        topic = topics.model(model_id)
        publish(topic, encode(message))
        log.info("published %s (%d bytes) on %s", relative, len(message.onnx), topic)
    publish(topics.plan(), encode(plan))
    log.info("published plan %s: %s", plan.plan_id, dict(plan.assignments))


def clear(bundle: Bundle, broker: str | Connection, topics: Topics | None = None) -> None:
    """Remove what `deploy` published for this bundle: the plan and every model file."""
    topics = topics or Topics()
    plan = make_plan(bundle, bundle_assignments(bundle, None))
    client = MqttClient(unique_client_id("deploy"), broker, logger=log)
    client.start(required=True)
    try:
        client.publish_and_wait(topics.plan(), b"", qos=1, retain=True)
        for model_id in plan.model_ids():
            client.publish_and_wait(topics.model(model_id), b"", qos=1, retain=True)
    finally:
        client.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder written by `edvit build`")
    parser.add_argument(
        "--nodes",
        help="comma-separated node ids, sub-models round-robin (default: the bundle's "
        "assignment.json, else node-0..node-N-1)",
    )
    parser.add_argument(
        "--replicas", type=int, default=1,
        help="nodes per share (default 1): NODE-r1, NODE-r2, ... get NODE's sub-models and "
        "split its frames through shared subscriptions (README, \"Scale-out\")",
    )  # fmt: skip
    parser.add_argument(
        "--wait-nodes", type=positive_int, metavar="N",
        help="wait until N nodes have announced themselves (a retained status that is not "
        "offline), then place the sub-models round-robin over every node announced by then "
        "(nodes beyond the sub-model count become replicas); for nodes started with "
        "`--id auto` (compose's `--scale node=N`)",
    )  # fmt: skip
    parser.add_argument(
        "--wait-timeout", type=positive_float, default=120.0, metavar="S",
        help="give up waiting for the nodes after S seconds (default 120)",
    )  # fmt: skip
    parser.add_argument("--clear", action="store_true", help="remove the plan and models instead")
    sign_key_option(parser, "sign the plan (it pins every model by sha256) with this Ed25519 key")
    parser.add_argument(
        "--force", action="store_true",
        help="publish an unsigned plan even over a signed one (the fleet's followers that "
        "take signed plans only refuse it)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle)
    topics = Topics(args.prefix)
    if args.clear:
        clear(bundle, connection(args), topics)
        print(f"cleared the plan and models of {args.bundle} from {args.broker}")
        return 0
    nodes = [n.strip() for n in args.nodes.split(",")] if args.nodes else None
    sign_key = plan_keys(args)[1]
    plan = deploy(
        bundle, connection(args), nodes, topics, sign_key=sign_key, replicas=args.replicas,
        wait_nodes=args.wait_nodes, wait_timeout=args.wait_timeout, force=args.force,
    )  # fmt: skip
    signed = f", signed by key {sign_key.key_id}" if sign_key is not None else ""
    print(f"deployed plan {plan.plan_id} to {args.broker}{signed}")
    for node, ids in plan.assignments.items():
        print(f"  {node}: {', '.join(ids) or '(nothing)'}")
    return 0
