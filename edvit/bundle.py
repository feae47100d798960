"""The model bundle that `edvit build` writes and `edvit deploy` publishes.

A bundle is a folder::

    manifest.json        this schema
    original.onnx        the original (unsplit) ViT, for evaluation
    submodels/<id>.onnx  one feature extractor per class subset
    fusion.onnx          the MLP that turns concatenated features into class logits
    report.json          accuracies, parameter counts, bytes

A bundle built with ``edvit build --untrained`` says so (``untrained: true``): its models have
random weights, for capacity planning (sizes, latencies) only.

ONNX signatures (fixed by the contract, batch dimension dynamic):
- original:  image [B, C, H, W] float32 -> logits [B, num_classes]
- sub-model: image [B, C, H, W] float32 -> features [B, feature_dim]
- stem slices (bundles built with --shared-blocks K): embed: image -> tokens [B, T, D];
  block i and "from j" (blocks j..K-1): tokens -> tokens; a sub-model's tail: tokens at
  block K -> features. Chained, they equal the whole sub-model.
- fusion:    features [B, sum(feature_dims)] float32, present [B, num_submodels] float32
             -> logits [B, num_classes]; ``present`` is 1 for a sub-model whose features
             arrived and 0 for one that did not (its block of ``features`` is then zeros).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edvit.errors import ConfigError, IntegrityError
from edvit.schemas import Preprocessing

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
# Written by `edvit build --devices` and `edvit plan`; not part of the verified files because
# re-planning a bundle for another fleet must not change the models' identity.
ASSIGNMENT_NAME = "assignment.json"

IMAGE_INPUT = "image"
FEATURES_OUTPUT = "features"
LOGITS_OUTPUT = "logits"
FUSION_FEATURES_INPUT = "features"
FUSION_PRESENT_INPUT = "present"
TOKENS_INPUT = "tokens"  # input of block slices and tails
TOKENS_OUTPUT = "tokens_out"  # output of the embed and block slices (ONNX names are unique)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SubmodelSpec(_Frozen):
    id: str
    classes: tuple[int, ...]
    file: str
    feature_dim: int = Field(gt=0)
    params: int = Field(ge=0)
    # What pruning left: embed_dim and per block heads / MLP width (models.prune.describe).
    architecture: dict[str, Any] | None = None


class FusionSpec(_Frozen):
    file: str = "fusion.onnx"
    feature_dims: tuple[int, ...]
    hidden_dim: int = Field(gt=0)
    params: int = Field(ge=0)


class OriginalSpec(_Frozen):
    file: str = "original.onnx"
    architecture: str
    params: int = Field(ge=0)
    # Where the original came from: "trained" by edvit build, the --checkpoint path given, or
    # "untrained" (random weights, `edvit build --untrained`).
    source: str = "trained"


class StemSpec(_Frozen):
    """Slices of a bundle built with --shared-blocks K (files relative to the bundle)."""

    blocks: int = Field(ge=1)
    token_shape: tuple[int, int]
    embed: str  # image -> tokens at block 0
    block_files: tuple[str, ...]  # block i alone, i < K
    from_files: tuple[str, ...]  # blocks j..K-1 together, j < K
    tails: dict[str, str]  # sub-model id -> tail file (tokens at block K -> features)

    @model_validator(mode="after")
    def _counts(self) -> StemSpec:
        if len(self.block_files) != self.blocks or len(self.from_files) != self.blocks:
            raise ValueError("stem needs one block file and one from-file per shared block")
        return self

    def all_files(self) -> list[str]:
        return [self.embed, *self.block_files, *self.from_files, *self.tails.values()]


class Manifest(_Frozen):
    format: Literal["edvit-bundle/1"] = "edvit-bundle/1"
    name: str
    dataset: str
    class_names: tuple[str, ...]
    class_subsets: tuple[tuple[int, ...], ...]
    preprocessing: Preprocessing
    input_shape: tuple[int, int, int]  # C, H, W
    original: OriginalSpec
    submodels: tuple[SubmodelSpec, ...]
    fusion: FusionSpec
    stem: StemSpec | None = None
    files: dict[str, str]  # relative path -> sha256, every file but manifest.json
    command: tuple[str, ...]
    seed: int
    created: str
    edvit_version: str
    # Built with `edvit build --untrained`: random weights, for sizes and latencies only; its
    # predictions mean nothing. Manifests written before the field read as trained.
    untrained: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        num_classes = len(self.class_names)
        covered = sorted(c for subset in self.class_subsets for c in subset)
        if covered != list(range(num_classes)):
            raise ValueError("class_subsets must cover every class exactly once")
        if [tuple(s.classes) for s in self.submodels] != [tuple(c) for c in self.class_subsets]:
            raise ValueError("one sub-model per class subset, in the same order")
        if tuple(s.feature_dim for s in self.submodels) != self.fusion.feature_dims:
            raise ValueError("fusion.feature_dims must list the sub-models' feature dims in order")
        named = {self.original.file, self.fusion.file, *(s.file for s in self.submodels)}
        if self.stem is not None:
            named |= set(self.stem.all_files())
            if set(self.stem.tails) != {s.id for s in self.submodels}:
                raise ValueError("stem.tails needs one tail per sub-model")
        missing = named - set(self.files)
        if missing:
            raise ValueError(f"files lacks sha256 for {sorted(missing)}")
        c, h, w = self.input_shape
        pp = self.preprocessing
        if (c, h, w) != (pp.channels, pp.height, pp.width):
            raise ValueError("input_shape does not match preprocessing")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Bundle:
    """A bundle folder whose manifest has been validated and whose files match their sha256."""

    def __init__(self, root: Path, manifest: Manifest, manifest_sha256: str) -> None:
        self.root = root
        self.manifest = manifest
        self.sha256 = manifest_sha256

    @classmethod
    def load(cls, root: str | Path, *, verify: bool = True) -> Bundle:
        root = Path(root)
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ConfigError(f"{root} is not a bundle: {MANIFEST_NAME} not found")
        raw = manifest_path.read_bytes()
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise ConfigError(f"{manifest_path}: {where}: {first['msg']}") from None
        bundle = cls(root, manifest, sha256_bytes(raw))
        if verify:
            bundle.verify()
        return bundle

    def path(self, relative: str) -> Path:
        return self.root / relative

    def verify(self) -> None:
        for relative, expected in self.manifest.files.items():
            path = self.path(relative)
            if not path.is_file():
                raise IntegrityError(f"bundle file {relative} is missing from {self.root}")
            actual = sha256_file(path)
            if actual != expected:
                raise IntegrityError(
                    f"bundle file {relative} has sha256 {actual[:12]}…, "
                    f"manifest says {expected[:12]}…"
                )

    def file_sha256(self, relative: str) -> str:
        return self.manifest.files[relative]
