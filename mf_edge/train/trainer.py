"""``train``: float fine-tuning or QAT of one zoo model, alone or under ``torchrun``, resumable."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mf_edge.checkpoint_facts import trained_defaults
from mf_edge.console import note
from mf_edge.errors import UserError
from mf_edge.models import create_model, get_model_info
from mf_edge.publish import check_replaceable, remove_stale
from mf_edge.spec import ExportSpec
from mf_edge.train import distributed, qat
from mf_edge.train.checkpoint import (
    BEST,
    LAST,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    seed_everything,
)
from mf_edge.train.config import TrainConfig
from mf_edge.train.data import ImageData, load_image_data, seed_epoch, train_loader, val_loader
from mf_edge.train.loop import (
    EpochStats,
    describe_precision,
    evaluate,
    mixed_precision,
    steps_in_epoch,
    train_one_epoch,
)
from mf_edge.train.metrics import plot, write_csv
from mf_edge.train.optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    """Where the run wrote its files and how well it did (top-1 %, on the validation split)."""

    output: Path
    best_top1: float
    last_checkpoint: Path
    best_checkpoint: Path
    history: list[dict] = field(default_factory=list)
    main_process: bool = True


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune (or, with ``config.qat``, quantization-aware train) ``config.model`` on ``config.data``."""
    context = distributed.setup(config.device)
    try:
        return _Run(config, context).fit()
    finally:
        distributed.teardown(context)


