"""PLATON unstructured pruning, optionally weighted by intrinsic dimension (ID).

Wang, Zhang and Ma, *Exploring Intrinsic Dimension for Vision-Language Model Pruning* (ICML 2024;
Nofear18/ID_VL_Pruning: ID_pruner.py, ID_pruner_nlvr.py, train_caption.py, train_nlvr.py), with the
importance score of Zhang et al., *PLATON* (ICML 2022; QingruZhang/PLATON: Pruner.py).

The task model is fine-tuned while individual entries of the weights and biases of every Linear listed
by :func:`pruners.targets.targets` (48 ViT + 120 text modules on BLIP caption, 48 + 174 on BLIP NLVR2)
are zeroed. After every optimizer step each entry gets the sensitivity ``I = |w * g|`` (``w`` after the
step, ``g`` the gradient it used), averaged over windows of ``deltaT`` steps; at every window boundary
``Ibar <- b1 Ibar + (1 - b1) I_win`` and ``Ubar <- b2 Ubar + (1 - b2) |I_win - Ibar|``, and the score is
``S = Ibar * Ubar`` (``importance: platon``). ``magnitude`` (``S = |w|``) and ``taylor`` (``S = |w g|`` of
the current step) share everything else. With ``use_id`` every score of a module is multiplied by that
module's ID, measured once on the dense model by ``compute_id.py``; the raw number, no normalisation,
because the single global threshold is what turns it into a modality allocation.

The remaining ratio ``r`` follows the cubic schedule: ``r0`` up to ``t_i``, then
``rf + (r0 - rf) (1 - (t - t_i) / (T - t_i - t_f))^3``, masking every ``deltaT`` steps and at the last
step of every epoch, and ``rf`` with masking at every step after ``T - t_f``. At a mask event the
scores of all masked tensors are ranked in one list and exactly ``floor(N (1 - r))`` entries, the
lowest, are pruned; equal scores at the threshold are taken in registration order (module, weight
before bias, row-major), so the count is exact and the same on every rank. Biases are in the masked
set, as in the seed (``mask_bias``); the report counts them separately.

Masks are persistent boolean tensors: after every optimizer step the weights are multiplied by them
(and before it the pruned entries' gradients are zeroed), and already-pruned entries rank below
everything at the next event, so a pruned weight stays exactly zero while the survivors are re-ranked.

Where this differs from the seed, by default, and the switch that restores the seed where it is cheap:

* **Regrowth** (ID_pruner.py ``mask_with_threshold``): the seed zeroes entries in place at mask events
  only, keeps no mask and re-ranks everything, so pruned weights regrow between events and the pruned
  set keeps changing. Fixed; ``seed_regrow: true`` reproduces it.
* **"Keep at least 3 weights"** (same function): ``S < max(tau, third-smallest S of the tensor)`` with
  ``tau`` the k-th smallest score actually prunes at least the 2 lowest entries of every tensor and
  misses the exact count. Fixed (exact global count, no per-tensor rule); ``seed_threshold: true``
  reproduces it.
* **State reset** (train_caption.py / train_nlvr.py build the Pruner inside ``train()``): Ibar, Ubar
  and I_win restart from zero every epoch. Fixed; ``reset_each_epoch: true`` reproduces it.
* **Skipped step**: the seed's loops skip ``optimizer.step()`` at the last iteration of every epoch but
  still score and mask. Fixed, no switch: the engine owns the optimizer step.
* **warmup_steps** (the schedule's "epoch") is a CLI default computed for 2 GPUs at the seed's batch
  sizes (14168 caption, 4318 NLVR2). Fixed: derived from the engine's step count (``total /
  max_epoch``); ``warmup_steps: N`` forces a fixed value.
* **NLVR2 IDs**: train_nlvr.py's ID list is empty, so ``--useID`` crashes. Fixed: ``compute_id.py
  --task nlvr`` measures all 222 modules.
* **Positional IDs**: the seed walks ``named_parameters()`` and advances its ID index on every name
  containing ``bias``. Fixed: IDs are looked up by module name (``ids.json`` from ``compute_id.py``)
  and the names must equal the masked modules exactly. A positional one-value-per-line table (the
  seed's ``result_id.txt``) is accepted only together with ``id_names``, a file naming the module of
  every line (``compute_id.py``'s ``ID.txt``, or one name per line).
* **Sparsity log** (pruning/utils.py ``compute_prune_ratio``): hard-coded layer counts and the caption
  model's name filters (an index error on NLVR2), biases not counted, and a "vision-pruning rate" that
  is a share of the zeros. Fixed: :func:`measure_sparsity` counts zeros in the weights of the masked
  modules by name: masked set (weights + biases), weights only, biases only, per modality, per part
  (vision / text / cross / decoder), per module and the whole model (and still the vision share).
* **Checkpoints**: the seed's ``*_Pruned`` loaders read only its per-epoch files (``model_state_dict``,
  ``module.`` prefix), not its own best checkpoints. Here the engine writes one format
  (``{"model": state_dict}``); the zeros are the masks, so evaluating a pruned model is a dense
  evaluation of its checkpoint (``--evaluate --pretrained checkpoint_best.pth``).
* **Model selection**: the seed keeps the best-validation epoch of the whole run, which on captioning
  can be the unpruned first epoch. Here only epochs at the final ratio compete (:meth:`Platon.at_target`).
* ``beta2 == 2`` (a running-variance branch that takes the square root of a dict in both codes) is
  refused; other values outside (0, 1] give ``S = Ibar |I_win - Ibar|`` as in the seed.

Memory: PLATON keeps three float32 tensors per masked entry (about 2.4 GB on BLIP caption's
198 M masked entries), plus one float32 score buffer allocated once and a boolean mask; a mask event
runs ``torch.kthvalue`` over the N concatenated scores, which copies them once more.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pruners.base import Pruner
from pruners.targets import VISION, targets
from utils import log

IMPORTANCES = ("platon", "magnitude", "taylor")


# ---------------------------------------------------------------------------------------------- schedule


def schedule(
    step: int,
    total: int,
    t_i: float,
    t_f: float,
    r0: float,
    rf: float,
    delta_t: int,
    epoch_len: int | None = None,
) -> tuple[float, bool]:
    """The remaining ratio after optimizer step ``step`` (1..``total``) and whether to mask at it.

    Up to ``t_i`` the ratio is ``r0`` and nothing is masked; after ``total - t_f`` it is ``rf`` and every
    step masks; in between it falls cubically and masks every ``delta_t`` steps, at the last step of every
    epoch of ``epoch_len`` steps (the seed), and at ``total`` (so that a run always ends at ``rf``).
    """
    if step <= t_i:
        return r0, False
    if step > total - t_f:
        return rf, True
    # Only reachable when t_i < total - t_f, so the span is positive.
    span = total - t_i - t_f
    ratio = rf + (r0 - rf) * (1.0 - (step - t_i) / span) ** 3
    mask = step % delta_t == 0 or step == total or bool(epoch_len and step % epoch_len == 0)
    return ratio, mask


def prune_count(n: int, ratio: float) -> int:
    """``floor(n (1 - ratio))``, robust to the float error of e.g. ``n * 0.8`` landing just below an integer."""
    return min(n, max(0, math.floor(n * (1.0 - ratio) + 1e-6)))


# ---------------------------------------------------------------------------------------------- scores


def update_platon(
    ipt: Tensor, ibar: Tensor, ubar: Tensor | None, sens: Tensor, step: int, delta_t: int, beta1: float, beta2: float
) -> None:
    """One step of PLATON's smoothed sensitivity and uncertainty, in place.

    ``ipt`` is the running mean of ``sens`` over the current window; at a window boundary
    (``step % delta_t == 0``) it is folded into ``ibar`` (and ``|ipt - ibar|`` into ``ubar``) and the window
    restarts at this step's ``sens``. States start at zero without bias correction, so the first window
    mean counts the zero start as a sample (as both reference codes).
    """
    local = step % delta_t
    if local == 0:
        ibar.mul_(beta1).add_(ipt, alpha=1.0 - beta1)
        if ubar is not None:
            ubar.mul_(beta2).add_((ipt - ibar).abs_(), alpha=1.0 - beta2)
        ipt.copy_(sens)
    else:
        ipt.mul_(local).add_(sens).div_(local + 1)


def platon_score(ipt: Tensor, ibar: Tensor, ubar: Tensor | None, beta2: float, out: Tensor) -> Tensor:
    """``S = Ibar * Ubar`` for 0 < beta2 < 1, ``Ibar`` for beta2 = 1, else ``Ibar * |I_win - Ibar|``; into ``out``."""
    if ubar is not None:
        return torch.mul(ibar, ubar, out=out)
    if beta2 == 1.0:
        return out.copy_(ibar)
    return torch.mul(ibar, (ipt - ibar).abs_(), out=out)


# ---------------------------------------------------------------------------------------------- selection


def select_lowest(scores: Tensor, k: int) -> tuple[Tensor, float | None]:
    """A boolean tensor marking exactly the ``k`` lowest entries of the flat ``scores``, and the k-th value.

    Entries equal to the k-th value are taken in index order, so the result is deterministic and the
    count exact whatever the ties (e.g. the many zero scores of already-pruned weights).
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device), None
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device), float(scores.max())
    tau = scores.kthvalue(k).values
    chosen = scores < tau
    need = k - int(chosen.sum())
    if need > 0:
        ties = (scores == tau).nonzero().flatten()[:need]
        chosen[ties] = True
    return chosen, float(tau)


