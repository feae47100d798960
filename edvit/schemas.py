"""Payload schemas of the wire contract (v1) and their codecs.

Binary payloads (frames, features, model files) are msgpack; the ones people and
dashboards read (plan, status, predictions) are JSON. Every msgpack payload carries
``"v": 1``. An empty payload on a retained topic means "cleared" and decodes to None.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edvit import WIRE_VERSION
from edvit.errors import BadPayload
from edvit.limits import (
    MAX_BATCH,
    MAX_FEATURE_ABS,
    MAX_FRAME_SIDE,
    MAX_STEM_BLOCKS,
    MAX_TENSOR_DIM,
    MAX_TIMESTAMP_S,
    PayloadKind,
    max_payload_bytes,
)
from edvit.topics import FUSION_MODEL_ID

Encoding = Literal["jpeg", "png", "raw"]
FeatureDtype = Literal["float32", "float16"]
State = Literal["online", "ready", "offline"]
# How a node runs a sliced bundle's stem (edge_node/runners.py); it decides which stem files
# the node fetches.
NodeStrategy = Literal["per-entry", "merged"]
NODE_STRATEGIES: tuple[NodeStrategy, ...] = ("per-entry", "merged")

# Ints that become array sizes (see edvit/limits.py).
FrameSide = Annotated[int, Field(ge=1, le=MAX_FRAME_SIDE)]
TensorDim = Annotated[int, Field(ge=1, le=MAX_TENSOR_DIM)]
ClassIndex = Annotated[int, Field(ge=0)]


# Capture times, unix seconds: bounded so that latencies computed from them stay finite
# (ts = 1e308 is finite, but now - ts is not).
Timestamp = Annotated[float, Field(ge=0, le=MAX_TIMESTAMP_S)]
# A stage's duration in ms: an hour at most.
StageMs = Annotated[float, Field(ge=0, le=3_600_000)]


class _Message(BaseModel):
    # allow_inf_nan=False: NaN/inf in any float field (nested ones too) is refused.
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)
    # The topic kind a message travels on, whose payload limit `decode` applies.
    PAYLOAD_KIND: ClassVar[PayloadKind | None] = None


class Preprocessing(_Message):
    """How a node turns any frame into the model's input tensor [1, C, H, W]."""

    channels: Literal[1, 3]
    height: TensorDim
    width: TensorDim
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Literal["area", "linear", "nearest"] = "area"

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self


class FrameMsg(_Message):
    PAYLOAD_KIND: ClassVar[PayloadKind] = "frame"
    v: Literal[1] = WIRE_VERSION
    camera: str
    seq: int = Field(ge=0)
    ts: Timestamp
    enc: Encoding
    data: bytes
    shape: tuple[FrameSide, ...] | None = Field(default=None, max_length=3)  # jpeg/png: info
    dtype: Literal["uint8"] | None = None
    label: int | None = None

    @model_validator(mode="after")
    def _raw_needs_shape(self) -> FrameMsg:
        if self.enc == "raw":
            if self.shape is None or len(self.shape) not in (2, 3):
                raise ValueError("raw frames need shape [H, W] or [H, W, C]")
            if self.dtype is None:
                raise ValueError("raw frames need dtype")
            if len(self.shape) == 3 and self.shape[2] not in (1, 3, 4):
                raise ValueError("raw frames have 1, 3 or 4 channels")
        return self


class SubmodelRef(_Message):
    id: str
    classes: tuple[ClassIndex, ...]
    sha256: str
    feature_dim: TensorDim
    # v1 addition: the ONNX file's size, so a planner can place it by memory.
    bytes: int | None = Field(default=None, ge=0)


