"""ViLT (Kim et al., ICML 2021): one transformer over ``[text | image]``, built from the prunable blocks.

BERT-style text embeddings (word, position, BERT token type 0, LayerNorm eps 1e-12) and 32-px patch embeddings with
an image CLS and absolute position embeddings each get a modality-type embedding (text 0, image 1; NLVR2's second
image 2) and are concatenated, text first, into one sequence through pre-norm ViT blocks (:class:`~models.layers.Block`
in a :class:`~models.vit.VisionTransformer`, LayerNorm eps 1e-6), a final LayerNorm and a pooler (dense + tanh on
token 0, the text [CLS], which no token reducer touches). The token state carries the text length
(``TokenState.text_len``), so a reducer knows where the image starts (PuMer).

Parameter names are those of the original release (dandelin/ViLT): ``text_embeddings.*``, ``token_type_embeddings``,
``transformer.{cls_token, pos_embed, patch_embed.proj, blocks.{i}.*, norm}``, ``pooler.dense`` and the heads
``vqa_classifier``, ``nlvr2_classifier``, ``ve_classifier`` (PuMer's), ``rank_output``, ``itm_score.fc`` and
``mlm_score``; :mod:`models.vilt_checkpoints` reads the original ``.ckpt``, PuMer's folders and Hugging Face's
``Vilt*`` layout, and writes the latter.

Images are taken as a batch of one size (PuMer resizes every image to a 384 x 384 square, spec pumer_vilt.md 5.5):
no pixel mask, no padded patches. ``patch_shuffle`` reproduces the original's random patch order (a draw from the
global generator per image, as the original and Hugging Face's port do, so a seeded run is reproducible); attention
does not depend on the order, order-dependent steps (ToMe's parity split) do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cost import Cost, Probe, blocks_cost, layer_norm, linear
from models.layers import Unit
from models.token_state import TokenState
from models.vit import VisionTransformer, prunable_units

__all__ = ["HEADS", "VILT_DEFAULTS", "ViLT", "build_vilt", "vilt_cost", "vilt_schedule"]

# Config keys of a ViLT model (ViLT-B/32 values; PuMer's blocks run without dropout, the original's with 0.1).
VILT_DEFAULTS: dict[str, Any] = {
    "vilt_hidden": 768,
    "vilt_depth": 12,
    "vilt_heads": 12,
    "vilt_mlp_ratio": 4.0,
    "vilt_patch_size": 32,
    "vilt_vocab_size": 30522,
    "max_text_len": 40,
    "vilt_drop_rate": 0.0,
    "vilt_text_drop": 0.1,
    "vilt_norm_eps": 1.0e-6,
    "vilt_text_norm_eps": 1.0e-12,
    "patch_shuffle": False,
    # additive: padding as a bias (original ViLT, Hugging Face); pumer: PuMer's multiplicative masked softmax in
    # every layer (its fine-tuned and pruned models were trained with it).
    "masked_softmax": "additive",
}

# Task heads, by the name the config's ``vilt_head`` / the task gives.
HEADS = ("vqa", "nlvr2", "ve", "retrieval", "pretrain", "none")


class TextEmbeddings(nn.Module):
    """BERT's embeddings: word + position + token type (always 0 in ViLT), LayerNorm, dropout."""

    def __init__(self, vocab: int, dim: int, max_len: int, eps: float, drop: float, type_vocab: int = 2) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.token_type_embeddings = nn.Embedding(type_vocab, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(drop)

    def forward(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        if n > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {n} tokens is longer than max_text_len {self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(n, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class Pooler(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class ITMHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class MLMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm (eps 1e-12), then the vocabulary projection and its bias."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(dim, dim)
        self.transform.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x: Tensor) -> Tensor:
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return self.decoder(x) + self.bias


def _classifier(d_in: int, hidden: int, out: int) -> nn.Sequential:
    """ViLT's task head: Linear, LayerNorm (eps 1e-5), GELU, Linear (keys 0, 1, 3)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))


class ViLT(nn.Module):
    """ViLT with one task head (``head`` in :data:`HEADS`).

    ``forward(input_ids, attention_mask, images, images2=None)`` returns the head's logits: VQA (B, num_labels), VE
    (B, 3), NLVR2 (B, 2) from two passes (``images`` with modality type 1, ``images2`` with type 2; pooled features
    concatenated), retrieval's rank score (B, 1); :meth:`itm_logits` and :meth:`mlm_logits` serve retrieval and
    pre-training. :meth:`encode` gives every token after the final norm and its :class:`TokenState`.
    """

    def __init__(
        self,
        head: str = "vqa",
        num_labels: int = 3129,
        *,
        hidden: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 32,
        image_size: int = 384,
        vocab_size: int = 30522,
        max_text_len: int = 40,
        modality_types: int | None = None,
        drop_rate: float = 0.0,
        text_drop: float = 0.1,
        norm_eps: float = 1e-6,
        text_norm_eps: float = 1e-12,
        patch_shuffle: bool = False,
        masked_softmax: str = "additive",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown ViLT head {head!r}; choose from {HEADS}")
        if masked_softmax not in ("additive", "pumer"):
            raise ValueError(f"masked_softmax must be 'additive' or 'pumer', got {masked_softmax!r}")
        self.head = head
        self.hidden = hidden
        self.patch_shuffle = bool(patch_shuffle)
        self.masked_softmax = masked_softmax
        self.max_text_len = max_text_len
        self.text_embeddings = TextEmbeddings(vocab_size, hidden, max_text_len, text_norm_eps, text_drop)
        types = modality_types if modality_types is not None else (3 if head == "nlvr2" else 2)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.transformer = VisionTransformer(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=hidden,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp_ratio,
            norm_eps=norm_eps,
            drop_rate=drop_rate,
        )
        self.pos_drop = nn.Dropout(drop_rate)
        self.pooler = Pooler(hidden)
        if head == "vqa":
            self.vqa_classifier = _classifier(hidden, 2 * hidden, num_labels)
        elif head == "nlvr2":
            self.nlvr2_classifier = _classifier(2 * hidden, 2 * hidden, 2)
        elif head == "ve":
            self.ve_classifier = _classifier(hidden, 2 * hidden, 3)
        elif head == "retrieval":
            self.rank_output = nn.Linear(hidden, 1)
            self.itm_score = ITMHead(hidden)
        elif head == "pretrain":
            self.itm_score = ITMHead(hidden)
            self.mlm_score = MLMHead(hidden, vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The original's init: N(0, 0.02) for Linear and Embedding weights, zero biases, unit LayerNorms.
        if isinstance(m, nn.Linear | nn.Embedding):
            m.weight.data.normal_(0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.zero_()
        if isinstance(m, nn.LayerNorm):
            m.weight.data.fill_(1.0)
            m.bias.data.zero_()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # PuMer and the original exempt only biases and norms (the engine's rule); the position embedding and the
        # image CLS decay.
        return set()

    # ------------------------------------------------------------------------------------------ embedding
    def visual_embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Image tokens (B, 1 + N, D) (CLS first) with their position embeddings, and each token's patch index + 1
        (B, 1 + N) (0 for the CLS; the order of the patches when shuffled)."""
        vit = self.transformer
        x, grid = vit.patch_embed(images)
        pos = vit.pos_embed[:, 1:]
        if tuple(grid) != tuple(vit.patch_embed.grid_size):  # the original resizes bilinearly, corners aligned
            gh, gw = vit.patch_embed.grid_size
            pos = pos.transpose(1, 2).reshape(1, -1, gh, gw)
            pos = F.interpolate(pos, size=grid, mode="bilinear", align_corners=True).flatten(2).transpose(1, 2)
        x = x + pos
        b, n = x.shape[:2]
        order = torch.arange(n, device=x.device).expand(b, n)
        if self.patch_shuffle:
            order = torch.stack([torch.multinomial(torch.ones(n), n) for _ in range(b)]).to(x.device)
            x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(b, -1, -1)
        index = torch.cat([order.new_zeros(b, 1), order + 1], dim=1)
        return self.pos_drop(torch.cat([cls, x], dim=1)), index

    def encode(
        self, input_ids: Tensor, attention_mask: Tensor | None, images: Tensor, image_type: int = 1
    ) -> tuple[Tensor, TokenState]:
        """Every token after the final norm, (B, T + N', D) (text first; N' image tokens after any reduction), and
        the token state (``text_len``: the text tokens left; ``mask``: their weights, ones for the image)."""
        text = self.text_embeddings(input_ids)
        image, index = self.visual_embed(images)
        b, t = input_ids.shape
        text = text + self.token_type_embeddings.weight[0]
        image = image + self.token_type_embeddings.weight[image_type]
        x = torch.cat([text, image], dim=1)
        if attention_mask is None:
            mask = None
        else:
            mask = torch.cat([attention_mask.to(x.dtype), x.new_ones(b, image.shape[1])], dim=1)
        positions = torch.cat([torch.arange(t, device=x.device).expand(b, t), index + t], dim=1)
        state = TokenState(mask=mask, positions=positions, text_len=t, masked_softmax=self.masked_softmax)
        for block in self.transformer.blocks:
            x, state = block(x, state)
        return self.transformer.norm(x), state

    def pooled(self, input_ids: Tensor, attention_mask: Tensor | None, images: Tensor, image_type: int = 1) -> Tensor:
        return self.pooler(self.encode(input_ids, attention_mask, images, image_type)[0])

    # ------------------------------------------------------------------------------------------ heads
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None, images: Tensor, images2: Tensor | None = None
    ) -> Tensor:
        if self.head == "nlvr2":
            if images2 is None:
                raise ValueError("the NLVR2 head needs both images (images, images2)")
            pooled = torch.cat(
                [self.pooled(input_ids, attention_mask, images, 1), self.pooled(input_ids, attention_mask, images2, 2)],
                dim=-1,
            )
            return self.nlvr2_classifier(pooled)
        pooled = self.pooled(input_ids, attention_mask, images)
        if self.head == "vqa":
            return self.vqa_classifier(pooled)
        if self.head == "ve":
            return self.ve_classifier(pooled)
        if self.head == "retrieval":
            return self.rank_output(pooled)
        raise ValueError(f"a ViLT with the {self.head!r} head has no forward logits; use itm_logits / mlm_logits")

    def itm_logits(self, input_ids: Tensor, attention_mask: Tensor | None, images: Tensor) -> Tensor:
        """Image-text matching (B, 2) (index 1: match)."""
        return self.itm_score(self.pooled(input_ids, attention_mask, images))

    def pretrain_logits(
        self, input_ids: Tensor, attention_mask: Tensor | None, images: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Image-text matching (B, 2) and masked-token logits over the vocabulary at every text position (B, T, V),
        from one pass (no reducer may merge text)."""
        x, state = self.encode(input_ids, attention_mask, images)
        if state.text_len != input_ids.shape[1]:
            raise ValueError("masked-token prediction needs every text token; remove the token reducers")
        return self.itm_score(self.pooler(x)), self.mlm_score(x[:, : input_ids.shape[1]])

    def mlm_logits(self, input_ids: Tensor, attention_mask: Tensor | None, images: Tensor) -> Tensor:
        """Masked-token logits (B, T, V) (see :meth:`pretrain_logits`)."""
        return self.pretrain_logits(input_ids, attention_mask, images)[1]

    # ------------------------------------------------------------------------------------------ seams
    def prunable_units(self, momentum: bool = False) -> list[Unit]:
        return prunable_units(self.transformer, "cross", "transformer.")

    def passes(self) -> int:
        """Forward passes of the backbone per example (NLVR2: one per image)."""
        return 2 if self.head == "nlvr2" else 1

    def cost_probe(self, kind: str = "seed", batch: Any = None, dataset: Any = None, batch_size: int = 1) -> Probe:
        """What is fed when counted or timed: ``seed``, one example as PuMer's benchmark (32 random text tokens, or
        ``max_text_len`` if fewer, a full mask, images of the model's size); ``speed``: ``batch_size`` such examples;
        ``batch``: an evaluation batch (a :class:`data.vilt.ViltBatch`, or retrieval's (images, indices))."""
        device = self.transformer.pos_embed.device
        if kind == "batch" and batch is None:
            raise ValueError("a batch probe needs a batch of the evaluation loader")
        if kind == "batch" and not hasattr(batch, "ids"):
            # Retrieval's evaluation batches are (images, indices): each image with one text of max_text_len tokens.
            images = batch[0].to(device)
            g = torch.Generator().manual_seed(0)
            n, t = images.shape[0], self.max_text_len
            ids = torch.randint(1, self.text_embeddings.word_embeddings.num_embeddings, (n, t), generator=g).to(device)
            mask, images2 = torch.ones(n, t, dtype=torch.long, device=device), None
        elif kind == "batch":
            ids, mask, images = batch.ids.to(device), batch.mask.to(device), batch.images.to(device)
            images2 = batch.images2.to(device) if self.head == "nlvr2" else None
        elif kind in ("seed", "speed"):
            n = 1 if kind == "seed" else batch_size
            g = torch.Generator().manual_seed(0)
            t = min(32, self.max_text_len)
            ids = torch.randint(1, self.text_embeddings.word_embeddings.num_embeddings, (n, t), generator=g)
            ids, mask = ids.to(device), torch.ones(n, t, dtype=torch.long, device=device)
            size = self.transformer.patch_embed.img_size
            images = torch.randn(n, 3, *size, generator=g).to(device)
            images2 = torch.randn(n, 3, *size, generator=g).to(device) if self.head == "nlvr2" else None
        else:
            raise ValueError(f"unknown probe kind {kind!r}; choose from ('seed', 'batch', 'speed')")
        n, t = ids.shape
        grid = tuple(s // p for s, p in zip(images.shape[-2:], self.transformer.patch_embed.patch_size))
        what = f"{n} example(s): {t} text tokens, {self.passes()} image(s) {'x'.join(map(str, images.shape[-2:]))}"

        def run() -> Tensor:
            if self.head == "pretrain":
                return self.itm_logits(ids, mask, images)
            return self(ids, mask, images, images2)

        return Probe(run, n, what, analytic=lambda: vilt_cost(self, n, t, grid), shape={"text": t, "grid": grid})


def vilt_schedule(model: ViLT, text: int, image: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per block, the (text, image) tokens entering it and reaching its MLP, from the static settings of its token
    reducers: PuMer's ``out_split``; a reducer over the whole sequence (ToMe's ``out_tokens``) is counted against
    the image (only the total matters to the cost)."""
    from models.cost import DynamicSchedule

    out = []
    for block in model.transformer.blocks:
        before = (text, image)
        for hook in getattr(block, "token_hooks", []):
            split = getattr(hook, "out_split", None)
            if split is not None:
                text, image = split(text, image)
            elif callable(getattr(hook, "out_tokens", None)):
                image = hook.out_tokens(text + image) - text
            else:
                raise DynamicSchedule(f"{hook!r} decides its token count per input; cost it from recorded counts")
        out.append((before, (text, image)))
    return out


def vilt_cost(model: ViLT, batch: int = 1, text: int = 40, grid: tuple[int, int] | None = None) -> Cost:
    """The analytic cost of ``model``'s forward on ``batch`` examples of ``text`` text tokens and images of ``grid``
    patches (default: the model's size): embeddings (LayerNorm, patch convolution), every block with the token
    schedule of its reducers and their own products, the final LayerNorm, the pooler and the head, for every pass."""
    vit = model.transformer
    grid = tuple(grid or vit.patch_embed.grid_size)
    conv = vit.patch_embed.proj
    d = model.hidden
    n_img = grid[0] * grid[1] + 1
    schedule = vilt_schedule(model, text, n_img)
    counts = {i: (sum(a), sum(a), sum(b)) for i, (a, b) in enumerate(schedule)}
    blocks, tokens = blocks_cost(vit.blocks, batch, text + n_img, counts, "ViLT")
    extra = 0
    for block, ((t_in, n_in), _) in zip(vit.blocks, schedule):
        for hook in getattr(block, "token_hooks", []):
            macs = getattr(hook, "split_macs", None)
            if macs is not None:
                extra += macs(t_in, n_in, block.attn.head_dim)
    one = layer_norm(batch * text, d) + linear(batch * (n_img - 1), conv.in_channels * conv.kernel_size[0] ** 2, d)
    one = one + blocks + Cost(batch * extra) + layer_norm(batch * tokens, d) + linear(batch, d, d)
    cost = one.scaled(model.passes())
    return cost + _head_cost(model, batch)


def _head_cost(model: ViLT, batch: int) -> Cost:
    mods = {
        "vqa": "vqa_classifier",
        "nlvr2": "nlvr2_classifier",
        "ve": "ve_classifier",
        "retrieval": "rank_output",
        "pretrain": "itm_score",
    }
    name = mods.get(model.head)
    if name is None:
        return Cost()
    cost = Cost()
    for m in getattr(model, name).modules():
        if isinstance(m, nn.Linear):
            cost = cost + linear(batch, m.in_features, m.out_features)
        elif isinstance(m, nn.LayerNorm):
            cost = cost + layer_norm(batch, m.normalized_shape[0])
    return cost


def build_vilt(config: Mapping[str, Any], head: str, num_labels: int = 3129) -> ViLT:
    """A ViLT with ``head`` from a task config (the keys of :data:`VILT_DEFAULTS` and ``image_size``)."""
    return ViLT(
        head,
        num_labels,
        hidden=config["vilt_hidden"],
        depth=config["vilt_depth"],
        heads=config["vilt_heads"],
        mlp_ratio=config["vilt_mlp_ratio"],
        patch_size=config["vilt_patch_size"],
        image_size=config["image_size"],
        vocab_size=config["vilt_vocab_size"],
        max_text_len=config["max_text_len"],
        drop_rate=config["vilt_drop_rate"],
        text_drop=config["vilt_text_drop"],
        norm_eps=config["vilt_norm_eps"],
        text_norm_eps=config["vilt_text_norm_eps"],
        patch_shuffle=config["patch_shuffle"],
        masked_softmax=config["masked_softmax"],
    )
