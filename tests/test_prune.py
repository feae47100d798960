"""Structured pruning: Taylor scores find dead units, surgery keeps outputs and counts exact,
heavy pruning (empty branches, narrow embedding) still runs in torch and ONNX Runtime."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")

from torch import Tensor  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from edvit.models.export import export_image_model  # noqa: E402
from edvit.models.prune import (  # noqa: E402
    PruneSpec,
    SkipBlock,
    ZeroBranch,
    count_params_after,
    describe,
    full_spec,
    iterative_prune,
    prune_vit,
    score_units,
    select_units,
)
from edvit.models.vit import SubModel, count_params, make_vit  # noqa: E402

CLASSES = 10


def cross_entropy(logits: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(logits, batch[1])


def make_batches(img_size: int, count: int = 2, size: int = 16) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 1, img_size, img_size, generator=generator),
            torch.randint(0, CLASSES, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def seeded_vit(size: str, img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_vit(size, img_size, 1, CLASSES).eval()


def features(vit: torch.nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return SubModel(vit).eval()(images)


def heavy_spec(vit: torch.nn.Module) -> PruneSpec:
    """Small ViT (6 blocks, 4 heads, MLP 128, width 64): uneven widths, empty branches."""
    generator = torch.Generator().manual_seed(2)

    def pick(n: int, k: int) -> list[int]:
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())

    return PruneSpec(
        heads=[[0, 2], [], [1], [], [0, 1, 2, 3], []],
        mlp=[pick(128, 5), pick(128, 40), [], [], pick(128, 1), pick(128, 17)],
        embed=pick(64, 24),
    )


def test_dead_mlp_neuron_scores_lowest_and_its_removal_keeps_outputs() -> None:
    vit = seeded_vit("test", 8)
    with torch.no_grad():
        vit.blocks[1].mlp.fc2.weight[:, 7] *= 1e-6
    importance = score_units(vit, make_batches(8), cross_entropy, embed=False)
    scores = torch.cat(importance.mlp)
    assert int(torch.argmin(scores)) == 64 + 7
    assert importance.embed is None and importance.num_batches == 2

    neuron_cost = count_params(vit) - count_params_after(vit, _without(vit, mlp=(1, 7)))
    budget = count_params(vit) - neuron_cost
    spec = select_units(importance, vit, param_budget=budget)
    assert spec.mlp[1] == [i for i in range(64) if i != 7]
    assert spec.mlp[0] == list(range(64)) and spec.heads == full_spec(vit).heads
    pruned = prune_vit(vit, spec)
    assert count_params(pruned) == budget
    images = make_batches(8)[0][0]
    diff = (features(pruned, images) - features(vit, images)).abs().max()
    assert diff < 1e-5


def test_dead_head_scores_lowest_and_its_removal_keeps_outputs() -> None:
    vit = seeded_vit("test", 8)
    attn = vit.blocks[0].attn
    with torch.no_grad():
        attn.proj.weight[:, 16:32] = 0.0  # head 1 of 2 writes nothing
    importance = score_units(vit, make_batches(8), cross_entropy, embed=False)
    assert importance.heads[0][1] == 0.0
    assert float(importance.heads[0][1]) < float(torch.cat(importance.heads).max())

    budget = count_params_after(vit, _without(vit, head=(0, 1)))
    spec = select_units(importance, vit, param_budget=budget)
    assert spec.heads == [[0], [0, 1]]
    pruned = prune_vit(vit, spec)
    assert pruned.blocks[0].attn.num_heads == 1 and pruned.blocks[0].attn.attn_dim == 16
    images = make_batches(8)[0][0]
    diff = (features(pruned, images) - features(vit, images)).abs().max()
    assert diff < 1e-5


def _without(
    vit: torch.nn.Module, *, mlp: tuple[int, int] | None = None, head: tuple[int, int] | None = None
) -> PruneSpec:
    spec = full_spec(vit)
    if mlp is not None:
        spec.mlp[mlp[0]].remove(mlp[1])
    if head is not None:
        spec.heads[head[0]].remove(head[1])
    return spec


def test_heavy_pruning_shapes_counts_and_structure() -> None:
    vit = seeded_vit("small", 28)
    spec = heavy_spec(vit)
    pruned = prune_vit(vit, spec)
    assert type(pruned) is type(vit)
    assert describe(pruned)["blocks"] == [
        {"heads": 2, "mlp": 5},
        {"heads": 0, "mlp": 40},
        {"heads": 1, "mlp": 0},
        {"heads": 0, "mlp": 0},
        {"heads": 4, "mlp": 1},
        {"heads": 0, "mlp": 17},
    ]
    assert describe(pruned)["embed_dim"] == 24 == pruned.num_features == pruned.head_hidden_size
    assert isinstance(pruned.blocks[1].attn, ZeroBranch) and isinstance(
        pruned.blocks[2].mlp, ZeroBranch
    )
    assert isinstance(pruned.blocks[3], SkipBlock)
    assert count_params_after(vit, spec) == count_params(pruned) == describe(pruned)["params"]
    for batch in (1, 5):
        images = torch.randn(batch, 1, 28, 28)
        assert features(pruned, images).shape == (batch, 24)
        assert pruned(images).shape == (batch, CLASSES)
    # A pruned model can be scored and pruned again.
    importance = score_units(pruned, make_batches(28, count=1), cross_entropy)
    assert [len(h) for h in importance.heads] == [2, 0, 1, 0, 4, 0]
    again = prune_vit(pruned, select_units(importance, pruned, keep_ratio=0.5))
    assert count_params(again) <= count_params(pruned) // 2


def test_select_units_meets_the_budget_without_overshooting() -> None:
    vit = seeded_vit("small", 28)
    importance = score_units(vit, make_batches(28, count=1), cross_entropy)
    total = count_params(vit)
    for ratio, embed_ratio in ((0.5, 1.0), (0.1, 0.5)):
        budget = int(total * ratio)
        spec = select_units(importance, vit, param_budget=budget, embed_keep_ratio=embed_ratio)
        after = count_params_after(vit, spec)
        assert after <= budget
        # One head with its norm and bias is the most a single removal frees.
        width = len(spec.embed)
        assert after > budget - (3 * 16 * (width + 1) + 16 * width + 3 * width)
        assert len(spec.embed) == round(64 * embed_ratio)
        assert sum(map(len, spec.heads)) >= 1  # min_heads keeps attention somewhere
    assert count_params_after(vit, select_units(importance, vit, keep_ratio=0.3)) <= 0.3 * total
    with pytest.raises(ValueError):
        select_units(importance, vit, keep_ratio=0.5, param_budget=1000)
    with pytest.raises(ValueError):
        select_units(importance, vit, param_budget=1000)  # unreachable at full width


def test_scoring_and_pruning_leave_the_original_unchanged() -> None:
    vit = seeded_vit("small", 28).train()
    vit.patch_embed.proj.weight.requires_grad_(False)
    before = copy.deepcopy(vit.state_dict())
    importance = score_units(vit, make_batches(28, count=1), cross_entropy)
    prune_vit(vit, select_units(importance, vit, keep_ratio=0.2, embed_keep_ratio=0.5))
    after = vit.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert vit.training and not vit.patch_embed.proj.weight.requires_grad
    assert all(p.grad is None for p in vit.parameters())
    assert describe(vit)["blocks"] == [{"heads": 4, "mlp": 128}] * 6


def test_invalid_spec_is_refused() -> None:
    vit = seeded_vit("test", 8)
    spec = full_spec(vit)
    spec.mlp[0] = [0, 64]
    with pytest.raises(ValueError):
        prune_vit(vit, spec)


def test_iterative_prune_reaches_the_budget_with_recovery_between_steps() -> None:
    vit = seeded_vit("test", 8)
    seen: list[int] = []

    def recover(model: torch.nn.Module) -> torch.nn.Module:
        seen.append(count_params(model))
        return model

    budget = count_params(vit) // 4
    pruned = iterative_prune(
        vit,
        lambda: make_batches(8, count=1),
        cross_entropy,
        param_budget=budget,
        steps=2,
        embed_keep_ratio=0.5,
        recover=recover,
    )
    assert len(seen) == 2 and seen[0] > seen[1] == count_params(pruned)
    assert count_params(pruned) <= budget and pruned.embed_dim == 16


@pytest.mark.slow
def test_onnx_parity_and_fewer_nodes_after_pruning(tmp_path: Path) -> None:
    vit = seeded_vit("small", 28)
    pruned = prune_vit(vit, heavy_spec(vit))
    images = np.random.default_rng(3).standard_normal((5, 1, 28, 28)).astype(np.float32)
    _, diff = export_image_model(SubModel(pruned), tmp_path / "pruned.onnx", images, features=True)
    assert diff < 1e-4
    _, diff = export_image_model(SubModel(vit), tmp_path / "full.onnx", images, features=True)
    assert diff < 1e-4
    nodes = {
        name: len(onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
        for name in ("full", "pruned")
    }
    assert nodes["pruned"] < nodes["full"]


def test_frozen_blocks_are_kept_whole() -> None:
    vit = seeded_vit("small", 28)
    importance = score_units(vit, make_batches(28), cross_entropy, embed=False)
    spec = select_units(importance, vit, param_budget=count_params(vit) // 2, frozen_blocks=2)
    full = full_spec(vit)
    assert spec.heads[:2] == full.heads[:2] and spec.mlp[:2] == full.mlp[:2]
    assert count_params_after(vit, spec) <= count_params(vit) // 2
    with pytest.raises(ValueError, match="embedding width is shared"):
        select_units(importance, vit, param_budget=1000, frozen_blocks=1, embed_keep_ratio=0.5)
