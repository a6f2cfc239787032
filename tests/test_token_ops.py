"""Token reduction: the pure functions on hand-worked cases, ToMe against a reference written here from the
paper and run on timm's ViT, EViT's selection and fusion, and the no-op settings that must change nothing."""

import math

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.testing import assert_close

from models.token_ops import (
    EViTReducer,
    ToMeReducer,
    attach_reducers,
    bipartite_plan,
    build_reducer,
    complement,
    fuse_tokens,
    keep_topk,
    pad_tokens,
    reducer_specs,
)
from models.token_state import HookContext, TokenState
from models.vit import VisionTransformer

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 4}
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ pure functions


def test_topk_keeps_positions_in_order_and_complement_is_the_rest():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [0.5, 0.1, 0.4, 0.0, 0.9]])
    keep = keep_topk(scores, 2)
    assert keep.tolist() == [[1, 3], [0, 4]]
    assert complement(keep, 5).tolist() == [[0, 2, 4], [1, 2, 3]]


def test_fusion_weights_tokens_raw_or_normalised():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    w = torch.tensor([[0.25, 0.5]])
    assert fuse_tokens(x, w).tolist() == [[[0.25, 1.0]]]
    assert_close(fuse_tokens(x, w, normalize=True), torch.tensor([[[1 / 3, 4 / 3]]]))


def test_pad_tokens_pads_with_zeros_and_masks_them():
    a, b = torch.ones(2, 3, 4), 2 * torch.ones(1, 5, 4)
    x, m = pad_tokens([a, b], [torch.ones(2, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)])
    assert x.shape == (3, 5, 4) and m.tolist() == [[1, 1, 1, 0, 0]] * 2 + [[1] * 5]
    assert x[:2, 3:].abs().sum() == 0 and torch.equal(x[2], b[0])


# ------------------------------------------------------------------------------------------ ToMe by hand


def _seven_tokens():
    """7 tokens: CLS at 0, set A = 0, 2, 4, 6 and set B = 1, 3, 5. Keys chosen so that token 2 is almost token 3,
    token 4 almost token 5, and token 6 only loosely like token 1."""
    keys = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # 0 CLS (would match 1 perfectly, but is protected)
            [1.0, 0.0, 0.0, 0.1],  # 1
            [0.0, 1.0, 0.0, 0.0],  # 2 -> 3
            [0.0, 1.0, 0.05, 0.0],  # 3
            [0.0, 0.0, 1.0, 0.0],  # 4 -> 5
            [0.0, 0.0, 1.0, 0.05],  # 5
            [0.6, 0.0, 0.0, 0.8],  # 6 -> 1 loosely
        ]
    )[None]
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1).expand(1, 7, 3).clone()
    return keys, x


def test_tome_merges_the_two_most_similar_pairs_on_seven_tokens():
    keys, x = _seven_tokens()
    plan = bipartite_plan(keys, r=2, protect_first=True)
    # A = [0, 2, 4, 6] (indices 0..3 of set A), B = [1, 3, 5]: A-token 1 (token 2) -> B-token 1 (token 3),
    # A-token 2 (token 4) -> B-token 2 (token 5); CLS and token 6 stay.
    assert plan.src.tolist() == [[1, 2]] and plan.dst.tolist() == [[1, 2]] and plan.unmerged.tolist() == [[0, 3]]
    merged, size = plan.merge_weighted(x, None)
    assert plan.positions(torch.arange(7)[None]).tolist() == [[0, 6, 1, 3, 5]]
    assert size.tolist() == [[1, 1, 1, 2, 2]]
    assert merged[0, :, 0].tolist() == [0.0, 6.0, 1.0, 2.5, 4.5]  # (2 + 3) / 2 and (4 + 5) / 2
    # Sizes carry: merging the merged sequence again weights by them.
    again = bipartite_plan(torch.tensor([[[1.0, 0], [0, 1.0], [0, 1.0], [1.0, 0], [0, 1.0]]]), 1, True)
    x2, s2 = again.merge_weighted(merged, size)
    assert s2.sum() == 7 and x2[0, :, 0].sum() * 0 == 0


def test_tome_reducer_sets_sizes_positions_and_the_proportional_attention_bias():
    keys, x = _seven_tokens()
    reducer = ToMeReducer(r=2, prop_attn=True)
    ctx = HookContext(0, "post_attn", keys=keys[:, None].expand(1, 2, 7, 4))  # two heads, same keys
    out, state = reducer(x, TokenState(), ctx)
    assert out.shape == (1, 5, 3) and state.size.tolist() == [[1, 1, 1, 2, 2]]
    assert state.positions.tolist() == [[0, 6, 1, 3, 5]] and state.prop_attn
    bias = state.attn_bias(out)
    assert_close(bias[0, 0, 0], torch.tensor([0, 0, 0, math.log(2), math.log(2)]))
    assert reducer.out_tokens(7) == 5 and reducer.macs(7, 4) == 4 * 3 * 4


