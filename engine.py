"""The one train / evaluate loop shared by every task and pruner.

A task supplies ``train_step`` and ``evaluate``; a pruner (optional) supplies extra parameters,
loss terms and per-step / per-epoch hooks. The engine owns everything else: DDP, AMP, gradient
accumulation, the learning-rate schedule, atomic per-epoch checkpoints, exact resume, the
non-finite-loss guard, ``log.jsonl`` and ``results.json``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import utils
from config import dump_yaml
from losses import KD_DEFAULTS, KDConfig, distilled_logits, kd_loss
from utils import DistInfo, log

CHECKPOINT_LAST = "checkpoint_last.pth"
CHECKPOINT_BEST = "checkpoint_best.pth"
LOG = "log.jsonl"
# What a training run leaves in its output folder (the engine's files, then the entry script's). A fresh run
# started over an earlier one (--overwrite) removes the earlier run's files once its own first checkpoint is on
# disk, never before.
RUN_FILES = (
    LOG,
    "config.yaml",
    CHECKPOINT_LAST,
    CHECKPOINT_BEST,
    "results.json",
    "model_compressed.safetensors",
    "model_compressed.json",
    "model_compressed.pth",
)

# Engine keys every task config accepts (the task schemas add their own).
ENGINE_DEFAULTS: dict[str, Any] = {
    "max_epoch": 1,
    "init_lr": 1e-5,
    "min_lr": 0.0,
    "weight_decay": 0.05,
    "warmup_steps": 0,
    "warmup_lr": 0.0,
    "warmup_ratio": 0.0,  # > 0: warm up over this fraction of the phase's optimizer steps (PuMer: 0.1)
    "lr_schedule": "cosine",  # cosine | constant | linear (per step, to min_lr at the last step)
    "adam_betas": [0.9, 0.999],  # AdamW betas (PuMer: 0.9, 0.98)
    "lr_per_step": False,  # False: the seeds' per-epoch cosine
    "accum_steps": 1,
    "amp": False,  # bf16 autocast
    "amp_dtype": "bfloat16",  # bfloat16 | float16 (float16 adds a GradScaler)
    "grad_clip": 0.0,  # 0 = off (the seeds do not clip)
    "grad_checkpointing": False,
    "find_unused_parameters": False,
    "seed": 42,
    "num_workers": 4,
    "eval_every": 1,
    "no_decay_norm_bias": False,  # True: no weight decay on biases, norms, no_weight_decay() names (timm/DeiT)
    "lr_mult": {},  # parameter-name pattern -> LR factor (PuMer: the classifier at x10)
    "teacher": dict(KD_DEFAULTS),  # knowledge distillation from a frozen teacher (losses.py)
}


# Ranges of the engine keys, checked (file and key named) before anything is built: key -> (test, wanted).
ENGINE_CHECKS: dict[str, tuple[Any, str]] = {
    "max_epoch": (lambda v: v >= 1, "at least 1"),
    "accum_steps": (lambda v: v >= 1, "at least 1"),
    "eval_every": (lambda v: v >= 1, "at least 1"),
    "init_lr": (lambda v: v >= 0, "at least 0"),
    "min_lr": (lambda v: v >= 0, "at least 0"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "warmup_steps": (lambda v: v >= 0, "at least 0"),
    "grad_clip": (lambda v: v >= 0, "at least 0 (0 = off)"),
    "num_workers": (lambda v: v >= 0, "at least 0"),
    "lr_schedule": (lambda v: v in ("cosine", "constant", "linear"), "cosine, constant or linear"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "amp_dtype": (lambda v: v in ("bfloat16", "float16"), "bfloat16 or float16"),
}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class StepInfo:
    epoch: int  # epoch within the phase (search or train): the seeds restart per-epoch ramps in each
    step: int  # micro-batch index within the epoch
    steps_per_epoch: int  # micro-batches per epoch
    global_step: int  # optimizer steps taken so far


class Task(Protocol):
    name: str
    main_metric: str  # key in the "val" metrics used for model selection (higher is better)

    def train_step(self, model: torch.nn.Module, batch: Any, info: StepInfo) -> dict[str, torch.Tensor]:
        """Forward one batch; return a dict of scalar losses that includes the total under 'loss', and, for tasks
        that can be distilled, the student's logits under 'logits' (not a loss: the engine takes it out)."""

    def evaluate(self, model: torch.nn.Module, loader: Any, split: str) -> dict[str, float]:
        """Metrics for one split, gathered over ranks (identical on every rank)."""


