"""Structured pruning of a timm VisionTransformer: attention heads, MLP hidden neurons and the
embedding width (the residual stream), ranked by first-order Taylor importance.

Criterion. A unit's importance is the first-order estimate of the loss change when the unit is
removed, |dL/dg * g| for a multiplicative gate g = 1 on its output. For a head or an MLP neuron
that gate sits right before ``proj`` / ``fc2``, so dL/dg equals sum(W * dL/dW) over the ``proj``
columns of the head (``fc2`` column of the neuron): we compute it from the weight gradients,
with no hooks and no change to the model. For an embedding channel c the group is every
parameter slice that writes or reads c (patch-embed row, class token, position embedding,
LayerNorm entries, ``qkv``/``fc1``/head input columns, ``proj``/``fc2`` output rows and
biases): zeroing them all removes c from the stream, and |sum(W * dL/dW)| over the group is the
Taylor estimate of that. Scores are |.| per batch, summed over batches.

Pruning keeps timm classes: ``prune_vit`` returns a new ``VisionTransformer`` whose layers are
sliced. A branch left with no unit becomes ``ZeroBranch`` with its LayerNorm removed (the block
computes ``x + 0``, which the dynamo ONNX exporter folds away: no op left); a block left with
neither branch becomes ``SkipBlock``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from edvit.models.vit import count_params

LossFn = Callable[[Tensor, tuple[Tensor, Tensor]], Tensor]
ForwardFn = Callable[[VisionTransformer, Tensor], Tensor]


class ZeroBranch(nn.Module):
    """A pruned attention or MLP branch: adds nothing to the residual stream.

    Returns a 0-d zero, so ``x + branch(x)`` broadcasts to ``x`` with one cheap op.
    """

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        return x.new_zeros(())


class SkipBlock(nn.Module):
    """A block whose attention and MLP were both pruned away: the identity."""

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        return x


@dataclass
class Importance:
    """Taylor scores: ``heads[b]`` (num_heads_b,), ``mlp[b]`` (hidden_b,), ``embed`` (D,)."""

    heads: list[Tensor]
    mlp: list[Tensor]
    embed: Tensor | None
    num_batches: int


@dataclass
class PruneSpec:
    """Units to keep, as sorted indices into the model the spec was made for."""

    heads: list[list[int]]
    mlp: list[list[int]]
    embed: list[int]


# ---------------------------------------------------------------------------------------------
# Structure


def check_supported(vit: VisionTransformer) -> None:
    """NotImplementedError naming the first part of ``vit`` that pruning cannot handle."""
    if vit.attn_pool is not None:
        raise NotImplementedError("attention pooling heads are not supported")
    for index, block in enumerate(vit.blocks):
        if isinstance(block, SkipBlock):
            continue
        if not isinstance(block, Block):
            raise NotImplementedError(f"block {index}: {type(block).__name__} is not a timm Block")
        attn, mlp = block.attn, block.mlp
        if not isinstance(attn, (Attention, ZeroBranch)):
            raise NotImplementedError(f"block {index}: attention {type(attn).__name__}")
        if isinstance(attn, Attention) and (
            attn.gate is not None or not isinstance(attn.norm, nn.Identity)
        ):
            raise NotImplementedError(f"block {index}: gated or scale-normed attention")
        if not isinstance(mlp, (Mlp, ZeroBranch)):
            raise NotImplementedError(f"block {index}: MLP {type(mlp).__name__}")
        if isinstance(mlp, Mlp) and not isinstance(mlp.norm, nn.Identity):
            raise NotImplementedError(f"block {index}: scale-normed MLP")


def _num_heads(block: nn.Module) -> int:
    attn = getattr(block, "attn", None)
    return int(attn.num_heads) if isinstance(attn, Attention) else 0


def _mlp_width(block: nn.Module) -> int:
    mlp = getattr(block, "mlp", None)
    return int(mlp.fc1.out_features) if isinstance(mlp, Mlp) else 0


def _head_dim(vit: VisionTransformer) -> int:
    """The (unchanged by pruning) per-head width; any value if no head is left."""
    for block in vit.blocks:
        if _num_heads(block):
            return int(block.attn.head_dim)
    return 1


def describe(vit: VisionTransformer) -> dict:
    """Per block head count and MLP width, the embedding width and the parameter count."""
    return {
        "embed_dim": int(vit.embed_dim),
        "params": count_params(vit),
        "blocks": [{"heads": _num_heads(b), "mlp": _mlp_width(b)} for b in vit.blocks],
    }


def full_spec(vit: VisionTransformer) -> PruneSpec:
    """The spec that keeps every unit of ``vit``."""
    return PruneSpec(
        heads=[list(range(_num_heads(b))) for b in vit.blocks],
        mlp=[list(range(_mlp_width(b))) for b in vit.blocks],
        embed=list(range(int(vit.embed_dim))),
    )


# ---------------------------------------------------------------------------------------------
# Parameter counting (closed form, equal to count_params of prune_vit's result)


def _width_params(module: nn.Module | None) -> int:
    """Parameters per unit of width of a per-channel module (LayerNorm, LayerScale) or 0."""
    if module is None:
        return 0
    return sum(1 for p in module.parameters(recurse=False) if p.dim() == 1)


def _bias(linear: nn.Linear) -> int:
    return 1 if linear.bias is not None else 0


@dataclass(frozen=True)
class _BlockCosts:
    """Parameter counts of one block at a given embedding width."""

    per_head: int
    per_neuron: int
    attn_fixed: int  # present while at least one head is kept
    mlp_fixed: int  # present while at least one neuron is kept


def _template_block(vit: VisionTransformer) -> Block | None:
    """A block that still has its attention and MLP, to read layer options from."""
    for block in vit.blocks:
        if isinstance(block, Block) and _num_heads(block) and _mlp_width(block):
            return block
    return None


def _block_costs(vit: VisionTransformer, block: nn.Module, width: int) -> _BlockCosts:
    attn = block.attn if _num_heads(block) else None
    mlp = block.mlp if _mlp_width(block) else None
    hd = _head_dim(vit)
    per_head = attn_fixed = per_neuron = mlp_fixed = 0
    if attn is not None:
        per_head = 3 * hd * (width + _bias(attn.qkv)) + hd * width
        attn_fixed = (
            width * (_width_params(block.norm1) + _bias(attn.proj))
            + width * _width_params(block.ls1)
            + count_params(attn.q_norm)
            + count_params(attn.k_norm)
        )
    if mlp is not None:
        per_neuron = width + _bias(mlp.fc1) + width
        mlp_fixed = width * (_width_params(block.norm2) + _bias(mlp.fc2) + _width_params(block.ls2))
    return _BlockCosts(per_head, per_neuron, attn_fixed, mlp_fixed)


def _stem_params(vit: VisionTransformer, width: int) -> int:
    """Everything outside the blocks: patch embedding, tokens, norms, head."""
    conv = vit.patch_embed.proj
    per_channel = conv.weight[0].numel() + (1 if conv.bias is not None else 0)
    tokens = sum(t.shape[1] for t in (vit.cls_token, vit.reg_token, vit.pos_embed) if t is not None)
    norms = sum(
        _width_params(m) for m in (vit.patch_embed.norm, vit.norm_pre, vit.norm, vit.fc_norm)
    )
    head = 0
    if isinstance(vit.head, nn.Linear):
        head = vit.head.out_features * (width + _bias(vit.head))
    return width * (per_channel + tokens + norms) + head


def count_params_after(vit: VisionTransformer, spec: PruneSpec) -> int:
    """The exact parameter count of ``prune_vit(vit, spec)``, without building it."""
    check_supported(vit)
    width = len(spec.embed)
    total = _stem_params(vit, width)
    for b, block in enumerate(vit.blocks):
        costs = _block_costs(vit, block, width)
        heads, neurons = len(spec.heads[b]), len(spec.mlp[b])
        if heads:
            total += costs.attn_fixed + heads * costs.per_head
        if neurons:
            total += costs.mlp_fixed + neurons * costs.per_neuron
    return total


# ---------------------------------------------------------------------------------------------
# Importance


def _embed_groups(vit: VisionTransformer) -> list[tuple[nn.Parameter, int]]:
    """Every (parameter, axis) whose slices along ``axis`` belong to one embedding channel."""
    groups: list[tuple[nn.Parameter, int]] = []

    def per_channel(module: nn.Module | None) -> None:
        if module is None or isinstance(module, nn.Identity):
            return
        groups.extend((p, 0) for p in module.parameters(recurse=False) if p.dim() == 1)

    conv = vit.patch_embed.proj
    groups.append((conv.weight, 0))
    if conv.bias is not None:
        groups.append((conv.bias, 0))
    for token in (vit.cls_token, vit.reg_token, vit.pos_embed):
        if token is not None:
            groups.append((token, 2))
    for norm in (vit.patch_embed.norm, vit.norm_pre, vit.norm, vit.fc_norm):
        per_channel(norm)
    if isinstance(vit.head, nn.Linear):
        groups.append((vit.head.weight, 1))

    def branch(norm: nn.Module, scale: nn.Module, reads: nn.Linear, writes: nn.Linear) -> None:
        """A residual branch reads the channels through ``reads`` and adds to them."""
        per_channel(norm)
        per_channel(scale)
        groups.append((reads.weight, 1))
        groups.append((writes.weight, 0))
        if writes.bias is not None:
            groups.append((writes.bias, 0))

    for block in vit.blocks:
        if _num_heads(block):
            branch(block.norm1, block.ls1, block.attn.qkv, block.attn.proj)
        if _mlp_width(block):
            branch(block.norm2, block.ls2, block.mlp.fc1, block.mlp.fc2)
    return groups


def _taylor_along(param: Tensor, grad: Tensor | None, axis: int) -> Tensor:
    """sum(W * dL/dW) over every axis but ``axis`` (signed)."""
    if grad is None:
        return param.new_zeros(param.shape[axis])
    product = (param.detach() * grad).movedim(axis, 0)
    return product.reshape(product.shape[0], -1).sum(dim=1)


def _default_forward(vit: VisionTransformer, images: Tensor) -> Tensor:
    return vit(images)


def score_units(
    vit: VisionTransformer,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: LossFn,
    *,
    embed: bool = True,
    forward: ForwardFn = _default_forward,
) -> Importance:
    """First-order Taylor importance of every head, MLP neuron and (``embed``) channel.

    ``loss_fn(forward(vit, images), (images, labels))`` is the loss; ``forward`` defaults to
    the logits ``vit(images)``. The model's weights, ``.grad``, ``requires_grad`` flags and
    train/eval mode are left as they were; scoring runs in eval mode.
    """
    check_supported(vit)
    blocks = list(vit.blocks)
    groups = _embed_groups(vit) if embed else []
    width = int(vit.embed_dim)
    heads = [torch.zeros(_num_heads(b)) for b in blocks]
    mlp = [torch.zeros(_mlp_width(b)) for b in blocks]
    embed_score = torch.zeros(width) if embed else None

    params = list(vit.parameters())
    flags = [p.requires_grad for p in params]
    was_training = vit.training
    index = {id(p): i for i, p in enumerate(params)}
    count = 0
    grad_enabled = torch.is_grad_enabled()
    try:
        vit.eval()
        torch.set_grad_enabled(True)
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(forward(vit, batch[0]), batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for b, block in enumerate(blocks):
                if _num_heads(block):
                    proj = block.attn.proj.weight
                    per_col = _taylor_along(proj, grads[index[id(proj)]], 1)
                    heads[b] += per_col.view(_num_heads(block), -1).sum(dim=1).abs().cpu()
                if _mlp_width(block):
                    fc2 = block.mlp.fc2.weight
                    mlp[b] += _taylor_along(fc2, grads[index[id(fc2)]], 1).abs().cpu()
            if embed_score is not None:
                channel = torch.zeros(width, device=batch[0].device)
                for param, axis in groups:
                    channel += _taylor_along(param, grads[index[id(param)]], axis)
                embed_score += channel.abs().cpu()
            count += 1
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        vit.train(was_training)
        torch.set_grad_enabled(grad_enabled)
    return Importance(heads=heads, mlp=mlp, embed=embed_score, num_batches=count)


def balance_kinds(importance: Importance, vit: VisionTransformer) -> Importance:
    """``importance`` with the heads' and the MLP neurons' scores each divided by their kind's
    mean score per parameter: the kinds then compete on equal terms, and only the scores
    within a kind (which block, which unit) still differ.

    For scores of random weights: there a head's Taylor score, the |signed sum| of its
    columns' terms, is a fraction of what its many parameters would suggest, and every head
    would go before any neuron (measured on the 'small' preset: 2 heads left of 24 where the
    trained model keeps 13 at the same budget). A trained model's own scores need no such
    help: leave them as they are.
    """
    width = int(vit.embed_dim)
    blocks = list(vit.blocks)
    costs = [_block_costs(vit, block, width) for block in blocks]

    def mean_per_param(scores: list[Tensor], per_unit: list[int]) -> float:
        ratios = [s / c for s, c in zip(scores, per_unit, strict=True) if len(s) and c]
        return float(torch.cat(ratios).mean()) if ratios else 0.0

    head_mean = mean_per_param(importance.heads, [c.per_head for c in costs])
    mlp_mean = mean_per_param(importance.mlp, [c.per_neuron for c in costs])
    return Importance(
        heads=[s / head_mean if head_mean > 0 else s for s in importance.heads],
        mlp=[s / mlp_mean if mlp_mean > 0 else s for s in importance.mlp],
        embed=importance.embed,
        num_batches=importance.num_batches,
    )


# ---------------------------------------------------------------------------------------------
# Selection


def _top(scores: Tensor, keep: int) -> list[int]:
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(int(i) for i in order[:keep])


def select_units(
    importance: Importance,
    vit: VisionTransformer,
    *,
    keep_ratio: float | None = None,
    param_budget: int | None = None,
    embed_keep_ratio: float = 1.0,
    min_embed: int = 8,
    min_heads: int = 1,
    frozen_blocks: int = 0,
) -> PruneSpec:
    """Choose the units to keep so that the pruned model has at most the budgeted parameters.

    The embedding keeps its ``max(min_embed, round(embed_keep_ratio * D))`` best channels.
    Then heads and MLP neurons from all blocks are ranked together by Taylor score per
    parameter removed (the estimated loss increase per parameter saved, both at the new
    embedding width; the greedy answer to "lose the least loss for this many parameters"),
    and removed cheapest-first until the count is at most ``param_budget`` (or ``keep_ratio``
    times the model's current parameter count). With neither, only the embedding is pruned.
    The ``min_heads`` best heads of the whole model are never removed: first-order scores rate
    units one at a time and miss that with no attention left the class token never sees the
    image (the output would be a constant). Blocks before ``frozen_blocks`` are kept whole
    (the shared stem of a sliced build), and then the embedding width must stay too.
    """
    if frozen_blocks and embed_keep_ratio < 1.0:
        raise ValueError("the embedding width is shared with frozen blocks: keep it whole")
    if keep_ratio is not None and param_budget is not None:
        raise ValueError("give keep_ratio or param_budget, not both")
    if keep_ratio is not None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        param_budget = int(keep_ratio * count_params(vit))
    spec = full_spec(vit)
    width = int(vit.embed_dim)
    if embed_keep_ratio < 1.0:
        if importance.embed is None:
            raise ValueError("embedding pruning needs importance scored with embed=True")
        keep = min(width, max(min_embed, round(embed_keep_ratio * width)))
        spec.embed = _top(importance.embed, keep)
    if param_budget is None:
        return spec

    total = count_params_after(vit, spec)
    width = len(spec.embed)
    costs = [_block_costs(vit, block, width) for block in vit.blocks]
    units: list[tuple[float, str, int, int]] = []
    for b, cost in enumerate(costs):
        if b < frozen_blocks:
            continue
        units += [
            (float(s) / cost.per_head, "heads", b, i) for i, s in enumerate(importance.heads[b])
        ]
        units += [
            (float(s) / cost.per_neuron, "mlp", b, i) for i, s in enumerate(importance.mlp[b])
        ]
    units.sort(key=lambda unit: unit[0])
    head_units = [unit for unit in units if unit[1] == "heads"]
    protected = {(b, i) for _, _, b, i in head_units[max(0, len(head_units) - min_heads) :]}
    kept = {"heads": [set(h) for h in spec.heads], "mlp": [set(m) for m in spec.mlp]}
    for _, kind, b, i in units:
        if total <= param_budget:
            break
        if kind == "heads" and (b, i) in protected:
            continue
        kept[kind][b].discard(i)
        cost = costs[b]
        total -= cost.per_head if kind == "heads" else cost.per_neuron
        if not kept[kind][b]:
            total -= cost.attn_fixed if kind == "heads" else cost.mlp_fixed
    if total > param_budget:
        raise ValueError(
            f"{total} parameters remain with all but {min_heads} heads and every MLP neuron "
            f"pruned; the budget {param_budget} needs a narrower embedding (embed_keep_ratio)"
        )
    spec.heads = [sorted(h) for h in kept["heads"]]
    spec.mlp = [sorted(m) for m in kept["mlp"]]
    return spec


# ---------------------------------------------------------------------------------------------
# Surgery (on a deep copy)


def _index(keep: list[int], device: torch.device) -> Tensor:
    return torch.tensor(keep, dtype=torch.long, device=device)


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))


def _slice_linear(linear: nn.Linear, rows: Tensor | None, cols: Tensor | None) -> None:
    weight = linear.weight.data
    if rows is not None:
        weight = weight.index_select(0, rows)
        if linear.bias is not None:
            _set(linear, "bias", linear.bias.data.index_select(0, rows))
        linear.out_features = len(rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
        linear.in_features = len(cols)
    _set(linear, "weight", weight)


def _slice_channels(module: nn.Module, channels: Tensor) -> None:
    """Slice a LayerNorm / RmsNorm / LayerScale (or nothing, for Identity) to ``channels``."""
    for name, param in list(module.named_parameters(recurse=False)):
        _set(module, name, param.data.index_select(0, channels))
    if hasattr(module, "normalized_shape"):  # nn.LayerNorm, timm's RmsNorm and SimpleNorm
        module.normalized_shape = (len(channels),)


def _qkv_rows(heads: list[int], num_heads: int, head_dim: int, device: torch.device) -> Tensor:
    attn_dim = num_heads * head_dim
    rows = [
        part * attn_dim + h * head_dim + d
        for part in range(3)
        for h in heads
        for d in range(head_dim)
    ]
    return _index(rows, device)


def _prune_attention(block: Block, heads: list[int], channels: Tensor) -> None:
    attn: Attention = block.attn
    if not heads:
        block.norm1, block.attn = nn.Identity(), ZeroBranch()
        block.ls1, block.drop_path1 = nn.Identity(), nn.Identity()
        return
    device = channels.device
    hd = int(attn.head_dim)
    cols = _index([h * hd + d for h in heads for d in range(hd)], device)
    _slice_linear(attn.qkv, _qkv_rows(heads, int(attn.num_heads), hd, device), channels)
    _slice_linear(attn.proj, channels, cols)
    attn.num_heads = len(heads)
    attn.attn_dim = len(heads) * hd
    _slice_channels(block.norm1, channels)
    _slice_channels(block.ls1, channels)


def _prune_mlp(block: Block, neurons: list[int], channels: Tensor) -> None:
    mlp: Mlp = block.mlp
    if not neurons:
        block.norm2, block.mlp = nn.Identity(), ZeroBranch()
        block.ls2, block.drop_path2 = nn.Identity(), nn.Identity()
        return
    hidden = _index(neurons, channels.device)
    _slice_linear(mlp.fc1, hidden, channels)
    _slice_linear(mlp.fc2, channels, hidden)
    _slice_channels(block.norm2, channels)
    _slice_channels(block.ls2, channels)


def _prune_stem(vit: VisionTransformer, channels: Tensor) -> None:
    conv = vit.patch_embed.proj
    _set(conv, "weight", conv.weight.data.index_select(0, channels))
    if conv.bias is not None:
        _set(conv, "bias", conv.bias.data.index_select(0, channels))
    conv.out_channels = len(channels)
    for name in ("cls_token", "reg_token", "pos_embed"):
        if getattr(vit, name) is not None:
            _set(vit, name, getattr(vit, name).data.index_select(2, channels))
    for norm in (vit.patch_embed.norm, vit.norm_pre, vit.norm, vit.fc_norm):
        _slice_channels(norm, channels)
    if isinstance(vit.head, nn.Linear):
        _slice_linear(vit.head, None, channels)
    vit.embed_dim = vit.num_features = vit.head_hidden_size = len(channels)


def _check_spec(vit: VisionTransformer, spec: PruneSpec) -> None:
    depth = len(vit.blocks)
    if len(spec.heads) != depth or len(spec.mlp) != depth:
        raise ValueError(f"spec has {len(spec.heads)}/{len(spec.mlp)} blocks, model {depth}")
    if not spec.embed:
        raise ValueError("spec keeps no embedding channel")
    checks = [("embed", spec.embed, int(vit.embed_dim))]
    for b, block in enumerate(vit.blocks):
        checks.append((f"block {b} heads", spec.heads[b], _num_heads(block)))
        checks.append((f"block {b} mlp", spec.mlp[b], _mlp_width(block)))
    for what, keep, size in checks:
        if len(set(keep)) != len(keep) or any(not 0 <= i < size for i in keep):
            raise ValueError(f"{what}: indices must be distinct and in [0, {size})")


def prune_vit(vit: VisionTransformer, spec: PruneSpec) -> VisionTransformer:
    """A new, pruned ``VisionTransformer`` keeping the units in ``spec``; ``vit`` is untouched."""
    check_supported(vit)
    _check_spec(vit, spec)
    pruned = copy.deepcopy(vit)
    channels = _index(sorted(spec.embed), pruned.patch_embed.proj.weight.device)
    _prune_stem(pruned, channels)
    for b, block in enumerate(pruned.blocks):
        if isinstance(block, SkipBlock):
            continue
        if _num_heads(block):
            _prune_attention(block, sorted(spec.heads[b]), channels)
        if _mlp_width(block):
            _prune_mlp(block, sorted(spec.mlp[b]), channels)
        if isinstance(block.attn, ZeroBranch) and isinstance(block.mlp, ZeroBranch):
            pruned.blocks[b] = SkipBlock()
    return pruned


# ---------------------------------------------------------------------------------------------
# Iterative pruning


def iterative_prune(
    vit: VisionTransformer,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    loss_fn: LossFn,
    *,
    param_budget: int,
    steps: int = 3,
    embed_keep_ratio: float = 1.0,
    min_embed: int = 8,
    recover: Callable[[VisionTransformer], VisionTransformer] | None = None,
    frozen_blocks: int = 0,
    balanced: bool = False,
) -> VisionTransformer:
    """Score, prune and ``recover`` (e.g. fine-tune) ``steps`` times toward ``param_budget``.

    Budgets and embedding widths shrink geometrically, so each step removes the same fraction;
    ``batches()`` is called once per step for fresh scoring data. ``balanced``: scores go
    through ``balance_kinds`` (for random weights). ``vit`` is untouched.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    model = vit
    start = count_params(vit)
    for step in range(1, steps + 1):
        budget = int(start * (param_budget / start) ** (step / steps))
        width_target = max(
            min_embed, round(int(vit.embed_dim) * embed_keep_ratio ** (step / steps))
        )
        importance = score_units(model, batches(), loss_fn, embed=embed_keep_ratio < 1.0)
        if balanced:
            importance = balance_kinds(importance, model)
        spec = select_units(
            importance,
            model,
            param_budget=budget,
            embed_keep_ratio=min(1.0, width_target / int(model.embed_dim)),
            min_embed=min_embed,
            frozen_blocks=frozen_blocks,
        )
        model = prune_vit(model, spec)
        if recover is not None:
            model = recover(model)
    return model