def test_tome_caps_r_at_half_the_unprotected_tokens_and_unmerges():
    keys = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(1))
    plan = bipartite_plan(keys, r=100, protect_first=True)
    assert plan.r == 4  # (9 - 1) // 2
    merged = plan.merge(x, "mean")
    back = plan.unmerge(merged)
    # Every token comes back as the value of the token it went into; the kept ones exactly.
    for b in range(2):
        for a in plan.unmerged[b].tolist():
            assert torch.equal(back[b, 2 * a], x[b, 2 * a])
        for i in range(plan.r):
            src, dst = 2 * plan.src[b, i].item(), 2 * plan.dst[b, i].item() + 1
            assert torch.equal(back[b, src], back[b, dst])


# ------------------------------------------------------------------------------------------ ToMe vs reference


def _reference_tome_forward(vit: TimmViT, images: torch.Tensor, rs: list[int], prop_attn: bool) -> torch.Tensor:
    """ToMe (Bolya et al. 2023, Sec. 3) applied to timm's ViT, sample by sample, written from the paper: after each
    block's attention, split the tokens alternately into sets A and B; score every A-B pair by the cosine
    similarity of their keys averaged over heads; CLS may neither leave A nor be merged; the r A-tokens with the
    best matches merge into their best B partners (size-weighted average; sizes add); the sequence becomes the
    remaining A tokens (in order) followed by B. Proportional attention adds log(size) to the attention logits."""
    outs = []
    for img in images:
        x = vit.patch_embed(img[None])
        x = torch.cat([vit.cls_token, x], dim=1) + vit.pos_embed
        size = torch.ones(x.shape[1])
        for block, r in zip(vit.blocks, rs):
            a = block.attn
            h = block.norm1(x)[0]
            n, c = h.shape
            qkv = a.qkv(h).view(n, 3, a.num_heads, c // a.num_heads).permute(1, 2, 0, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]
            logits = q @ k.transpose(-1, -2) * a.scale
            if prop_attn:
                logits = logits + size.log()[None, None, :]
            att = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, c)
            x = x + a.proj(att)[None]
            metric = k.mean(0)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            set_a, set_b = list(range(0, n, 2)), list(range(1, n, 2))
            rr = min(r, (n - 1) // 2)
            best = {}
            for i in set_a:
                if i == 0:
                    continue
                sims = [(float(metric[i] @ metric[j]), j) for j in set_b]
                best[i] = max(sims)
            merging = sorted(best, key=lambda i: -best[i][0])[:rr]
            tok, sz = x[0].clone(), size.clone()
            for i in merging:
                j = best[i][1]
                tok[j] = (tok[j] * sz[j] + tok[i] * sz[i]) / (sz[j] + sz[i])
                sz[j] = sz[j] + sz[i]
            keep = [i for i in set_a if i not in merging] + set_b
            x, size = tok[keep][None], sz[keep]
            x = x + block.mlp(block.norm2(x))
        outs.append(vit.norm(x)[0, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("r", [0, 3, [2, 5, 1]])
def test_our_tome_deit_equals_the_reference_on_timm_weights(r, prop_attn):
    timm_vit = _randomize(TimmViT(img_size=32, num_classes=0, global_pool="token", **TINY)).eval()
    ours = VisionTransformer(img_size=32, num_classes=0, **TINY).eval()
    ours.load_state_dict(timm_vit.state_dict(), strict=True)
    rs = r if isinstance(r, list) else [r] * len(ours.blocks)
    for block, value in zip(ours.blocks, rs):
        block.token_hooks.append(ToMeReducer(value, prop_attn))
    x = _images(3, seed=2)
    with torch.no_grad():
        got, state = ours.forward_tokens(x)
        expected = _reference_tome_forward(timm_vit, x, rs, prop_attn)
    assert_close(got[:, 0], expected, **TOL)
    tokens = 17
    for value in rs:
        tokens -= min(value, (tokens - 1) // 2)
    assert got.shape[1] == tokens and [c[2] for c in state.counts.values()][-1] == tokens
    if r == 0:
        assert_close(got, timm_vit.forward_features(x), **TOL)  # r = 0 is the dense model exactly


def test_tome_keeps_a_distillation_token_out_of_the_merges():
    ref = _randomize(VisionTransformerDistilled(img_size=32, num_classes=3, **TINY)).eval()
    ours = VisionTransformer(img_size=32, num_classes=3, distilled=True, **TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for block in ours.blocks:
        block.token_hooks.append(ToMeReducer(4, protect=2))
    with torch.no_grad():
        _, state = ours.forward_tokens(_images())
    assert state.positions[:, :2].tolist() == [[0, 1]] * 2  # CLS and distillation token first, unmerged
    assert (state.size[:, :2] == 1).all()


# ------------------------------------------------------------------------------------------ EViT


def test_evit_keeps_the_most_attended_tokens_and_fuses_the_rest_by_that_attention():
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1).expand(1, 6, 2).clone()
    probs = torch.zeros(1, 2, 6, 6)
    # CLS attention to tokens 1..5, averaged over two heads: [0.1, 0.4, 0.05, 0.3, 0.15]
    probs[0, 0, 0, 1:] = torch.tensor([0.2, 0.4, 0.0, 0.4, 0.0])
    probs[0, 1, 0, 1:] = torch.tensor([0.0, 0.4, 0.1, 0.2, 0.3])
    reducer = EViTReducer(keep_rate=0.4)  # ceil(0.4 * 5) = 2 of the 5
    out, state = reducer(x, TokenState(), HookContext(0, "post_attn", probs=probs))
    assert state.positions.tolist() == [[0, 2, 4, -1]]  # CLS, the two most attended in order, the fused one
    fused = 0.1 * 1 + 0.05 * 3 + 0.15 * 5  # the others, weighted by their attention
    assert_close(out[0, :, 0], torch.tensor([0.0, 2.0, 4.0, fused]))
    assert reducer.out_tokens(6) == 4 and EViTReducer(0.4, fuse=False).out_tokens(6) == 3


def test_evit_keeps_padding_out_when_text_is_reduced():
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    probs = torch.zeros(2, 1, 5, 5)
    probs[:, 0, 0, 1:] = torch.tensor([0.4, 0.1, 0.3, 0.2])
    out, state = EViTReducer(0.5, point="post_self_attn")(x, TokenState(mask=mask), HookContext(0, "", probs=probs))
    assert state.mask.tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]  # kept 1 and 3; the fused token is real if any part is


def test_keep_rate_one_and_r_zero_change_nothing_in_a_vit():
    vit = _randomize(VisionTransformer(img_size=32, num_classes=4, **TINY)).eval()
    x = _images()
    with torch.no_grad():
        dense = vit(x)
        for block in vit.blocks:
            block.token_hooks += [EViTReducer(1.0), ToMeReducer(0)]
        assert torch.equal(vit(x), dense)


def test_reducers_round_trip_through_their_specs():
    vit = VisionTransformer(img_size=32, num_classes=0, **TINY)
    vit.blocks[1].token_hooks.append(EViTReducer(0.5, fuse=False))
    vit.blocks[2].token_hooks.append(ToMeReducer(3, prop_attn=False))
    specs = reducer_specs(vit)
    assert specs == {
        "blocks.1": [{"kind": "evit", "keep_rate": 0.5, "fuse": False, "protect": 1, "point": "post_attn"}],
        "blocks.2": [{"kind": "tome", "r": 3, "prop_attn": False, "protect": 1}],
    }
    other = VisionTransformer(img_size=32, num_classes=0, **TINY)
    attach_reducers(other, specs)
    assert reducer_specs(other) == specs
    with pytest.raises(ValueError, match="unknown token reducer 'fancy'"):
        build_reducer({"kind": "fancy"})
    with pytest.raises(ValueError, match="not blocks of the model"):
        attach_reducers(other, {"blocks.9": []}, "x.json")


def test_a_hook_at_an_unknown_point_or_asking_for_the_unknown_is_refused():
    vit = VisionTransformer(img_size=32, num_classes=0, **TINY)

    class Hook:
        point, needs = "after_mlp", frozenset()

        def __call__(self, x, state, ctx):
            return x, state

    vit.blocks[0].token_hooks.append(Hook())
    with pytest.raises(ValueError, match="block 0: token hook .* has point 'after_mlp'"):
        vit(_images())
    vit.blocks[0].token_hooks[0].point, vit.blocks[0].token_hooks[0].needs = "post_attn", frozenset({"values"})
    with pytest.raises(ValueError, match=r"needs \['values'\]"):
        vit(_images())
