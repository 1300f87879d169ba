"""``TrainConfig``: one fine-tuning or QAT run, as asked on the command line."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from mf_edge.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; ``output`` receives checkpoints, ``metrics.csv`` and ``metrics.png``."""

    model: str
    data: Path
    output: Path
    weights: str = "random"
    num_classes: int | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    image_size: int | None = None
    device: str | None = None
    amp: bool = False
    qat: bool = False
    target: str | None = None
    resume: Path | None = None
    workers: int = 2
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    ema_decay: float | None = None
    clip_grad: float | None = None
    seed: int = 0
    max_steps_per_epoch: int | None = None
    val_fraction: float = 0.1
    min_crop_scale: float = 0.25
    freeze_observers_after: float = 0.5
    calib_size: int = 256
    stop_after_epochs: int | None = None
    force: bool = False

    def __post_init__(self) -> None:
        checks = (
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}."),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}."),
            (self.lr > 0, f"--lr must be positive, got {self.lr}."),
            (self.workers >= 0, f"--workers must be 0 or more, got {self.workers}."),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}."),
            (0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}."),
            (0 <= self.drop_path < 1, f"--drop-path must be in [0, 1), got {self.drop_path}."),
            (self.ema_decay is None or 0 < self.ema_decay < 1,
             f"--ema-decay must be in (0, 1), got {self.ema_decay}."),
            (self.clip_grad is None or self.clip_grad > 0,
             f"--clip-grad must be positive, got {self.clip_grad}."),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             f"--max-steps-per-epoch must be at least 1, got {self.max_steps_per_epoch}."),
            (0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1), got {self.val_fraction}."),
            (0 < self.min_crop_scale <= 1, f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}."),
            (0 <= self.freeze_observers_after <= 1,
             f"--freeze-observers-after must be a fraction of the training steps in [0, 1], got "
             f"{self.freeze_observers_after}."),
            (self.stop_after_epochs is None or self.stop_after_epochs >= 1,
             f"--stop-after-epochs must be at least 1, got {self.stop_after_epochs}."),
            (self.calib_size >= 1, f"--calib-size must be at least 1, got {self.calib_size}."),
            (not self.qat or self.target is not None,
             "--qat needs --target (the target whose int8 scheme to train for), e.g. --target executorch."),
            (self.target is None or self.qat,
             "--target only applies with --qat; add --qat or drop --target."),
            (not (self.qat and self.ema_decay), "--ema is not supported with --qat (averaging observer "
             "statistics is meaningless); drop --ema."),
            (not (self.qat and self.amp), "--amp is not supported with --qat (fake quantization simulates "
             "int8 from float32); drop --amp."),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def to_dict(self) -> dict:
        """Plain types only, to store inside a checkpoint."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
