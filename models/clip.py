"""OpenAI CLIP built from the prunable blocks, and the retrieval model of the UPop / MADTP forks (ITC with momentum
distillation and queues).

Both towers are stacks of :class:`models.layers.Block` (pre-norm, fused q/k/v, QuickGELU, LayerNorm eps 1e-5), so
every pruner reaches them as it reaches a ViT: prunable units (head dims, heads, neurons), the three token-hook
points, the analytic cost model. The image tower is a :class:`~models.vit.VisionTransformer` with CLIP's
``ln_pre`` (``norm_pre``), a bias-free patch convolution and the output projection ``proj``; the text tower embeds
tokens, runs causal self-attention and pools at the end-of-text token, found by its position in the token state
(so a token reducer that keeps the EOT token keeps the pooling right).

Parameter names follow timm (``visual.blocks.{i}.attn.qkv``, ``text.blocks.{i}.mlp.fc1``, ...);
:mod:`models.clip_checkpoints` maps the OpenAI / open_clip / fork layout and the Hugging Face layout onto them and
back. Architecture sizes come from :data:`CLIP_PRESETS` (OpenAI's ViT-B/32, B/16, L/14, L/14@336px), from config
overrides (the tiny demo model) or from a state dict's shapes (:func:`models.clip_checkpoints.infer_arch`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blip import concat_all_gather, copy_params, momentum_update
from models.cost import Cost, Probe, blocks_cost, layer_norm, linear, random_images, vit_cost
from models.layers import Block, Unit, checkpoint_last_blocks
from models.token_state import TokenState
from models.vit import VisionTransformer, prunable_units
from utils import log

__all__ = [
    "CLIP_PRESETS",
    "ClipArch",
    "ClipRetrieval",
    "ClipTextTower",
    "ClipTokenizer",
    "ClipVisionTower",
    "TextBatch",
]

LOGIT_SCALE_MAX = math.log(100.0)  # the forks clamp at 4.6052
# The seed's dummy caption (UPop utils.print_params_and_flops, 'retrieval_clip').
SEED_CAPTION = "car driving down a road behind a lot of sheep"

# OpenAI's released ViTs (the heads of both towers are width / 64).
CLIP_PRESETS: dict[str, dict[str, int]] = {
    "ViT-B/32": {
        "embed_dim": 512,
        "image_size": 224,
        "patch_size": 32,
        "vision_width": 768,
        "vision_layers": 12,
        "text_width": 512,
        "text_layers": 12,
    },
    "ViT-B/16": {
        "embed_dim": 512,
        "image_size": 224,
        "patch_size": 16,
        "vision_width": 768,
        "vision_layers": 12,
        "text_width": 512,
        "text_layers": 12,
    },
    "ViT-L/14": {
        "embed_dim": 768,
        "image_size": 224,
        "patch_size": 14,
        "vision_width": 1024,
        "vision_layers": 24,
        "text_width": 768,
        "text_layers": 12,
    },
    "ViT-L/14@336px": {
        "embed_dim": 768,
        "image_size": 336,
        "patch_size": 14,
        "vision_width": 1024,
        "vision_layers": 24,
        "text_width": 768,
        "text_layers": 12,
    },
}


@dataclass(frozen=True)
class ClipArch:
    """The sizes of a CLIP model. Heads default to width / 64 in both towers (OpenAI's rule, which the checkpoint
    loaders assume); the tiny demo model sets its own."""

    embed_dim: int = 768
    image_size: int = 336
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int | None = None
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 768
    text_layers: int = 12
    text_heads: int | None = None
    act: str = "quick_gelu"

    def __post_init__(self) -> None:
        for name in ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "context_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"clip_arch.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"clip image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), self.heads(tower)
            if heads < 1 or width % heads:
                raise ValueError(f"clip {tower}_width {width} is not divisible into {heads} heads")

    def heads(self, tower: str) -> int:
        given = getattr(self, f"{tower}_heads")
        return int(given) if given is not None else max(1, getattr(self, f"{tower}_width") // 64)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_config(cls, model: str, overrides: Mapping[str, Any] | None = None, image_size: int | None = None):
        """A preset of :data:`CLIP_PRESETS` (``model``; "" starts from the dataclass defaults, ViT-L/14@336px), with
        the keys of ``overrides`` (config ``clip_arch``) and the config's ``image_size`` on top."""
        if model and model not in CLIP_PRESETS:
            raise ValueError(f"unknown clip_model {model!r}; choose from {', '.join(CLIP_PRESETS)} (or 'auto')")
        values: dict[str, Any] = dict(CLIP_PRESETS[model]) if model else {}
        unknown = sorted(set(overrides or {}) - set(cls.fields()))
        if unknown:
            raise ValueError(f"unknown clip_arch key(s) {unknown}; valid: {cls.fields()}")
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        if image_size is not None:
            values["image_size"] = int(image_size)
        return cls(**values)

    def describe(self) -> str:
        return (
            f"CLIP ViT {self.vision_layers}x{self.vision_width} (patch {self.patch_size}, {self.image_size} px), "
            f"text {self.text_layers}x{self.text_width} (context {self.context_length}), embedding {self.embed_dim}"
        )


