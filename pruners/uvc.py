"""UVC: unified ViT compression (Yu et al., ICLR 2022; VITA-Group/UVC), on DeiT.

Heads, value coordinates inside each head and MLP neurons are pruned, and whole blocks skipped, under a FLOPs
budget ``B`` solved as a min-max problem (spec uvc_deit.md sections 2-4):

* continuous *counts* ``s`` (L, 2: whole heads, MLP neurons) and ``r`` (L, H: value coordinates per head) say how
  many groups each block loses; *which* groups is re-ranked from the current weights by magnitude (the squared
  norm of a head's / a coordinate's ``proj`` input columns, of a neuron's ``fc2`` column), the ``ceil(count)``
  lowest being selected;
* block gates ``g`` (L, 2: skip, execute) sampled by Gumbel-softmax mix each block with its input;
* the Lagrangian ``KD loss + sum y * LeastS(s) + sum p * LeastS(r) + z * (R - B)``: the weights take AdamW steps
  and a proximal shrink of the selected groups, the counts and gates gradient steps, the duals ``y, p, z``
  projected ascent. ``R`` is the model's MACs as a differentiable function of the counts and gates, read from
  the shared cost model (:func:`block_macs`).

Then the selection is frozen, the gates decided by argmax, and the model *materialised* (heads, value rows,
neurons and skipped blocks deleted: an ordinary model with uneven widths that evaluates without this code) and
post-trained with distillation from the uncompressed teacher.

The core is a handful of pure functions (:func:`ceil_st`, :func:`least_s`, :func:`prox_shrink`,
:func:`gate_weights`, :func:`block_macs`, :func:`resource`, :func:`dual_ascent`, :func:`box_sgd`);
:class:`UVC` wires them into a :class:`~models.vit.VisionTransformer`. Switches named ``parity_*`` reproduce
behaviours of the released code that spec section 9 lists as bugs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from engine import PhaseSpec
from models.arch import skip_blocks
from models.cost import linear, vit_block_cost
from models.uvc_checkpoints import cut_block
from pruners.base import Pruner
from utils import log

__all__ = [
    "UVC",
    "Selection",
    "block_macs",
    "box_sgd",
    "ceil_st",
    "dual_ascent",
    "gate_weights",
    "group_scores",
    "least_s",
    "prox_shrink",
    "resource",
    "select",
]

RESOURCES = ("released", "materialised")


# ------------------------------------------------------------------------------------------------ pure functions


def ceil_st(x: Tensor) -> Tensor:
    """``ceil(x)`` forward, identity backward (UVC's straight-through ceil on the counts)."""
    return x + (torch.ceil(x) - x).detach()


class _LeastS(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, count: Tensor, scores: Tensor) -> Tensor:
        k = int(math.ceil(float(count)))
        ordered = scores.detach().flatten().sort().values
        ctx.next_score = ordered[k] if k < ordered.numel() else ordered.new_zeros(())
        return ordered[:k].sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.next_score, None


def least_s(count: Tensor, scores: Tensor) -> Tensor:
    """The sum of the ``ceil(count)`` smallest ``scores``; its derivative in ``count`` is the next smallest score
    (the marginal cost of selecting one group more). No gradient reaches the scores (the proximal step acts on
    the weights instead)."""
    return _LeastS.apply(count, scores)


def prox_shrink(columns: Tensor, multiplier: Tensor | float, lr: float) -> Tensor:
    """The proximal step of ``multiplier * ||W_G||^2`` at learning rate ``lr``: ``W_G / (1 + 2 lr multiplier)``."""
    return columns / (1.0 + 2.0 * lr * multiplier)


def gate_weights(logits: Tensor, mode: str, tau: float = 0.5, hard: bool = False, eps: float = 0.1) -> Tensor:
    """Execution weights (L,) of the blocks from gate logits (L, 2: skip, execute).

    ``gumbel``: the execute component of a fresh Gumbel-softmax sample at temperature ``tau`` (straight-through
    one-hot with ``hard``); ``soft_l0``: ``g1^2 / (g1^2 + eps)`` (UVC's ``use_gumbel 0``); ``argmax``: 1 where
    execute beats skip, else 0 (the final decision); ``half``: 0.5 everywhere (UVC's warm-up).
    """
    if mode == "gumbel":
        return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=-1)[:, 1]
    if mode == "soft_l0":
        sq = logits[:, 1] ** 2
        return sq / (sq + eps)
    if mode == "argmax":
        return (logits[:, 1] > logits[:, 0]).to(logits.dtype)
    if mode == "half":
        return logits.new_full((logits.shape[0],), 0.5)
    raise ValueError(f"unknown gate mode {mode!r}")


