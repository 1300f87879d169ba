"""DDP on 2 gloo processes trains what 1 process trains at the same global batch, and a stopped and
resumed 2-process run ends where a straight one ends.

The ranks run under ``python -m torch.distributed.run -m mf_edge.train`` (a separate interpreter: pytest's
importlib mode leaves test modules unimportable for spawned children). Tiny on purpose (PoolFormerV2-S12
at 32 px, 2 epochs of 3 steps, ``--workers 0``): the equivalence does not depend on the size.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mf_edge import create_model
from mf_edge.console import set_quiet
from mf_edge.train import TrainConfig, train
from mf_edge.train.checkpoint import load_checkpoint
from mf_edge.train.data import train_loader

MODEL = "poolformerv2_s12"
SIZE = 32
GLOBAL_BATCH = 16
# EMA, clipping, warmup and label smoothing on: each must see the same steps in both runs
COMMON = {"epochs": 2, "max_steps_per_epoch": 3, "lr": 1e-3, "warmup_epochs": 0.5, "label_smoothing": 0.1,
          "ema_decay": 0.9, "clip_grad": 1.0, "seed": 3}
# fp32 sums in another order (two half-batch gradients all-reduced vs one batch): measured max |diff|
# of a weight after 6 AdamW steps 3.6e-7; another augmentation or sample order moves them far more
ATOL = 1e-5


def cli_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flag = "--ema-decay" if key == "ema_decay" else "--" + key.replace("_", "-")
        flags += [flag, str(value)]
        if key == "ema_decay":
            flags.append("--ema")
    return flags


def torchrun(cifar10_small: Path, output: Path, **options) -> subprocess.CompletedProcess:
    """``mf-edge train`` on 2 gloo CPU processes, ``GLOBAL_BATCH // 2`` images per process and step."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mf_edge.train", MODEL, "--data", str(cifar10_small), "--image-size", str(SIZE),
               "--batch-size", str(GLOBAL_BATCH // 2), "--workers", "0", "--device", "cpu",
               "--weights", "random", "--output", str(output), *cli_flags(options)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    floats = [k for k in a if a[k].is_floating_point()]
    worst = max((float((a[k].double() - b[k].double()).abs().max()), k) for k in floats)
    assert worst[0] <= atol, f"{worst[1]} differs by {worst[0]:.3g} (> {atol})"


@pytest.fixture(scope="module")
def two_processes(cifar10_small: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The straight 2-process run: its output folder and rank 0's stdout."""
    output = tmp_path_factory.mktemp("ddp") / "two"
    return output, torchrun(cifar10_small, output, **COMMON).stdout


def test_two_process_run_writes_one_run(two_processes: tuple[Path, str]) -> None:
    """Only rank 0 reports and writes; the checkpoint records the world size; weights moved."""
    output, stdout = two_processes
    assert stdout.count("best top-1") == 1, stdout
    checkpoint = load_checkpoint(output / "last.pt")
    assert checkpoint["meta"]["world_size"] == 2
    start = create_model(MODEL, num_classes=10, image_size=SIZE, seed=COMMON["seed"]).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in checkpoint["model"].items())
    rows = list(csv.DictReader(open(output / "metrics.csv")))
    assert len(rows) == 2 and all(float(row["train_loss"]) > 0 for row in rows)
    assert not list(output.glob("*.partial"))


def test_two_processes_equal_one_at_the_same_global_batch(two_processes, cifar10_small, tmp_path,
                                                          one_torch_thread) -> None:
    """One process with batch 16 ends with the weights (EMA and raw), losses and accuracies of two
    processes with batch 8 each, to float tolerance.

    Catches anything that makes a run depend on its world size: augmentation drawn from each rank's
    own generator (planted: ``SeededAugmentation.__getitem__`` without its ``fork_rng``/``manual_seed``:
    max |diff| 1.8e-3), contiguous shards instead of the round-robin deal, a gradient sum, not a mean."""
    set_quiet(True)
    one = train(TrainConfig(model=MODEL, data=cifar10_small, output=tmp_path / "one", image_size=SIZE,
                            batch_size=GLOBAL_BATCH, workers=0, device="cpu", **COMMON))
    single, double = load_checkpoint(one.last_checkpoint), load_checkpoint(two_processes[0] / "last.pt")
    assert single["meta"]["world_size"] == 1
    assert_same_weights(single["model"], double["model"], ATOL)
    assert_same_weights(single["train"]["raw_model"], double["train"]["raw_model"], ATOL)
    for a, b in zip(single["train"]["history"], double["train"]["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
        assert a["val_top1"] == b["val_top1"]


def test_two_process_stop_and_resume_equals_a_straight_run(cifar10_small, tmp_path) -> None:
    """2 processes stopped after epoch 1 and resumed (a new torchrun) end bit-identical to 2 processes
    trained straight, with drop path on, so each rank's random generator must come back as its own.

    Catches a resume that loses state across processes (planted: ``restore_rng(states[0])`` on every
    rank in ``_Run._restore``: rank 1 redraws rank 0's drop-path masks, a weight differs by 4.9e-4)."""
    options = {**COMMON, "drop_path": 0.1}
    torchrun(cifar10_small, tmp_path / "straight", **options)
    torchrun(cifar10_small, tmp_path / "resumed", **options, stop_after_epochs=1)
    torchrun(cifar10_small, tmp_path / "resumed", **options, resume=tmp_path / "resumed" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["meta"]["epoch"] == straight["meta"]["epoch"] == 1
    assert_same_weights(straight["model"], resumed["model"], 0.0)
    assert_same_weights(straight["train"]["raw_model"], resumed["train"]["raw_model"], 0.0)
    assert straight["train"]["history"][1]["train_loss"] == resumed["train"]["history"][1]["train_loss"]


def test_a_step_of_two_shards_reads_the_images_of_one_process_step(cifar10_small: Path) -> None:
    """Step 0 of 2 processes x 4 images is step 0 of 1 process x 8, dealt round-robin (rank 0 the even
    places, rank 1 the odd) and augmented identically, in two epochs; an image's augmentation changes
    with the epoch and comes back for the same epoch (the properties the equivalence above rests on).

    Catches a world-size-dependent deal or augmentation (planted: ``SeededAugmentation.__getitem__``
    without its seeding: rank 1's images differ) and an augmentation frozen across epochs (planted: the
    seed without ``self.epoch``)."""
    from mf_edge.models import get_model_info
    from mf_edge.spec import ExportSpec
    from mf_edge.train.data import SeededAugmentation, load_image_data, seed_epoch

    prep = ExportSpec.for_model(get_model_info(MODEL), SIZE).preprocessing
    data = load_image_data(cifar10_small, prep, 0.25, 0.1, seed=0).train
    for epoch in (0, 1):
        loaders = [train_loader(data, 8 // world, 0, rank, world, seed=5) for world in (1, 2)
                   for rank in range(world)]
        for rank, loader in zip((0, 0, 1), loaders, strict=True):
            seed_epoch(loader, 5, epoch, rank)
        (images, labels), *shards = (next(iter(loader)) for loader in loaders)
        for rank, (shard_images, shard_labels) in enumerate(shards):
            assert torch.equal(shard_images, images[rank::2]) and torch.equal(shard_labels, labels[rank::2])
    augmented = SeededAugmentation(data, seed=5)
    first = augmented[0][0]
    augmented.set_epoch(1)
    assert not torch.equal(augmented[0][0], first)
    augmented.set_epoch(0)
    assert torch.equal(augmented[0][0], first)