def parameter_groups(
    model: torch.nn.Module,
    named: list[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    no_decay_norm_bias: bool,
    lr_mult: Mapping[str, float],
) -> list[dict]:
    """Optimizer groups of ``named`` parameters by (weight decay, LR multiplier). Without ``no_decay_norm_bias``
    every parameter decays (the BLIP seeds); with it biases, 1-D parameters (norms) and the names of the model's
    ``no_weight_decay()`` (position embeddings, class tokens) do not (timm, DeiT, PuMer). ``lr_mult`` maps
    parameter-name patterns (fnmatch; a plain module path matches everything under it) to LR factors, applied
    through each group's ``lr_scale``; a pattern that matches nothing is an error."""
    skip = set(model.no_weight_decay()) if no_decay_norm_bias and hasattr(model, "no_weight_decay") else set()
    hits = dict.fromkeys(lr_mult, 0)
    buckets: dict[tuple[bool, float], list] = {}
    for name, p in named:
        decay = not (no_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias") or name in skip))
        scale = 1.0
        for pattern, factor in lr_mult.items():
            if fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern.rstrip(".") + "."):
                scale, hits[pattern] = float(factor), hits[pattern] + 1
        buckets.setdefault((decay, scale), []).append(p)
    unused = [pattern for pattern, n in hits.items() if n == 0]
    if unused:
        raise ValueError(f"lr_mult: {unused} match no trainable parameter of {type(model).__name__}")
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "decay": decay, "lr_scale": scale}
        for (decay, scale), params in buckets.items()
    ]


@dataclass
class EngineConfig:
    max_epoch: int = 1
    init_lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    warmup_ratio: float = 0.0
    lr_schedule: str = "cosine"
    adam_betas: tuple = (0.9, 0.999)
    lr_per_step: bool = False
    accum_steps: int = 1
    amp: bool = False
    amp_dtype: str = "bfloat16"
    grad_clip: float = 0.0
    grad_checkpointing: bool = False
    find_unused_parameters: bool = False
    eval_every: int = 1
    no_decay_norm_bias: bool = False
    lr_mult: dict = field(default_factory=dict)
    # An exponential moving average of the weights (timm ModelEmaV3, updated after every optimizer step; a task
    # schema that offers it has these keys): evaluated beside the model ("ema" in log.jsonl, "ema_metrics" in
    # the results), saved as "model_ema" in the checkpoints, never used for model selection (DeiT).
    model_ema: bool = False
    model_ema_decay: float = 0.99996

    @classmethod
    def from_config(cls, config: Mapping) -> EngineConfig:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: config[k] for k in names if k in config})


@dataclass(frozen=True)
class PhaseSpec:
    """One stretch of a run, as data: what a pruner's ``phases()`` returns (UPop: search, then retrain; UVC:
    search, then post-train; most methods: one phase).

    ``lr_schedule``: ``None`` for the config's (warm-up, then ``lr_schedule``), or ``constant`` (``init_lr``
    throughout, UPop's search); ``pruning``: whether the pruner's losses, per-step hooks and epoch hooks act;
    ``weight_decay``: ``None`` for the config's; ``evaluate``: ``every`` (each ``eval_every`` epochs and the
    last) or ``end`` (only after the phase, once the pruner's ``phase_end`` ran).
    """

    name: str
    epochs: int
    lr_schedule: str | None = None
    pruning: bool = True
    weight_decay: float | None = None
    evaluate: str = "every"
    # The phase's own learning-rate recipe where it differs from the config's (UVC: the search warms up over 500
    # steps and decays per step to 0, the post-training follows the config); None keeps the config's value.
    init_lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    per_step: bool | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"phase {self.name} needs at least one epoch, got {self.epochs}")
        if self.lr_schedule not in (None, "constant", "cosine", "linear"):
            raise ValueError(f"phase {self.name}: unknown lr_schedule {self.lr_schedule!r}")
        if self.evaluate not in ("every", "end"):
            raise ValueError(f"phase {self.name}: evaluate must be 'every' or 'end', got {self.evaluate!r}")


