"""The networks: a timm VisionTransformer sized for small grey images (or a user's own
registered timm ViT, built for its checkpoint), the sub-model wrapper that turns it into a
feature extractor, and the fusion MLP."""

from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edvit.errors import ConfigError


@dataclass(frozen=True)
class VitSize:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float


# "test": CI on the 8x8 digits. "small": Fashion-MNIST 28x28 (~0.2M parameters).
# "medium": ViT-Ti's width (192, 3 heads, MLP x4) at half its depth (~2.7M parameters): a
# block costs ~0.4 ms on one core, more than handling a message, as in the models slicing is
# meant for; the slicing benchmark uses it.
SIZES: dict[str, VitSize] = {
    "test": VitSize(patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "small": VitSize(patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0),
    "medium": VitSize(patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
}


def make_vit(size: str, img_size: int, in_chans: int, num_classes: int) -> VisionTransformer:
    """A timm ViT with a class token, for square images of ``img_size`` pixels."""
    spec = SIZES[size]
    if img_size % spec.patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of patch {spec.patch_size}")
    return VisionTransformer(
        img_size=img_size,
        patch_size=spec.patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        global_pool="token",
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        drop_rate=0.0,
        drop_path_rate=0.0,
    )


def check_patch_size(size: str, height: int, width: int) -> None:
    """A ConfigError unless the preset's patch size tiles a ``height`` x ``width`` image."""
    patch = SIZES[size].patch_size
    if height != width:
        raise ConfigError(f"only square images are supported, got {height}x{width}")
    if height % patch:
        raise ConfigError(
            f"image size {height}x{width} is not a multiple of ViT size {size!r}'s patch "
            f"size {patch}: resize the images or choose another --size"
        )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict saved with torch.save, bare or under a "state_dict" / "model" key (as timm's
    train.py saves it, with its argparse arguments), without DDP's "module." prefix."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} not found") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"checkpoint {path} is not a torch state_dict: {first}") from None
    if isinstance(raw, dict):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConfigError(f"checkpoint {path} holds no state_dict of tensors")
    if raw and all(isinstance(k, str) and k.startswith("module.") for k in raw):
        raw = {k.removeprefix("module."): v for k, v in raw.items()}
    return raw


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model`` strictly; a one-line ConfigError starting with ``where``
    and naming the first mis-shaped, missing or unexpected tensor otherwise. Shapes come
    first: another width says more than the blocks that another depth leaves missing."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"{where}: {key} is {list(state[key].shape)} in the checkpoint but "
                f"{list(tensor.shape)} in the model"
            )
    missing = [k for k in expected if k not in state]
    if missing:
        raise ConfigError(f"{where}: {len(missing)} tensors missing, first {missing[0]}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ConfigError(f"{where}: unexpected tensor {unexpected[0]}")
    model.load_state_dict(state)


def load_checkpoint(
    path: str | Path, size: str, img_size: int, in_chans: int, num_classes: int
) -> VisionTransformer:
    """The ViT of preset ``size`` with the weights of checkpoint ``path``; a one-line
    ConfigError naming the first missing, unexpected or mis-shaped tensor otherwise."""
    state = read_state_dict(path)
    vit = make_vit(size, img_size, in_chans, num_classes)
    where = (
        f"checkpoint {path} does not match ViT size {size!r} for {img_size}x{img_size}x{in_chans}"
    )
    load_matching(vit, state, where)
    return vit.eval()


def architecture_name(size: str, img_size: int, in_chans: int) -> str:
    fields = ",".join(f"{k}={v}" for k, v in asdict(SIZES[size]).items())
    return f"timm.VisionTransformer(size={size},img_size={img_size},in_chans={in_chans},{fields})"


# ---------------------------------------------------------------------------------------------
# A user's own timm ViT (--model NAME --checkpoint FILE)

# What a fine-tuned checkpoint may change from its timm name's architecture (read from its
# tensors); depth, width and heads are the name's.
INFERRED = ("img_size", "patch_size", "in_chans", "num_classes")
CLOSE_NAMES = 5


@dataclass(frozen=True)
class TimmModel:
    """A registered timm ViT built for a checkpoint: the name, the keyword arguments inferred
    from the checkpoint's tensors, and the model with the checkpoint's weights."""

    name: str
    kwargs: dict[str, object]
    vit: VisionTransformer

    @property
    def architecture(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"timm.create_model({self.name!r}{args})"

    @property
    def img_size(self) -> int:
        return int(self.kwargs["img_size"])  # type: ignore[call-overload]

    @property
    def in_chans(self) -> int:
        return int(self.kwargs["in_chans"])  # type: ignore[call-overload]

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The normalisation the name's pretrained config uses (timm's default_cfg), one value
        per input channel (a grey model: the mean over RGB)."""
        cfg = self.vit.pretrained_cfg
        mean = tuple(float(m) for m in cfg.get("mean") or IMAGENET_DEFAULT_MEAN)
        std = tuple(float(s) for s in cfg.get("std") or IMAGENET_DEFAULT_STD)
        if self.in_chans == 1 and len(mean) != 1:
            return (sum(mean) / len(mean),), (sum(std) / len(std),)
        return mean, std


def check_timm_name(name: str) -> None:
    """A ConfigError naming a few registered ViTs close to ``name`` unless timm knows it."""
    if timm.is_model(name):
        return
    known = timm.list_models(["*vit*", "*deit*"])
    close = difflib.get_close_matches(name, known, n=CLOSE_NAMES, cutoff=0.5) or known[:CLOSE_NAMES]
    raise ConfigError(
        f"--model {name!r} is not a timm model; close names: {', '.join(close)} "
        "(timm.list_models('*vit*') lists them all)"
    )


def infer_timm_kwargs(
    state: dict[str, torch.Tensor], probe: VisionTransformer, where: str
) -> dict[str, object]:
    """img_size, patch_size, in_chans and num_classes from the checkpoint's patch embedding,
    position embedding and head. ``probe``: the name's model with its defaults."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 4:
        raise ConfigError(f"{where}: no patch_embed.proj.weight [embed, channels, patch, patch]")
    _, in_chans, patch_h, patch_w = proj.shape
    if patch_h != patch_w:
        raise ConfigError(f"{where}: only square patches are supported, got {patch_h}x{patch_w}")
    if in_chans not in (1, 3):
        raise ConfigError(f"{where}: {in_chans} input channels; edvit supports 1 (grey) or 3")
    head = state.get("head.weight")
    if head is None or head.dim() != 2:
        raise ConfigError(
            f"{where}: no head.weight [classes, embed]: the checkpoint needs the classifier "
            "it was fine-tuned with"
        )
    img_size = int(probe.patch_embed.img_size[0])
    pos_embed = state.get("pos_embed")
    if pos_embed is not None and pos_embed.dim() == 3:
        prefix = 0 if probe.no_embed_class else int(probe.num_prefix_tokens)
        grid = int(pos_embed.shape[1]) - prefix
        side = math.isqrt(max(grid, 0))
        if grid < 1 or side * side != grid:
            raise ConfigError(
                f"{where}: pos_embed has {pos_embed.shape[1]} tokens, not {prefix} prefix "
                "tokens and a square grid of patches"
            )
        img_size = side * int(patch_h)
    return {
        "img_size": img_size,
        "patch_size": int(patch_h),
        "in_chans": int(in_chans),
        "num_classes": int(head.shape[0]),
    }


def timm_probe(name: str, **kwargs: object) -> VisionTransformer:
    """timm's ``name`` on the meta device (only its structure: no memory, no initialisation
    cost); a one-line ConfigError unless it is a registered plain timm VisionTransformer."""
    check_timm_name(name)
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"--model {name!r} with {kwargs}: {exc}".splitlines()[0]) from None
    if type(probe) is not VisionTransformer:
        raise ConfigError(
            f"--model {name!r} is a timm {type(probe).__name__}; edvit prunes plain "
            "timm VisionTransformer models (ViT, DeiT)"
        )
    return probe


def untrained_timm_model(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    overrides: dict[str, object] | None = None,
) -> TimmModel:
    """timm's ``name`` with random weights (never downloaded), ``num_classes`` outputs and a
    fixed input of ``img_size`` pixels a side (default: the name's). ``overrides`` are further
    timm keyword arguments (e.g. ``depth``), for small test models. The caller seeds torch."""
    extra = dict(overrides or {})
    probe = timm_probe(name, **extra)
    patch = int(probe.patch_embed.patch_size[0])
    side = int(probe.patch_embed.img_size[0]) if img_size is None else img_size
    if side < patch or side % patch:
        raise ConfigError(
            f"--img-size {side} is not a multiple of {name}'s patch size {patch}: choose "
            f"{max(patch, side - side % patch)} or {side + patch - side % patch}"
        )
    kwargs = {
        **extra,
        "img_size": side,
        "in_chans": int(probe.patch_embed.proj.in_channels),
        "num_classes": num_classes,
        "dynamic_img_size": False,
    }
    vit = timm.create_model(name, pretrained=False, **kwargs)
    return TimmModel(name=name, kwargs=kwargs, vit=vit.eval())


def load_timm_checkpoint(path: str | Path, name: str) -> TimmModel:
    """timm's ``name`` (never downloaded: pretrained=False) with what checkpoint ``path``
    changed (``INFERRED``) and its weights, loaded strictly. A one-line ConfigError for an
    unknown name, a model that is not a plain timm VisionTransformer, or a checkpoint that
    does not match it (naming the first missing, unexpected or mis-shaped tensor)."""
    probe = timm_probe(name)
    state = read_state_dict(path)
    where = f"checkpoint {path} does not match timm model {name!r}"
    # Fixed input size: the bundle's preprocessing resizes every frame to it.
    kwargs = {**infer_timm_kwargs(state, probe, where), "dynamic_img_size": False}
    vit = timm.create_model(name, pretrained=False, **kwargs)
    where = f"{where} with {', '.join(f'{k}={kwargs[k]}' for k in INFERRED)}"
    load_matching(vit, state, where)
    return TimmModel(name=name, kwargs=kwargs, vit=vit.eval())


def replace_head(vit: VisionTransformer, num_classes: int) -> None:
    """Give ``vit`` a fresh linear head with ``num_classes`` outputs."""
    vit.reset_classifier(num_classes)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SubModel(nn.Module):
    """A ViT used as a feature extractor: image -> pre-logits features [B, embed_dim].

    Training goes through ``logits`` (features then the ViT's own head); export uses forward.
    """

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    @property
    def feature_dim(self) -> int:
        return int(self.vit.num_features)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(image), pre_logits=True)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.vit.head(self.forward(image))