def block_macs(
    dim: int,
    tokens: int,
    heads: Tensor | float,
    head_dim: int,
    value_width: Tensor | float,
    hidden: Tensor | float,
    kind: str = "released",
) -> Tensor | float:
    """Multiply-adds of one DeiT block (``tokens`` tokens) with ``heads`` heads, ``value_width`` value
    coordinates summed over heads and ``hidden`` neurons, all possibly continuous tensors.

    ``released``: UVC's resource (spec section 3): the qkv projection scales with the heads only (the value rows
    its in-head pruning makes dead are not credited), the attention-times-value product and the output
    projection with ``value_width``. ``materialised``: what the materialised model computes (value rows removed
    from qkv; the attention product at the padded width of the kept heads, see ``models.layers.Attention``).
    """
    if kind not in RESOURCES:
        raise ValueError(f"uvc.resource must be one of {RESOURCES}, got {kind!r}")
    qk = heads * head_dim
    if kind == "materialised":
        return vit_block_cost(1, dim, heads, head_dim, hidden, tokens, v_dim=qk, v_proj=value_width).macs
    cost = vit_block_cost(1, dim, heads, head_dim, hidden, tokens, v_dim=value_width, v_proj=value_width).macs
    return cost + linear(tokens, dim, qk - value_width).macs


@dataclass
class Geometry:
    """What the resource needs of a dense DeiT: width, tokens, heads, head width, MLP width, depth, patch MACs."""

    dim: int
    tokens: int
    heads: int
    head_dim: int
    hidden: int
    depth: int
    embed_macs: int

    @classmethod
    def of(cls, vit: nn.Module) -> Geometry:
        conv = vit.patch_embed.proj
        patches = vit.patch_embed.num_patches
        block = vit.blocks[0]
        return cls(
            dim=vit.embed_dim,
            tokens=patches + vit.num_prefix_tokens,
            heads=block.attn.num_heads,
            head_dim=block.attn.head_dim,
            hidden=block.mlp.hidden,
            depth=len(vit.blocks),
            embed_macs=patches * conv.in_channels * math.prod(conv.kernel_size) * conv.out_channels,
        )

    def dense_macs(self) -> int:
        """Patch embedding plus every block (heads, LayerNorms and softmax not counted, as UVC)."""
        one = block_macs(self.dim, self.tokens, self.heads, self.head_dim, self.dim, self.hidden)
        return int(self.embed_macs + self.depth * one)


def resource(
    geo: Geometry,
    s: Tensor,
    r: Tensor,
    execute: Tensor,
    pruned_heads: Tensor,
    kind: str = "released",
) -> Tensor:
    """``R``: the model's MACs over the dense model's (1 = dense), differentiable in the counts ``s`` (L, 2),
    ``r`` (L, H) through :func:`ceil_st` and in the execution weights ``execute`` (L,). ``pruned_heads`` (L, H,
    bool) marks the heads currently selected for removal, whose value coordinates count with the head (a choice,
    not differentiated). Computed in float64 (a block's share is ~1e-2 of ~1e9 MACs)."""
    s, r, execute = s.double(), r.double(), execute.double()
    hs = ceil_st(s[:, 0])
    heads = geo.heads - hs
    hidden = geo.hidden - ceil_st(s[:, 1])
    kept_r = (ceil_st(r) * (~pruned_heads).to(r.dtype)).sum(dim=1)
    value = (geo.dim - geo.head_dim * hs - kept_r).clamp_min(0)
    total = s.new_tensor(float(geo.embed_macs))
    for layer in range(geo.depth):
        cost = block_macs(geo.dim, geo.tokens, heads[layer], geo.head_dim, value[layer], hidden[layer], kind)
        total = total + execute[layer] * cost
    return total / geo.dense_macs()


def box_sgd(x: Tensor, grad: Tensor, upper: Tensor, lr: float) -> Tensor:
    """UVC's step on a count matrix: a coordinate at its upper bound may only fall, one at 0 only rise; the gradient
    is rescaled so its largest entry is at most 1; one SGD step; the result clipped to ``[0, upper]``."""
    grad = grad.clone()
    grad[(x >= upper) & (grad < 0)] = 0
    grad[(x <= 0) & (grad > 0)] = 0
    grad = grad / grad.abs().max().clamp_min(1.0)
    return torch.minimum((x - lr * grad).clamp_min(0), upper)