class StemRef(_Message):
    """The shared stem of a sliced bundle (`edvit build --shared-blocks K`): the patch
    embedding and K unpruned blocks, identical in every sub-model. Each piece is its own
    ONNX file on `models/{slice id}`, so a camera can run the first J blocks and a node
    can run the rest of the stem once for all its sub-models."""

    blocks: int = Field(ge=1, le=MAX_STEM_BLOCKS)  # K
    token_shape: tuple[TensorDim, TensorDim]  # tokens, width: the same at every block boundary <= K
    slices: dict[str, str]  # slice id -> sha256 (see the *_id methods)
    tails: dict[str, str]  # sub-model id -> sha256 of its tail (tokens at block K -> features)

    EMBED_ID: ClassVar[str] = "stem.embed"

    @staticmethod
    def block_id(index: int) -> str:
        """Block `index` alone: tokens at its entry -> tokens at its exit."""
        return f"stem.block{index}"

    @staticmethod
    def from_id(entry: int) -> str:
        """Blocks entry..K-1 in one file: tokens entering at `entry` -> tokens at block K."""
        return f"stem.from{entry}"

    @staticmethod
    def tail_id(submodel_id: str) -> str:
        return f"{submodel_id}.tail"

    def head_ids(self, count: int) -> list[str]:
        """What a camera running the first `count` blocks needs: embedding, blocks 0..count-1."""
        return [self.EMBED_ID, *(self.block_id(i) for i in range(count))]

    @model_validator(mode="after")
    def _complete(self) -> StemRef:
        expected = {self.EMBED_ID}
        expected |= {self.block_id(i) for i in range(self.blocks)}
        expected |= {self.from_id(j) for j in range(self.blocks)}
        if set(self.slices) != expected:
            raise ValueError(f"stem slices must be exactly {sorted(expected)}")
        return self


