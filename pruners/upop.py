"""UPop: unified and progressive structured pruning (Shi et al., ICML 2023; sdc17/UPop).

Every attention module gets one mask entry per head dimension (shared by all heads and by Q, K and V)
and every FFN one entry per hidden neuron. During the search the model is fine-tuned while the masks
stay out of the optimizer; their gradients are summed instead. Every ``interval`` steps the summed
gradients are z-scored (attention entries and FFN entries separately, each over every modality at
once), ranked in one list, and the cost-weighted prefix that makes up ``p_t`` of the total cost is
pruned: those entries are set to ``1 - p_t / p``, the rest to 1. ``p_t`` follows
``p * sin(pi (s + 1) / (2 S))``, so at the last search step the masks are exactly 0 or 1. Then the
zero entries are sliced out of the Linear layers and the smaller dense model is retrained.

The core is three pure functions (:func:`progressive_ratio`, :func:`is_update_step`,
:func:`unified_selection`); :class:`UPop` wires them into a model through its prunable units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engine import PhaseSpec
from models.arch import apply_architecture, architecture, model_units, sync_momentum_towers
from models.layers import Mlp, Unit
from pruners.base import Pruner
from utils import log

SEARCH_KINDS = ("head_dim", "neuron")


def progressive_ratio(p: float, s: int, total: int) -> float:
    """The pruned share of the budget after search step ``s`` (0-based) of ``total``; exactly ``p`` at the end."""
    return p * math.sin(math.pi * (s + 1) / (2 * total))


def is_update_step(s: int, total: int, interval: int, at_start: bool = True) -> bool:
    """Masks are re-ranked every ``interval`` steps (step 0 included only ``at_start``: the BLIP/CLIP seeds
    do, the DeiT seed does not) and always at the last search step."""
    return (s % interval == 0 and (at_start or s > 0)) or s == total - 1


def _zscore(x: Tensor) -> Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()  # unbiased, as the seed
    return (x - x.mean()) / std if std > 0 else x - x.mean()


def unified_selection(
    scores: Sequence[Tensor], is_attn: Sequence[bool], attn_cost: float, ratio: float
) -> list[Tensor]:
    """Boolean keep-vectors, one per mask, from one global cost-weighted ranking.

    ``scores`` are per-entry importances where *higher means prune first* (UPop: the summed mask
    gradient). Attention and FFN scores are z-scored as two groups; entries are sorted descending;
    with attention entries costing ``attn_cost`` and FFN entries 1, the threshold is the score at
    the position whose cumulative cost is closest to ``ratio`` of the total. Entries strictly above
    it are pruned, except that every mask keeps its own lowest-scoring entry.
    """
    scores = [s.detach().double().flatten() for s in scores]
    attn = [i for i, a in enumerate(is_attn) if a]
    ffn = [i for i, a in enumerate(is_attn) if not a]
    z: list[Tensor | None] = [None] * len(scores)
    for group in (attn, ffn):
        if not group:
            continue
        flat = _zscore(torch.cat([scores[i] for i in group]))
        for i, part in zip(group, flat.split([scores[i].numel() for i in group])):
            z[i] = part
    all_z = torch.cat(z)
    costs = torch.cat([torch.full_like(zi, attn_cost if a else 1.0) for zi, a in zip(z, is_attn)])
    order = torch.sort(all_z, descending=True, stable=True).indices
    cum = costs[order].cumsum(0)
    k = int(torch.argmin((cum - ratio * cum[-1]).abs()))
    tau = all_z[order[k]]
    return [(zi <= tau) | (zi == zi.min()) for zi in z]


def entry_weight_norms(unit: Unit) -> Tensor:
    """L2 norm of all weights one mask entry gates: the magnitude baseline's importance."""
    m = unit.module
    if unit.kind == "head_dim":
        h, d = m.num_heads, m.head_dim
        if m.fused:
            sq = m.qkv.weight.detach().view(3, h, d, -1).pow(2).sum(dim=(0, 1, 3))
        else:
            sq = sum(lin.weight.detach().view(h, d, -1).pow(2).sum(dim=(0, 2)) for lin in (m.query, m.key, m.value))
        out = m.proj if m.proj is not None else getattr(m, "output_dense", None)
        if out is not None:
            sq = sq + out.weight.detach().view(out.out_features, h, d).pow(2).sum(dim=(0, 1))
        return sq.sqrt()
    if unit.kind == "neuron":
        first, second = (m.fc1, m.fc2) if isinstance(m, Mlp) else (m.dense, m.output_dense)
        sq = first.weight.detach().pow(2).sum(1)
        if second is not None:
            sq = sq + second.weight.detach().pow(2).sum(0)
        return sq.sqrt()
    raise ValueError(f"no magnitude score for unit kind {unit.kind!r}")


