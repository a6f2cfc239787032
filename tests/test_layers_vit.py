"""Prunable blocks and the ViT: parity with timm, mask/slice equivalence, hooks, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn
from torch.testing import assert_close

from models import layers
from models.layers import Attention, Block, KVCache, Mlp, attention, module_units
from models.token_state import TokenState
from models.vit import VisionTransformer, prunable_units, resample_pos_embed, vit_config

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (default inits zero the biases, which would hide slicing bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _tiny_vit(**kwargs) -> VisionTransformer:
    return _randomize(VisionTransformer(img_size=32, **{**TINY, **kwargs})).eval()


def _images(h: int = 32, w: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- timm parity


@pytest.mark.parametrize("img_size,num_classes", [(32, 0), (32, 5), (48, 0)])
def test_vit_matches_timm(img_size, num_classes):
    ref = _randomize(TimmViT(img_size=img_size, num_classes=num_classes, global_pool="token", class_token=True, **TINY))
    ref.eval()
    ours = VisionTransformer(img_size=img_size, num_classes=num_classes, **TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _images(img_size, img_size)
    with torch.no_grad():
        feats = ours.forward_features(x)
        assert feats.shape == (2, 1 + (img_size // 8) ** 2, 32)
        assert_close(feats, ref.forward_features(x), **TOL)
        if num_classes:
            assert_close(ours(x), ref(x), **TOL)
        else:
            assert_close(ours(x)[:, 0], ref(x), **TOL)


def test_vit_other_image_size_resamples_pos_embed_like_a_rebuilt_model():
    ours = _tiny_vit()
    sd = ours.state_dict()
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (4, 6), old_grid=(4, 4))
    ref = TimmViT(img_size=(32, 48), num_classes=0, **TINY).eval()
    ref.load_state_dict(sd, strict=True)
    x = _images(32, 48)
    with torch.no_grad():
        assert_close(ours.forward_features(x), ref.forward_features(x), **TOL)


def test_distilled_vit_matches_timm_deit():
    ref = _randomize(VisionTransformerDistilled(img_size=32, num_classes=5, **TINY)).eval()
    ours = VisionTransformer(img_size=32, num_classes=5, distilled=True, **TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _images()
    with torch.no_grad():
        assert_close(ours(x), ref(x), **TOL)
    ours.train()
    ours.distilled_training = True
    cls_logits, dist_logits = ours(x)
    feats = ours.forward_features(x)
    assert_close(cls_logits, ours.head(feats[:, 0]))
    assert_close(dist_logits, ours.head_dist(feats[:, 1]))


# --------------------------------------------------------------------------- attention core


def test_sdpa_path_equals_explicit_probs_path():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=g)
    k = torch.randn(2, 3, 7, 8, generator=g)
    v = torch.randn(2, 3, 7, 8, generator=g)
    mask = torch.zeros(2, 1, 5, 7)
    mask[1, :, :, -2:] = -10000.0
    for scale in (None, 0.3):
        fast, none = attention(q, k, v, mask, scale=scale)
        slow, probs = attention(q, k, v, mask, scale=scale, need_probs=True)
        assert none is None
        assert_close(fast, slow, atol=1e-6, rtol=1e-6)
        assert probs.shape == (2, 3, 5, 7)
        assert_close(probs.sum(-1), torch.ones(2, 3, 5))
        assert probs[1, :, :, -2:].max() < 1e-6
    with pytest.raises(TypeError, match="additive"):
        attention(q, k, v, mask < 0)


def test_fused_layout_equals_split_layout():
    fused = _randomize(Attention(16, 4, fused=True))
    split = Attention(16, 4, fused=False)
    with torch.no_grad():
        for i, linear in enumerate((split.query, split.key, split.value)):
            linear.weight.copy_(fused.qkv.weight[16 * i : 16 * (i + 1)])
            linear.bias.copy_(fused.qkv.bias[16 * i : 16 * (i + 1)])
        split.proj.load_state_dict(fused.proj.state_dict())
    x = torch.randn(2, 6, 16)
    a, b = fused(x, need_probs=True), split(x, need_probs=True)
    assert_close(a.out, b.out, **TOL)
    assert_close(a.probs, b.probs, **TOL)
    assert_close(fused(x), a.out)


def test_cross_attention_matches_hand_computation():
    attn = _randomize(Attention(12, 2, head_dim=5, kv_dim=20, fused=False))
    x, ctx = torch.randn(2, 3, 12), torch.randn(2, 4, 20)
    mask = torch.zeros(2, 1, 1, 4)
    mask[1, ..., -1] = -10000.0
    out = attn(x, context=ctx, mask=mask)

    def heads(t):
        return t.view(2, -1, 2, 5).transpose(1, 2)

    q, k, v = heads(attn.query(x)), heads(attn.key(ctx)), heads(attn.value(ctx))
    probs = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / 5**0.5 + mask, dim=-1)
    expected = attn.proj(torch.einsum("bhqk,bhkd->bqhd", probs, v).reshape(2, 3, 10))
    assert out.shape == (2, 3, 12)
    assert_close(out, expected, **TOL)

    with pytest.raises(ValueError, match="fused"):
        Attention(12, 2, kv_dim=20, fused=True)
    with pytest.raises(ValueError, match="context"):
        Attention(12, 2)(x, context=x)


def test_kv_cache_incremental_decoding_equals_full_pass():
    attn = _randomize(Attention(16, 4, fused=False)).eval()
    attn.head_dim_mask = torch.tensor([1.0, 0.5, 0.0, 1.0])
    x = torch.randn(1, 5, 16)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    full = attn(x, mask=causal)
    cache = KVCache()
    steps = [attn(x[:, t : t + 1], kv_cache=cache) for t in range(5)]
    assert_close(torch.cat(steps, dim=1), full, **TOL)
    assert cache.k.shape == (1, 4, 5, 4)

    cross = _randomize(Attention(16, 4, kv_dim=8, fused=False), seed=3).eval()
    ctx = torch.randn(1, 3, 8)
    cache = KVCache()
    first = cross(x[:, :2], context=ctx, kv_cache=cache)
    cached_k = cache.k
    second = cross(x[:, 2:], context=ctx, kv_cache=cache)
    assert cache.k is cached_k
    assert_close(torch.cat([first, second], dim=1), cross(x, context=ctx), **TOL)


# --------------------------------------------------------------------------- masks vs slicing


def test_head_dim_mask_equals_keep_head_dims():
    model = _tiny_vit()
    compressed = copy.deepcopy(model)
    kept = [[0, 2, 5, 7], [1, 2, 3]]
    for block, keep in zip(model.blocks, kept):
        mask = torch.zeros(8)
        mask[keep] = 1.0
        block.attn.head_dim_mask = mask
    for block, keep in zip(compressed.blocks, kept):
        block.attn.keep_head_dims(keep)
    x = _images()
    with torch.no_grad():
        assert_close(compressed(x), model(x), **TOL)

    attn, dense = compressed.blocks[0].attn, model.blocks[0].attn
    assert attn.head_dim == 4 and attn.qkv.weight.shape == (3 * 4 * 4, 32) and attn.proj.weight.shape == (32, 16)
    assert attn.scale == 8**-0.5  # timm ViT convention: the dense scale survives
    rows = torch.tensor([w * 32 + h * 8 + d for w in range(3) for h in range(4) for d in kept[0]])
    assert torch.equal(attn.qkv.bias, dense.qkv.bias[rows])
    assert torch.equal(attn.qkv.weight, dense.qkv.weight[rows])


def test_head_mask_equals_keep_heads():
    model = _tiny_vit()
    compressed = copy.deepcopy(model)
    model.blocks[0].attn.head_mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    model.blocks[1].attn.head_mask = torch.tensor([0.0, 0.0, 0.0, 1.0])
    compressed.blocks[0].attn.keep_heads(torch.tensor([True, False, True, False]))
    compressed.blocks[1].attn.keep_heads([3])
    x = _images()
    with torch.no_grad():
        assert_close(compressed(x), model(x), **TOL)
    assert compressed.blocks[1].attn.num_heads == 1
    assert compressed.blocks[1].attn.qkv.weight.shape == (3 * 8, 32)


def test_neuron_mask_equals_keep_neurons():
    model = _tiny_vit()
    compressed = copy.deepcopy(model)
    keep = torch.arange(0, 128, 3)
    mask = torch.zeros(128)
    mask[keep] = 1.0
    model.blocks[1].mlp.neuron_mask = mask
    compressed.blocks[1].mlp.keep_neurons(keep)
    x = _images()
    with torch.no_grad():
        assert_close(compressed(x), model(x), **TOL)
    mlp = compressed.blocks[1].mlp
    assert mlp.hidden == keep.numel() and mlp.fc1.bias.shape == (keep.numel(),)
    assert mlp.fc2.weight.shape == (32, keep.numel())
    assert torch.equal(mlp.fc2.bias, model.blocks[1].mlp.fc2.bias)


def test_all_ones_masks_change_nothing():
    model = _tiny_vit()
    x = _images()
    with torch.no_grad():
        dense = model(x)
        for block in model.blocks:
            block.attn.head_dim_mask = torch.ones(8)
            block.attn.head_mask = torch.ones(4)
            block.mlp.neuron_mask = torch.ones(128)
        assert torch.equal(model(x), dense)


@pytest.mark.parametrize("fused", [True, False])
def test_soft_head_dim_mask_scales_query_key_and_value(fused):
    """A soft entry a scales coordinate d of q, k and v: the same as scaling those projection rows by a."""
    attn = _randomize(Attention(16, 4, fused=fused))
    scaled = copy.deepcopy(attn)
    alpha = torch.tensor([0.2, 1.0, 0.5, 0.9])
    attn.head_dim_mask = alpha
    rows = alpha.repeat(12 if fused else 4)
    with torch.no_grad():
        for linear in [scaled.qkv] if fused else [scaled.query, scaled.key, scaled.value]:
            linear.weight.mul_(rows[:, None])
            linear.bias.mul_(rows)
    x = torch.randn(2, 5, 16)
    assert_close(attn(x), scaled(x), **TOL)


def test_slicing_keeps_soft_masks_on_kept_units():
    attn = _randomize(Attention(16, 4, fused=False))
    mlp = _randomize(Mlp(16, 10), seed=2)
    attn.head_dim_mask = torch.tensor([0.7, 0.0, 1.0, 0.3])
    attn.head_mask = torch.tensor([0.5, 1.0, 0.0, 0.9])
    mlp.neuron_mask = torch.linspace(0, 1, 10)
    x = torch.randn(2, 5, 16)
    before_attn, before_mlp = attn(x), mlp(x)
    attn.keep_head_dims([0, 2, 3])
    attn.keep_heads([0, 1, 3])
    mlp.keep_neurons(torch.arange(1, 10))
    assert_close(attn(x), before_attn, **TOL)
    assert_close(mlp(x), before_mlp, **TOL)
    assert_close(attn.head_mask, torch.tensor([0.5, 1.0, 0.9]))
    assert attn.query.weight.shape == (9, 16) and attn.proj.weight.shape == (16, 9)


def test_rescale_sets_scale_from_kept_head_dim():
    attn = _randomize(Attention(16, 2, fused=False))  # head_dim 8
    masked = copy.deepcopy(attn)
    keep = [1, 4]
    masked.head_dim_mask = torch.tensor([0.0, 1, 0, 0, 1, 0, 0, 0])
    masked.scale = 2**-0.5
    cols = attn.keep_head_dims(keep, rescale=True)
    assert attn.scale == pytest.approx(2**-0.5)
    assert cols.tolist() == [1, 4, 9, 12]
    x = torch.randn(2, 5, 16)
    assert_close(attn(x), masked(x), **TOL)

    plain = _randomize(Attention(16, 2, fused=False))
    plain.keep_head_dims(keep)
    assert plain.scale == pytest.approx(8**-0.5)


def test_masks_are_slots_not_parameters():
    model = _tiny_vit()
    keys = set(model.state_dict())
    n_params = len(list(model.parameters()))
    alpha = nn.Parameter(torch.ones(8))
    attn = model.blocks[0].attn
    attn.head_dim_mask = alpha
    model.blocks[0].mlp.neuron_mask = nn.Parameter(torch.ones(128))
    hook = nn.Linear(3, 3)  # a hook with weights of its own is never registered by the block
    hook.point, hook.needs = "post_attn", frozenset()
    model.blocks[0].token_hooks.append(hook)
    assert set(model.state_dict()) == keys
    assert len(list(model.parameters())) == n_params
    model.blocks[0].token_hooks.clear()
    model(_images()).square().sum().backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0

    with pytest.raises(ValueError, match=r"head_dim_mask must have shape \(8,\)"):
        attn.head_dim_mask = torch.ones(4)
    with pytest.raises(ValueError, match="neuron_mask"):
        model.blocks[0].mlp.neuron_mask = torch.ones(1, 128)
    with pytest.raises(ValueError, match="keep at least one"):
        attn.keep_heads([])
    with pytest.raises(ValueError, match="duplicate"):
        attn.keep_heads([1, 1])
    with pytest.raises(IndexError, match="out of range"):
        model.blocks[0].mlp.keep_neurons([128])


# --------------------------------------------------------------------------- widths, units


def test_per_block_widths_build_and_round_trip():
    widths = {"heads": [4, 2], "head_dims": [8, 3], "mlp_hidden": [20, 7]}
    model = _tiny_vit(**widths)
    sd = model.state_dict()
    assert sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert sd["blocks.1.attn.qkv.weight"].shape == (18, 32)
    assert sd["blocks.1.attn.qkv.bias"].shape == (18,)
    assert sd["blocks.1.attn.proj.weight"].shape == (32, 6)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (20, 32)
    assert sd["blocks.1.mlp.fc2.weight"].shape == (32, 7)
    assert model.blocks[1].attn.scale == 8**-0.5
    assert model.block_widths() == widths
    assert model(_images()).shape == (2, 17, 32)

    dense = _tiny_vit()
    dense.blocks[1].attn.keep_heads([0, 3])
    dense.blocks[1].attn.keep_head_dims([0, 1, 5])
    dense.blocks[0].mlp.keep_neurons(range(20))
    dense.blocks[1].mlp.keep_neurons(range(7))
    rebuilt = VisionTransformer(img_size=32, **TINY, **dense.block_widths()).eval()
    rebuilt.load_state_dict(dense.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(rebuilt(_images()), dense(_images()))

    with pytest.raises(ValueError, match="heads lists 1 blocks but depth is 2"):
        VisionTransformer(img_size=32, heads=[4], **TINY)


def test_prunable_units_cost_is_the_removed_parameter_count():
    model = _tiny_vit(heads=[4, 2], mlp_hidden=[20, 7])
    units = prunable_units(model)
    assert [(u.name, u.kind, u.size) for u in units] == [
        ("blocks.0.attn", "head_dim", 8),
        ("blocks.0.attn", "head", 4),
        ("blocks.0.mlp", "neuron", 20),
        ("blocks.1.attn", "head_dim", 8),
        ("blocks.1.attn", "head", 2),
        ("blocks.1.mlp", "neuron", 7),
    ]
    n_params = sum(p.numel() for p in model.parameters())
    for i, unit in enumerate(units):
        pruned = copy.deepcopy(model)
        pruned_unit = prunable_units(pruned)[i]
        pruned_unit.keep(range(unit.size - 1))
        assert n_params - sum(p.numel() for p in pruned.parameters()) == unit.cost, unit
    units[1].set_mask(torch.ones(4))
    assert model.blocks[0].attn.head_mask is not None and units[1].mask_slot == "head_mask"

    # Per-entry costs the UPop budget is built on: ViT-B/BERT-base 36,900 and 1,537; DeiT-S 9,234 and 769.
    assert module_units("a", Attention(768, 12))[0].cost == 36900
    assert Mlp(768, 3072).param_cost() == 1537
    assert Attention(384, 6).param_cost("head_dim") == 9234
    assert Mlp(384, 1536).param_cost() == 769
    with pytest.raises(TypeError, match="no prunable units"):
        module_units("norm", nn.LayerNorm(4))


def test_vit_presets():
    assert vit_config("base") == {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
    assert vit_config("large") == {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
    assert vit_config("deit_tiny")["embed_dim"] == 192 and vit_config("deit_tiny")["num_heads"] == 3
    assert vit_config("deit_small")["embed_dim"] == 384 and vit_config("deit_small")["num_heads"] == 6
    with pytest.raises(ValueError, match="unknown ViT preset"):
        vit_config("huge")


# --------------------------------------------------------------------------- checkpointing, hooks


def test_grad_checkpointing_is_numerically_a_no_op(monkeypatch):
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counting_checkpoint)
    plain = _tiny_vit(num_classes=3).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = _images()
    out_plain, out_ckpt = plain(x), ckpt(x)
    assert calls == [False] * 4  # attention and MLP of both blocks, non-reentrant
    assert torch.equal(out_plain, out_ckpt)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    grads_plain = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        assert_close(p.grad, grads_plain[name].grad, atol=1e-6, rtol=1e-6)
    assert list(ckpt.state_dict()) == list(plain.state_dict())

    ckpt.set_grad_checkpointing(True, last_k=1)
    assert [b.grad_checkpointing for b in ckpt.blocks] == [False, True]
    calls.clear()
    with torch.no_grad():
        ckpt(x)
    ckpt.eval()(x)
    assert calls == []


class _KeepFirst:
    """Token pruner stand-in: keeps the first ``n`` tokens, records what it was given."""

    point = "post_attn"

    def __init__(self, n: int, needs_probs: bool) -> None:
        self.n = n
        self.needs = frozenset({"probs"} if needs_probs else ())
        self.seen: list[dict] = []

    def __call__(self, x, state, ctx):
        self.seen.append({"block": ctx.block, "tokens": x.shape[1], "probs": ctx.probs})
        n = min(self.n, x.shape[1])
        state.scratch["kept"] = n
        return x[:, :n], state.select(torch.arange(n).expand(x.shape[0], -1))


def test_token_hook_drops_tokens_and_receives_probs():
    model = _tiny_vit()
    first, second = _KeepFirst(9, needs_probs=True), _KeepFirst(5, needs_probs=False)
    model.blocks[0].token_hooks.append(first)
    model.blocks[1].token_hooks.append(second)
    x = _images()
    with torch.no_grad():
        out, state = model.forward_tokens(x, record_attn=[0])
    assert out.shape == (2, 5, 32)
    assert first.seen[0]["block"] == 0 and first.seen[0]["tokens"] == 17
    assert second.seen[0]["block"] == 1 and second.seen[0]["tokens"] == 9
    assert second.seen[0]["probs"] is None
    assert state.scratch["kept"] == 5 and state.positions.tolist() == [list(range(5))] * 2
    assert state.counts == {0: (17, 17, 9), 1: (9, 9, 5)}  # into attention, after self-attention, into the MLP
    assert list(state.maps) == [0] and state.maps[0] is first.seen[0]["probs"]

    # the probabilities handed to the hook are block 0's softmax(q k^T / sqrt(d))
    with torch.no_grad():
        patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), patches], 1) + model.pos_embed
        qkv = model.blocks[0].attn.qkv(model.blocks[0].norm1(tokens)).view(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
        expected = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * 8**-0.5, dim=-1)
    assert_close(first.seen[0]["probs"], expected, **TOL)

    # a block alone accepts any token count
    assert model.blocks[1](torch.randn(2, 3, 32))[0].shape == (2, 3, 32)


def test_proportional_attention_weights_merged_tokens_by_size():
    block = _randomize(Block(16, 4)).eval()
    x = torch.randn(1, 3, 16)
    duplicated = torch.cat([x, x[:, 1:2]], dim=1)  # token 1 present twice
    size = torch.tensor([[1.0, 2.0, 1.0]])
    with torch.no_grad():
        merged = block(x, TokenState(size=size, prop_attn=True))[0]
        reference = block(duplicated)[0]
        off = block(x, TokenState(size=size, prop_attn=False))[0]
    assert_close(merged, reference[:, :3], **TOL)
    assert not torch.allclose(off, reference[:, :3], atol=1e-4)


# --------------------------------------------------------------------------- position embeddings


@pytest.mark.parametrize("new_grid", [(6, 6), (3, 5)])
def test_resample_pos_embed_matches_direct_bicubic(new_grid):
    pos = torch.randn(1, 1 + 16, 8)
    out = resample_pos_embed(pos, new_grid)
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    direct = direct.permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert out.shape == (1, 1 + new_grid[0] * new_grid[1], 8)
    assert torch.equal(out[:, :1], pos[:, :1])
    assert_close(out[:, 1:], direct, atol=1e-6, rtol=1e-6)
    assert resample_pos_embed(pos, 4) is pos


def test_resample_pos_embed_is_not_antialiased():
    pos = torch.randn(1, 2 + 36, 8)
    out = resample_pos_embed(pos, 4, num_prefix_tokens=2)
    assert torch.equal(out[:, :2], pos[:, :2])
    grid = pos[:, 2:].reshape(1, 6, 6, 8).permute(0, 3, 1, 2)
    aa = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(out[:, 2:], aa.permute(0, 2, 3, 1).reshape(1, 16, 8), atol=1e-3)
    with pytest.raises(ValueError, match="square grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 8), 4)
