"""``mf-edge train``: one epoch lowers the loss, resuming is exact, bad input (2-process DDP:
test_ddp_equivalence.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torchvision import datasets

from mf_edge import create_model
from mf_edge.cli import main
from mf_edge.data import eval_transform
from mf_edge.errors import UserError
from mf_edge.models import get_model_info
from mf_edge.spec import ExportSpec
from mf_edge.train import TrainConfig, train
from mf_edge.train.checkpoint import load_checkpoint

MODEL = "poolformerv2_s12"  # the fastest family to train on CPU
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(data: Path, output: Path, **overrides) -> TrainConfig:
    options = {"model": MODEL, "data": data, "output": output, "image_size": SIZE, "batch_size": 16,
               "epochs": 1, "lr": 5e-4, "warmup_epochs": 0.0, "label_smoothing": 0.0, "workers": 0,
               "device": "cpu"}
    return TrainConfig(**{**options, **overrides})


def mean_loss(model: torch.nn.Module, folder: Path) -> float:
    """Cross-entropy of ``model`` over every image of ``folder`` under the eval transform."""
    prep = ExportSpec.for_model(get_model_info(MODEL), SIZE).preprocessing
    dataset = datasets.ImageFolder(str(folder), transform=eval_transform(prep))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(images), torch.tensor(dataset.targets)))


def test_one_epoch_lowers_the_loss(cifar10_small: Path, tmp_path: Path) -> None:
    before = mean_loss(create_model(MODEL, num_classes=10, image_size=SIZE), cifar10_small / "train")
    result = train(config(cifar10_small, tmp_path))
    trained = create_model(MODEL, weights=result.best_checkpoint, num_classes=10, image_size=SIZE)
    after = mean_loss(trained, cifar10_small / "train")
    assert after < before - 0.1, (before, after)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1"]
    assert 0 <= float(rows[0]["val_top1"]) <= 100
    assert (tmp_path / "metrics.png").stat().st_size > 1000


def test_resume_continues_exactly(cifar10_small: Path, tmp_path: Path) -> None:
    common = {"epochs": 2, "max_steps_per_epoch": 3, "ema_decay": 0.9, "workers": 1, "warmup_epochs": 0.5,
              "label_smoothing": 0.1, "drop_path": 0.1, "clip_grad": 1.0}
    train(config(cifar10_small, tmp_path / "straight", **common))
    train(config(cifar10_small, tmp_path / "resumed", **common, stop_after_epochs=1))
    train(config(cifar10_small, tmp_path / "resumed", **common, resume=tmp_path / "resumed" / "last.pt"))
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["meta"]["epoch"] == straight["meta"]["epoch"] == 1
    for section in ("model", "raw_model"):
        a = straight["model"] if section == "model" else straight["train"][section]
        b = resumed["model"] if section == "model" else resumed["train"][section]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{section}.{key} differs after resuming"
    assert straight["train"]["history"][1]["train_loss"] == resumed["train"]["history"][1]["train_loss"]
    steps = [run["train"]["optimizer"]["state"][0]["step"] for run in (straight, resumed)]
    assert steps[0] == steps[1] == 6


def make_folder(root: Path, source: Path, classes: list[str], count: int = 2) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for image in sorted((source / name).iterdir())[:count]:
            (root / name / image.name).symlink_to(image.resolve())
    return root


def test_data_without_class_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", MODEL, "--data", str(tmp_path / "images"), "--image-size", "32", "--device", "cpu",
              "--weights", "random", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "one sub-folder of images per class" in error
    assert "Traceback" not in error


def test_classes_differ_between_train_and_val(cifar10_small: Path, tmp_path: Path) -> None:
    make_folder(tmp_path / "data" / "train", cifar10_small / "train", ["cat", "dog", "ship"])
    make_folder(tmp_path / "data" / "val", cifar10_small / "val", ["cat", "dog", "truck"])
    with pytest.raises(UserError, match=r"only in train: \['ship'\]; only in val: \['truck'\]"):
        train(config(tmp_path / "data", tmp_path / "out"))


def test_num_classes_must_match_the_data(cifar10_small: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--num-classes 5 does not match the 10 class folders"):
        train(config(cifar10_small, tmp_path, num_classes=5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU, so --device cuda is valid")
def test_cuda_without_gpu(cifar10_small: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        train(config(cifar10_small, tmp_path, device="cuda"))


def test_resume_refuses_another_model(cifar10_small: Path, tmp_path: Path) -> None:
    train(config(cifar10_small, tmp_path / "a", max_steps_per_epoch=1))
    with pytest.raises(UserError, match="was written for model='poolformerv2_s12'"):
        train(config(cifar10_small, tmp_path / "b", model="identityformer_s12",
                     resume=tmp_path / "a" / "last.pt"))


def test_single_folder_is_split_with_a_seed(cifar10_small: Path, tmp_path: Path) -> None:
    from mf_edge.train.data import load_image_data

    prep = ExportSpec.for_model(get_model_info(MODEL), SIZE).preprocessing
    first = load_image_data(cifar10_small / "train", prep, 0.25, 0.2, seed=3)
    again = load_image_data(cifar10_small / "train", prep, 0.25, 0.2, seed=3)
    assert len(first.val) == 40 and len(first.train) == 160
    assert first.val.indices == again.val.indices
    assert not set(first.val.indices) & set(first.train.indices)