MAX_FUSION_HIDDEN = 256


def fusion_hidden_for(feature_dims: tuple[int, ...], num_classes: int, max_params: int) -> int:
    """The widest hidden layer (at most ``MAX_FUSION_HIDDEN``, at least ``num_classes``) that
    keeps a ``FusionMLP`` over ``feature_dims`` within ``max_params`` parameters. The fusion
    runs on a board too: it should not outweigh the sub-models it fuses."""
    inputs = sum(feature_dims) + len(feature_dims)
    # params(h) = (inputs + 1) * h + (h + 1) * num_classes
    widest = (max_params - num_classes) // (inputs + 1 + num_classes)
    return int(max(num_classes, min(MAX_FUSION_HIDDEN, widest)))


class FusionMLP(nn.Module):
    """Concatenated sub-model features + presence flags -> class logits.

    Each sub-model's block of features is multiplied by its presence flag (so a missing
    block is exactly zero whatever the caller put there) and the flags are appended to the
    input, so the MLP knows which blocks it got. With ``drop_prob`` > 0, training randomly
    marks blocks missing (never all of them) to make the fusion robust to lost devices.
    """

    def __init__(
        self,
        feature_dims: tuple[int, ...],
        num_classes: int,
        hidden_dim: int = MAX_FUSION_HIDDEN,
        dropout: float = 0.1,
        drop_prob: float = 0.0,
    ) -> None:
        super().__init__()
        self.feature_dims = tuple(int(d) for d in feature_dims)
        self.hidden_dim = hidden_dim
        self.drop_prob = drop_prob
        index = torch.repeat_interleave(
            torch.arange(len(self.feature_dims)), torch.tensor(self.feature_dims)
        )
        self.register_buffer("block_index", index, persistent=False)
        total = sum(self.feature_dims) + len(self.feature_dims)
        self.net = nn.Sequential(
            nn.Linear(total, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_prob > 0:
            keep = (torch.rand_like(present) >= self.drop_prob).to(present.dtype)
            none_left = keep.sum(dim=1, keepdim=True) == 0
            keep = torch.where(none_left, torch.ones_like(keep), keep)
            present = present * keep
        mask = present[:, self.block_index]
        return self.net(torch.cat([features * mask, present], dim=1))
