"""Cutting a ViT at block boundaries: the shared stem's slices and each sub-model's tail.

For `edvit build --shared-blocks K`, every sub-model keeps the patch embedding and the
first K blocks of the original, unpruned and frozen, so those can run once per frame for
all sub-models of a node, or partly on the camera. The pieces exported here chain back to
the whole sub-model: embed -> block 0 .. block K-1 (or "from j") -> tail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edvit.bundle import FEATURES_OUTPUT, IMAGE_INPUT, TOKENS_INPUT, TOKENS_OUTPUT, StemSpec
from edvit.models.export import export_onnx, parity


class Embed(nn.Module):
    """image [B, C, H, W] -> tokens [B, T, D] at the entry of block 0."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image))))


class BlockRange(nn.Module):
    """tokens at the entry of block `start` -> tokens at the entry of block `stop`."""

    def __init__(self, vit: VisionTransformer, start: int, stop: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*vit.blocks[start:stop])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.blocks(tokens)


class Tail(nn.Module):
    """tokens at the entry of block `start` -> the sub-model's feature vector."""

    def __init__(self, vit: VisionTransformer, start: int) -> None:
        super().__init__()
        self.vit = vit
        self.blocks = nn.Sequential(*vit.blocks[start:])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.vit.norm(self.blocks(tokens))
        return self.vit.forward_head(x, pre_logits=True)


def check_shared_blocks(vit: VisionTransformer, shared_blocks: int) -> None:
    if not 1 <= shared_blocks <= len(vit.blocks):
        raise ValueError(f"--shared-blocks must be between 1 and the depth {len(vit.blocks)}")


def export_stem(
    stem_vit: VisionTransformer,
    tails: dict[str, VisionTransformer],
    shared_blocks: int,
    out: Path,
    images: np.ndarray,
) -> tuple[StemSpec, dict[str, float]]:
    """Export embed, every block < K, every "from j" range and each sub-model's tail.

    `stem_vit` provides the stem (every sub-model shares it); `images` are real model
    inputs for the parity checks. Returns the manifest's StemSpec and the max abs
    difference between ONNX Runtime and torch per file.
    """
    check_shared_blocks(stem_vit, shared_blocks)
    images = np.ascontiguousarray(images[:8], dtype=np.float32)
    diffs: dict[str, float] = {}

    def export(module: nn.Module, relative: str, inputs: np.ndarray, name_in: str,
               name_out: str) -> str:  # fmt: skip
        example = (torch.from_numpy(inputs[:2]),)
        export_onnx(module.eval(), example, out / relative, [name_in], name_out)
        diffs[relative] = parity(module, out / relative, [inputs], [name_in])
        return relative

    embed = Embed(stem_vit).eval()
    with torch.no_grad():
        tokens = [embed(torch.from_numpy(images)).numpy()]
        for block in stem_vit.blocks[:shared_blocks]:
            tokens.append(block.eval()(torch.from_numpy(tokens[-1])).numpy())

    embed_file = export(embed, "stem/embed.onnx", images, IMAGE_INPUT, TOKENS_OUTPUT)
    block_files = tuple(
        export(
            BlockRange(stem_vit, i, i + 1),
            f"stem/block{i}.onnx",
            tokens[i],
            TOKENS_INPUT,
            TOKENS_OUTPUT,
        )
        for i in range(shared_blocks)
    )
    from_files = tuple(
        export(
            BlockRange(stem_vit, j, shared_blocks),
            f"stem/from{j}.onnx",
            tokens[j],
            TOKENS_INPUT,
            TOKENS_OUTPUT,
        )  # fmt: skip
        for j in range(shared_blocks)
    )
    tail_files = {
        sid: export(
            Tail(vit, shared_blocks),
            f"tails/{sid}.onnx",
            tokens[shared_blocks],
            TOKENS_INPUT,
            FEATURES_OUTPUT,
        )  # fmt: skip
        for sid, vit in tails.items()
    }
    _, num_tokens, width = tokens[0].shape
    spec = StemSpec(
        blocks=shared_blocks,
        token_shape=(num_tokens, width),
        embed=embed_file,
        block_files=block_files,
        from_files=from_files,
        tails=tail_files,
    )
    return spec, diffs