class PlanMsg(_Message):
    PAYLOAD_KIND: ClassVar[PayloadKind] = "plan"
    v: Literal[1] = WIRE_VERSION
    plan_id: str
    bundle_sha256: str
    classes: tuple[str, ...]
    submodels: tuple[SubmodelRef, ...]
    assignments: dict[str, tuple[str, ...]]
    fusion_sha256: str
    # The classes and preprocessing travel with the plan, so a node needs only a broker and an id.
    preprocessing: Preprocessing
    stem: StemRef | None = None  # only for sliced bundles
    created: float = Field(default_factory=time.time)
    # v1 additions, set on plans a planner derived from a deployed one (self-healing): the
    # deployed plan's id and assignments, restored once its nodes are back.
    base_plan_id: str | None = None
    base_assignments: dict[str, tuple[str, ...]] | None = None
    # v1 additions, on signed plans (edvit/signing.py): the signing key's id (a short sha256
    # of its public key) and the Ed25519 signature over every other field, base64.
    key_id: str | None = Field(default=None, max_length=64)
    signature: str | None = Field(default=None, max_length=256)
    # v1 addition: the bundle was built with `edvit build --untrained` (random weights): its
    # answers are for measuring, not for use. Signed only when true (edvit/signing.py).
    untrained: bool = False
    # v1 addition, on signed plans: the plan's place in the order of plans (edvit/replay.py).
    # A follower with a trust key refuses a plan whose sequence is older than the newest it
    # followed, so a signed plan cannot be replayed. Signed only when set (edvit/signing.py).
    seq: int | None = Field(default=None, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> PlanMsg:
        ids = [s.id for s in self.submodels]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate sub-model ids in plan")
        for ref in self.submodels:
            if any(c >= len(self.classes) for c in ref.classes):
                raise ValueError(
                    f"sub-model {_name(ref.id)} names a class beyond the plan's classes"
                )
        if self.stem is not None and set(self.stem.tails) != set(ids):
            raise ValueError("the stem must list one tail per sub-model")
        for placement in (self.assignments, self.base_assignments or {}):
            for node, assigned in placement.items():
                unknown = set(assigned) - set(ids)
                if unknown:
                    raise ValueError(
                        f"node {_name(node)} is assigned unknown sub-models "
                        f"{_name(sorted(unknown))}"
                    )
        return self

    def submodel(self, submodel_id: str) -> SubmodelRef:
        for ref in self.submodels:
            if ref.id == submodel_id:
                return ref
        raise KeyError(submodel_id)

    def submodels_of(self, node: str) -> tuple[str, ...]:
        return self.assignments.get(node, ())

    def node_models(self, node: str, strategy: NodeStrategy) -> dict[str, str]:
        """Model id -> sha256 of every file `node` loads for its share of this plan: its whole
        sub-models, or for a sliced plan the embedding, the stem as `strategy` runs it, and
        its sub-models' tails."""
        assigned = self.submodels_of(node)
        if not assigned:
            return {}
        stem = self.stem
        if stem is None:
            return {sid: self.submodel(sid).sha256 for sid in assigned}
        per_block = StemRef.from_id if strategy == "per-entry" else StemRef.block_id
        needed = {StemRef.EMBED_ID: stem.slices[StemRef.EMBED_ID]}
        needed |= {per_block(i): stem.slices[per_block(i)] for i in range(stem.blocks)}
        needed |= {StemRef.tail_id(sid): stem.tails[sid] for sid in assigned}
        return needed

    def model_ids(self) -> dict[str, str]:
        """Model id -> sha256 of every file this plan names (what a deploy publishes)."""
        models = {s.id: s.sha256 for s in self.submodels}
        models[FUSION_MODEL_ID] = self.fusion_sha256
        if self.stem is not None:
            models |= self.stem.slices
            models |= {StemRef.tail_id(sid): sha for sid, sha in self.stem.tails.items()}
        return models


class TokensMsg(_Message):
    """A camera that ran the first `block` stem blocks itself sends the tokens at that block
    boundary instead of the frame."""

    PAYLOAD_KIND: ClassVar[PayloadKind] = "tokens"
    v: Literal[1] = WIRE_VERSION
    camera: str
    seq: int = Field(ge=0)
    ts: Timestamp
    block: int = Field(ge=0, le=MAX_STEM_BLOCKS)
    dtype: FeatureDtype
    shape: tuple[TensorDim, TensorDim]  # tokens, width
    data: bytes
    label: int | None = None
    # The plan whose stem slices computed these tokens (v1 addition; absent from older
    # cameras): a node never mixes tokens from one stem with another's blocks.
    plan_id: str | None = None

    @model_validator(mode="after")
    def _size_matches(self) -> TokensMsg:
        itemsize = 4 if self.dtype == "float32" else 2
        expected = self.shape[0] * self.shape[1] * itemsize
        if len(self.data) != expected:
            raise ValueError(f"data has {len(self.data)} bytes, shape needs {expected}")
        return self


class ModelMsg(_Message):
    PAYLOAD_KIND: ClassVar[PayloadKind] = "model"
    v: Literal[1] = WIRE_VERSION
    sha256: str
    onnx: bytes


class Capacity(_Message):
    """What a node offers a planner: memory for model files and relative speed."""

    memory_mb: float = Field(gt=0)
    speed: float = Field(default=1.0, gt=0)


class StatusMsg(_Message):
    PAYLOAD_KIND: ClassVar[PayloadKind] = "status"
    state: State
    plan_id: str | None = None  # the newest plan the service follows ("ready": it serves it)
    submodels: tuple[str, ...] = ()
    # v1 additions: the plan actually served while a newer one loads, and why the newest
    # plan was refused (the service then keeps serving the one before).
    serving_plan_id: str | None = None
    error: str | None = None
    capacity: Capacity | None = None  # v1 addition, nodes only
    ts: Timestamp = Field(default_factory=time.time)
    counters: dict[str, int] = Field(default_factory=dict)
    # v1 additions, to order one service's statuses whatever order they arrive in: the
    # connection that published it (wall clock when it began; every connection starts a new
    # one) and its number within that connection. A Will has no `seq`: it is the last word
    # of its connection (see `supersedes`).
    session: Timestamp | None = None
    seq: int | None = Field(default=None, ge=0, le=2**63 - 1)

    @property
    def final(self) -> bool:
        """The last status of its connection: the Will, or the clean stop's offline status."""
        return self.session is not None and (self.seq is None or self.state == "offline")


def supersedes(new: StatusMsg | None, old: StatusMsg | None) -> bool:
    """Whether `new` replaces `old` as what a service last said about itself: by connection
    and sequence, never by arrival order alone.

    - Within one connection, the higher sequence wins, and nothing follows its final status
      (a status that connection sent before its Will, delivered late, is stale).
    - Between connections, the newer one wins; a connection that ended (its final status)
      gives way to any other, so a board whose clock went back on reboot is still heard.
    - A clear (None), or statuses without a connection stamp, go by arrival order; the same
      status delivered again (the broker's retained copy, on a new subscription) stands.
    """
    if new is None or old is None or new.session is None or old.session is None or new == old:
        return True
    if new.session == old.session:
        if old.final:
            return False
        return new.seq is None or (old.seq is not None and new.seq > old.seq) or new.final
    return new.session > old.session or (old.final and not new.final)


class FeaturesMsg(_Message):
    PAYLOAD_KIND: ClassVar[PayloadKind] = "features"
    v: Literal[1] = WIRE_VERSION
    camera: str
    seq: int = Field(ge=0)
    ts: Timestamp
    submodel: str
    plan_id: str
    node: str
    dtype: FeatureDtype
    data: bytes
    dim: TensorDim
    infer_ms: float = Field(ge=0)  # the whole batch's inference time
    batch: int = Field(default=1, ge=1, le=MAX_BATCH)  # how many frames shared that call
    # v1 additions, for per-stage timings: when the node took the frame off the wire (its
    # clock), the decode and the wait in its queue, and when it published these features.
    received_ts: Timestamp | None = None
    decode_ms: StageMs | None = None
    queue_ms: StageMs | None = None
    sent_ts: Timestamp | None = None
    label: int | None = None  # the frame's true label, passed through when the camera knew it

    @model_validator(mode="after")
    def _size_matches(self) -> FeaturesMsg:
        itemsize = 4 if self.dtype == "float32" else 2
        if len(self.data) != self.dim * itemsize:
            raise ValueError(f"data has {len(self.data)} bytes, expected dim*{itemsize}")
        values = np.frombuffer(self.data, dtype="<f4" if self.dtype == "float32" else "<f2")
        if not np.isfinite(values).all():
            raise ValueError("features contain NaN or infinity")
        if values.size and float(np.abs(values).max()) > MAX_FEATURE_ABS:
            raise ValueError(f"features beyond ±{MAX_FEATURE_ABS:g}")
        return self


class PredictionMsg(_Message):
    PAYLOAD_KIND: ClassVar[PayloadKind] = "prediction"
    model_config = ConfigDict(
        frozen=True, extra="ignore", populate_by_name=True, allow_inf_nan=False
    )

    camera: str
    seq: int = Field(ge=0)
    ts: Timestamp
    label: int
    class_name: str = Field(alias="class")
    score: float
    topk: tuple[tuple[str, float], ...]
    latency_ms: float
    submodels: tuple[str, ...]
    missing: tuple[str, ...] = ()
    degraded: bool = False
    plan_id: str
    true_label: int | None = None
    # v1 addition: where the frame's milliseconds went, along the path of the sub-model whose
    # features came last (STAGES, in order). Stages across two machines (to_node,
    # to_aggregator) compare their clocks; `other` is what no stage accounts for.
    timings: dict[str, float] = Field(default_factory=dict, max_length=16)
    # v1 addition: the plan's bundle is untrained (random weights): the class is meaningless.
    untrained: bool = False


# PredictionMsg.timings keys, in the frame's order through the fleet.
STAGES = (
    "to_node", "decode", "queue", "infer", "to_aggregator", "wait", "fusion", "other",
)  # fmt: skip


OFFLINE_STATUS = StatusMsg(state="offline", ts=0.0)

M = TypeVar("M", bound=_Message)


class HealthMsg(_Message):
    """The planner's retained view of the fleet (`{prefix}/fleet/health`)."""

    PAYLOAD_KIND: ClassVar[PayloadKind] = "health"
    planner: str  # the instance that is planning
    plan_id: str | None
    base_plan_id: str | None
    healthy: bool  # every sub-model of the deployed plan is served where it was placed
    degraded: tuple[str, ...] = ()  # sub-models no live node serves: answers lack them
    moved: dict[str, str] = Field(default_factory=dict)  # sub-model -> node it was moved to
    nodes: dict[str, str] = Field(default_factory=dict)  # node -> live/down/suspect/holding
    # v1 addition: why the planner does not publish the placement it would (e.g. it cannot
    # sign plans in a fleet that takes signed plans only).
    error: str | None = None
    ts: Timestamp = Field(default_factory=time.time)


def plan_id_for(bundle_sha256: str, assignments: dict[str, tuple[str, ...]]) -> str:
    """A plan's id: the same bundle placed the same way always gets the same id."""
    identity = bundle_sha256 + repr(sorted((n, tuple(ids)) for n, ids in assignments.items()))
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


_JSON_MESSAGES = (PlanMsg, StatusMsg, PredictionMsg, HealthMsg)


def encode(message: _Message) -> bytes:
    """Serialize a message as the contract says: JSON for plan/status/predictions, else msgpack."""
    if isinstance(message, _JSON_MESSAGES):
        return message.model_dump_json(by_alias=True).encode()
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


def decode(kind: type[M], payload: bytes) -> M | None:
    """Parse and validate a payload; None for an empty (cleared retained) payload.

    Raises BadPayload with a one-line reason for anything else that is wrong.
    """
    if not payload:
        return None
    if kind.PAYLOAD_KIND is not None and len(payload) > max_payload_bytes(kind.PAYLOAD_KIND):
        raise BadPayload(
            f"{kind.__name__}: {len(payload)} bytes, over the limit of"
            f" {max_payload_bytes(kind.PAYLOAD_KIND)} for {kind.PAYLOAD_KIND} payloads"
        )
    raw: Any
    try:
        if issubclass(kind, _JSON_MESSAGES):
            raw = json.loads(payload)
        else:
            raw = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack and json raise many types for garbage
        fmt = "JSON" if issubclass(kind, _JSON_MESSAGES) else "msgpack"
        raise BadPayload(f"not valid {fmt}: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise BadPayload(f"expected a map, got {type(raw).__name__}")
    if issubclass(kind, _JSON_MESSAGES):
        try:  # JSON escapes can make lone surrogates, which no service could publish again
            json.dumps(raw, ensure_ascii=False).encode()
        except (UnicodeEncodeError, RecursionError) as exc:
            raise BadPayload(f"not valid JSON text: {type(exc).__name__}") from None
    if "v" in kind.model_fields and raw.get("v") != WIRE_VERSION:
        version = _one_line(repr(raw.get("v")), 40)
        raise BadPayload(f"unsupported wire version {version} (this build speaks v1)")
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        reason = f"{where}: {first['msg']}" if where else first["msg"]
        raise BadPayload(_one_line(f"{kind.__name__}: {reason}")) from None


def _name(value: object) -> str:
    """A name from a payload, quoted and cut short, for a reason."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _one_line(text: str, limit: int = 300) -> str:
    """A reason fit for one log line: the payload's own strings (keys, ids) may carry
    newlines or control characters, and may be long."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit * 2])
    return text if len(text) <= limit else text[: limit - 1] + "…"
