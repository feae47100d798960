"""The fusion MLP over the sub-models' features, distilled from the original's logits with
whole sub-model blocks dropped at random, so the fleet still answers with a node down."""

from __future__ import annotations

import numpy as np
import torch

from .build_settings import BuildSettings, log, train_config
from .build_submodels import feature_params
from .train import Distillation, fit, predict
from .vit import FusionMLP, SubModel, count_params, fusion_hidden_for

FUSION_SHARE = 0.5  # default fusion: at most this share of the largest sub-model's params


def train_fusion(
    settings: BuildSettings,
    submodels: list[SubModel],
    ids: list[str],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    teacher_logits: torch.Tensor,
) -> FusionMLP:
    """The fusion MLP over every sub-model's features of the training images, distilled from
    the original's logits like the sub-models (on the sub-models' own training images the
    hard labels are too easy to fit: the teacher's soft targets say which classes look
    alike)."""
    num_classes = int(teacher_logits.shape[1])
    features = np.concatenate(
        [
            predict(s, x_train, desc=f"{sid} features", device=settings.device)
            for s, sid in zip(submodels, ids, strict=True)
        ],
        axis=1,
    )
    dims = tuple(s.feature_dim for s in submodels)
    hidden = fusion_width(settings, submodels, num_classes)
    return fit_fusion(settings, features, dims, hidden, y_train, teacher_logits)


def fusion_width(settings: BuildSettings, submodels: list[SubModel], num_classes: int) -> int:
    """--fusion-hidden, else the widest hidden layer within ``FUSION_SHARE`` of the largest
    sub-model."""
    dims = tuple(s.feature_dim for s in submodels)
    largest = max(feature_params(s.vit) for s in submodels)
    return settings.fusion_hidden or fusion_hidden_for(
        dims, num_classes, int(FUSION_SHARE * largest)
    )


def fit_fusion(
    settings: BuildSettings,
    features: np.ndarray,
    dims: tuple[int, ...],
    hidden: int,
    y_train: torch.Tensor,
    teacher_logits: torch.Tensor,
) -> FusionMLP:
    """A ``hidden``-wide fusion MLP trained on the sub-models' concatenated ``features`` (of
    widths ``dims``) of the training images, distilled from the original's logits."""
    num_classes = int(teacher_logits.shape[1])
    # Seeded here, not by what trained before: a build with --jobs trained its sub-models in
    # other processes, and the fusion must start from the same weights either way.
    config = train_config(settings, settings.fusion_epochs, settings.fusion_lr, 100)
    torch.manual_seed(config.seed)
    fusion = FusionMLP(
        dims,
        num_classes,
        hidden,
        drop_prob=settings.fusion_drop_prob if len(dims) > 1 else 0.0,
    )
    present = torch.ones(len(features), len(dims))
    log(f"training the fusion MLP ({count_params(fusion)} params, {settings.fusion_epochs} epochs)")
    criterion = Distillation(tuple(range(num_classes)), settings.kd_alpha, settings.kd_temperature)
    fit(fusion, fusion, [torch.from_numpy(features), present], y_train, config, "fusion",
        criterion=criterion, targets=[teacher_logits])  # fmt: skip
    return fusion.eval()