# ------------------------------------------------------------------------------------------------ tokenizer


class TextBatch(NamedTuple):
    """Tokenised texts: ids (B, context) and a 0/1 mask over [SOT] ... [EOT] (the causal model needs no padding
    mask; the mask tells other consumers which positions hold text)."""

    input_ids: Tensor
    attention_mask: Tensor


class ClipTokenizer:
    """CLIP's byte-level BPE: [SOT] + BPE ids + [EOT], zero-padded to ``context_length``.

    The vocabulary comes with open_clip (its ``SimpleTokenizer`` reads OpenAI's ``bpe_simple_vocab_16e6.txt.gz``
    shipped in the package): 256 byte symbols, their end-of-word variants, 48,894 merges and the two specials,
    49,408 ids; [SOT] 49406, [EOT] 49407, padding 0. A text longer than the context is cut to it with [EOT] last
    (the forks raise instead); the first such text is reported once per tokenizer.
    """

    def __init__(self, context_length: int = 77) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = int(context_length)
        self._bpe = SimpleTokenizer(context_length=self.context_length)
        self.sot_token_id = int(self._bpe.sot_token_id)
        self.eot_token_id = int(self._bpe.eot_token_id)
        self.vocab_size = int(self._bpe.vocab_size)
        self._warned = False

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without the special tokens."""
        return list(self._bpe.encode(text))

    def __call__(self, texts: str | Sequence[str]) -> TextBatch:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        mask = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        cut = []
        for i, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > self.context_length:
                cut.append((len(tokens), text))
                tokens = tokens[: self.context_length - 1] + [self.eot_token_id]
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = 1
        if cut and not self._warned:
            self._warned = True
            n, text = cut[0]
            log.warning(
                "CLIP tokenizer: a text of %d tokens was cut to the context length %d (%r); further cuts are not "
                "reported",
                n,
                self.context_length,
                text[:80],
            )
        return TextBatch(ids, mask)


# ------------------------------------------------------------------------------------------------ towers


class ClipVisionTower(VisionTransformer):
    """OpenAI CLIP's image encoder: a ViT with ``ln_pre`` (``norm_pre``), a bias-free patch convolution, QuickGELU
    and LayerNorm eps 1e-5, whose CLS token after ``ln_post`` (``norm``) is projected by ``proj`` (width x embed).
    """

    # The Linear modules PLATON masks and compute_id measures (pruners.targets): the seed's CLIP pruner never masks
    # the fused q/k/v projection (specs/platon_id.md 2.3).
    masked_linears = ("attn.proj", "mlp.fc1", "mlp.fc2")

    def __init__(self, arch: ClipArch) -> None:
        super().__init__(
            img_size=arch.image_size,
            patch_size=arch.patch_size,
            embed_dim=arch.vision_width,
            depth=arch.vision_layers,
            num_heads=arch.heads("vision"),
            norm_eps=1e-5,
            pre_norm=True,
            patch_bias=False,
            act=arch.act,
        )
        self.proj = nn.Parameter(torch.randn(arch.vision_width, arch.embed_dim) * arch.vision_width**-0.5)
        for block in self.blocks:
            block.attn.slice_rescale = True

    def _init_weights(self) -> None:
        # OpenAI's: class and position embeddings ~ N(0, 1/width); the blocks keep torch's defaults, the fused
        # projection Xavier-uniform like nn.MultiheadAttention's, attention biases zero. (A tiny model trained from
        # scratch leaves the contrastive loss's first plateau much sooner with this than with timm's 0.02 normal.)
        scale = self.embed_dim**-0.5
        with torch.no_grad():
            self.cls_token.normal_(std=scale)
            self.pos_embed.normal_(std=scale)
        for block in self.blocks:
            nn.init.xavier_uniform_(block.attn.qkv.weight)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.proj.bias)

    def embed(self, tokens: Tensor) -> Tensor:
        """The (unnormalised) image embedding (B, E) from the tower's output tokens."""
        return tokens[:, 0] @ self.proj