def seed_select(scores: Sequence[Tensor], flat: Tensor, k: int) -> tuple[list[Tensor], float | None]:
    """The seed's rule: ``tau`` = k-th smallest of all scores (``flat``, their concatenation); in every
    tensor prune ``S < max(tau, third smallest S of that tensor)``: at least the 2 lowest entries of every
    tensor, and about ``k - 1`` in all rather than exactly ``k``."""
    tau = flat.kthvalue(k).values if k >= 1 else flat.new_tensor(-math.inf)
    out = []
    for s in scores:
        third = s.flatten().topk(min(3, s.numel()), largest=False).values.max()
        out.append(s < torch.maximum(third, tau))
    return out, float(tau) if k >= 1 else None


# ---------------------------------------------------------------------------------------------- ID tables


def _read_names(path: Path) -> list[str]:
    """Module names, one per line: plain, or compute_id's ``ID.txt`` (``name: N, modality: M``)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("name:"):
            line = line[len("name:") :].split(",", 1)[0].strip()
        names.append(line)
    return names


def load_ids(path: str | Path, modules: Sequence[str], id_names: str | Path | None = None) -> dict[str, float]:
    """The ID of every masked module, by name, from ``compute_id.py``'s ``ids.json`` (``name -> {"id": x}``
    or ``name -> x``), or from a positional table (one value per line) together with ``id_names``.

    The names must be exactly ``modules``: a missing, unexpected or duplicated name is an error that names
    them, and every ID must be a positive finite number (a global threshold makes the scale irrelevant, but
    not the sign).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"platon.use_id: ID file {path} does not exist")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"platon.use_id: {path} is not valid JSON ({e})") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"platon.use_id: {path} must map module names to IDs, got {type(data).__name__}")
        pairs = []
        for name, value in data.items():
            if isinstance(value, Mapping):
                if "id" not in value:
                    raise ValueError(f"platon.use_id: {path}: entry {name!r} has no 'id'")
                value = value["id"]
            pairs.append((name, value))
    else:
        if not id_names:
            raise ValueError(
                f"platon.use_id: {path} is a positional table (one ID per line, like the seed's result_id.txt); "
                "IDs are matched by module name, so also give platon.id_names: a file naming the module of every "
                "line (compute_id.py's ID.txt, or one name per line), or use compute_id.py's ids.json"
            )
        names_path = Path(id_names)
        if not names_path.is_file():
            raise FileNotFoundError(f"platon.id_names: name list {names_path} does not exist")
        names = _read_names(names_path)
        values = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(values) != len(names):
            raise ValueError(
                f"platon.use_id: {path} has {len(values)} values but {names_path} names {len(names)} modules"
            )
        pairs = list(zip(names, values))
    ids: dict[str, float] = {}
    for name, value in pairs:
        if name in ids:
            raise ValueError(f"platon.use_id: {path} names module {name!r} twice")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"platon.use_id: {path}: ID of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"platon.use_id: {path}: ID of {name!r} must be positive and finite, got {v}")
        ids[name] = v
    wanted = set(modules)
    missing = [m for m in modules if m not in ids]
    unexpected = [n for n in ids if n not in wanted]
    if missing or unexpected:

        def some(xs: list[str]) -> str:
            return ", ".join(xs[:6]) + (f", ... ({len(xs)} in all)" if len(xs) > 6 else "")

        raise ValueError(
            f"platon.use_id: the module names in {path} do not match the {len(modules)} masked modules of this model"
            + (f"; missing: {some(missing)}" if missing else "")
            + (f"; not masked here: {some(unexpected)}" if unexpected else "")
            + " (an ID table belongs to one model layout: run compute_id.py on this task's dense model)"
        )
    return ids


