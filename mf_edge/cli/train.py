"""``mf-edge train``: fine-tune a zoo model on an image folder, or train it quantization-aware (``--qat``)."""

from __future__ import annotations

from pathlib import Path

import typer

from mf_edge.cli import app


@app.command("train")
def train_command(
    model: str = typer.Argument(..., help="Zoo model name, e.g. convformer_s18 (see `mf-edge models`)."),
    data: Path = typer.Option(..., "--data", help="ImageFolder root with train/ and val/ (or test/), or one "
                              "folder of class sub-folders to split."),
    weights: str = typer.Option("imagenet", help="imagenet (default, as in every command), random or a "
                                "checkpoint path to start from."),
    num_classes: int = typer.Option(None, help="Number of classes (default: the data's class folders)."),
    epochs: int = typer.Option(10, help="Epochs to train."),
    batch_size: int = typer.Option(64, help="Batch size per process."),
    lr: float = typer.Option(5e-4, help="Peak AdamW learning rate."),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay (not applied to norms and biases)."),
    image_size: int = typer.Option(None, help="Training and validation image size (default: the model's)."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision on CUDA (bf16, else fp16 + scaling)."),
    qat: bool = typer.Option(False, "--qat", help="Quantization-aware training for --target's int8 scheme."),
    target: str = typer.Option(None, help="With --qat: the deployment target (executorch, onnx, ...)."),
    output: Path = typer.Option(None, help="Output folder (default ./mf-edge-out/<model>-train[-qat-T])."),
    resume: Path = typer.Option(None, help="Continue from the last.pt of an earlier run."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier run in --output (only a folder "
                               "mf-edge train wrote, or an empty one)."),
    workers: int = typer.Option(2, help="DataLoader worker processes per training process."),
    warmup_epochs: float = typer.Option(1.0, help="Linear learning-rate warm-up, in epochs."),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing of the training loss."),
    drop_path: float = typer.Option(0.0, help="Stochastic depth rate (float training only)."),
    ema: bool = typer.Option(False, "--ema", help="Validate and save an exponential moving average."),
    ema_decay: float = typer.Option(0.999, help="EMA decay per step (with --ema)."),
    clip_grad: float = typer.Option(None, help="Clip the gradient norm to this value."),
    seed: int = typer.Option(0, help="Seed of the initialisation, split, shuffling and augmentation."),
    max_steps_per_epoch: int = typer.Option(None, help="Stop each epoch after this many steps (quick runs)."),
    val_fraction: float = typer.Option(0.1, help="Validation share when --data has no val/ folder."),
    freeze_observers_after: float = typer.Option(0.5, help="With --qat: fraction of the training steps after "
                                                 "which observers and batch statistics are frozen."),
    calib_size: int = typer.Option(256, help="With --qat: training images PTQ calibrates on before QAT."),
    stop_after_epochs: int = typer.Option(None, help="End this invocation after N epochs (the schedule still "
                                          "spans --epochs); continue later with --resume."),
) -> None:
    """Fine-tune MODEL on an image folder; with --qat --target T, train it quantization-aware for T's int8.

    Writes last.pt (every epoch, for --resume), best.pt, metrics.csv and metrics.png to --output.
    Run under `torchrun --nproc_per_node=N` for DistributedDataParallel.

    Example: mf-edge train convformer_s18 --data ~/data/flowers --epochs 30 --lr 1e-4
    """
    from mf_edge.train import TrainConfig, train

    suffix = f"-qat-{target}" if qat and target else ""
    config = TrainConfig(
        model=model, data=data, output=output or Path("mf-edge-out") / f"{model}-train{suffix}",
        weights=weights, num_classes=num_classes, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay,
        image_size=image_size, device=device, amp=amp, qat=qat, target=target, resume=resume, workers=workers,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, drop_path=drop_path,
        ema_decay=ema_decay if ema else None, clip_grad=clip_grad, seed=seed,
        max_steps_per_epoch=max_steps_per_epoch, val_fraction=val_fraction,
        freeze_observers_after=freeze_observers_after, calib_size=calib_size,
        stop_after_epochs=stop_after_epochs, force=force,
    )
    result = train(config)
    if result.main_process:
        typer.echo(f"best top-1 {result.best_top1:.2f}%; checkpoints in {result.output}")