class ClipTextTower(nn.Module):
    """OpenAI CLIP's text encoder: token + position embeddings, causal pre-norm blocks, ``ln_final`` (``norm``),
    and the state at the end-of-text token (the largest id of each row) projected by ``proj`` (width x embed)."""

    masked_linears = ClipVisionTower.masked_linears

    def __init__(self, arch: ClipArch) -> None:
        super().__init__()
        width, layers = arch.text_width, arch.text_layers
        self.context_length = arch.context_length
        self.token_embedding = nn.Embedding(arch.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(arch.context_length, width))
        self.blocks = nn.ModuleList(
            Block(width, arch.heads("text"), norm_eps=1e-5, act=arch.act, index=i) for i in range(layers)
        )
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.proj = nn.Parameter(torch.empty(width, arch.embed_dim))
        for block in self.blocks:
            block.attn.slice_rescale = True
        self._init_weights(width, layers)

    def _init_weights(self, width: int, layers: int) -> None:
        # OpenAI's CLIP.initialize_parameters
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        nn.init.normal_(self.proj, std=attn_std)

    def set_grad_checkpointing(self, enable: bool = True, last_k: int | None = None) -> None:
        checkpoint_last_blocks(self.blocks, enable, last_k)

    def forward_tokens(
        self, ids: Tensor, state: TokenState | None = None, norm: nn.Module | None = None
    ) -> tuple[Tensor, TokenState]:
        """Every position's state after the final LayerNorm (``norm`` replaces it: the UPop fork's momentum path
        reads the online one) and the :class:`TokenState` (causal)."""
        t = ids.shape[1]
        if t > self.context_length:
            raise ValueError(f"{t} text tokens exceed the context length {self.context_length}")
        x = self.token_embedding(ids) + self.pos_embed[:t]
        state = TokenState.start(causal=True) if state is None else state
        state.scratch["keep_positions"] = ids.argmax(dim=-1)  # the end-of-text token, where the text is pooled
        for block in self.blocks:
            x, state = block(x, state)
        return (norm or self.norm)(x), state

    @staticmethod
    def pool(x: Tensor, state: TokenState, ids: Tensor) -> Tensor:
        """The state (B, width) at each row's end-of-text token, found by its position in the token state."""
        eot = ids.argmax(dim=-1)
        rows = torch.arange(x.shape[0], device=x.device)
        if state.positions is None:
            return x[rows, eot]
        hit = state.positions == eot[:, None]
        if not bool(hit.any(dim=1).all()):
            raise ValueError("a token reducer removed the end-of-text token, where CLIP pools its text")
        return x[rows, hit.float().argmax(dim=1)]

    def embed(self, ids: Tensor, norm: nn.Module | None = None) -> Tensor:
        """The (unnormalised) text embedding (B, E)."""
        x, state = self.forward_tokens(ids, norm=norm)
        return self.pool(x, state, ids) @ self.proj


# ------------------------------------------------------------------------------------------------ retrieval


