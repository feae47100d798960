"""Payload schemas of the wire contract (v1) and their codecs.

Binary payloads (frames, features, model files) are msgpack; the ones people and
dashboards read (plan, status, predictions) are JSON. Every msgpack payload carries
``"v": 1``. An empty payload on a retained topic means "cleared" and decodes to None.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edvit import WIRE_VERSION
from edvit.errors import BadPayload
from edvit.topics import FUSION_MODEL_ID

Encoding = Literal["jpeg", "png", "raw"]
FeatureDtype = Literal["float32", "float16"]
State = Literal["online", "ready", "offline"]
# How a node runs a sliced bundle's stem (edge_node/runners.py); it decides which stem files
# the node fetches.
NodeStrategy = Literal["per-entry", "merged"]
NODE_STRATEGIES: tuple[NodeStrategy, ...] = ("per-entry", "merged")


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Preprocessing(_Message):
    """How a node turns any frame into the model's input tensor [1, C, H, W]."""

    channels: Literal[1, 3]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
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
    v: Literal[1] = WIRE_VERSION
    camera: str
    seq: int = Field(ge=0)
    ts: float
    enc: Encoding
    data: bytes
    shape: tuple[int, ...] | None = None
    dtype: Literal["uint8"] | None = None
    label: int | None = None

    @model_validator(mode="after")
    def _raw_needs_shape(self) -> FrameMsg:
        if self.enc == "raw":
            if self.shape is None or len(self.shape) not in (2, 3):
                raise ValueError("raw frames need shape [H, W] or [H, W, C]")
            if self.dtype is None:
                raise ValueError("raw frames need dtype")
        return self


class SubmodelRef(_Message):
    id: str
    classes: tuple[int, ...]
    sha256: str
    feature_dim: int = Field(gt=0)


class StemRef(_Message):
    """The shared stem of a sliced bundle (`edvit build --shared-blocks K`): the patch
    embedding and K unpruned blocks, identical in every sub-model. Each piece is its own
    ONNX file on `models/{slice id}`, so a camera can run the first J blocks and a node
    can run the rest of the stem once for all its sub-models."""

    blocks: int = Field(ge=1)  # K
    token_shape: tuple[int, int]  # tokens, width: the same at every block boundary <= K
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
    v: Literal[1] = WIRE_VERSION
    plan_id: str
    bundle_sha256: str
    classes: tuple[str, ...]
    submodels: tuple[SubmodelRef, ...]
    assignments: dict[str, tuple[str, ...]]
    fusion_sha256: str
    # Not in the minimal list but needed so nodes need only a broker and an id.
    preprocessing: Preprocessing
    stem: StemRef | None = None  # only for sliced bundles
    created: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _consistent(self) -> PlanMsg:
        ids = [s.id for s in self.submodels]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate sub-model ids in plan")
        if self.stem is not None and set(self.stem.tails) != set(ids):
            raise ValueError("the stem must list one tail per sub-model")
        for node, assigned in self.assignments.items():
            unknown = set(assigned) - set(ids)
            if unknown:
                raise ValueError(f"node {node} is assigned unknown sub-models {sorted(unknown)}")
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

    v: Literal[1] = WIRE_VERSION
    camera: str
    seq: int = Field(ge=0)
    ts: float
    block: int = Field(ge=0)
    dtype: FeatureDtype
    shape: tuple[int, int]  # tokens, width
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
    v: Literal[1] = WIRE_VERSION
    sha256: str
    onnx: bytes


class StatusMsg(_Message):
    state: State
    plan_id: str | None = None  # the newest plan the service follows ("ready": it serves it)
    submodels: tuple[str, ...] = ()
    # v1 additions: the plan actually served while a newer one loads, and why the newest
    # plan was refused (the service then keeps serving the one before).
    serving_plan_id: str | None = None
    error: str | None = None
    ts: float = Field(default_factory=time.time)
    counters: dict[str, int] = Field(default_factory=dict)


class FeaturesMsg(_Message):
    v: Literal[1] = WIRE_VERSION
    camera: str
    seq: int = Field(ge=0)
    ts: float
    submodel: str
    plan_id: str
    node: str
    dtype: FeatureDtype
    data: bytes
    dim: int = Field(gt=0)
    infer_ms: float  # the whole batch's inference time
    batch: int = Field(default=1, ge=1)  # how many frames shared that inference call
    label: int | None = None  # the frame's true label, passed through when the camera knew it

    @model_validator(mode="after")
    def _size_matches(self) -> FeaturesMsg:
        itemsize = 4 if self.dtype == "float32" else 2
        if len(self.data) != self.dim * itemsize:
            raise ValueError(f"data has {len(self.data)} bytes, expected dim*{itemsize}")
        return self


class PredictionMsg(_Message):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    camera: str
    seq: int
    ts: float
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


OFFLINE_STATUS = StatusMsg(state="offline", ts=0.0)

M = TypeVar("M", bound=_Message)

_JSON_MESSAGES = (PlanMsg, StatusMsg, PredictionMsg)


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
    if "v" in kind.model_fields and raw.get("v") != WIRE_VERSION:
        raise BadPayload(f"unsupported wire version {raw.get('v')!r} (this build speaks v1)")
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or kind.__name__
        raise BadPayload(f"{kind.__name__}: {where}: {first['msg']}") from None
