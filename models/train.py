"""Plain, seeded training loops: AdamW, per-step cosine learning rate with a short warm-up,
optional label smoothing or a caller's loss (knowledge distillation), optional augmentation
(random shifts and horizontal flips), on the CPU or a CUDA device, a tqdm bar per epoch on
stderr. Modules come back on the CPU, where pruning and export expect them."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

Forward = Callable[..., torch.Tensor]
# loss(outputs, labels, *per-sample targets) for one batch
Criterion = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Augment:
    """Per-sample random translation by up to ``shift`` pixels (zero padding) and, with
    ``flip``, a horizontal flip half of the time. Applied to image batches [B, C, H, W]."""

    shift: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, height, width = images.shape
        if self.flip:
            flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.shift > 0:
            s = self.shift
            padded = nn.functional.pad(images, (s, s, s, s))
            dy = torch.randint(0, 2 * s + 1, (batch,), generator=generator).to(images.device)
            dx = torch.randint(0, 2 * s + 1, (batch,), generator=generator).to(images.device)
            rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
            sample = torch.arange(batch, device=images.device)[:, None, None, None]
            channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
            images = padded[sample, channel, rows, cols]
        return images


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    warmup_fraction: float = 0.05
    seed: int = 0
    device: str = "cpu"
    augment: Augment | None = None  # applied to the first input (the images) only


def resolve_device(name: str) -> str:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cpu``/``cuda``/``cuda:N`` as given
    (a ValueError when CUDA is asked for and missing)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}: choose auto, cpu or cuda[:N]")
    return name


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: the cores this process may use)."""
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(
    module: nn.Module,
    forward: Forward,
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    config: TrainConfig,
    desc: str,
    *,
    criterion: Criterion | None = None,
    targets: Sequence[torch.Tensor] = (),
) -> list[float]:
    """Train ``module`` so that ``forward(*batch_inputs)`` predicts ``labels``.

    The loss is cross-entropy (with the config's label smoothing) unless ``criterion`` is
    given: then it is ``criterion(outputs, labels, *batch_targets)``, ``targets`` being extra
    per-sample tensors (e.g. a teacher's logits). Returns the mean training loss of each
    epoch. The data order depends only on the seed.
    """
    n = len(labels)
    if n == 0 or config.epochs <= 0:
        return []
    device = torch.device(config.device)
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = int(total * config.warmup_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, total, warmup)
    )
    loss_fn = criterion or nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    augment = config.augment if config.augment is not None and config.augment.active else None
    history: list[float] = []
    module.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        total_loss, seen = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{desc} epoch {epoch + 1}/{config.epochs}",
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = [x[idx].to(device, non_blocking=True) for x in inputs]
            if augment is not None:
                batch[0] = augment(batch[0], generator)
            outputs = forward(*batch)
            loss = loss_fn(outputs, labels[idx].to(device), *(t[idx].to(device) for t in targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach() * len(idx)
            seen += len(idx)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}")
        bar.close()
        history.append(float(total_loss) / seen)
        print(
            f"[edvit build] {desc} epoch {epoch + 1}/{config.epochs}: loss {history[-1]:.4f}",
            file=sys.stderr,
        )
    module.eval()
    module.to("cpu")
    return history


@torch.no_grad()
def predict(
    module: nn.Module,
    images: torch.Tensor,
    batch_size: int = 512,
    desc: str | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Run ``module`` over ``images`` in batches on ``device`` (eval mode is the caller's job);
    the module is back on the CPU afterwards."""
    outputs = []
    module.to(device)
    starts = range(0, len(images), batch_size)
    bar = tqdm(starts, desc=desc, file=sys.stderr, leave=False, disable=desc is None)
    for start in bar:
        batch = images[start : start + batch_size].to(device)
        outputs.append(module(batch).cpu().numpy())
    module.to("cpu")
    return np.concatenate(outputs)


def fold_log_probs(
    logits: torch.Tensor, subset: Sequence[int], temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of the sub-task: each class of ``subset``, then 'other'.

    'other' is the total probability of every class outside ``subset`` (a log-sum-exp of
    their log-probabilities); with no class outside, there is no 'other' column.
    """
    log_probs = torch.log_softmax(logits / temperature, dim=1)
    own = log_probs[:, list(subset)]
    rest = [c for c in range(logits.shape[1]) if c not in set(subset)]
    if not rest:
        return own
    other = torch.logsumexp(log_probs[:, rest], dim=1, keepdim=True)
    return torch.cat([own, other], dim=1)


@dataclass(frozen=True)
class Distillation:
    """alpha * CE(sub-task labels) + (1 - alpha) * T^2 * KL(teacher || student), on the
    sub-task's folded probabilities (``fold_log_probs``) of 10-way student/teacher logits."""

    subset: tuple[int, ...]
    alpha: float = 0.5
    temperature: float = 2.0

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        ce = nn.functional.nll_loss(fold_log_probs(logits, self.subset), labels)
        t = self.temperature
        student = fold_log_probs(logits, self.subset, t)
        teacher = fold_log_probs(teacher_logits, self.subset, t)
        kl = nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return self.alpha * ce + (1.0 - self.alpha) * t * t * kl


@dataclass(frozen=True)
class SubtaskCrossEntropy:
    """Cross-entropy of the sub-task labels on folded probabilities (the pruning criterion's
    loss: at the start the student is the teacher, so a distillation loss has no gradient)."""

    subset: tuple[int, ...]

    def __call__(
        self, logits: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        return nn.functional.nll_loss(fold_log_probs(logits, self.subset), batch[1])
