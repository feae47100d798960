"""`edvit build`: the ED-ViT pipeline. Train (or load) the original ViT, split its classes over
N devices, prune one class-specific sub-model per subset, fine-tune it with distillation,
place the sub-models on the devices, train the fusion MLP, export everything to ONNX and
write a verified bundle with its report.

Sub-models (``make_submodel``). For a class subset S, the data is every training image (or,
with ``other_ratio``, the images of S plus a sample of the rest); its task is |S| classes +
'other'. A sub-model
keeps the original's 10-way head during training and reads it *folded* to the sub-task
(``train.fold_log_probs``: the classes of S, then 'other' = the sum of the rest), so the
teacher and the student speak the same sub-task with no new head to learn.

1. Branch dropping. The original's heads and MLP neurons are scored on the subset's data
   (first-order Taylor, ``prune.score_units``) with the *sub-task cross-entropy*: at this
   point the student is the teacher, so a distillation loss would have zero gradient. Whole
   attention / MLP branches with the lowest summed scores are removed until
   ``keep_branches`` remain (default ``max(2, floor(2 * branches / N))``, at least one
   attention branch). Why: on the ORT CPU runtime at batch 1 the latency of these small ViTs
   is mostly per-operator overhead (measured: the 'small' preset pruned to 1/10 of its
   parameters but keeping all 12 branches is only 2.3x faster; keeping 4 branches 4.7x), so
   the latency target (original / slowest sub-model >= N/2) needs fewer operators, not only
   fewer parameters.
2. Parameter budget. Then ``prune.iterative_prune`` removes heads and neurons (ranked by
   Taylor score per parameter freed) and embedding channels in ``prune_steps`` geometric
   steps down to ``param_budget`` (default ``floor(0.95 * original_params / N)``: every
   sub-model is at least N times smaller and their sum stays below the original), with
   ``recover_epochs`` of distillation fine-tuning after each step. The embedding keeps
   ``embed_keep_ratio`` of its channels (by N: 1.0 up to 2 devices, 0.75 up to 4, else 0.5),
   narrowed further if the budget cannot be met otherwise.
3. Recovery. Fine-tuning with knowledge distillation from the original:
   ``alpha * CE + (1 - alpha) * T^2 * KL`` on the folded probabilities (``train.Distillation``),
   for ``sub_steps`` optimizer steps (``recover_steps`` after each pruning step) whatever the
   dataset size (default ``default_sub_steps(N)``: 3000 up to N=3, 1200 per device beyond),
   unless ``sub_epochs`` / ``recover_epochs`` fix the epochs.

Placement. Each exported sub-model is an item (ONNX file MB, measured ORT latency at batch 1,
one thread) for ``assignment.assign`` on the inventory (``--devices`` file or N identical
devices). When nothing fits, ``assignment.shrink_budgets`` gives smaller memory budgets; the
sub-models concerned are pruned again from the original to the matching parameter budget
(MB over the sub-model's bytes per parameter) and retrained, up to ``budget_rounds`` times.

Fusion. The MLP over the concatenated features is distilled from the original's logits with
whole sub-model blocks dropped at random (``fusion_drop_prob``), so the fleet still answers
with a node down. Its hidden width is the widest that keeps it at most ``FUSION_SHARE`` of the
largest sub-model (``vit.fusion_hidden_for``): it runs on a board too.

Preprocessing: the dataset's own channels (grey or RGB) and size, normalised with the
per-channel mean and std of the training images, through
``edvit.preprocess.dataset_to_model_input`` exactly as the edge nodes do.

A user's own model (``--model NAME --checkpoint FILE``): the original is timm's registered
``NAME`` with the input size, patch size, channels and classes its checkpoint's tensors say
(``vit.load_timm_checkpoint``); it is never trained or downloaded. Its head must have one
class per dataset class. Preprocessing is then the model's, not the data's: images resized to
its input size, normalised with the mean and std of the name's pretrained config (what timm
fine-tunes with). The rest (pruning budgets, placement, fusion) is read from the model itself.

Untrained (``--model NAME --untrained``): the same pruning, export and placement on random
weights with no training and no image read, for capacity planning (models/build_untrained.py).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from edvit.errors import ConfigError

from .build_data import (
    balanced_subset_indices,
    compute_preprocessing,
    load_data,
    load_original_checkpoint,
    load_user_model,
    make_original,
    model_inputs,
    model_preprocessing,
    original_call,
    train_original,
)
from .build_fusion import fit_fusion, train_fusion
from .build_output import (
    accuracy,
    accuracy_warning,
    batched,
    evaluate_onnx,
    export_original_and_fusion,
    export_stem_slices,
    extract_features,
    prepare_out_dir,
    write_bundle_manifest,
    write_report,
)
from .build_placement import Exports, export_submodels, place_submodels
from .build_settings import (
    DEFAULTS,
    ORIGINAL_WEIGHTS,
    BuildSettings,
    default_settings,
    default_sub_steps,
    epochs_for_steps,
    log,
    split_classes,
    sub_steps_of,
    subset_epochs,
    timed,
    validate,
)
from .build_submodels import branch_spec, feature_params, make_submodels
from .build_untrained import build_untrained_bundle
from .train import predict, resolve_device, set_threads
from .vit import SubModel, count_params

# The build's API: the pipeline and the parts of it that the tests, benchmarks/ and the CLI use.
__all__ = [
    "DEFAULTS",
    "ORIGINAL_WEIGHTS",
    "BuildSettings",
    "accuracy",
    "accuracy_warning",
    "balanced_subset_indices",
    "batched",
    "branch_spec",
    "build_bundle",
    "build_tiny_digits_bundle",
    "compute_preprocessing",
    "default_settings",
    "default_sub_steps",
    "epochs_for_steps",
    "extract_features",
    "feature_params",
    "fit_fusion",
    "load_data",
    "log",
    "model_inputs",
    "model_preprocessing",
    "split_classes",
    "sub_steps_of",
    "subset_epochs",
    "train_original",
]

PARITY_SAMPLES = 64
TINY_DIGITS = dict(
    size="test",
    epochs=15,
    sub_epochs=3,
    recover_epochs=4,
    fusion_epochs=20,
    batch_size=64,
    lr=2e-3,
)


def build_bundle(settings: BuildSettings, out: str | Path, *, force: bool = False) -> dict:
    """Build a bundle into ``out``; returns the report (also written to report.json)."""
    validate(settings)
    try:
        settings = replace(settings, device=resolve_device(settings.device))
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}") from None
    out = Path(out)
    if settings.untrained:
        return build_untrained_bundle(settings, out, force=force)
    started = time.time()
    threads = set_threads(settings.threads)
    user = load_user_model(settings)
    data = load_data(settings, user)
    loaded = user.vit if user is not None else load_original_checkpoint(settings, data)
    prepare_out_dir(out, force)
    log(
        f"{settings.dataset}: {len(data.train)} train and {len(data.test)} test images, "
        f"N={data.num_devices}"
    )
    inputs = model_inputs(data)
    torch.manual_seed(settings.seed)
    timings: dict[str, float] = {}

    # 1. The original ViT on all classes (trained, or the user's checkpoint).
    with timed(timings, "original"):
        original = make_original(settings, data, inputs, loaded, out)
    original_params = count_params(original)
    teacher_logits = torch.from_numpy(
        predict(original, inputs.x_train, desc="teacher logits", device=settings.device)
    )

    # 2. One pruned, distilled sub-model per class subset.
    with timed(timings, "submodels"):
        subs = make_submodels(
            settings, original, original_params, data, inputs, teacher_logits, threads
        )

    # 3. Export the sub-models and place them; shrink and rebuild what does not fit.
    exports = Exports(out=out, sample=inputs.x_test[:PARITY_SAMPLES])
    with timed(timings, "placement"):
        export_submodels(subs, exports)
        rounds = place_submodels(settings, original, subs, data, exports)
    extractors = [SubModel(v) for v in subs.vits]
    stem = export_stem_slices(settings, original, subs, exports)

    # 4. Fusion MLP on the cached features of every training image, blocks dropped at random.
    with timed(timings, "fusion"):
        fusion = train_fusion(
            settings, extractors, subs.ids, inputs.x_train, inputs.y_train, teacher_logits
        )

    # 5. Export the original and the fusion; parity-check on real test inputs.
    export_original_and_fusion(original, fusion, extractors, exports)

    # 6. Manifest.
    files, params, architectures = write_bundle_manifest(
        settings, out, data=data, subs=subs, extractors=extractors, fusion=fusion, stem=stem,
        original_params=original_params,
        original_architecture=original_call(settings, data, user),
    )  # fmt: skip

    # 7. Evaluate the exported files on the full test split, as the fleet would run them.
    with timed(timings, "evaluate"):
        evaluation = evaluate_onnx(settings, out, data.test, inputs.x_test, subs.vits, threads)
    return write_report(
        settings,
        out,
        data=data,
        subs=subs,
        rounds=rounds,
        exports=exports,
        files=files,
        params=params,
        architectures=architectures,
        evaluation=evaluation,
        timings=timings,
        started=started,
        threads=threads,
    )


def build_tiny_digits_bundle(out: str | Path, **overrides: object) -> dict:
    """A small digits bundle in a few seconds, for tests; returns its report."""
    values = {**TINY_DIGITS, **overrides}
    force = bool(values.pop("force", False))
    command = ("edvit", "build", "--dataset", "digits", "--out", str(out))
    settings = default_settings("digits", command=command, **values)
    return build_bundle(settings, out, force=force)