def dual_ascent(dual: Tensor, violation: Tensor, lr: float) -> Tensor:
    """Projected dual ascent: ``max(0, dual + lr * violation)``."""
    return (dual + lr * violation).clamp_min(0)


# ------------------------------------------------------------------------------------------------ selection


def group_scores(block: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """Squared norms of (heads (H,), value coordinates (H, d), neurons (hidden,)): a head's and a coordinate's
    ``proj`` input columns, a neuron's ``fc2`` column."""
    attn = block.attn
    cols = attn.proj.weight.detach().float().pow(2).sum(0).view(attn.num_heads, attn.head_dim)
    neurons = block.mlp.fc2.weight.detach().float().pow(2).sum(0)
    return cols.sum(1), cols, neurons


@dataclass
class Selection:
    """The groups selected for removal in one block: heads (H,), value coordinates (H, d), neurons (hidden,)."""

    heads: Tensor
    dims: Tensor
    neurons: Tensor

    def proj_columns(self) -> Tensor:
        """Proj input columns (H * d,) that are zero in the masked model: a removed head's or a removed
        coordinate's."""
        return (self.heads[:, None] | self.dims).flatten()


def _lowest(scores: Tensor, k: int) -> Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        keep[scores.argsort(stable=True)[:k]] = True
    return keep


def select(block: nn.Module, s_row: Tensor, r_row: Tensor) -> Selection:
    """The ``ceil(s)`` lowest heads and neurons and, in every head ``i``, the ``ceil(r_i)`` lowest coordinates."""
    heads, cols, neurons = group_scores(block)
    dims = torch.stack([_lowest(cols[i], math.ceil(float(r_row[i]))) for i in range(cols.shape[0])])
    return Selection(_lowest(heads, math.ceil(float(s_row[0]))), dims, _lowest(neurons, math.ceil(float(s_row[1]))))


# ------------------------------------------------------------------------------------------------ the pruner


class UVC(Pruner):
    """Config: the ``uvc`` section (``DEFAULTS``; the released command line's names) and ``--budget``."""

    name = "uvc"
    DEMO_CONFIGS = {"classification": "configs/demo/classification_uvc.yaml"}
    DEFAULTS: dict[str, Any] = {
        "budget": 0.5,  # target R: the share of the dense MACs (patch embedding + blocks) to keep
        "search_epochs": 31,  # stage 1, warm-up included (the release runs num_epochs + 1)
        "warmup_epochs": 5,  # blocks at half weight, only the weights train (the release's warm-up)
        "epochs": None,  # stage 2 post-training epochs (None: max_epoch; --epoch wins)
        "search_lr": 1.0e-4,  # stage-1 AdamW LR (not batch-scaled in the release); null: the config's init_lr
        "search_warmup_steps": 500,  # stage-1 linear LR warm-up, then per-step cosine to 0
        "slr": 0.02,  # SGD LR of the head / neuron counts s
        "rlr": 0.02,  # SGD LR of the in-head counts r
        "ylr": 1.0e-4,  # dual ascent LRs
        "plr": 1.0e-4,
        "zlr_schedule": [1.0, 5.0, 9.0, 13.0, 17.0],  # z's LR per equal segment of the search epochs
        "zlr_mode": "released",  # released: the first value throughout (the release's key bug); intended
        "dual_init": 1.0e-3,  # initial y, p, z
        "z_grad_clip": 0.5,  # clamp on R - B before it is differentiated (not a gradient clip)
        "resource": "released",  # released (UVC's R) | materialised (what the materialised model computes)
        "use_gumbel": True,  # Gumbel-softmax gates; false: soft-L0 with eps
        "tau": 0.5,
        "gumbel_hard": False,
        "eps": 0.1,
        "eps_decay": 0.92,
        "gating_interval": 50,  # iterations between the gates' SGD steps
        "gating_weight": 5.0e-4,  # weight of z * dR/dg in the gate gradient
        "glr": 0.1,  # gate SGD (momentum 0.9, weight decay 1e-4)
        "gate_momentum": 0.9,
        "gate_weight_decay": 1.0e-4,
        "enable_pruning": True,
        "enable_block_gating": True,
        "patch_gating": 0,  # 0: off (the released runs); 1: per-position patch gates (a labelled extension)
        "patch_init": 3.0,
        "patch_l1_weight": 0.01,  # extension (mode 1): L1 on the patch gates
        "patchlr": 0.01,  # extension (mode 1): SGD LR of the patch logits
        "select_by": "budget",  # budget: materialise the search epoch whose deterministic R is the largest not above
        # budget x (1 + budget_tolerance) (spec trap 19: R overshoots); last: the last search epoch
        "budget_tolerance": 0.03,
        "mask_in_search": False,  # true: selected groups zeroed during the search (not the released algorithm)
        "parity_stochastic_eval": False,  # true: evaluate the search with sampled gates, as the release
    }
    FLAGS = {
        "--budget": ("uvc.budget", float, "UVC: share of the dense MACs to keep (0.5: half)"),
        "--search_epochs": ("uvc.search_epochs", int, "UVC: stage-1 epochs, warm-up included"),
        "--warmup_epochs": ("uvc.warmup_epochs", int, "UVC: warm-up epochs inside the search"),
        "--zlr_mode": ("uvc.zlr_mode", str, "UVC: released | intended z learning-rate schedule"),
        "--patch_gating": ("uvc.patch_gating", int, "UVC: 0 off, 1 per-position patch gates (extension)"),
    }

    def __init__(self, config: dict):
        super().__init__(config)
        if config.get("p") is not None:
            raise ValueError("uvc: --p means nothing here; give the FLOPs share to keep with --budget")
        opts = self.options()
        if not 0.0 < float(opts["budget"]) <= 1.0:
            raise ValueError(
                f"uvc.budget (--budget) is the share of the dense MACs to keep, in (0, 1]; got {opts['budget']}"
            )
        if int(opts["search_epochs"]) < 1 or not 0 <= int(opts["warmup_epochs"]) < int(opts["search_epochs"]):
            raise ValueError(
                f"uvc.warmup_epochs ({opts['warmup_epochs']}) must be below uvc.search_epochs ({opts['search_epochs']})"
            )
        if opts["zlr_mode"] not in ("released", "intended"):
            raise ValueError(f"uvc.zlr_mode must be 'released' or 'intended', got {opts['zlr_mode']!r}")
        if opts["resource"] not in RESOURCES:
            raise ValueError(f"uvc.resource must be one of {RESOURCES}, got {opts['resource']!r}")
        if opts["patch_gating"] not in (0, 1):
            raise ValueError(
                f"uvc.patch_gating must be 0 or 1 (the release's mode 2 saves nothing), got {opts['patch_gating']!r}"
            )
        if not opts["zlr_schedule"] or int(opts["gating_interval"]) < 1:
            raise ValueError("uvc.zlr_schedule needs at least one value and uvc.gating_interval must be >= 1")
        if opts["select_by"] not in ("budget", "last"):
            raise ValueError(f"uvc.select_by must be 'budget' or 'last', got {opts['select_by']!r}")
        if not (opts["enable_pruning"] or opts["enable_block_gating"]):
            raise ValueError("uvc: enable_pruning and enable_block_gating are both off; nothing would be searched")
        self.opts = opts
        self.budget = float(opts["budget"])
        self.model: nn.Module | None = None
        self.geo: Geometry | None = None
        self.materialised = False
        self.warm = True
        self.epoch = 0
        self.t = 0  # search iterations after warm-up
        self.eps = float(opts["eps"])
        self.selections: list[Selection] = []
        self._handles: list[Any] = []
        self._pi: Tensor | None = None
        self.chosen: dict[str, Any] | None = None  # the search epoch kept for materialisation (select_by budget)

    # ------------------------------------------------------------------------------------ wiring
    def attach(self, model: nn.Module) -> None:
        from models.layers import SkippedBlock
        from models.vit import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise TypeError(
                f"uvc prunes a ViT / DeiT classifier (models.vit.VisionTransformer), not {type(model).__name__}"
            )
        if any(isinstance(b, SkippedBlock) for b in model.blocks) or any(
            b.attn.value_dims is not None or b.attn.num_heads != model.blocks[0].attn.num_heads for b in model.blocks
        ):
            raise ValueError(
                "uvc searches a dense model; this one is already compressed (skipped blocks or uneven widths)"
            )
        self.model = model
        self.geo = Geometry.of(model)
        geo, device = self.geo, model.pos_embed.device
        self.s = torch.zeros(geo.depth, 2, device=device)
        self.r = torch.zeros(geo.depth, geo.heads, device=device)
        self.s_upper = torch.tensor([geo.heads - 1 - 1e-8, geo.hidden - 1 - 1e-8], device=device).expand(geo.depth, 2)
        self.r_upper = torch.full_like(self.r, geo.head_dim - 1 - 1e-8)
        init = float(self.opts["dual_init"])
        self.y = torch.full((geo.depth, 2), init, device=device)
        self.p = torch.full((geo.depth, geo.heads), init, device=device)
        self.z = torch.tensor(init, device=device)
        # Gate logits (skip, execute) start at (-1, +1): every block executes.
        self.gates = nn.Parameter(torch.tensor([[-1.0, 1.0]] * geo.depth, device=device))
        self.gate_buffer: list[Tensor] = []
        self.gate_velocity: Tensor | None = None
        self.patch_logits = (
            nn.Parameter(
                torch.full((1, model.patch_embed.num_patches, 1), float(self.opts["patch_init"]), device=device)
            )
            if self.opts["patch_gating"] == 1
            else None
        )
        self.refresh_selection()
        self._hook()
        log.info(
            "uvc: budget %.3f of %.4f GMACs (%s resource), %d blocks x %d heads x %d, hidden %d",
            self.budget,
            geo.dense_macs() / 1e9,
            self.opts["resource"],
            geo.depth,
            geo.heads,
            geo.head_dim,
            geo.hidden,
        )

    def _hook(self) -> None:
        model = self.model

        def draw(module: nn.Module, args: Any) -> None:
            self._pi = self.execution(module.training)

        self._handles.append(model.register_forward_pre_hook(draw))
        for layer, block in enumerate(model.blocks):
            self._handles.append(block.register_forward_hook(self._gate_hook(layer), with_kwargs=False))
        if self.patch_logits is not None:
            self._handles.append(model.patch_embed.register_forward_hook(self._patch_hook))

    def _gate_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
            pi = self._pi
            if pi is None:
                return output
            x_in = args[0]
            x_out, state = output
            return pi[layer] * x_out + (1 - pi[layer]) * x_in, state

        return hook

    def _patch_hook(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        x, grid = output
        return x * torch.sigmoid(self.patch_logits).to(x.dtype), grid

    def execution(self, training: bool) -> Tensor | None:
        """The blocks' execution weights for one forward: 0.5 in the warm-up, sampled in the search (also in
        evaluation with ``parity_stochastic_eval``), argmax otherwise; ``None`` (no mixing) without gating."""
        if not self.opts["enable_block_gating"] or self.materialised:
            return None
        if self.warm:
            return gate_weights(self.gates, "half")
        if training or self.opts["parity_stochastic_eval"]:
            return self._sample(self.gates)
        return gate_weights(self.gates.detach(), "argmax")

    def _sample(self, logits: Tensor) -> Tensor:
        if self.opts["use_gumbel"]:
            return gate_weights(logits, "gumbel", float(self.opts["tau"]), bool(self.opts["gumbel_hard"]))
        return gate_weights(logits, "soft_l0", eps=self.eps)

    def param_groups(self) -> list[dict]:
        """The gate logits train with the weights' AdamW too (as in the release), besides their own SGD steps."""
        if self.materialised:
            return []
        groups = []
        if self.opts["enable_block_gating"]:
            groups.append({"params": [self.gates], "lr_scale": 1.0})
        return groups

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """The model without the gate (and patch) hooks: the dense model while searching."""
        if self.materialised:
            yield
            return
        self._unhook()
        try:
            yield
        finally:
            self._hook()

    # ------------------------------------------------------------------------------------ phases
    def phases(self, cfg: Any) -> list[PhaseSpec]:
        """Stage 1 (search, the release's per-step schedule at ``search_lr``), then stage 2 on the materialised
        model with the config's recipe, without the pruner (distillation from the teacher continues)."""
        lr = self.opts["search_lr"]
        return [
            PhaseSpec(
                "search",
                int(self.opts["search_epochs"]),
                lr_schedule="cosine",
                evaluate="every",
                init_lr=None if lr is None else float(lr),
                min_lr=0.0,
                warmup_steps=int(self.opts["search_warmup_steps"]),
                per_step=True,
            ),
            PhaseSpec("post_train", cfg.max_epoch, pruning=False),
        ]

    def phase_end(self, name: str, model: nn.Module) -> bool:
        if name != "search":
            return False
        self.materialise(model)
        return True

    @property
    def exports_model(self) -> bool:
        return self.materialised

    def at_target(self) -> bool:
        return self.materialised

    def epoch_start(self, epoch: int, engine: Any) -> None:
        self.epoch = epoch
        self.warm = epoch < int(self.opts["warmup_epochs"])
        self.gate_buffer = []
        self.refresh_selection()

    def epoch_end(self, epoch: int, engine: Any) -> None:
        self.refresh_selection()
        if not self.warm and not self.opts["use_gumbel"]:
            self.eps *= float(self.opts["eps_decay"])
        if not self.warm and self.opts["select_by"] == "budget":
            value = self.deterministic_resource()
            if value <= self.ceiling and (self.chosen is None or value >= self.chosen["R"]):
                self.chosen = {
                    "epoch": epoch,
                    "R": value,
                    "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                    "s": self.s.cpu().clone(),
                    "r": self.r.cpu().clone(),
                    "gates": self.gates.detach().cpu().clone(),
                }
        log.info("uvc epoch %d: %s", epoch, {k: v for k, v in self.report().items() if k != "blocks"})

    # ------------------------------------------------------------------------------------ the search
    @property
    def ceiling(self) -> float:
        """The largest R a materialised search may end at: the budget plus ``budget_tolerance`` of it."""
        return self.budget * (1 + float(self.opts["budget_tolerance"]))

    def refresh_selection(self) -> None:
        """Re-rank every block's groups by the current weights (UVC does it at each epoch's start and end, and the
        primal-dual step before and after its updates); with ``mask_in_search`` the selection is zeroed too."""
        if self.materialised:
            return
        self._rank()
        if self.opts["mask_in_search"]:
            self.apply_masks()

    def _rank(self) -> None:
        self.selections = [select(b, self.s[i], self.r[i]) for i, b in enumerate(self.model.blocks)]

    def pruned_heads(self) -> Tensor:
        return torch.stack([sel.heads for sel in self.selections]).to(self.s.device)

    def apply_masks(self) -> None:
        """Zero the selected groups' weights (proj columns, fc2 columns, fc1 rows): the masked model."""
        with torch.no_grad():
            for block, sel in zip(self.model.blocks, self.selections):
                cols = sel.proj_columns().to(block.attn.proj.weight.device)
                block.attn.proj.weight[:, cols] = 0
                neurons = sel.neurons.to(block.mlp.fc2.weight.device)
                block.mlp.fc2.weight[:, neurons] = 0
                block.mlp.fc1.weight[neurons] = 0

    def loss(self, model: nn.Module, outputs: dict) -> Tensor | None:
        if self.patch_logits is None or self.materialised:
            return None
        # Extension (mode 1): an L1 pull on the patch gates (parsed but unused in the release).
        return float(self.opts["patch_l1_weight"]) * torch.sigmoid(self.patch_logits).mean()

    def before_optimizer_step(self, model: nn.Module, grad_scale: float = 1.0) -> None:
        """The gate (and patch) logits live outside the model: DDP does not average their gradients, so do it."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for p in (self.gates, self.patch_logits):
            if p is not None and p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()

    def _zlr(self) -> float:
        values = [float(v) for v in self.opts["zlr_schedule"]]
        if self.opts["zlr_mode"] == "released":
            return values[0]
        segment = max(1, int(self.opts["search_epochs"]) // len(values))
        return values[min(self.epoch // segment, len(values) - 1)]

    def step(self, model: nn.Module, step: int, total: int, lr: float = 0.0) -> None:
        """One iteration of the primal-dual search after the weights' AdamW step (spec section 2.5, 3-6)."""
        if self.materialised:
            return
        self._rank()
        if self.opts["enable_pruning"]:
            self._prox(lr)
        if self.patch_logits is not None and self.patch_logits.grad is not None:
            with torch.no_grad():  # extension: the patch logits' own SGD step
                self.patch_logits -= float(self.opts["patchlr"]) * self.patch_logits.grad
        if self.warm:
            self._sync()
            return
        self.t += 1
        opts = self.opts
        scores = [group_scores(b) for b in self.model.blocks]
        pruned = self.pruned_heads()
        s = self.s.clone().requires_grad_(True)
        r = self.r.clone().requires_grad_(True)
        gates = self.gates.detach().clone().requires_grad_(True)
        execute = self._sample(gates) if opts["enable_block_gating"] else torch.ones(self.geo.depth, device=s.device)
        violation = resource(self.geo, s, r, execute, pruned, opts["resource"]) - self.budget
        clipped = violation.clamp(-float(opts["z_grad_clip"]), float(opts["z_grad_clip"]))
        objective = self.z * clipped
        sparsity = s.new_zeros(())
        for i, (heads, cols, neurons) in enumerate(scores):
            sparsity = sparsity + self.y[i, 0] * least_s(s[i, 0], heads) + self.y[i, 1] * least_s(s[i, 1], neurons)
            for h in range(self.geo.heads):
                sparsity = sparsity + self.p[i, h] * least_s(r[i, h], cols[h])
        objective_sr = objective + sparsity
        if opts["enable_pruning"]:
            grad_s, grad_r = torch.autograd.grad(objective_sr, (s, r), retain_graph=opts["enable_block_gating"])
            self.s = box_sgd(self.s, grad_s, self.s_upper, float(opts["slr"]))
            self.r = box_sgd(self.r, grad_r, self.r_upper, float(opts["rlr"]))
        if opts["enable_block_gating"]:
            (grad_g,) = torch.autograd.grad(objective, gates)
            task = self.gates.grad if self.gates.grad is not None else torch.zeros_like(self.gates)
            combined = task + float(opts["gating_weight"]) * grad_g
            interval = int(opts["gating_interval"])
            self.gate_buffer.append(combined.detach() * (self.t % interval))
            if self.t % interval == 0:
                self._gate_sgd(torch.stack(self.gate_buffer).mean(0))
                self.gate_buffer = []
        # Dual ascent on a fresh sample of R (unclamped) and on the selected groups' squared norms.
        with torch.no_grad():
            pruned = self.pruned_heads()
            execute = self._sample(self.gates) if opts["enable_block_gating"] else torch.ones_like(execute)
            fresh = resource(self.geo, self.s, self.r, execute, pruned, opts["resource"])
            self.z = dual_ascent(self.z, fresh - self.budget, self._zlr())
            least_y = torch.tensor(
                [
                    [float(least_s(self.s[i, 0], sc[0])), float(least_s(self.s[i, 1], sc[2]))]
                    for i, sc in enumerate(scores)
                ],
                device=self.y.device,
            )
            least_p = torch.tensor(
                [
                    [float(least_s(self.r[i, h], sc[1][h])) for h in range(self.geo.heads)]
                    for i, sc in enumerate(scores)
                ],
                device=self.p.device,
            )
            self.y = dual_ascent(self.y, least_y, float(opts["ylr"]))
            self.p = dual_ascent(self.p, least_p, float(opts["plr"]))
        if opts["mask_in_search"]:
            self.refresh_selection()
        self._sync()

    def _prox(self, lr: float) -> None:
        with torch.no_grad():
            for i, (block, sel) in enumerate(zip(self.model.blocks, self.selections)):
                w = block.attn.proj.weight
                d = self.geo.head_dim
                view = w.view(w.shape[0], self.geo.heads, d)
                for h in range(self.geo.heads):
                    if sel.heads[h]:
                        view[:, h] = prox_shrink(view[:, h], self.y[i, 0], lr)
                    dims = sel.dims[h].to(w.device)
                    if dims.any():
                        view[:, h, dims] = prox_shrink(view[:, h, dims], self.p[i, h], lr)
                neurons = sel.neurons.to(w.device)
                if neurons.any():
                    fc2 = block.mlp.fc2.weight
                    fc2[:, neurons] = prox_shrink(fc2[:, neurons], self.y[i, 1], lr)

    def _gate_sgd(self, grad: Tensor) -> None:
        """SGD with momentum and weight decay on the gate logits (torch.optim.SGD's update, state kept here)."""
        with torch.no_grad():
            d = grad + float(self.opts["gate_weight_decay"]) * self.gates
            if self.gate_velocity is None:
                self.gate_velocity = d.clone()
            else:
                self.gate_velocity = float(self.opts["gate_momentum"]) * self.gate_velocity + d
            self.gates -= float(self.opts["glr"]) * self.gate_velocity

    def _sync(self) -> None:
        """Every rank keeps rank 0's counts, duals and gates (their updates use each rank's own noise)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for t in (self.s, self.r, self.y, self.p, self.z, self.gates.data):
            dist.broadcast(t, 0)
        if self.patch_logits is not None:
            dist.broadcast(self.patch_logits.data, 0)
        if self.gate_velocity is not None:
            dist.broadcast(self.gate_velocity, 0)

    # ------------------------------------------------------------------------------------ the result
    def executes(self) -> list[bool]:
        if not self.opts["enable_block_gating"]:
            return [True] * self.geo.depth
        return [bool(v) for v in gate_weights(self.gates.detach(), "argmax").tolist()]

    def deterministic_resource(self, kind: str | None = None) -> float:
        """R with argmax gates and integer counts (what is reported; the search's R values are samples)."""
        execute = torch.tensor([float(e) for e in self.executes()], device=self.s.device)
        with torch.no_grad():
            return float(
                resource(self.geo, self.s, self.r, execute, self.pruned_heads(), kind or self.opts["resource"])
            )

    def materialise(self, model: nn.Module) -> nn.Module:
        """Freeze the selection, decide the gates, delete removed heads, value rows, neurons and skipped blocks."""
        if self.materialised:
            return model
        if self.chosen is not None:
            log.info(
                "uvc: materialising search epoch %d (deterministic R %.4f)", self.chosen["epoch"], self.chosen["R"]
            )
            model.load_state_dict(self.chosen["model"])
            device = self.s.device
            self.s, self.r = self.chosen["s"].to(device), self.chosen["r"].to(device)
            with torch.no_grad():
                self.gates.copy_(self.chosen["gates"])
        self.refresh_selection()
        r_released, r_exact = self.deterministic_resource("released"), self.deterministic_resource("materialised")
        self._unhook()
        skipped = []
        for i, (block, sel, run) in enumerate(zip(list(model.blocks), self.selections, self.executes())):
            if not run:
                skipped.append(f"blocks.{i}")
                continue
            cut_block(block, ~sel.proj_columns(), ~sel.neurons)
        skip_blocks(model, skipped, "uvc")
        self.materialised = True
        self.final = {
            "R_released": r_released,
            "R_materialised": r_exact,
            "skipped": skipped,
            "search_epoch": None if self.chosen is None else self.chosen["epoch"],
        }
        self.chosen = None
        log.info(
            "uvc: materialised at R %.4f (UVC's formula; budget %.3f), %.4f of the dense MACs as built; skipped %s",
            r_released,
            self.budget,
            r_exact,
            skipped or "none",
        )
        if r_released > self.ceiling:
            log.warning(
                "uvc: the search ended at R %.4f, above the budget %.3f by more than uvc.budget_tolerance (%g)",
                r_released,
                self.budget,
                float(self.opts["budget_tolerance"]),
            )
        return model

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state: dict[str, Any] = {"materialised": self.materialised, "epoch": self.epoch, "t": self.t, "eps": self.eps}
        if self.materialised:
            from models.arch import architecture

            state["arch"] = architecture(self.model)
            state["final"] = self.final
            return state
        state.update(
            s=self.s.cpu(),
            r=self.r.cpu(),
            y=self.y.cpu(),
            p=self.p.cpu(),
            z=self.z.cpu(),
            gates=self.gates.detach().cpu(),
            gate_buffer=[g.cpu() for g in self.gate_buffer],
            gate_velocity=None if self.gate_velocity is None else self.gate_velocity.cpu(),
            warm=self.warm,
            chosen=self.chosen,
        )
        if self.patch_logits is not None:
            state["patch_logits"] = self.patch_logits.detach().cpu()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.t, self.eps = int(state["epoch"]), int(state["t"]), float(state["eps"])
        if state["materialised"]:
            from models.arch import apply_architecture

            self._unhook()
            apply_architecture(self.model, state["arch"], "the UVC resume state")
            self.materialised, self.final = True, state["final"]
            return
        device = self.s.device
        self.s, self.r, self.y, self.p = (state[k].to(device) for k in ("s", "r", "y", "p"))
        self.z = state["z"].to(device)
        with torch.no_grad():
            self.gates.copy_(state["gates"])
            if self.patch_logits is not None:
                self.patch_logits.copy_(state["patch_logits"])
        self.gate_buffer = [g.to(device) for g in state["gate_buffer"]]
        self.gate_velocity = None if state["gate_velocity"] is None else state["gate_velocity"].to(device)
        self.warm = bool(state["warm"])
        self.chosen = state.get("chosen")
        self.refresh_selection()

    def report(self) -> dict:
        out: dict[str, Any] = {"budget": self.budget, "materialised": self.materialised}
        if self.materialised:
            out.update(self.final)
            return out
        if self.geo is None:
            return out
        out.update(
            R=self.deterministic_resource(),
            z=float(self.z),
            warm=self.warm,
            heads_removed=[math.ceil(float(v)) for v in self.s[:, 0]],
            neurons_removed=[math.ceil(float(v)) for v in self.s[:, 1]],
            dims_removed=[sum(math.ceil(float(v)) for v in row) for row in self.r],
            executes=self.executes(),
        )
        return out
