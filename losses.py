"""Knowledge distillation from a frozen teacher: the term the engine adds to a task's loss in any phase.

The task's ``train_step`` returns the student's logits beside its losses (``"logits"``: a tensor, or DeiT's
``(class logits, distillation logits)`` pair, whose second member is distilled); the engine runs the teacher on
the same batch under ``no_grad`` (``task.teacher_logits``) and mixes
``loss = (1 - alpha) * task loss + alpha * kd`` (DeiT's ``DistillationLoss``, PuMer's and UVC's logit KD).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KD_DEFAULTS", "KDConfig", "kd_loss"]

# The ``teacher`` section of every task config.
KD_DEFAULTS: dict[str, Any] = {
    "path": "",  # weights of the teacher (the task's model at its dense widths); "" = no distillation
    "kind": "soft",  # soft: KL of temperature-softened distributions; hard: CE against the teacher's argmax
    "alpha": 0.5,  # weight of the KD term; the task loss gets 1 - alpha
    "tau": 1.0,  # temperature of soft distillation
    "reduction": "batchmean",  # soft KL summed and divided by the batch (batchmean) or by every logit (numel: DeiT)
}
KINDS = ("soft", "hard")
REDUCTIONS = ("batchmean", "numel")


@dataclass(frozen=True)
class KDConfig:
    path: str = ""
    kind: str = "soft"
    alpha: float = 0.5
    tau: float = 1.0
    reduction: str = "batchmean"

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> KDConfig:
        """From the ``teacher`` section; every value checked, naming the key."""
        kd = cls(**{k: section[k] for k in KD_DEFAULTS})
        if kd.kind not in KINDS:
            raise ValueError(f"teacher.kind must be one of {KINDS}, got {kd.kind!r}")
        if not 0.0 <= kd.alpha <= 1.0:
            raise ValueError(f"teacher.alpha must be in [0, 1], got {kd.alpha}")
        if kd.tau <= 0:
            raise ValueError(f"teacher.tau must be positive, got {kd.tau}")
        if kd.reduction not in REDUCTIONS:
            raise ValueError(f"teacher.reduction must be one of {REDUCTIONS}, got {kd.reduction!r}")
        return kd

    @property
    def active(self) -> bool:
        return bool(self.path)


def kd_loss(
    student: Tensor, teacher: Tensor, kind: str = "soft", tau: float = 1.0, reduction: str = "batchmean"
) -> Tensor:
    """The distillation term for student and teacher logits (B, C).

    ``soft``: ``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``, summed and divided by the batch
    (``batchmean``) or by the number of logits (``numel``, DeiT's scaling); ``hard``: cross-entropy against the
    teacher's top class (DeiT's hard distillation). Zero when the student equals the teacher (soft).
    """
    student, teacher = student.float(), teacher.float()
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=-1))
    if kind != "soft":
        raise ValueError(f"unknown distillation kind {kind!r}; choose from {KINDS}")
    kl = F.kl_div(
        F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1), reduction="sum", log_target=True
    )
    denominator = student.shape[0] if reduction == "batchmean" else student.numel()
    return kl * (tau * tau) / denominator


def distilled_logits(logits: Any) -> Tensor:
    """The logits a student is distilled through: the distillation head's of a ``(class, distillation)`` pair."""
    if isinstance(logits, (tuple, list)):
        return logits[1]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"train_step returned {type(logits).__name__} as logits; expected a tensor or a pair")
    return logits