# ---------------------------------------------------------------------------------------------- reporting


@dataclass(frozen=True)
class Masked:
    """One masked tensor: the weight or bias of a target Linear."""

    name: str  # parameter name, e.g. visual_encoder.blocks.0.attn.qkv.weight
    module: str  # the Linear's name: the key of its ID
    modality: str  # vision | text (pruners.targets)
    part: str  # vision | text | cross | decoder
    linear: nn.Linear
    attr: str  # weight | bias

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.linear, self.attr)


def _part(name: str, modality: str) -> str:
    # Cross-attention reads image tokens, and a captioner's text tower is a decoder: reported apart because
    # that is where the ID factor moves sparsity (the seed's cross key/value IDs look like vision ones).
    if modality == VISION:
        return "vision"
    if ".crossattention." in f".{name}.":
        return "cross"
    if name.startswith("text_decoder."):
        return "decoder"
    return "text"


def masked_tensors(model: nn.Module, mask_bias: bool = True) -> list[Masked]:
    """The masked tensors of ``model``, in registration order (each module's weight, then its bias)."""
    modules = dict(model.named_modules())
    out = []
    for t in targets(model):
        linear = modules[t.name]
        part = _part(t.name, t.modality)
        out.append(Masked(f"{t.name}.weight", t.name, t.modality, part, linear, "weight"))
        if mask_bias and linear.bias is not None:
            out.append(Masked(f"{t.name}.bias", t.name, t.modality, part, linear, "bias"))
    return out


