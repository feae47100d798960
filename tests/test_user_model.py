"""A user's own timm ViT: `edvit build --model NAME --checkpoint FILE --dataset imagefolder`.

The model is timm's registered `test_vit` (6 blocks, 64 wide: the tiny ViT timm ships for its
own tests) fine-tuned here for a few seconds on a generated folder of 40x40 images at its own
input size (32, patch 8, 3 classes); the build must read that from the checkpoint, resize and
normalise as the model expects, and make a bundle that prunes, places and fuses like a preset's.
The error cases fail in one line, before any output, and train nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import tier

pytest.importorskip("torch")
timm = pytest.importorskip("timm")
cv2 = pytest.importorskip("cv2")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from edvit.bundle import Bundle  # noqa: E402
from edvit.cli import main  # noqa: E402
from edvit.datasets import Dataset, load_dataset  # noqa: E402
from edvit.inference import FeatureExtractor  # noqa: E402
from edvit.models.build import ORIGINAL_WEIGHTS, branch_spec, model_preprocessing  # noqa: E402
from edvit.models.prune import count_params_after, prune_vit, score_units, select_units  # noqa: E402
from edvit.models.vit import SubModel, count_params, load_timm_checkpoint  # noqa: E402
from edvit.preprocess import dataset_to_model_input  # noqa: E402
from edvit.schemas import Preprocessing  # noqa: E402

NAME = "test_vit"
CLASSES = ("circles", "squares", "stripes")  # sorted: imagefolder labels by name
SIDE = 40  # the images; the model's input is IMG_SIZE, so the build must resize
IMG_SIZE = 32
PATCH = 8
TRAIN_PER_CLASS = 24
TEST_PER_CLASS = 12
# test_vit's pretrained config (timm's default_cfg for the name): what it is fine-tuned with.
MEAN = STD = (0.5, 0.5, 0.5)


def draw(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 40x40 BGR image, one clearly different pattern and colour per class, jittered."""
    image = rng.integers(0, 40, size=(SIDE, SIDE, 3), dtype=np.uint8)
    colour = [(0, 0, 255), (0, 200, 0), (255, 80, 0)][label]
    offset = int(rng.integers(0, 6))
    if label == 0:
        cv2.circle(image, (20 + offset - 3, 20), 8 + offset, colour, thickness=3)
    elif label == 1:
        for y in range(offset, SIDE, 8):
            cv2.line(image, (0, y), (SIDE - 1, y), colour, thickness=3)
    else:
        cv2.rectangle(image, (6 + offset, 6), (30 + offset, 30), colour, thickness=-1)
    return image