def _default_linear_bias(linear: nn.Linear) -> None:
    bound = 1 / math.sqrt(linear.in_features) if linear.in_features > 0 else 0
    with torch.no_grad():
        linear.bias.uniform_(-bound, bound)


class UPop(Pruner):
    """Unified progressive search over head dimensions and FFN neurons, then physical compression.

    Config: ``p`` (the target share of the cost-weighted mask budget: 0.5 is "2x") and the ``upop``
    section (see ``DEFAULTS``). The engine runs ``search_epochs`` epochs of search with a constant
    learning rate, calls :meth:`compress`, then retrains for ``max_epoch`` epochs with a fresh optimizer.
    """

    name = "upop"
    DEFAULTS: dict[str, Any] = {
        "epochs": None,  # retrain epochs with this pruner (None: max_epoch; --epoch wins)
        "interval": 50,  # optimizer steps between mask updates
        "search_epochs": None,  # None: as many as the retrain epochs (the seed's --epoch N = N + N)
        "update_at_start": True,  # also re-rank at search step 0 (BLIP/CLIP seeds; the DeiT seed starts at interval)
        "w_sp_attn": 4.8e-3,  # L1 weights of the masks
        "w_sp_mlp": 2e-4,
        "w_sp_divide_world": True,  # divide the L1 weights by the world size (BLIP/CLIP seeds; the DeiT seed does not)
        "attn_cost": None,  # cost of one attention entry against one FFN neuron; None: int(param ratio)
        "importance": "gradient",  # gradient (UPop) | magnitude (the same search ranked by weight norm)
        "round_to": 1,  # kept widths rounded up to a multiple of this at compression
        "parity_scale": False,  # BERT attention takes 1/sqrt(kept width) at compression (the seed)
        "parity_qkv_bias_reinit": False,  # re-initialise the ViT qkv bias at compression (the seed's bug, §4.1)
    }

    FLAGS = {
        "--interval": ("upop.interval", int, "optimizer steps between mask updates"),
        "--w_sp_attn": ("upop.w_sp_attn", float, "L1 weight of the attention masks"),
        "--w_sp_mlp": ("upop.w_sp_mlp", float, "L1 weight of the FFN masks"),
    }

    def __init__(self, config: dict):
        super().__init__(config)
        opts = self.options()
        p = config.get("p")
        self.p = 0.5 if p is None else float(p)  # UPop's "2x"
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"upop: p (--p) is the pruned share of the mask budget, in [0, 1); got {self.p}")
        if opts["importance"] not in ("gradient", "magnitude"):
            raise ValueError(f"upop.importance must be 'gradient' or 'magnitude', got {opts['importance']!r}")
        if int(opts["interval"]) < 1 or int(opts["round_to"]) < 1:
            raise ValueError("upop.interval and upop.round_to must be at least 1")
        for key in ("epochs", "search_epochs"):
            if opts[key] is not None and int(opts[key]) < 1:
                raise ValueError(f"upop.{key} must be at least 1 (or null), got {opts[key]}")
        self.opts = opts
        self.search_epochs = int(opts["search_epochs"] or config.get("max_epoch", 1))
        self.units: list[Unit] = []
        self.masks: list[Tensor] = []
        self.accum: list[Tensor] = []
        self.attn_cost = 1.0
        self.p_t = 0.0
        self.updates = 0
        self.compressed = False
        self.model: nn.Module | None = None
        self.dense_arch: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------ wiring
    def attach(self, model: nn.Module) -> None:
        self.model = model
        self.dense_arch = architecture(model)
        self.units = [u for u in model_units(model) if u.kind in SEARCH_KINDS]
        if not self.units:
            raise ValueError(f"{type(model).__name__} has no head-dim or neuron units to search")
        device = next(model.parameters()).device
        self.masks = [torch.ones(u.size, device=device, requires_grad=True) for u in self.units]
        self.accum = [torch.zeros(u.size, dtype=torch.float64, device=device) for u in self.units]
        for u, m in zip(self.units, self.masks):
            u.set_mask(m)
        attn = [u.cost for u in self.units if u.kind == "head_dim"]
        ffn = [u.cost for u in self.units if u.kind == "neuron"]
        if self.opts["attn_cost"] is not None:
            self.attn_cost = float(self.opts["attn_cost"])
        elif attn and ffn:
            self.attn_cost = float(int(attn[0] / ffn[0]))  # the DeiT seed's int(9234 / 769) = 12
        log.info(
            "upop: %d masks (%d attention entries, %d FFN entries), p=%.3f, attention cost %g",
            len(self.masks),
            sum(u.size for u in self.units if u.kind == "head_dim"),
            sum(u.size for u in self.units if u.kind == "neuron"),
            self.p,
            self.attn_cost,
        )

    def _move(self, device: torch.device) -> None:
        if self.masks and self.masks[0].device != device:
            self.masks = [m.detach().to(device).requires_grad_(True) for m in self.masks]
            self.accum = [a.to(device) for a in self.accum]
            for u, m in zip(self.units, self.masks):
                u.set_mask(m)

    def loss(self, model: nn.Module, outputs: dict) -> Tensor | None:
        if self.compressed:
            return None
        self._move(next(model.parameters()).device)
        world = dist.get_world_size() if dist.is_initialized() and self.opts["w_sp_divide_world"] else 1
        attn = sum(m.abs().sum() for u, m in zip(self.units, self.masks) if u.kind == "head_dim")
        ffn = sum(m.abs().sum() for u, m in zip(self.units, self.masks) if u.kind == "neuron")
        return (self.opts["w_sp_attn"] * attn + self.opts["w_sp_mlp"] * ffn) / world

    def before_optimizer_step(self, model: nn.Module, grad_scale: float = 1.0) -> None:
        """Add this step's mask gradients (averaged over ranks, unscaled) to the running sums."""
        if self.compressed:
            return
        grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in self.masks]
        flat = torch.cat([g.detach().flatten() for g in grads]).double()
        if dist.is_initialized():
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        flat /= grad_scale
        for a, g in zip(self.accum, flat.split([m.numel() for m in self.masks])):
            a += g
        for m in self.masks:
            m.grad = None

    def phases(self, cfg: Any) -> list[PhaseSpec]:
        """Search at a constant learning rate (evaluated only once compressed), then retrain the smaller model
        with a fresh optimizer and the config's schedule, without the pruner."""
        return [
            PhaseSpec("search", self.search_epochs, lr_schedule="constant", evaluate="end"),
            PhaseSpec("train", cfg.max_epoch, pruning=False),
        ]

    def phase_end(self, name: str, model: nn.Module) -> bool:
        if name != "search":
            return False
        self.compress(model)
        return True

    @property
    def exports_model(self) -> bool:
        return self.compressed

    def step(self, model: nn.Module, step: int, total: int, lr: float = 0.0) -> None:
        s = step - 1
        at_start = bool(self.opts["update_at_start"])
        if self.compressed or self.p == 0 or not is_update_step(s, total, int(self.opts["interval"]), at_start):
            return
        self.update(progressive_ratio(self.p, s, total))

    # ------------------------------------------------------------------------------------ search
    def scores(self) -> list[Tensor]:
        """Per-entry scores, higher = prune first."""
        if self.opts["importance"] == "gradient":
            return self.accum
        return [-entry_weight_norms(u).double() for u in self.units]

    def update(self, p_t: float) -> None:
        """Re-rank every entry and set the masks for the pruned share ``p_t`` of the budget."""
        keeps = unified_selection(self.scores(), [u.kind == "head_dim" for u in self.units], self.attn_cost, p_t)
        soft = 1.0 - p_t / self.p
        with torch.no_grad():
            for m, keep in zip(self.masks, keeps):
                m.copy_(torch.where(keep.to(m.device), 1.0, soft))
        self.p_t = p_t
        self.updates += 1
        pruned_attn = sum(int((m < 1).sum()) for u, m in zip(self.units, self.masks) if u.kind == "head_dim")
        pruned_ffn = sum(int((m < 1).sum()) for u, m in zip(self.units, self.masks) if u.kind == "neuron")
        log.debug(
            "upop update %d: p_t=%.4f, pruned %d attention / %d FFN entries", self.updates, p_t, pruned_attn, pruned_ffn
        )

    def budget(self) -> dict[str, float]:
        """The cost-weighted share of mask entries currently below 1 (what ``p`` targets)."""
        total = pruned = 0.0
        for u, m in zip(self.units, self.masks):
            c = self.attn_cost if u.kind == "head_dim" else 1.0
            total += c * m.numel()
            pruned += c * int((m < 1).sum())
        return {"pruned_cost": pruned, "total_cost": total, "ratio": pruned / total if total else 0.0}

    # ------------------------------------------------------------------------------------ compression
    def at_target(self) -> bool:
        return self.compressed

    def _keep_indices(self, unit: Unit, mask: Tensor, score: Tensor) -> Tensor:
        m = mask.detach().cpu()
        if not bool(((m == 0) | (m == 1)).all()):
            raise RuntimeError(
                f"upop: the mask of {unit.name} is not binary (p_t={self.p_t:.4f} < p={self.p}); "
                "compression needs the search to reach its last step"
            )
        keep = m == 1
        k = int(self.opts["round_to"])
        want = min(unit.size, math.ceil(int(keep.sum()) / k) * k)
        if want > int(keep.sum()):
            # Hardware-friendly widths: restore the most important pruned entries (lowest scores).
            pruned = (~keep).nonzero().flatten()
            best = pruned[torch.argsort(score.detach().cpu()[pruned], stable=True)[: want - int(keep.sum())]]
            keep[best] = True
        return keep.nonzero().flatten()

    def compress(self, model: nn.Module) -> nn.Module:
        """Slice every masked entry out of its Linear layers; the model becomes an ordinary smaller model."""
        if self.compressed:
            return model
        kwargs = {} if self.opts["parity_scale"] else {"rescale": False}
        for u, m, score in zip(self.units, self.masks, self.scores()):
            idx = self._keep_indices(u, m, score)
            if u.kind == "head_dim":
                u.keep(idx, **kwargs)
                if self.opts["parity_qkv_bias_reinit"] and getattr(u.module, "fused", False):
                    _default_linear_bias(u.module.qkv)
            else:
                u.keep(idx)
            u.set_mask(None)
        sync_momentum_towers(model)
        self.compressed = True
        self.masks, self.accum = [], []
        log.info("upop: compressed at p=%.3f; kept %s", self.p, self.kept())
        return model

    def kept(self) -> dict[str, float]:
        from models.arch import kept_fraction

        return kept_fraction(self.model, self.dense_arch["units"])

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state: dict[str, Any] = {"p": self.p, "p_t": self.p_t, "updates": self.updates, "compressed": self.compressed}
        if self.compressed:
            state["arch"] = architecture(self.model)
        else:
            state["masks"] = [m.detach().cpu() for m in self.masks]
            state["accum"] = [a.cpu() for a in self.accum]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.p_t, self.updates = float(state["p_t"]), int(state["updates"])
        if state.get("compressed"):
            for u in self.units:
                u.set_mask(None)
            apply_architecture(self.model, state["arch"], "the UPop resume state")
            self.compressed = True
            self.masks, self.accum = [], []
            return
        with torch.no_grad():
            for m, saved in zip(self.masks, state["masks"]):
                m.copy_(saved)
            for a, saved in zip(self.accum, state["accum"]):
                a.copy_(saved)

    def report(self) -> dict:
        out: dict[str, Any] = {
            "p": self.p,
            "p_t": self.p_t,
            "mask_updates": self.updates,
            "importance": self.opts["importance"],
            "attn_cost": self.attn_cost,
            "compressed": self.compressed,
        }
        if self.model is not None and self.dense_arch is not None:
            out["kept"] = self.kept()
        if not self.compressed and self.masks:
            out["budget"] = self.budget()
        return out