def _ratio(zeros: int, numel: int) -> dict[str, float | int]:
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}


@torch.no_grad()
def measure_sparsity(model: nn.Module, mask_bias: bool = True) -> dict[str, Any]:
    """Zeros counted in the weights of ``model`` (a pruned model, or a freshly loaded pruned checkpoint).

    ``masked_set``: weights and (with ``mask_bias``) biases of the masked Linears, what the schedule
    targets; ``weights`` / ``biases``: each alone; ``per_modality`` (vision / text) and ``per_part``
    (vision / text / cross-attention / decoder): weights + biases; ``vision_share_of_zeros``: the seed's
    "vision-pruning rate"; ``model``: every parameter of the model; ``per_module``: weight + bias sparsity.
    """
    entries = masked_tensors(model, mask_bias=True)
    totals: dict[str, list[int]] = {}

    def add(key: str, zeros: int, numel: int) -> None:
        acc = totals.setdefault(key, [0, 0])
        acc[0] += zeros
        acc[1] += numel

    per_module: dict[str, list[int]] = {}
    for e in entries:
        p = e.param
        z, n = int((p == 0).sum()), p.numel()
        add("weights" if e.attr == "weight" else "biases", z, n)
        if e.attr == "weight" or mask_bias:
            add("masked_set", z, n)
            add(f"modality:{e.modality}", z, n)
            add(f"part:{e.part}", z, n)
        acc = per_module.setdefault(e.module, [0, 0])
        acc[0] += z
        acc[1] += n
    seen: set[int] = set()
    model_zeros = model_numel = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            model_zeros += int((p == 0).sum())
            model_numel += p.numel()
    vision_zeros = totals.get(f"modality:{VISION}", [0, 0])[0]
    all_zeros = totals.get("masked_set", [0, 0])[0]
    return {
        "masked_set": _ratio(*totals.get("masked_set", [0, 0])),
        "weights": _ratio(*totals.get("weights", [0, 0])),
        "biases": _ratio(*totals.get("biases", [0, 0])),
        "biases_masked": mask_bias,
        "per_modality": {k.split(":", 1)[1]: _ratio(*v) for k, v in totals.items() if k.startswith("modality:")},
        "per_part": {k.split(":", 1)[1]: _ratio(*v) for k, v in totals.items() if k.startswith("part:")},
        "vision_share_of_zeros": vision_zeros / all_zeros if all_zeros else 0.0,
        "model": _ratio(model_zeros, model_numel),
        "per_module": {name: round(z / n, 6) if n else 0.0 for name, (z, n) in per_module.items()},
    }