class _Run:
    """The state of one run; ``fit`` is the epoch loop."""

    def __init__(self, config: TrainConfig, context: distributed.Distributed) -> None:
        self.config, self.context = config, context
        seed_everything(config.seed * 1_000 + context.rank)
        info = get_model_info(config.model)
        resume = load_resume(config.resume) if config.resume else None
        # a training checkpoint given as --weights sets the default image size (also when resuming)
        image_size, _ = trained_defaults(info.name, config.weights, config.image_size, None)
        self.spec = ExportSpec.for_model(info, image_size, batch_size=config.batch_size)
        self.data = load_image_data(config.data, self.spec.preprocessing, config.min_crop_scale,
                                    config.val_fraction, config.seed)
        self.num_classes = self._check_classes(self.data)
        if resume:
            self._check_resume_matches(resume)
            check_schedule(resume, config.resume, config.epochs)
        prepare_output(config, context.is_main)  # after every check: --force replaces only for a real run
        self.train_loader = train_loader(self.data.train, config.batch_size, config.workers, context.rank,
                                         context.world_size, config.seed)
        self.val_loader = val_loader(self.data.val, config.batch_size, config.workers, context.rank,
                                     context.world_size)
        self.steps = steps_in_epoch(self.train_loader, config.max_steps_per_epoch)
        self.model = self._build_model(resume)
        device_ids = [context.device] if context.device.type == "cuda" else None
        self.net = DistributedDataParallel(self.model, device_ids) if context.enabled else self.model
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, config.epochs * self.steps,
                                         round(config.warmup_epochs * self.steps))
        self.precision = mixed_precision(context.device, config.amp)
        if context.is_main and config.amp:
            note(describe_precision(self.precision, context.device))
        self.ema = None
        if config.ema_decay:
            averaging = get_ema_multi_avg_fn(config.ema_decay)
            self.ema = AveragedModel(self.model, multi_avg_fn=averaging, use_buffers=True)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()
        self.output = Path(config.output)
        self.history: list[dict] = []
        self.best_top1 = float("-inf")
        self.start_epoch = 0
        if resume:
            self._restore(resume)

    # --- setup -------------------------------------------------------------------------------
    def _check_classes(self, data: ImageData) -> int:
        found = len(data.classes)
        if self.config.num_classes is not None and self.config.num_classes != found:
            raise UserError(f"--num-classes {self.config.num_classes} does not match the {found} class "
                            f"folders of {self.config.data}; drop --num-classes or fix the data folder.")
        if found < 2:
            raise UserError(f"{self.config.data} has {found} class folder; classification needs at least 2.")
        return found

    def _check_resume_matches(self, resume: dict) -> None:
        meta, config = resume["meta"], self.config
        asked = {"model": config.model, "classes": self.data.classes, "image_size": self.spec.image_size,
                 "qat_target": config.target if config.qat else None}
        for key, value in asked.items():
            if meta.get(key) != value:
                raise UserError(f"--resume {config.resume} was written for {key}={meta.get(key)!r}, not "
                                f"{value!r}; resume with the same model, data, image size and QAT target.")

    def _build_model(self, resume: dict | None) -> nn.Module:
        config = self.config
        weights = "random" if resume else config.weights
        drop_path = 0.0 if config.qat else config.drop_path
        if config.qat and config.drop_path:
            note("--drop-path is ignored with --qat: the quantized graph is captured in eval form")
        model = create_model(config.model, weights=weights, num_classes=self.num_classes,
                             image_size=self.spec.image_size, seed=config.seed, drop_path_rate=drop_path)
        self.float_source = dict(model.mf_edge_weights)
        if resume:  # the weights this run started from; the training state itself is restored later
            model.load_state_dict(resume["model"])
            self.float_source = resume["meta"]["weights"]
        if config.qat:
            calibration = None if resume else self.data.calibration_images(config.calib_size, config.seed)
            self.qat = qat.QATModel.prepare(model, config.target, self.spec, calibration)
            return self.qat.module.to(self.context.device)
        self.qat = None
        return model.to(self.context.device)

    def _restore(self, resume: dict) -> None:
        state = resume["train"]
        if self.qat:
            self.qat.load_state(resume["qat"])
        else:
            self.model.load_state_dict(state.get("raw_model") or resume["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(resume["model"])
            self.ema.n_averaged.fill_(state["ema_n_averaged"])
        self.history = list(state["history"])
        self.best_top1 = resume["meta"]["best_top1"]
        self.start_epoch = resume["meta"]["epoch"] + 1
        states = state["rng"]  # one per process of the run that wrote it
        restore_rng(states[self.context.rank] if len(states) == self.context.world_size else states[0])
        note(f"resumed from {self.config.resume} after epoch {self.start_epoch}")

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        config, context = self.config, self.context
        if context.is_main:
            note(f"{config.model} on {self.data.source}: {len(self.data.train)} train / "
                 f"{len(self.data.val)} val images, {self.num_classes} classes, {self.steps} steps per epoch "
                 f"on {context.world_size} process(es) ({context.device})")
        end = config.epochs
        if config.stop_after_epochs:
            end = min(end, self.start_epoch + config.stop_after_epochs)
        for epoch in range(self.start_epoch, end):
            started = time.perf_counter()
            seed_epoch(self.train_loader, config.seed, epoch, context.rank)
            label = f"epoch {epoch + 1}/{config.epochs}"
            lr = self.optimizer.param_groups[0]["lr"]
            trained = train_one_epoch(self.net, self.train_loader, self.optimizer, self.scheduler,
                                      self.criterion, context, self.precision, config.clip_grad, self.ema,
                                      config.max_steps_per_epoch, f"{label} train",
                                      before_step=lambda step, e=epoch: self._before_step(e, step))
            distributed.check_replicas_in_sync(self.model, context)
            validated = self._validate(f"{label} val")
            self._record(epoch, self._phase(), lr, trained, validated, time.perf_counter() - started)
        distributed.barrier(context)
        return TrainResult(self.output, self.best_top1, self.output / LAST, self.output / BEST, self.history,
                           context.is_main)

    def _before_step(self, epoch: int, step: int) -> None:
        """QAT: freeze observers once ``--freeze-observers-after`` of all training steps are done."""
        if not self.qat or self.qat.frozen:
            return
        done = epoch * self.steps + step
        if done >= round(self.config.freeze_observers_after * self.config.epochs * self.steps):
            self.qat.freeze()
            if self.context.is_main:
                note(f"epoch {epoch + 1}, step {step + 1}: observers and batch statistics frozen")

    def _phase(self) -> str:
        """What the epoch ended as: ``float``, ``qat`` (observers adapting) or ``qat-frozen``."""
        if not self.qat:
            return "float"
        return "qat-frozen" if self.qat.frozen else "qat"

    def _validate(self, description: str) -> EpochStats:
        evaluated = self.ema.module if self.ema is not None else self.net
        if self.qat:
            with qat.observers_paused(self.model):
                return evaluate(evaluated, self.val_loader, self.eval_criterion, self.context, self.precision,
                                description)
        return evaluate(evaluated, self.val_loader, self.eval_criterion, self.context, self.precision,
                        description)

    def _record(self, epoch: int, phase: str, lr: float, trained: EpochStats, validated: EpochStats,
                seconds: float) -> None:
        row = {"epoch": epoch + 1, "phase": phase, "lr": lr, "train_loss": round(trained.loss, 6),
               "val_loss": round(validated.loss, 6), "val_top1": round(validated.top1, 3),
               "val_top5": round(validated.top5, 3), "seconds": round(seconds, 2)}
        self.history.append(row)
        improved = validated.top1 > self.best_top1
        self.best_top1 = max(self.best_top1, validated.top1)
        rng = distributed.gather(capture_rng(), self.context)  # every process's generators, for --resume
        if self.context.is_main:
            note(f"epoch {epoch + 1}: train loss {trained.loss:.4f}, val loss {validated.loss:.4f}, "
                 f"top-1 {validated.top1:.2f}%, top-5 {validated.top5:.2f}%")
            self._save(epoch, validated, improved, rng)
        distributed.barrier(self.context)

    # --- files -------------------------------------------------------------------------------
    def _save(self, epoch: int, validated: EpochStats, improved: bool, rng: list[dict]) -> None:
        config = self.config
        meta = {"model": config.model, "classes": self.data.classes, "num_classes": self.num_classes,
                "image_size": self.spec.image_size, "epoch": epoch, "val_top1": validated.top1,
                "best_top1": self.best_top1, "qat_target": config.target if config.qat else None,
                "weights": {k: v for k, v in self.float_source.items() if v is not None},
                "world_size": self.context.world_size}
        deploy = self.ema.module if self.ema is not None else self.model
        deployable = {"model": _cpu_state(self.qat.float_state() if self.qat else deploy.state_dict()),
                      "qat": self.qat.section() if self.qat else None, "meta": meta}
        train_state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            "raw_model": _cpu_state(self.model.state_dict()) if self.ema is not None else None,
            "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else 0,
            "history": self.history, "rng": rng, "config": config.to_dict(),
        }
        save_checkpoint({**deployable, "train": train_state}, self.output / LAST)
        if improved:
            save_checkpoint(deployable, self.output / BEST)
        write_csv(self.history, self.output / "metrics.csv")
        kind = f"QAT for {config.target}" if config.qat else "float fine-tuning"
        plot(self.history, self.output / "metrics.png", f"{config.model} ({kind})")


def load_resume(path: Path) -> dict:
    """The checkpoint ``--resume`` names, if it holds a training state to continue (else ``UserError``)."""
    resume = load_checkpoint(path)
    path = Path(path)
    if not isinstance(resume.get("train"), dict):
        raise UserError(f"{path} holds no training state ({BEST} keeps only the weights to deploy); resume "
                        f"from {path.with_name(LAST)}, or start from these weights with --weights {path}.")
    return resume


def check_schedule(resume: dict, path: Path, epochs: int) -> None:
    """Refuse to resume a run that ``epochs`` leaves nothing to train, or whose schedule it cuts short."""
    done = resume["meta"]["epoch"] + 1
    planned = resume["train"].get("config", {}).get("epochs", epochs)
    if done >= epochs:
        raise UserError(f"--resume {path} has already trained {done} epoch(s) and --epochs is {epochs}: "
                        f"nothing is left to train; pass --epochs above {done} to train longer, or --weights "
                        f"{path} to fine-tune from its weights with a new schedule.")
    if epochs < planned:
        raise UserError(f"--resume {path} continues a {planned}-epoch schedule; --epochs {epochs} would cut "
                        f"it short; pass --epochs {planned} (or more, to extend it).")
    if epochs > planned:
        note(f"extending the schedule of {path} from {planned} to {epochs} epochs")


RUN_FILES = (LAST, BEST, "metrics.csv", "metrics.png")


def prepare_output(config: TrainConfig, is_main: bool) -> None:
    """Refuse an output folder that holds files, unless this run resumes from it or ``--force`` (then
    only a folder of an earlier run is replaced); remove temporary files of killed runs."""
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a folder; pass another --output.")
    resuming_here = config.resume is not None and Path(config.resume).resolve().parent == output.resolve()
    if output.is_dir() and not _only_temporary(output) and not resuming_here:
        if not config.force:
            raise UserError(f"output folder {output} already holds files (an earlier run?); pass --resume "
                            f"{output / LAST} to continue it, --force to replace it, or another --output.")
        check_replaceable(output, _holds_run, f"a folder of an earlier run ({', '.join(RUN_FILES)})")
        if is_main:
            shutil.rmtree(output)
    if is_main and output.is_dir():
        for name in RUN_FILES:
            remove_stale(output, name)
            (output / f"{name}.partial").unlink(missing_ok=True)  # the temporary name before PIDs


def _kept_names(folder: Path) -> set[str]:
    """The entries of ``folder`` but temporary files (``.NAME.pidPID-.partial``, ``last.pt.partial``)."""
    legacy = {f"{name}.partial" for name in RUN_FILES}
    return {entry.name for entry in folder.iterdir() if entry.name not in legacy
            and not (entry.name.startswith(".") and entry.name.endswith(".partial"))}


def _only_temporary(folder: Path) -> bool:
    return not _kept_names(folder)


def _holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds only what ``mf-edge train`` writes (run files and temporary files)."""
    return _kept_names(folder) <= set(RUN_FILES)


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
