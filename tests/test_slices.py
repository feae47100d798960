"""Stem slices chained equal the whole sub-model, and the node's two strategies give the
same features as running whole sub-models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import tier

torch = pytest.importorskip("torch")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from edvit.bundle import FEATURES_OUTPUT, IMAGE_INPUT, TOKENS_INPUT, TOKENS_OUTPUT  # noqa: E402
from edvit.edge_node.runners import IMAGE_ENTRY, Merged, PerEntry, Request, WholeModels  # noqa: E402
from edvit.inference import make_session  # noqa: E402
from edvit.models.export import export_image_model  # noqa: E402
from edvit.models.prune import full_spec, prune_vit  # noqa: E402
from edvit.models.slices import Embed, export_stem  # noqa: E402
from edvit.models.vit import SubModel  # noqa: E402

K = 2  # shared blocks out of 4


def _vit(seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=32, depth=4,
        num_heads=2, mlp_ratio=2.0, global_pool="token",
    ).eval()  # fmt: skip


def _submodel_sharing_stem(original: VisionTransformer, seed: int, keep_heads: list[list[int]],
                           keep_mlp: int) -> VisionTransformer:  # fmt: skip
    """A sub-model as --shared-blocks builds it: stem identical, later blocks pruned and
    (here) perturbed as fine-tuning would."""
    spec = full_spec(original)
    for b in range(K, len(original.blocks)):
        spec.heads[b] = keep_heads[b - K]
        spec.mlp[b] = list(range(keep_mlp))
    pruned = prune_vit(original, spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in pruned.blocks[K:]:
            for p in block.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return pruned.eval()


@pytest.fixture(scope="module")
@tier("slow")
def sliced(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("slices")
    original = _vit(0)
    subs = {
        "sub0": _submodel_sharing_stem(original, 1, [[0], [1]], 40),
        "sub1": _submodel_sharing_stem(original, 2, [[0, 1], []], 7),
    }
    images = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    spec, diffs = export_stem(original, subs, K, out, images)
    whole = {}
    for sid, vit in subs.items():
        export_image_model(SubModel(vit), out / f"{sid}.onnx", images, features=True)
        whole[sid] = (out / f"{sid}.onnx").read_bytes()
    return out, spec, diffs, whole, images, original


def _run(path: Path, name_in: str, name_out: str, x: np.ndarray) -> np.ndarray:
    return make_session(path).run([name_out], {name_in: x})[0]


def test_chained_slices_equal_the_whole_submodel(sliced) -> None:
    out, spec, diffs, whole, images, _ = sliced
    assert max(diffs.values()) < 1e-4
    tokens = _run(out / spec.embed, IMAGE_INPUT, TOKENS_OUTPUT, images)
    assert tokens.shape[1:] == spec.token_shape
    at_block = [tokens]
    for block in spec.block_files:
        at_block.append(_run(out / block, TOKENS_INPUT, TOKENS_OUTPUT, at_block[-1]))
    for sid, tail in spec.tails.items():
        expected = _run(out / f"{sid}.onnx", IMAGE_INPUT, FEATURES_OUTPUT, images)
        chained = _run(out / tail, TOKENS_INPUT, FEATURES_OUTPUT, at_block[K])
        np.testing.assert_allclose(chained, expected, atol=1e-4)
        for j, from_file in enumerate(spec.from_files):
            via_range = _run(out / from_file, TOKENS_INPUT, TOKENS_OUTPUT, at_block[j])
            np.testing.assert_allclose(
                _run(out / tail, TOKENS_INPUT, FEATURES_OUTPUT, via_range), expected, atol=1e-4
            )


def test_embed_module_matches_timm_forward_features(sliced) -> None:
    *_, images, original = sliced
    x = torch.from_numpy(images)
    with torch.no_grad():
        via_slices = original.norm(original.blocks(Embed(original)(x)))
        np.testing.assert_allclose(
            via_slices.numpy(), original.forward_features(x).numpy(), atol=1e-6
        )


def test_both_strategies_equal_whole_models_on_mixed_entries(sliced) -> None:
    out, spec, _, whole, images, _ = sliced
    blob = lambda rel: (out / rel).read_bytes()  # noqa: E731
    tails = {sid: blob(f) for sid, f in spec.tails.items()}
    per_entry = PerEntry(blob(spec.embed), [blob(f) for f in spec.from_files], tails)
    merged = Merged(blob(spec.embed), [blob(f) for f in spec.block_files], tails)
    reference = WholeModels(whole)(
        [Request(IMAGE_ENTRY, image) for image in images]
    )  # what a node computes for plain frames
    # Camera i sends frames (J=0) or tokens after J=1 or J=2 head slices, interleaved.
    at_block = [_run(out / spec.embed, IMAGE_INPUT, TOKENS_OUTPUT, images)]
    for block in spec.block_files:
        at_block.append(_run(out / block, TOKENS_INPUT, TOKENS_OUTPUT, at_block[-1]))
    requests = []
    for i, image in enumerate(images):
        entry = i % (K + 1)
        requests.append(
            Request(IMAGE_ENTRY, image) if entry == 0 else Request(entry, at_block[entry][i])
        )
    for runner in (per_entry, merged):
        got = runner(requests)
        for sid in whole:
            np.testing.assert_allclose(got[sid], reference[sid], atol=1e-4)
    np.testing.assert_allclose(per_entry(requests)["sub0"], merged(requests)["sub0"], atol=1e-5)
    assert merged.model_bytes < per_entry.model_bytes  # each block loaded once vs K - j times
