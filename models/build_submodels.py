"""Sub-models: prune the original for each class subset, recover, fine-tune with
distillation (the method: edvit.models.build's doc); alone or several processes at once."""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

from edvit.errors import ConfigError

from .build_data import BuildData, ModelInputs, balanced_subset_indices, own_task_labels
from .build_settings import (
    SUBMODEL_DIR,
    BuildSettings,
    default_embed_keep_ratio,
    default_keep_branches,
    default_param_budget,
    log,
    subset_epochs,
    train_config,
)
from .prune import (
    PruneSpec,
    balance_kinds,
    count_params_after,
    describe,
    full_spec,
    iterative_prune,
    prune_vit,
    score_units,
)
from .train import Distillation, SubtaskCrossEntropy, fit, set_threads
from .vit import count_params

SCORE_BATCHES = 8  # batches of scoring data per Taylor importance estimate
SCORE_BATCH_SIZE = 128
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MIN_EMBED = 8


@dataclass(frozen=True)
class SubsetData:
    """One subset's training data: images, sub-task labels and the teacher's 10-way logits."""

    subset: tuple[int, ...]
    images: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor


def subset_data(
    subset: tuple[int, ...],
    x_train: torch.Tensor,
    labels: np.ndarray,
    teacher_logits: torch.Tensor,
    rng: np.random.Generator,
    other_ratio: float | None = None,
) -> SubsetData:
    chosen = balanced_subset_indices(labels, subset, rng, other_ratio)
    index = torch.from_numpy(chosen)
    return SubsetData(
        subset=subset,
        images=x_train[index],
        labels=torch.from_numpy(own_task_labels(labels[chosen], subset)),
        teacher_logits=teacher_logits[index],
    )