@dataclass(frozen=True)
class Phase:
    """Where an epoch falls: which phase, and where in it."""

    spec: PhaseSpec
    index: int  # the phase's position in the run
    epoch: int  # epoch index within the phase
    step_offset: int  # optimizer steps taken before the phase
    total_steps: int  # optimizer steps in the phase

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def last(self) -> bool:
        return self.epoch == self.spec.epochs - 1

    @classmethod
    def of(cls, epoch: int, phases: list[PhaseSpec], steps_per_epoch: int) -> Phase:
        start = 0
        for index, spec in enumerate(phases):
            if epoch < start + spec.epochs:
                return cls(spec, index, epoch - start, start * steps_per_epoch, spec.epochs * steps_per_epoch)
            start += spec.epochs
        raise IndexError(f"epoch {epoch} is past the run's {start} epochs")


@dataclass
class TrainState:
    epoch: int = -1  # last finished epoch
    global_step: int = 0
    best_value: float = -math.inf
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)  # the model a pruner started from: metrics, params


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        task: Task,
        cfg: EngineConfig,
        dist_info: DistInfo,
        output_dir: str | Path,
        pruner: Any = None,
        config: Mapping | None = None,
        dense_cost: Mapping | None = None,
        teacher: torch.nn.Module | None = None,
        kd: KDConfig | None = None,
    ):
        self.task, self.cfg, self.dist, self.pruner = task, cfg, dist_info, pruner
        self.dense_cost = dict(dense_cost or {})  # FLOPs / latency of the model a pruner starts from
        self.output_dir = Path(output_dir)
        self.config = dict(config or {})
        self.device = dist_info.device
        self.model = model.to(self.device)
        if cfg.grad_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise ValueError(f"grad_checkpointing is on but {type(model).__name__} has no set_grad_checkpointing()")
            self.model.set_grad_checkpointing(True)
        self.ddp_model: torch.nn.Module = self.model
        self._wrap()
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.amp_dtype]
        use_scaler = cfg.amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.teacher, self.kd = None, kd or KDConfig()
        if teacher is not None:
            if not hasattr(task, "teacher_logits"):
                raise ValueError(
                    f"a teacher was given, but the {task.name} task has no logits to distil (no teacher_logits); "
                    "distillation serves tasks with a classifier (classification, NLVR2)"
                )
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.phases = self.pruner.phases(cfg) if self.pruner is not None else [PhaseSpec("train", cfg.max_epoch)]
        self.optimizer = self._build_optimizer()
        self.ema = self._new_ema()
        self._ema_metrics: dict = {}
        self.state = TrainState()
        self._train_loader = None
        self._phase = ""  # the phase of the epoch being trained, recorded in checkpoints
        # Whether checkpoint_last.pth is this run's (written, or resumed from): the non-finite-loss message says so.
        self._own_checkpoint = False
        # Files of an earlier run in output_dir, removed once this (fresh) run has written its first checkpoint.
        self._earlier: list[str] = []

    def _wrap(self) -> None:
        self.ddp_model = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(self.model, device_ids=ids, find_unused_parameters=self.cfg.find_unused_parameters)

    def rebuild(self) -> None:
        """The model changed structure (a pruner compressed it): DDP and a fresh optimizer around it."""
        self.model.to(self.device)
        self._wrap()
        self.optimizer = self._build_optimizer()
        self.ema = self._new_ema()  # an average over the old structure means nothing for the new one

    def _new_ema(self) -> Any:
        if not self.cfg.model_ema:
            return None
        from timm.utils import ModelEmaV3

        return ModelEmaV3(self.model, decay=self.cfg.model_ema_decay)

    # ------------------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over all trainable model parameters plus the pruner's groups. The model's parameters form groups
        by weight decay (all decayed, as the seeds; or none on biases, norms and the model's
        ``no_weight_decay()`` names with ``no_decay_norm_bias``) and by learning-rate multiplier (``lr_mult``:
        parameter-name pattern -> factor, e.g. ``{"cls_head.*": 10}``)."""
        pruner_groups = list(self.pruner.param_groups()) if self.pruner is not None else []
        pruner_params = {id(p) for g in pruner_groups for p in g["params"]}
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in pruner_params]
        groups = parameter_groups(
            self.model, named, self.cfg.weight_decay, self.cfg.no_decay_norm_bias, self.cfg.lr_mult
        )
        return torch.optim.AdamW(
            [*groups, *pruner_groups],
            lr=self.cfg.init_lr,
            weight_decay=self.cfg.weight_decay,
            betas=tuple(float(b) for b in self.cfg.adam_betas),
        )

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.amp)

    # ------------------------------------------------------------------------------------------
    def fit(self, train_loader, eval_loaders: Mapping[str, Any], resume: str | Path | None = None) -> dict:
        """Train through the phases (the pruner's, or one of ``max_epoch`` epochs), evaluating every
        ``eval_every`` epochs and at each phase's end, after the pruner's ``phase_end`` (UPop compresses there)."""
        self._train_loader = train_loader
        self.eval_loaders = eval_loaders  # a pruner may measure on them (MADTP's controller)
        if resume:
            self.load_checkpoint(resume)
            self._own_checkpoint = True
        else:
            # A fresh run in a reused output_dir (--overwrite): the earlier run's files stay until this run has a
            # checkpoint of its own, then go (so the log, results and best checkpoint are this run's alone).
            self._earlier = [name for name in RUN_FILES if (self.output_dir / name).exists()]
            if self.pruner is not None and not self.state.dense:
                with self.pruner.bypassed():  # the dense model the pruner starts from
                    metrics = self.evaluate(eval_loaders)
                self.state.dense = {"metrics": metrics, "params": utils.count_parameters(self.model), **self.dense_cost}
                log.info("dense model before pruning: %s", _fmt(self.state.dense))
        micro_per_epoch = len(train_loader)
        if micro_per_epoch == 0:
            raise ValueError("the training loader is empty (dataset smaller than one batch with drop_last?)")
        accum = max(1, self.cfg.accum_steps)
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        total = sum(p.epochs for p in self.phases)
        for epoch in range(self.state.epoch + 1, total):
            t0 = time.time()
            phase = Phase.of(epoch, self.phases, steps_per_epoch)
            self._phase = phase.name
            schedule = self._schedule(phase.spec, steps_per_epoch)
            if phase.spec.weight_decay is not None:
                for group in self.optimizer.param_groups:
                    if group.get("decay", True):
                        group["weight_decay"] = phase.spec.weight_decay
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            pruning = self.pruner is not None and phase.spec.pruning
            if pruning:
                self.pruner.epoch_start(epoch, self)
            train_stats = self._train_epoch(train_loader, epoch, phase, schedule, accum, pruning)
            if pruning:
                self.pruner.epoch_end(epoch, self)
            if phase.last and self.pruner is not None and self.pruner.phase_end(phase.name, self.model):
                self.rebuild()
            metrics = {}
            every = phase.spec.evaluate == "every" and (phase.epoch + 1) % max(1, self.cfg.eval_every) == 0
            if phase.last or every:
                metrics = self.evaluate(eval_loaders)
                if self.ema is not None:
                    self._ema_metrics = self.evaluate(eval_loaders, self.ema.module)
            self.state.epoch = epoch
            self._update_best(metrics, epoch)
            self.save_checkpoint(self.output_dir / CHECKPOINT_LAST)
            record = {
                "epoch": epoch,
                **({"phase": phase.name} if len(self.phases) > 1 else {}),
                "lr": self.optimizer.param_groups[0]["lr"],
                "train": train_stats,
                **metrics,
                **({"ema": self._ema_metrics} if metrics and self.ema is not None else {}),
                "epoch_time_s": round(time.time() - t0, 3),
            }
            if pruning:
                record["pruner"] = self.pruner.report()
            utils.append_jsonl(self.output_dir / LOG, record)
            log.info("epoch %d: %s", epoch, _fmt(record))
        if self.pruner is not None and self.state.best_epoch < 0 and self.state.last_metrics:
            log.warning(
                "no evaluated epoch reached the %s pruner's target (%s); the result is the last epoch's model",
                self.pruner.name,
                self.pruner.report(),
            )
        return self.results()

    def _schedule(self, spec: PhaseSpec, steps_per_epoch: int) -> utils.LRSchedule:
        init_lr = self.cfg.init_lr if spec.init_lr is None else spec.init_lr
        if spec.lr_schedule == "constant":  # e.g. the seeds' search, at init_lr throughout
            return utils.LRSchedule(init_lr, init_lr, spec.epochs, steps_per_epoch, kind="constant")
        if spec.warmup_steps is not None:
            warmup = spec.warmup_steps
        elif self.cfg.warmup_ratio > 0:
            warmup = round(self.cfg.warmup_ratio * spec.epochs * steps_per_epoch)
        else:
            warmup = self.cfg.warmup_steps
        return utils.LRSchedule(
            init_lr=init_lr,
            min_lr=self.cfg.min_lr if spec.min_lr is None else spec.min_lr,
            max_epoch=spec.epochs,
            steps_per_epoch=steps_per_epoch,
            warmup_steps=warmup,
            warmup_lr=self.cfg.warmup_lr,
            per_step=self.cfg.lr_per_step if spec.per_step is None else spec.per_step,
            kind=spec.lr_schedule or self.cfg.lr_schedule,
        )

    def _train_epoch(self, loader, epoch: int, phase: Phase, schedule, accum: int, pruning: bool) -> dict:
        self.ddp_model.train()
        n_micro = len(loader)
        sums: dict[str, float] = {}
        count = 0
        self.optimizer.zero_grad(set_to_none=True)
        pruner = self.pruner if pruning else None
        bar = utils.progress(loader, desc=f"{phase.name} {epoch}", total=n_micro)
        for i, batch in enumerate(bar):
            step_in_epoch = i // accum
            if i % accum == 0:
                utils.set_lr(self.optimizer, schedule(phase.epoch, step_in_epoch))
            info = StepInfo(phase.epoch, i, n_micro, self.state.global_step)
            boundary = (i + 1) % accum == 0 or i + 1 == n_micro
            sync = (
                contextlib.nullcontext()
                if boundary or not isinstance(self.ddp_model, DDP)
                else self.ddp_model.no_sync()
            )
            with sync:
                with self._autocast():
                    losses = self.task.train_step(self.ddp_model, batch, info)
                    logits = losses.pop("logits", None)
                    # What a pruner's loss may need besides the losses (which image rows each text read), not logged.
                    extras = {k: losses.pop(k) for k in ("image_rows",) if k in losses}
                    loss = losses["loss"]
                    if self.teacher is not None:
                        loss, losses = self._distil(loss, losses, logits, batch)
                    if pruner is not None:
                        extra = pruner.loss(self.model, {**losses, **extras})
                        if extra is not None:
                            loss = loss + extra
                            losses = {**losses, "pruner_loss": extra}
                self._check_finite(loss, epoch, i)
                self.scaler.scale(loss / accum).backward()
            if boundary:
                if pruner is not None:
                    scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
                    pruner.before_optimizer_step(self.model, scale)
                if self.cfg.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.state.global_step += 1
                if self.ema is not None:
                    self.ema.update(self.model)
                if pruner is not None:
                    # Before zero_grad: score-based pruners read the gradients the step just used; the LR is the
                    # step's (UVC's proximal step scales by it).
                    lr = self.optimizer.param_groups[0]["lr"]
                    pruner.step(self.model, self.state.global_step - phase.step_offset, phase.total_steps, lr)
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        keys = sorted(sums)
        totals = utils.all_reduce_sum([sums[k] for k in keys] + [count])
        return {k: totals[j] / max(totals[-1], 1) for j, k in enumerate(keys)}

    def _distil(self, loss: torch.Tensor, losses: dict, logits: Any, batch: Any) -> tuple[torch.Tensor, dict]:
        """``(1 - alpha) * task loss + alpha * KD`` against the frozen teacher on the same batch."""
        if logits is None:
            raise ValueError(f"the {self.task.name} task's train_step returned no 'logits' to distil")
        with torch.no_grad():
            target = self.task.teacher_logits(self.teacher, batch)
        kd = kd_loss(distilled_logits(logits), target, self.kd.kind, self.kd.tau, self.kd.reduction)
        total = (1.0 - self.kd.alpha) * loss + self.kd.alpha * kd
        return total, {**losses, "loss": total, "task_loss": loss, "kd_loss": kd}

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        # Reduced over ranks so that every rank stops together instead of hanging in the next all-reduce.
        finite = utils.all_reduce_sum([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if finite[0] > 0:
            kept = self.output_dir / CHECKPOINT_LAST
            if self._own_checkpoint:
                kept_msg = f"the last good checkpoint {kept} (epoch {self.state.epoch}) is kept"
            elif self._earlier:
                kept_msg = (
                    f"this run wrote no checkpoint; the earlier run's files in {self.output_dir} "
                    f"({', '.join(self._earlier)}) are untouched"
                )
            else:
                kept_msg = "no checkpoint was written"
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach())}) at epoch {epoch}, step {step} "
                f"(optimizer step {self.state.global_step}); stopping, {kept_msg}"
            )

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loaders: Mapping[str, Any], model: torch.nn.Module | None = None) -> dict[str, dict]:
        model = self.model if model is None else model
        model.eval()
        out = {}
        for split, loader in loaders.items():
            with self._autocast():
                out[split] = self.task.evaluate(model, loader, split)
        return out

    def _update_best(self, metrics: Mapping, epoch: int) -> None:
        if not metrics:
            return
        self.state.last_metrics = dict(metrics)
        if self.pruner is not None and not self.pruner.at_target():
            return  # a model still on its way to the pruner's target (a search, a sparsity ramp) is no result
        split = getattr(self.pruner, "selection_split", None) or ("val" if "val" in metrics else next(iter(metrics)))
        if split not in metrics:
            raise ValueError(f"model selection on the {split} split, but the run evaluates only {sorted(metrics)}")
        value = metrics[split].get(self.task.main_metric)
        if value is None:  # e.g. VQA on the official test split: only the server knows the answers
            log.warning("no '%s' in the %s metrics; keeping the last epoch as the result", self.task.main_metric, split)
            return
        if value > self.state.best_value:
            self.state.best_value, self.state.best_epoch = float(value), epoch
            self.state.best_metrics = dict(metrics)
            self.save_model(self.output_dir / CHECKPOINT_BEST, epoch=epoch)

    # ------------------------------------------------------------------------------------------
    def architecture(self) -> dict | None:
        """The architecture description of a pruning run's model as it is now, with the pruner's report (None
        without a pruner, or for a model without prunable units, e.g. a test's toy model)."""
        if self.pruner is None:
            return None
        from models.arch import architecture

        try:
            return {**architecture(self.model), "pruner": self.pruner.name, **self.pruner.report()}
        except TypeError:
            return None

    def save_model(self, path: Path, **extra) -> None:
        """The weights, the config and, for a pruning run, the architecture description the model now has
        (widths, skipped blocks, token reducers: what evaluating it without pruner code needs)."""
        arch = self.architecture()
        if arch is not None:
            extra["arch"] = arch
        if self.ema is not None:
            extra["model_ema"] = self.ema.module.state_dict()
        if utils.is_main_process():
            utils.atomic_torch_save({"model": self.model.state_dict(), "config": self.config, **extra}, path)
            self._checkpoint_written(path)
        utils.barrier()

    def _checkpoint_written(self, path: Path) -> None:
        """This run has a checkpoint on disk: the files an earlier run left in output_dir go now."""
        self._own_checkpoint = self._own_checkpoint or path.name == CHECKPOINT_LAST
        if not self._earlier:
            return
        removed = [name for name in self._earlier if name != path.name]
        for name in removed:
            (self.output_dir / name).unlink(missing_ok=True)
        self._earlier = []
        log.info("this run's first checkpoint is written; removed the earlier run's %s", ", ".join(removed) or "-")

    def write_config(self) -> None:
        """``config.yaml`` is written with the first checkpoint or result, never before: a run that fails
        on a bad file or value leaves an earlier run's folder as it was."""
        if utils.is_main_process():
            dump_yaml(self.config, self.output_dir / "config.yaml")

    def save_checkpoint(self, path: Path) -> None:
        """Everything needed to continue exactly: every rank's RNG states (global generators and the
        train loader's own) are gathered into one file."""
        rng = utils.rng_state()
        generator = getattr(self._train_loader, "generator", None)
        if generator is not None:
            rng["loader"] = generator.get_state()
        rng = utils.all_gather_object(rng)
        if utils.is_main_process():
            ckpt = {
                "model": self.model.state_dict(),
                **({"model_ema": self.ema.module.state_dict()} if self.ema is not None else {}),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "pruner": self.pruner.state_dict() if self.pruner is not None else {},
                "rng": rng,
                "state": vars(self.state),
                "config": self.config,
                "world_size": self.dist.world_size,
                # What the file holds, so that a resume by the wrong run is refused by name.
                "task": self.task.name,
                "pruner_name": self.pruner.name if self.pruner is not None else "none",
                "phase": self._phase,
            }
            utils.atomic_torch_save(ckpt, path)
            self._checkpoint_written(path)
        self.write_config()
        utils.barrier()

    def load_checkpoint(self, path: str | Path) -> None:
        ckpt = utils.load_checkpoint_file(path, map_location="cpu")
        missing = [k for k in ("model", "optimizer", "state", "rng") if k not in ckpt]
        if missing:
            raise utils.CheckpointError(
                f"{path} is not a training checkpoint (missing {missing}); to start from weights use --pretrained"
            )
        self._check_resumable(path, ckpt)
        if self.pruner is not None and ckpt.get("pruner"):
            # First: a pruner that had compressed the model cuts it to the saved widths again.
            self.pruner.load_state_dict(ckpt["pruner"])
            self.rebuild()
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[:4]
            raise utils.CheckpointError(
                f"cannot resume from {path} ({_holds(ckpt)}): it does not fit this run's model and optimizer: "
                + " ".join(line.strip() for line in first)
            ) from None
        if self.ema is not None and "model_ema" in ckpt:
            self.ema.module.load_state_dict(ckpt["model_ema"])
        elif self.ema is not None:
            log.warning("%s holds no model_ema: the moving average restarts from the resumed weights", path)
            self.ema = self._new_ema()
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        rng = ckpt["rng"]
        rank = self.dist.rank
        if len(rng) != self.dist.world_size:
            log.warning(
                "resuming with %d processes from a checkpoint of %d: data order and augmentation "
                "will differ from an uninterrupted run",
                self.dist.world_size,
                len(rng),
            )
        mine = rng[rank % len(rng)]
        utils.set_rng_state(mine)
        generator = getattr(self._train_loader, "generator", None)
        if generator is not None and "loader" in mine:
            generator.set_state(mine["loader"])
        log.info(
            "resumed from %s at the end of epoch %d (optimizer step %d)", path, self.state.epoch, self.state.global_step
        )

    def _check_resumable(self, path: str | Path, ckpt: Mapping) -> None:
        """A checkpoint of another task, or of a run with another pruner, is refused by name."""
        mine = self.pruner.name if self.pruner is not None else "none"
        theirs = ckpt.get("pruner_name") or ("an unnamed pruner" if ckpt.get("pruner") else "none")
        task = ckpt.get("task")
        if task is not None and task != self.task.name:
            raise utils.CheckpointError(
                f"cannot resume from {path}: it holds {_holds(ckpt)}, but this is a {self.task.name} run; "
                f"resume it with compress_{task}.py, or start from its weights with --pretrained"
            )
        if theirs != mine:
            hint = f"; resume it with --pruner {theirs}" if ckpt.get("pruner_name") else ""
            raise utils.CheckpointError(
                f"cannot resume from {path}: it holds {_holds(ckpt)}, but this run has pruner {mine}{hint}"
            )

    # ------------------------------------------------------------------------------------------
    def results(self) -> dict:
        best = self.output_dir / CHECKPOINT_BEST
        out = {
            "metrics": self.state.best_metrics or self.state.last_metrics,
            "last_metrics": self.state.last_metrics,
            "best_epoch": self.state.best_epoch,
            "params": utils.count_parameters(self.model),
            "checkpoint": str(best if best.exists() else self.output_dir / CHECKPOINT_LAST),
        }
        if self.pruner is not None:
            out["dense"] = self.state.dense
            out["pruner_report"] = self.pruner.report()
        if self._ema_metrics:
            out["ema_metrics"] = self._ema_metrics
        return out


def _holds(ckpt: Mapping) -> str:
    """What a training checkpoint holds, in words: task, pruner, phase and epoch."""
    task = ckpt.get("task", "an unnamed task")
    pruner = ckpt.get("pruner_name") or ("an unnamed pruner" if ckpt.get("pruner") else "none")
    phase = ckpt.get("phase")
    epoch = (ckpt.get("state") or {}).get("epoch")
    where = ", ".join(x for x in (f"phase {phase}" if phase else "", f"after epoch {epoch}") if x)
    return f"a run of task {task} with pruner {pruner} ({where})"


def _fmt(record: Mapping) -> str:
    def short(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, Mapping):
            if len(v) > 12:  # e.g. a pruner's per-module report: log.jsonl has it in full
                return f"{{{len(v)} entries}}"
            return "{" + ", ".join(f"{k}: {short(x)}" for k, x in v.items()) + "}"
        return str(v)

    return ", ".join(f"{k}={short(v)}" for k, v in record.items())