# ---------------------------------------------------------------------------------------------- the pruner


class Platon(Pruner):
    """PLATON / magnitude / Taylor unstructured pruning with the cubic schedule and optional ID weighting.

    Config: the ``platon`` section (see ``DEFAULTS``). ``final_threshold`` is the fraction of the masked
    set that is *kept* (0.2 = 80 % sparsity). Warm-ups count epochs of the training phase.
    """

    name = "platon"
    DEFAULTS: dict[str, Any] = {
        "epochs": None,  # training epochs with this pruner (None: max_epoch; --epoch wins)
        "importance": "platon",  # platon | magnitude (|w|) | taylor (|w g| of the step)
        "final_threshold": 0.2,  # remaining ratio at the end, in (0, 1]: 1 - sparsity of the masked set (1 - p)
        "initial_threshold": 1.0,
        "initial_warmup": 1.0,  # epochs before pruning starts
        "final_warmup": 1.0,  # epochs at the final ratio, masking every step
        "warmup_steps": None,  # steps per "epoch" of the schedule; None: the real steps per epoch (B1)
        "deltaT": 10,  # window of the sensitivity average; mask interval during the ramp
        "beta1": 0.85,
        "beta2": 0.95,
        "use_id": "",  # compute_id.py's ids.json (or a positional table with id_names): score x ID
        "id_names": "",  # module names of a positional ID table, one per line
        "mask_bias": True,  # biases are masked and ranked with the weights (the seed)
        "mask_at_epoch_end": True,  # also mask at the last step of every epoch during the ramp (the seed)
        "reset_each_epoch": False,  # F4: restart Ibar/Ubar/I_win every epoch (the seed)
        "seed_regrow": False,  # no persistent mask: zero at mask events only, pruned weights regrow (the seed)
        "seed_threshold": False,  # F6: S < max(tau, third-smallest S per tensor), inexact count (the seed)
    }

    FLAGS = {
        "--pruner_name": ("platon.importance", str, "importance: PLATON, Magnitude or Taylor"),
        "--final_threshold": (
            "platon.final_threshold",
            float,
            "remaining ratio at the end, in (0, 1] (0.2 = 80%% sparsity; --p 0.8 says the same)",
        ),
        "--initial_threshold": ("platon.initial_threshold", float, "remaining ratio before pruning"),
        "--initial_warmup": ("platon.initial_warmup", float, "epochs before pruning starts"),
        "--final_warmup": ("platon.final_warmup", float, "epochs at the final ratio"),
        "--deltaT": ("platon.deltaT", int, "PLATON window / mask interval in optimizer steps"),
        "--beta1": ("platon.beta1", float, "PLATON sensitivity EMA"),
        "--beta2": ("platon.beta2", float, "PLATON uncertainty EMA"),
        "--useID": ("platon.use_id", str, "compute_id.py's ids.json: multiply each module's scores by its ID"),
    }

    @classmethod
    def options_from_p(cls, p: float) -> dict[str, Any]:
        """``--p`` is the pruned fraction of the masked set: ``final_threshold = 1 - p``."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"platon: --p is the pruned fraction of the masked weights and must be in [0, 1), got {p}")
        return {"final_threshold": 1.0 - p}

    def __init__(self, config: dict):
        super().__init__(config)
        opts = self.options()
        imp = str(opts["importance"]).lower()
        if imp not in IMPORTANCES:
            raise ValueError(f"platon.importance must be one of {IMPORTANCES} (any case), got {opts['importance']!r}")
        opts["importance"] = imp
        r0, rf = float(opts["initial_threshold"]), float(opts["final_threshold"])
        if not 0.0 < rf <= r0 <= 1.0:
            raise ValueError(
                f"platon thresholds are remaining ratios: need 0 < final_threshold ({rf}) <= "
                f"initial_threshold ({r0}) <= 1 (final_threshold 0 would zero every masked weight)"
            )
        if opts["use_id"] and not Path(opts["use_id"]).is_file():
            raise FileNotFoundError(f"platon.use_id (--useID): ID file {opts['use_id']} does not exist")
        if int(opts["deltaT"]) < 1:
            raise ValueError(f"platon.deltaT must be at least 1, got {opts['deltaT']}")
        if not 0.0 <= float(opts["beta1"]) < 1.0:
            raise ValueError(f"platon.beta1 must be in [0, 1), got {opts['beta1']}")
        if float(opts["beta2"]) == 2.0:
            raise ValueError(
                "platon.beta2 = 2 selects the seed's running-variance branch, which is broken there; "
                "use 0 < beta2 < 1 (PLATON) or 1 (Ibar only)"
            )
        for key in ("initial_warmup", "final_warmup"):
            if float(opts[key]) < 0:
                raise ValueError(f"platon.{key} must be >= 0 epochs, got {opts[key]}")
        if opts["warmup_steps"] is not None and int(opts["warmup_steps"]) < 1:
            raise ValueError(f"platon.warmup_steps must be a positive step count or null, got {opts['warmup_steps']}")
        self.opts = opts
        self.r0, self.rf = r0, rf
        self.delta_t = int(opts["deltaT"])
        self.beta1, self.beta2 = float(opts["beta1"]), float(opts["beta2"])
        self.max_epoch = int(config.get("max_epoch", 1))
        self.model: nn.Module | None = None
        self.tensors: list[Masked] = []
        self.keep: list[Tensor] = []  # True = kept
        self.ipt: list[Tensor] = []
        self.ibar: list[Tensor] = []
        self.ubar: list[Tensor] = []
        self.id_factor: list[float] = []
        self.ids: dict[str, float] | None = None
        self._flat: Tensor | None = None
        self.ratio = r0
        self.last_step = 0
        self.total = 0
        self.mask_events = 0
        self.threshold: float | None = None

    # ------------------------------------------------------------------------------------ wiring
    def attach(self, model: nn.Module) -> None:
        self.model = model
        self.tensors = masked_tensors(model, bool(self.opts["mask_bias"]))
        modules = list(dict.fromkeys(t.module for t in self.tensors))
        self.ids = None
        if self.opts["use_id"]:
            self.ids = load_ids(self.opts["use_id"], modules, self.opts["id_names"] or None)
        self.id_factor = [self.ids[t.module] if self.ids else 1.0 for t in self.tensors]
        self.keep = [torch.ones_like(t.param, dtype=torch.bool) for t in self.tensors]
        if self.opts["importance"] == "platon":
            unc = 0.0 < self.beta2 < 1.0
            self.ipt = [torch.zeros_like(t.param, dtype=torch.float32) for t in self.tensors]
            self.ibar = [torch.zeros_like(t.param, dtype=torch.float32) for t in self.tensors]
            self.ubar = [torch.zeros_like(t.param, dtype=torch.float32) for t in self.tensors] if unc else []
        n = sum(t.param.numel() for t in self.tensors)
        log.info(
            "platon: %s importance%s over %d modules, %d tensors, %d entries (%s); final remaining ratio %.3f",
            self.opts["importance"],
            f" x ID from {self.opts['use_id']}" if self.ids else "",
            len(modules),
            len(self.tensors),
            n,
            "weights + biases" if self.opts["mask_bias"] else "weights only",
            self.rf,
        )

    def _sync_device(self) -> None:
        """Attach runs before the engine moves the model to its device; follow it once it has."""
        device = self.tensors[0].param.device
        if self.keep[0].device == device:
            return
        self.keep = [k.to(device) for k in self.keep]
        self.ipt = [x.to(device) for x in self.ipt]
        self.ibar = [x.to(device) for x in self.ibar]
        self.ubar = [x.to(device) for x in self.ubar]
        self._flat = None

    def _persistent(self) -> bool:
        return not self.opts["seed_regrow"]

    # ------------------------------------------------------------------------------------ schedule
    def steps_per_epoch(self, total: int) -> float:
        return total / max(1, self.max_epoch)

    def warmup_steps(self, total: int) -> float:
        fixed = self.opts["warmup_steps"]
        return float(fixed) if fixed is not None else self.steps_per_epoch(total)

    def schedule(self, step: int, total: int) -> tuple[float, bool]:
        w = self.warmup_steps(total)
        per_epoch = self.steps_per_epoch(total)
        epoch_len = round(per_epoch) if self.opts["mask_at_epoch_end"] and per_epoch == round(per_epoch) else None
        return schedule(
            step,
            total,
            float(self.opts["initial_warmup"]) * w,
            float(self.opts["final_warmup"]) * w,
            self.r0,
            self.rf,
            self.delta_t,
            epoch_len,
        )

    # ------------------------------------------------------------------------------------ hooks
    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module, grad_scale: float = 1.0) -> None:
        """Pruned entries get no update, so AdamW's moments for them decay instead of pushing them back."""
        if not self._persistent() or not self.tensors:
            return
        self._sync_device()
        for t, keep in zip(self.tensors, self.keep):
            g = t.param.grad
            if g is not None:
                g.mul_(keep)

    @torch.no_grad()
    def step(self, model: nn.Module, step: int, total: int, lr: float = 0.0) -> None:
        self._sync_device()
        if self.total and total != self.total:
            log.warning("platon: the phase length changed from %d to %d steps", self.total, total)
        self.total, self.last_step = total, step
        if self._persistent():
            self.apply_masks()
        if self.opts["importance"] == "platon":
            self._update_scores(step)
        self.ratio, do_mask = self.schedule(step, total)
        if do_mask:
            self.mask(self.ratio)

    def _sensitivity(self, t: Masked) -> Tensor:
        p = t.param
        g = p.grad
        if g is None:  # a module this batch did not use contributes no sensitivity
            return torch.zeros_like(p, dtype=torch.float32)
        # A step skipped by the fp16 scaler leaves inf/nan gradients: they carry no information.
        return torch.nan_to_num((p.detach().float() * g.float()).abs_(), nan=0.0, posinf=0.0, neginf=0.0)

    def _update_scores(self, step: int) -> None:
        ubars: Iterable[Tensor | None] = self.ubar if self.ubar else [None] * len(self.tensors)
        for t, ipt, ibar, ubar in zip(self.tensors, self.ipt, self.ibar, ubars):
            update_platon(ipt, ibar, ubar, self._sensitivity(t), step, self.delta_t, self.beta1, self.beta2)

    def scores(self) -> list[Tensor]:
        """The current importance of every masked entry, ID-weighted (views into one flat buffer)."""
        sizes = [t.param.numel() for t in self.tensors]
        n = sum(sizes)
        device = self.tensors[0].param.device
        if self._flat is None or self._flat.numel() != n or self._flat.device != device:
            self._flat = torch.empty(n, dtype=torch.float32, device=device)  # allocated once (E3)
        out = [v.view_as(t.param) for v, t in zip(self._flat.split(sizes), self.tensors)]
        imp = self.opts["importance"]
        for i, (t, o) in enumerate(zip(self.tensors, out)):
            if imp == "platon":
                platon_score(self.ipt[i], self.ibar[i], self.ubar[i] if self.ubar else None, self.beta2, o)
            elif imp == "magnitude":
                torch.abs(t.param.detach().float(), out=o)
            else:
                o.copy_(self._sensitivity(t))
            if self.id_factor[i] != 1.0:
                o.mul_(self.id_factor[i])
        return out

    @torch.no_grad()
    def mask(self, ratio: float) -> None:
        """Re-rank every masked entry and keep the best ``ratio`` of them (one global threshold)."""
        self._sync_device()
        k = prune_count(sum(keep.numel() for keep in self.keep), ratio)
        exact = not self.opts["seed_threshold"]
        if exact and self._persistent() and k <= sum(int((~keep).sum()) for keep in self.keep):
            # The final phase: ranking could only return the pruned set again.
            self.mask_events += 1
            return
        scores = self.scores()
        flat = self._flat
        flat.nan_to_num_(nan=0.0)
        if not exact:
            pruned, tau = seed_select(scores, flat, k)
        else:
            if self._persistent():
                # Already-pruned entries rank below every survivor: a pruned weight stays pruned.
                for s, keep in zip(scores, self.keep):
                    s.masked_fill_(~keep, -math.inf)
            chosen, tau = select_lowest(flat, k)
            pruned = [c.view_as(s) for c, s in zip(chosen.split([s.numel() for s in scores]), scores)]
        persistent = self._persistent()
        for t, keep, p in zip(self.tensors, self.keep, pruned):
            if persistent:
                keep.logical_and_(~p)
            else:
                keep.copy_(~p)
            t.param.detach().masked_fill_(p, 0.0)
        if tau is not None and math.isfinite(tau):  # the score at the last cut that pruned anything new
            self.threshold = tau
        self.mask_events += 1

    @torch.no_grad()
    def apply_masks(self) -> None:
        for t, keep in zip(self.tensors, self.keep):
            t.param.detach().mul_(keep)

    def epoch_end(self, epoch: int, engine: Any) -> None:
        if self.opts["reset_each_epoch"]:
            for x in (*self.ipt, *self.ibar, *self.ubar):
                x.zero_()

    def at_target(self) -> bool:
        """Only epochs that end at the final ratio compete for the run's best checkpoint: an earlier, denser
        epoch would otherwise win model selection (the seed's caption run keeps its unpruned first epoch)."""
        return self.ratio == self.rf

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        names = [t.name for t in self.tensors]
        state: dict[str, Any] = {
            "names": names,
            "keep": {n: k.cpu() for n, k in zip(names, self.keep)},
            "ratio": self.ratio,
            "last_step": self.last_step,
            "total": self.total,
            "mask_events": self.mask_events,
            "threshold": self.threshold,
        }
        if self.ipt:
            state["ipt"] = {n: x.cpu() for n, x in zip(names, self.ipt)}
            state["ibar"] = {n: x.cpu() for n, x in zip(names, self.ibar)}
        if self.ubar:
            state["ubar"] = {n: x.cpu() for n, x in zip(names, self.ubar)}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        names = [t.name for t in self.tensors]
        if list(state.get("names", [])) != names:
            saved = list(state.get("names", []))
            diff = sorted(set(saved) ^ set(names))
            raise ValueError(
                f"platon: the saved state masks {len(saved)} tensors, this model {len(names)}"
                + (f"; differing: {diff[:6]}" if diff else " (same names, another order)")
            )
        self._sync_device()
        for key, dest in (("keep", self.keep), ("ipt", self.ipt), ("ibar", self.ibar), ("ubar", self.ubar)):
            if not dest:
                continue
            if key not in state:
                raise ValueError(f"platon: the saved state has no '{key}' (saved with another importance or beta2?)")
            for n, x in zip(names, dest):
                x.copy_(state[key][n])
        self.ratio = float(state["ratio"])
        self.last_step, self.total = int(state["last_step"]), int(state["total"])
        self.mask_events = int(state["mask_events"])
        self.threshold = state["threshold"]

    def report(self) -> dict:
        pruned = sum(int((~k).sum()) for k in self.keep)
        numel = sum(k.numel() for k in self.keep)
        out: dict[str, Any] = {
            "importance": self.opts["importance"],
            "use_id": self.opts["use_id"] or None,
            "final_threshold": self.rf,
            "target_sparsity": 1.0 - self.rf,
            "remaining_ratio": self.ratio,
            "step": self.last_step,
            "total_steps": self.total,
            "warmup_steps": self.warmup_steps(self.total) if self.total else None,
            "mask_events": self.mask_events,
            "threshold": self.threshold,
            "mask": {"pruned": pruned, "numel": numel, "sparsity": pruned / numel if numel else 0.0},
        }
        if self.ids:
            for modality in sorted({t.modality for t in self.tensors}):
                vals = [self.ids[m] for m in dict.fromkeys(t.module for t in self.tensors if t.modality == modality)]
                out.setdefault("id_mean", {})[modality] = sum(vals) / len(vals)
        if self.model is not None:
            out["sparsity"] = measure_sparsity(self.model, bool(self.opts["mask_bias"]))
        return out