def scoring_batches(data: SubsetData, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A few random batches of the subset's data for one importance estimate."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.labels), generator=generator)
    for b in range(SCORE_BATCHES):
        idx = order[b * SCORE_BATCH_SIZE : (b + 1) * SCORE_BATCH_SIZE]
        if len(idx) == 0:
            return
        yield data.images[idx], data.labels[idx]


def branch_spec(
    vit: VisionTransformer,
    heads: list[torch.Tensor],
    mlp: list[torch.Tensor],
    keep: int,
    frozen_blocks: int = 0,
    halves: bool = False,
) -> PruneSpec:
    """Keep the ``keep`` branches (attention or MLP of a block) with the highest summed
    Taylor scores, at least one of them attention; every unit of a kept branch stays.
    Blocks before ``frozen_blocks`` (a shared stem) are kept whole and not counted.
    ``halves``: the best ceil(keep / 2) attention and floor(keep / 2) MLP branches (as far as
    there are), the split that trained builds of the 'small' preset chose, for scores that
    cannot tell the kinds apart (random weights; docs/benchmarks/real-scale.md)."""
    spec = full_spec(vit)
    branches = [(float(s.sum()), "heads", b) for b, s in enumerate(heads) if len(s)]
    branches += [(float(s.sum()), "mlp", b) for b, s in enumerate(mlp) if len(s)]
    branches = [branch for branch in branches if branch[2] >= frozen_blocks]
    branches.sort(key=lambda branch: branch[0], reverse=True)
    kept = branches[:keep]
    if halves:
        attention = [branch for branch in branches if branch[1] == "heads"]
        others = [branch for branch in branches if branch[1] == "mlp"]
        first = attention[: max(keep - len(others), (keep + 1) // 2)]
        kept = first + others[: keep - len(first)]
    if not any(kind == "heads" for _, kind, _ in kept):
        best_attention = next(branch for branch in branches if branch[1] == "heads")
        kept = [*kept[: max(0, keep - 1)], best_attention]
    chosen = {(kind, b) for _, kind, b in kept}
    for _, kind, b in branches:
        if (kind, b) not in chosen:
            getattr(spec, kind)[b] = []
    return spec


def stem_parameters(vit: VisionTransformer, shared_blocks: int) -> list[torch.nn.Parameter]:
    """The patch embedding, tokens, position embedding and the first blocks."""
    params = [*vit.patch_embed.parameters(), *vit.norm_pre.parameters()]
    params += [p for p in (vit.cls_token, vit.reg_token, vit.pos_embed) if p is not None]
    for block in vit.blocks[:shared_blocks]:
        params += list(block.parameters())
    return params


def freeze_stem(vit: VisionTransformer, shared_blocks: int) -> None:
    """Sub-models of a sliced build share the original's stem: it must not train."""
    for param in stem_parameters(vit, shared_blocks):
        param.requires_grad_(False)


def count_branches(vit: VisionTransformer) -> int:
    arch = describe(vit)
    return sum(int(blk["heads"] > 0) + int(blk["mlp"] > 0) for blk in arch["blocks"])


def minimum_params(vit: VisionTransformer) -> int:
    """Parameters of the smallest sub-model pruning can make: the narrowest embedding and
    one attention head, nothing else."""
    spec = full_spec(vit)
    spec.embed = spec.embed[:MIN_EMBED]
    spec.heads = [h[:1] if b == 0 else [] for b, h in enumerate(spec.heads)]
    spec.mlp = [[] for _ in spec.mlp]
    return count_params_after(vit, spec)


@dataclass(frozen=True)
class PrunePlan:
    """How far to prune one sub-model."""

    param_budget: int
    embed_keep_ratio: float
    keep_branches: int


def make_submodel(
    original: VisionTransformer,
    data: SubsetData,
    plan: PrunePlan,
    settings: BuildSettings,
    seed_offset: int,
    name: str,
) -> VisionTransformer:
    """Prune ``original`` for ``data``'s sub-task to ``plan`` and fine-tune it (the steps:
    edvit.models.build's doc).

    Raises ValueError when the budget cannot be met even with the narrowest embedding.
    """
    smallest = minimum_params(original)
    if plan.param_budget < smallest:
        raise ValueError(f"{plan.param_budget} params is below the smallest sub-model, {smallest}")
    criterion = Distillation(data.subset, settings.kd_alpha, settings.kd_temperature)
    score_loss = SubtaskCrossEntropy(data.subset)
    frozen = settings.shared_blocks
    recover_epochs, fine_tune_epochs = subset_epochs(settings, len(data.labels))

    def tune(vit: VisionTransformer, epochs: int, what: str) -> VisionTransformer:
        freeze_stem(vit, frozen)
        config = train_config(settings, epochs, settings.sub_lr, seed_offset)
        fit(vit, vit, [data.images], data.labels, config, f"{name} {what}",
            criterion=criterion, targets=[data.teacher_logits])  # fmt: skip
        return vit.eval()

    importance = score_units(
        original, scoring_batches(data, settings.seed), score_loss, embed=False
    )
    if settings.untrained:  # random weights: let heads and neurons compete on equal terms
        importance = balance_kinds(importance, original)
    spec = branch_spec(
        original,
        importance.heads,
        importance.mlp,
        max(1, plan.keep_branches - 2 * frozen),
        frozen,
        halves=settings.untrained,
    )
    vit = prune_vit(original, spec)
    if count_branches(vit) < count_branches(original):
        vit = tune(vit, recover_epochs, "recover")
    step = iter(range(1, 1000))
    embed_ratio = plan.embed_keep_ratio
    while True:
        try:
            vit = iterative_prune(
                vit,
                lambda: scoring_batches(data, settings.seed + next(step)),
                score_loss,
                param_budget=plan.param_budget,
                steps=settings.prune_steps,
                embed_keep_ratio=embed_ratio,
                min_embed=MIN_EMBED,
                recover=lambda v: tune(v, recover_epochs, "recover"),
                frozen_blocks=frozen,
                balanced=settings.untrained,
            )
            break
        except ValueError:
            narrower = max(MIN_EMBED / int(vit.embed_dim), embed_ratio * 0.75)
            if narrower >= embed_ratio:
                raise
            log(f"{name}: budget {plan.param_budget} needs a narrower embedding ({narrower:.2f})")
            embed_ratio = narrower
    return tune(vit, fine_tune_epochs, "fine-tune")


def default_plan(
    settings: BuildSettings, original: VisionTransformer, original_params: int, num_devices: int
) -> PrunePlan:
    """Every sub-model's first plan: the settings, else the defaults by N (edvit.models.build's
    doc)."""
    total_branches = count_branches(original)
    shared = settings.shared_blocks
    stem_params = sum(p.numel() for p in stem_parameters(original, shared)) if shared else 0
    # With a shared stem only what follows it is split N ways.
    budget = stem_params + default_param_budget(original_params - stem_params, num_devices)
    embed_ratio = settings.embed_keep_ratio or default_embed_keep_ratio(num_devices)
    return PrunePlan(
        param_budget=settings.param_budget or budget,
        embed_keep_ratio=1.0 if shared else embed_ratio,
        keep_branches=settings.keep_branches or default_keep_branches(total_branches, num_devices),
    )


@dataclass
class SubModels:
    """One pruned sub-model per class subset, with the data and the plan it was made from.
    Placement replaces the ``plans`` and ``vits`` of those it has to shrink."""

    ids: list[str]
    data: list[SubsetData]
    plans: dict[str, PrunePlan]
    vits: list[VisionTransformer]

    @property
    def files(self) -> list[str]:
        """Each sub-model's ONNX file, relative to the bundle."""
        return [f"{SUBMODEL_DIR}/{sid}.onnx" for sid in self.ids]


def make_submodels(
    settings: BuildSettings,
    original: VisionTransformer,
    original_params: int,
    data: BuildData,
    inputs: ModelInputs,
    teacher_logits: torch.Tensor,
    threads: int,
) -> SubModels:
    """One pruned, distilled sub-model per class subset (``settings.jobs`` at a time)."""
    rng = np.random.default_rng(settings.seed)
    training = [
        subset_data(s, inputs.x_train, data.train.labels, teacher_logits, rng, settings.other_ratio)
        for s in data.subsets
    ]
    return prune_submodels(settings, original, original_params, training, threads)


def checked_plan(
    settings: BuildSettings, original: VisionTransformer, original_params: int, num_devices: int
) -> PrunePlan:
    """``default_plan``, or a one-line ConfigError naming the smallest budget pruning can meet
    when its budget is below that."""
    plan = default_plan(settings, original, original_params, num_devices)
    smallest = minimum_params(original)
    if plan.param_budget < smallest:
        given = (
            f"--param-budget {settings.param_budget}"
            if settings.param_budget
            else f"the default budget for N={num_devices} ({plan.param_budget})"
        )
        raise ConfigError(
            f"{given} is below the smallest sub-model pruning can make ({MIN_EMBED} embedding "
            f"channels and one attention head): the smallest possible budget is {smallest} "
            "parameters"
        )
    return plan


def prune_submodels(
    settings: BuildSettings,
    original: VisionTransformer,
    original_params: int,
    training: list[SubsetData],
    threads: int,
) -> SubModels:
    """Prune (and, as the settings say, fine-tune) one sub-model of ``original`` per subset's
    ``training`` data, to the plan of ``checked_plan``; ``settings.jobs`` at a time."""
    ids = [f"sub{i}" for i in range(len(training))]
    plan = checked_plan(settings, original, original_params, len(training))
    plans = {sid: plan for sid in ids}
    log(f"pruning plan per sub-model: {asdict(plan)} (original {original_params} params)")
    jobs = [
        SubmodelJob(original, subset, plans[sid], settings, i + 1, sid)
        for i, (sid, subset) in enumerate(zip(ids, training, strict=True))
    ]
    workers = min(settings.jobs, len(jobs))
    if workers > 1:
        vits = make_submodels_in_parallel(jobs, workers, threads)
    else:
        bar = tqdm(jobs, "sub-models", unit="model", file=sys.stderr, leave=False)
        vits = [job.run() for job in bar]
    return SubModels(ids=ids, data=training, plans=plans, vits=vits)


@dataclass(frozen=True)
class SubmodelJob:
    """The arguments of one ``make_submodel`` call, picklable for a worker process."""

    original: VisionTransformer
    data: SubsetData
    plan: PrunePlan
    settings: BuildSettings
    seed_offset: int
    name: str

    def run(self, threads: int | None = None) -> VisionTransformer:
        if threads is not None:  # in a worker process: its share of the cores
            set_threads(threads)
        subset = list(self.data.subset)
        log(f"{self.name}: classes {subset} + other ({len(self.data.labels)} images)")
        vit = make_submodel(
            self.original, self.data, self.plan, self.settings, self.seed_offset, self.name
        )
        if threads is not None:
            log(f"{self.name}: done ({count_params(vit)} params)")
        return vit


def stop_with_parent() -> None:
    """In a worker: be sent SIGTERM when the build's process dies, also when it is killed
    rather than interrupted (Ctrl-C reaches the workers anyway), instead of training on for
    nobody. Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def make_submodels_in_parallel(
    jobs: list[SubmodelJob], workers: int, threads: int
) -> list[VisionTransformer]:
    """Train the sub-models ``workers`` at a time, each process with ``threads / workers``
    threads: small sub-models use one core poorly through torch's threads but train
    independently (``--jobs``). Spawned, not forked: a forked torch thread pool can hang."""
    per_worker = max(1, threads // workers)
    log(f"training {len(jobs)} sub-models {workers} at a time, {per_worker} thread(s) each")
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=stop_with_parent) as pool:
        futures = [pool.submit(job.run, per_worker) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def check_stem_shared(
    original: VisionTransformer, sub_vits: list[VisionTransformer], shared_blocks: int
) -> None:
    """Every sub-model must carry the original's stem bit for bit, or slices would lie."""
    reference = stem_parameters(original, shared_blocks)
    for sub in sub_vits:
        for a, b in zip(reference, stem_parameters(sub, shared_blocks), strict=True):
            if not torch.equal(a, b):
                raise RuntimeError("a sub-model's stem drifted from the original's")


def feature_params(vit: VisionTransformer) -> int:
    """Parameters of the exported feature extractor (the training head is not shipped)."""
    return count_params(vit) - count_params(vit.head)