class ClipRetrieval(nn.Module):
    """CLIP fine-tuned for image-text retrieval as in the UPop / MADTP forks (specs/blip_clip_foundation.md 4.4):
    ITC only, ALBEF-style momentum distillation against queues of ``queue_size`` features; evaluation ranks by
    cosine similarity. The momentum towers ``visual_m`` / ``text_m`` are full copies (their parameters count in
    UPop's 856 M) updated by EMA and never trained. ``parity_momentum_ln_final``: the momentum text path uses the
    online ``ln_final`` (the UPop fork's quirk)."""

    task = "retrieval"
    backbone = "clip"
    TOWERS = ("visual", "text")

    def __init__(
        self,
        arch: ClipArch,
        queue_size: int = 57600,
        momentum: float = 0.995,
        parity_momentum_ln_final: bool = False,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.tokenizer = ClipTokenizer(arch.context_length)
        if self.tokenizer.vocab_size != arch.vocab_size:
            raise ValueError(
                f"clip vocab_size {arch.vocab_size} differs from the BPE vocabulary's {self.tokenizer.vocab_size}"
            )
        self.visual = ClipVisionTower(arch)
        self.text = ClipTextTower(arch)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.visual_m = copy.deepcopy(self.visual)
        self.text_m = copy.deepcopy(self.text)
        copy_params(self.model_pairs)
        e = arch.embed_dim
        self.register_buffer("image_queue", F.normalize(torch.randn(e, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(e, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
        self.queue_size = queue_size
        self.momentum = momentum
        self.parity_momentum_ln_final = parity_momentum_ln_final

    @property
    def model_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.visual, self.visual_m), (self.text, self.text_m)]

    def reset_momentum(self) -> None:
        copy_params(self.model_pairs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def prunable_units(self, momentum: bool = False) -> list[Unit]:
        """Head-dim, head and neuron units of both towers (``momentum`` adds ``visual_m`` / ``text_m``)."""
        names = list(self.TOWERS) + ([f"{t}_m" for t in self.TOWERS] if momentum else [])
        units: list[Unit] = []
        for name in names:
            modality = "vision" if name.startswith("visual") else "text"
            units += prunable_units(getattr(self, name), modality, prefix=f"{name}.")
        return units

    # ------------------------------------------------------------------------------------------ encoders
    def image_features(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(image tokens (B, N', D), their padding mask (B, N'), normalised embedding (B, E))."""
        tokens, state = self.visual.forward_tokens(image)
        return tokens, state.padding_mask(tokens), F.normalize(self.visual.embed(tokens), dim=-1)

    def text_inputs(self, text: Sequence[str], device: torch.device) -> TextBatch:
        batch = self.tokenizer(list(text))
        return TextBatch(batch.input_ids.to(device), batch.attention_mask.to(device))

    def text_features(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalised text embedding (B, E); ``mask`` is not needed (the model is causal and pools at EOT)."""
        return F.normalize(self.text.embed(ids), dim=-1)

    def _momentum_features(self, image: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        tokens, _ = self.visual_m.forward_tokens(image)
        norm = self.text.norm if self.parity_momentum_ln_final else None
        return F.normalize(self.visual_m.embed(tokens), dim=-1), F.normalize(self.text_m.embed(ids, norm), dim=-1)

    # ------------------------------------------------------------------------------------------ training
    def forward(self, image: Tensor, caption: Sequence[str], alpha: float, idx: Tensor) -> Tensor:
        """The ITC loss with momentum distillation of a batch of images, their captions and image indices."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        idx = idx.view(-1, 1)
        idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)
        pos = torch.eq(idx, idx_all).float()
        sim_targets = pos / pos.sum(1, keepdim=True)

        image_feat = self.image_features(image)[2]
        text = self.text_inputs(caption, image.device)
        text_feat = self.text_features(text.input_ids)
        scale = self.logit_scale.exp()

        with torch.no_grad():
            momentum_update(self.model_pairs, self.momentum)
            image_feat_m, text_feat_m = self._momentum_features(image, text.input_ids)
            image_feat_m_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_m_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            i2t_targets = alpha * F.softmax(scale * image_feat_m @ text_feat_m_all, dim=1) + (1 - alpha) * sim_targets
            t2i_targets = alpha * F.softmax(scale * text_feat_m @ image_feat_m_all, dim=1) + (1 - alpha) * sim_targets

        logits_i2t = scale * image_feat @ text_feat_m_all
        logits_t2i = scale * text_feat @ image_feat_m_all
        loss_i2t = -(F.log_softmax(logits_i2t, dim=1) * i2t_targets).sum(1).mean()
        loss_t2i = -(F.log_softmax(logits_t2i, dim=1) * t2i_targets).sum(1).mean()
        self._dequeue_and_enqueue(image_feat.detach(), text_feat.detach(), concat_all_gather(idx))
        return (loss_i2t + loss_t2i) / 2

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: Tensor, text_feat: Tensor, idxs: Tensor) -> None:
        """Enqueue the online features of every rank (the forks do; ALBEF enqueues momentum ones), the pointer first
        rounded down to a multiple of the global batch."""
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        n = image_feats.shape[0]
        if self.queue_size % n:
            raise ValueError(f"queue_size {self.queue_size} must be a multiple of the global batch {n}")
        ptr = int(self.ptr_queue) // n * n
        self.image_queue[:, ptr : ptr + n] = image_feats.T
        self.text_queue[:, ptr : ptr + n] = text_feats.T
        self.idx_queue[:, ptr : ptr + n] = idxs.T
        self.ptr_queue[0] = (ptr + n) % self.queue_size

    # ------------------------------------------------------------------------------------------ costs
    def cost_probe(self, kind: str = "seed", batch: Any = None, dataset: Any = None, batch_size: int = 1) -> Probe:
        """``seed``: UPop's dummy inputs (one image, the seed's caption, alpha 0, idx -100; a full training step with
        the momentum towers and the queues); ``batch``: that step on an evaluation batch (each image with its first
        caption); ``speed``: ``batch_size`` image-caption pairs embedded and compared (deployment)."""
        device = self.logit_scale.device
        if kind == "seed":
            return self._step_probe(random_images(self, 1), [SEED_CAPTION], torch.full((1,), -100, device=device))
        if kind == "batch":
            if batch is None or dataset is None or not hasattr(dataset, "img2txt"):
                raise ValueError("a retrieval batch probe needs a batch and its dataset (text, img2txt)")
            image, index = batch
            captions = [dataset.text[dataset.img2txt[int(i)][0]] for i in index]
            return self._step_probe(image.to(device), captions, index.to(device))
        if kind != "speed":
            raise ValueError(f"unknown probe kind {kind!r}; choose from ('seed', 'batch', 'speed')")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return self._speed_probe(batch_size)

    def _tower_costs(self, n: int, grid: tuple[int, int], momentum: bool) -> Cost:
        """Both towers (and their momentum twins) on ``n`` images of ``grid`` patches and ``n`` captions padded to the
        context, with the projections; the final LayerNorms run on every token, as in the forks."""
        ctx, cost = self.arch.context_length, Cost()
        towers = [(self.visual, self.text)] + ([(self.visual_m, self.text_m)] if momentum else [])
        for visual, text in towers:
            cost = cost + vit_cost(visual, n, grid)[0] + linear(n, *visual.proj.shape)
            text_cost, out = blocks_cost(text.blocks, n, ctx, what="the text tower")
            cost = cost + text_cost + layer_norm(n * out, text.norm.normalized_shape[0]) + linear(n, *text.proj.shape)
        return cost

    def _step_probe(self, images: Tensor, captions: list[str], idx: Tensor) -> Probe:
        n = images.shape[0]
        grid = (images.shape[-2] // self.arch.patch_size, images.shape[-1] // self.arch.patch_size)

        def run() -> Tensor:
            # Enqueueing only copies features (no arithmetic) and needs the pointer's value, which the meta device
            # lacks: it is skipped while counting.
            self._dequeue_and_enqueue = lambda *args: None
            try:
                return self(images, captions, 0.0, idx)
            finally:
                del self._dequeue_and_enqueue

        def analytic() -> Cost:
            itc = linear(n, self.arch.embed_dim, n + self.queue_size).scaled(4)
            return self._tower_costs(n, grid, momentum=True) + itc

        what = (
            f"{n} image(s) {'x'.join(map(str, images.shape[-2:]))} + 1 caption each ({self.arch.context_length} "
            "tokens); training step with momentum towers and ITC against the queues"
        )
        shape = {"images": n, "text_tokens": self.arch.context_length}
        return Probe(run, n, what, mutates=True, analytic=analytic, shape=shape)

    def _speed_probe(self, batch_size: int) -> Probe:
        images = random_images(self, batch_size)
        captions = [SEED_CAPTION] * batch_size
        grid = (images.shape[-2] // self.arch.patch_size, images.shape[-1] // self.arch.patch_size)

        def run() -> Tensor:
            image_feat = self.image_features(images)[2]
            text = self.text_inputs(captions, images.device)
            return image_feat @ self.text_features(text.input_ids).t()

        def analytic() -> Cost:
            e = self.arch.embed_dim
            return self._tower_costs(batch_size, grid, momentum=False) + linear(batch_size, e, batch_size)

        what = f"{batch_size} image-caption pair(s): embeddings of both and their cosine similarities"
        return Probe(run, batch_size, what, analytic=analytic)