def make_image_folder(root: Path, classes: tuple[str, ...] = CLASSES) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png."""
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                cv2.imwrite(str(folder / f"{i:03d}.png"), draw(label % 3, rng))
    return root


def model_pp() -> Preprocessing:
    return Preprocessing(
        channels=3, height=IMG_SIZE, width=IMG_SIZE, mean=MEAN, std=STD, interpolation="area"
    )


def save_checkpoint(path: Path, folder: Path | None = None, **kwargs: object) -> Path:
    """A ``test_vit`` at the user's input size and classes, fine-tuned on ``folder``'s train
    images for a few seconds when given (else random), saved as timm's train.py does."""
    torch.manual_seed(0)
    options = {"img_size": IMG_SIZE, "patch_size": PATCH, "num_classes": len(CLASSES), **kwargs}
    name = str(options.pop("name", NAME))
    vit = timm.create_model(name, pretrained=False, **options)
    if folder is not None:
        train = load_dataset("imagefolder", "train", folder)
        x = torch.from_numpy(dataset_to_model_input(train.images, model_pp()))
        y = torch.from_numpy(train.labels)
        optimiser = torch.optim.AdamW(vit.parameters(), lr=1e-3)
        vit.train()
        for _ in range(40):
            loss = F.cross_entropy(vit(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    torch.save({"state_dict": vit.state_dict(), "arch": name}, path)
    return path


def build_argv(folder: Path, checkpoint: Path | None, out: Path, *extra: str) -> list[str]:
    argv = ["build", "--dataset", "imagefolder", "--data-dir", str(folder), "--out", str(out)]
    argv += ["--num-devices", "2", "--model", NAME, *extra]
    return argv + (["--checkpoint", str(checkpoint)] if checkpoint else [])


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `edvit ARGV`; it must exit 2 with one line on stderr, which is returned."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("edvit build: error: ")
    return lines[0]


# --- the build ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
@tier("slow")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict]:
    root = tmp_path_factory.mktemp("user-model")
    folder = make_image_folder(root / "images")
    checkpoint = save_checkpoint(root / "finetuned.pth.tar", folder)
    out = root / "bundle"
    fast = ("--sub-epochs", "1", "--recover-epochs", "4", "--fusion-epochs", "2",
            "--batch-size", "16", "--prune-steps", "1", "--threads", "1")  # fmt: skip
    assert main(build_argv(folder, checkpoint, out, *fast)) == 0
    return folder, checkpoint, out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_a_user_timm_vit_builds_a_bundle(built: tuple[Path, Path, Path, dict]) -> None:
    folder, checkpoint, out, report = built
    bundle = Bundle.load(out)  # verifies every file's hash
    m = bundle.manifest
    assert m.class_names == CLASSES
    assert m.input_shape == (3, IMG_SIZE, IMG_SIZE)
    assert m.original.source == str(checkpoint)
    assert m.original.architecture == (
        f"timm.create_model('{NAME}', img_size={IMG_SIZE}, patch_size={PATCH}, in_chans=3, "
        f"num_classes={len(CLASSES)}, dynamic_img_size=False)"
    )
    assert ("--model", NAME) in zip(m.command, m.command[1:], strict=False)

    params = report["params"]
    assert all(p < params["original"] for p in params["submodels"].values())
    assert sum(params["submodels"].values()) < params["original"]

    # The nodes' path: the manifest's preprocessing on the 40x40 files, then each ONNX file.
    test = load_dataset("imagefolder", "test", folder)
    x = dataset_to_model_input(test.images, m.preprocessing)
    assert x.shape == (len(test), 3, IMG_SIZE, IMG_SIZE)
    for spec in m.submodels:
        features = FeatureExtractor(bundle.path(spec.file), threads=1)(x[:8])
        assert features.shape == (8, spec.feature_dim)
        assert np.isfinite(features).all()
    # The fine-tuned original learnt the (easy) classes; the fused sub-models keep most of it.
    assert report["accuracy"]["original"] > 0.8
    assert report["accuracy"]["fused"] > 1 / len(CLASSES) + 0.2


@pytest.mark.slow
def test_the_preprocessing_is_the_models_not_the_datas(
    built: tuple[Path, Path, Path, dict],
) -> None:
    pp = Bundle.load(built[2]).manifest.preprocessing
    assert (pp.channels, pp.height, pp.width) == (3, IMG_SIZE, IMG_SIZE)
    assert pp.mean == MEAN and pp.std == STD
    assert pp.interpolation == "area"  # 40 -> 32: shrinking


@pytest.mark.slow
def test_the_saved_original_is_a_checkpoint_for_the_same_model(
    built: tuple[Path, Path, Path, dict],
) -> None:
    _, checkpoint, out, _ = built
    again = load_timm_checkpoint(out / ORIGINAL_WEIGHTS, NAME)
    first = load_timm_checkpoint(checkpoint, NAME)
    assert again.architecture == Bundle.load(out).manifest.original.architecture
    for key, tensor in first.vit.state_dict().items():
        assert torch.equal(tensor, again.vit.state_dict()[key]), key


def test_a_grey_model_at_another_size_sets_the_preprocessing(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tmp_path / "grey.pt", in_chans=1, img_size=48)
    model = load_timm_checkpoint(checkpoint, NAME)
    assert model.kwargs == dict(
        img_size=48, patch_size=PATCH, in_chans=1, num_classes=3, dynamic_img_size=False
    )
    images = np.zeros((2, SIDE, SIDE, 3), np.uint8)
    data = Dataset("imagefolder", "train", images, np.zeros(2, np.int64), CLASSES)
    pp = model_preprocessing(model, data)
    assert (pp.channels, pp.height, pp.width, pp.interpolation) == (1, 48, 48, "linear")
    assert pp.mean == (0.5,) and pp.std == (0.5,)  # the RGB config's, one grey channel
    assert dataset_to_model_input(images, pp).shape == (2, 1, 48, 48)


@pytest.mark.parametrize("name", ["test_vit", "test_vit2", "test_vit4"])
def test_timms_tiny_vits_prune_to_the_counted_size(name: str) -> None:
    """Token and average pooling, LayerNorm and RmsNorm, layer scale: what pruning touches."""
    torch.manual_seed(0)
    vit = timm.create_model(name, img_size=IMG_SIZE, patch_size=PATCH, num_classes=3).eval()
    x, y = torch.randn(8, 3, IMG_SIZE, IMG_SIZE), torch.randint(0, 3, (8,))

    def loss(logits: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits, batch[1])

    importance = score_units(vit, [(x, y)], loss)
    branches = branch_spec(vit, importance.heads, importance.mlp, keep=4)
    spec = select_units(
        importance, vit, param_budget=count_params(vit) // 3, embed_keep_ratio=0.75, min_embed=8
    )
    for kept in (branches, spec):
        pruned = prune_vit(vit, kept)
        assert count_params(pruned) == count_params_after(vit, kept)
        assert SubModel(pruned)(x).shape == (8, pruned.num_features)


# --- one-line errors, before any output ---------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "random.pt")


def test_a_checkpoint_of_another_model_names_the_tensor(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = save_checkpoint(tmp_path / "wider.pt", embed_dim=32, num_heads=2)
    out = tmp_path / "bundle"
    line = one_line_error(build_argv(folder, other, out), capsys)
    assert f"checkpoint {other} does not match timm model '{NAME}'" in line
    assert "cls_token is [1, 1, 32] in the checkpoint but [1, 1, 64] in the model" in line
    assert not out.exists()


def test_an_unknown_name_lists_close_ones(
    tmp_path: Path, folder: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = build_argv(folder, checkpoint, tmp_path / "b")
    argv[argv.index(NAME)] = "test_vitt"
    line = one_line_error(argv, capsys)
    assert "--model 'test_vitt' is not a timm model" in line
    assert "close names: test_vit" in line


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet18", "is a timm ResNet; edvit prunes plain timm VisionTransformer"),
        ("deit_tiny_distilled_patch16_224", "is a timm VisionTransformerDistilled"),
    ],
)
def test_a_model_that_is_not_a_plain_vit_is_refused(
    tmp_path: Path,
    folder: Path,
    checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    message: str,
) -> None:
    argv = build_argv(folder, checkpoint, tmp_path / "b")
    argv[argv.index(NAME)] = name
    assert message in one_line_error(argv, capsys)


def test_a_vit_pruning_cannot_handle_is_refused(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pooled = save_checkpoint(tmp_path / "map.pt", name="test_vit3")  # attention-pool head
    argv = build_argv(folder, pooled, tmp_path / "b")
    argv[argv.index(NAME)] = "test_vit3"
    line = one_line_error(argv, capsys)
    assert "--model test_vit3: edvit cannot prune it: attention pooling" in line


def test_model_needs_a_checkpoint_and_excludes_size(
    tmp_path: Path, folder: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_line_error(build_argv(folder, None, tmp_path / "b"), capsys)
    assert f"--model {NAME} needs --checkpoint" in line and "does not download" in line
    line = one_line_error(build_argv(folder, checkpoint, tmp_path / "b", "--size", "small"), capsys)
    assert "--model and --size exclude each other" in line


def test_the_class_count_must_match_the_head(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    four = make_image_folder(tmp_path / "four", (*CLASSES, "triangles"))
    line = one_line_error(build_argv(four, checkpoint, tmp_path / "b"), capsys)
    assert "has a 3-class head but --data-dir" in line and "has 4 class folders" in line


def test_an_empty_class_folder_is_named(
    tmp_path: Path, folder: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = folder / "train" / "zebras"
    empty.mkdir()
    line = one_line_error(build_argv(folder, checkpoint, tmp_path / "b"), capsys)
    assert f"class folder {empty} holds no images" in line


def test_an_unreadable_image_is_named(
    tmp_path: Path, folder: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = folder / "train" / "stripes" / "x.png"
    broken.write_bytes(b"\x00garbage, not a png\xff" * 8)
    line = one_line_error(build_argv(folder, checkpoint, tmp_path / "b"), capsys)
    assert f"{broken}: OpenCV cannot read this image" in line
