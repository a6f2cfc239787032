"""MADTP (multimodal alignment-guided dynamic token pruning, spec madtp.md): the DTP functions against the spec
worked by hand, the reducer on plain tensors (selection, fusion, skip rules, CLIP's end-of-text token), the
alignment features and loss, the temperature controller's tables, T = 0 as the dense model, the analytic cost with
replayed token counts against the traced count, checkpoints (architecture round trip, the seed's release files)
and CLIP's per-block projections."""

import math

import pytest
import tiny_blip
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from benchmarks.flops import count
from benchmarks.measure import average_cost, inference, preserved_state, replayed_cost
from models.arch import apply_architecture, architecture, save_compressed
from models.blip_nlvr import BlipNLVR
from models.blip_retrieval import BlipRetrieval
from models.clip import ClipArch, ClipRetrieval, ClipTextTower
from models.cost import recorded_counts, replayed_counts
from models.madtp import from_release, reducer_plan
from models.token_ops import MADTPReducer, attach_reducers, madtp_importance, madtp_keep_count, reducer_specs
from models.token_state import HookContext, TokenState, run_hooks
from models.vit import VisionTransformer
from pruners.madtp import CALIBRATION, CONTROLLERS, MADTP, _image_side, temperature_step
from tasks.common import blip_loader
from utils import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # 16 patches + CLS: room to prune in the tiny BLIP models
WIDTH = tiny_blip.WIDTH
SD_NUM = 8
TEXTS = ["a red circle of two", "two red circle picture of a"]
PRUNE_T = 50.0  # prunes image and text tokens of the tiny BLIP models


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_blip.tiny_config(tmp_path_factory.mktemp("madtp_blip"))


def _nlvr(cfg, seed=0):
    torch.manual_seed(seed)
    return BlipNLVR(cfg, SIZE).eval()


def _madtp(model, temperature, **kw):
    attach_reducers(model, reducer_plan(model, temperature, SD_NUM, WIDTH, **kw))
    return model


def _images(n, seed=1, size=SIZE):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, images=None):
    return model(_images(4) if images is None else images, TEXTS)


def _temperatures(model):
    return {spec["temperature"] for specs in reducer_specs(model).values() for spec in specs}


def _dtp_inputs(seed, b=2, h=3, n=6, m=4, d=5):
    """Softmax-normalised attention (B, H, 1 + N, 1 + N), head outputs (B, H, 1 + N, d), raw matches (B, N, M)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(b, h, 1 + n, 1 + n, generator=g).softmax(dim=-1)
    head_out = torch.randn(b, h, 1 + n, d, generator=g)
    match = 3 * torch.randn(b, n, m, generator=g)
    return probs, head_out, match


def _importance_by_hand(probs, head_out, match):
    """Spec 3.1 written out token by token."""
    b, h, t, _ = probs.shape
    out = torch.zeros(b, t - 1)
    for s in range(b):
        s_self = [sum(max(float(probs[s, k, i, j]) for k in range(h)) for i in range(1, t)) for j in range(1, t)]
        s_cls = []
        for j in range(1, t):
            norms = [float(head_out[s, k, j].norm()) for k in range(h)]
            s_cls.append(sum(float(probs[s, k, 0, j]) * norms[k] / sum(norms) for k in range(h)))
        s_mag = [max(float(v) for v in match[s, j]) for j in range(t - 1)]
        for j in range(t - 1):
            out[s, j] = (s_self[j] / sum(s_self) + s_cls[j] + s_mag[j] / sum(s_mag)) / 3
    return out


def _block_case(seed, b=2, h=3, n=12, m=5, d=8):
    """One block's tokens (B, 1 + N, d), alignment tokens (M, d), attention and head outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1 + n, d, generator=g)
    sd = torch.randn(m, d, generator=g)
    probs = torch.randn(b, h, 1 + n, 1 + n, generator=g).softmax(dim=-1)
    head_out = torch.randn(b, h, 1 + n, d, generator=g)
    return x, sd, probs, head_out


def _expected(x, sd, probs, head_out, temperature):
    """(importance, K) that the reducer must reach for this block."""
    match = x[:, 1:] @ sd.t()
    importance = madtp_importance(probs, head_out, match)
    return importance, int(madtp_keep_count(importance, match, temperature).max())


def _bound(temperature, sd, **kw):
    """A MADTP reducer bound to a holder module whose alignment tokens are ``sd`` (eval: nothing recorded)."""
    holder = nn.Module()
    reducer = MADTPReducer(temperature, sd_num=sd.shape[0], sd_dim=sd.shape[1], **kw)
    reducer.bind(holder)
    with torch.no_grad():
        holder.madtp.space_dict.copy_(sd)
    holder.eval()
    return reducer


def _reduce(reducer, x, state, probs, head_out):
    """The reducer at its two points of one block: the block input, then after attention."""
    same, state = reducer(x, state, HookContext(0, "pre_attn"))
    assert same is x
    return reducer(x, state, HookContext(0, "post_attn", probs=probs, head_out=head_out))


def _to_front(j, x, probs, head_out):
    """The block with token ``j`` (of those after the first) moved to the front of them (batch of one)."""
    n = x.shape[1] - 1
    order = torch.tensor([0] + [j + 1] + [i + 1 for i in range(n) if i != j])
    return x[:, order], probs[:, :, order][:, :, :, order], head_out[:, :, order]


CLIP_TINY = {
    "embed_dim": 24,
    "patch_size": 8,
    "vision_width": 64,
    "vision_layers": 2,
    "context_length": 16,
    "text_width": 64,
    "text_layers": 2,
}


def _clip(seed=0):
    torch.manual_seed(seed)
    model = ClipRetrieval(ClipArch.from_config("", CLIP_TINY, image_size=32), queue_size=12).eval()
    with torch.no_grad():  # away from the init's zeros and ones
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.reset_momentum()
    return model


class _Split:
    """A retrieval evaluation split: two images with two captions each."""

    text = ["a red circle", "two", "a picture of two red circle", "of"]
    img2txt = {0: [0, 1], 1: [2, 3]}


# ------------------------------------------------------------------------------------------ 1: DTP functions


def test_importance_is_the_mean_of_received_cls_and_alignment_scores_by_hand():
    """madtp_importance equals spec 3.1 computed token by token."""
    probs, head_out, match = _dtp_inputs(0)
    got = madtp_importance(probs, head_out, match)
    assert got.shape == (2, 6)
    assert_close(got, _importance_by_hand(probs, head_out, match), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_keep_count_falls_as_the_temperature_rises(seed):
    """The mean keep count over a batch falls over a grid of T (spec: empirically; per sample it may rise)."""
    probs, head_out, match = _dtp_inputs(seed, b=256, h=4, n=16, m=10, d=8)
    importance = madtp_importance(probs, head_out, match)
    grid = [1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4]
    means = [float(madtp_keep_count(importance, match, t).float().mean()) for t in grid]
    # Where T is small the count is almost flat and the batch mean wobbles by a few hundredths of a token.
    assert all(b <= a + 0.1 for a, b in zip(means, means[1:])), means
    assert means[2] > means[5] > means[-1] and means[0] > means[-1] + 2, means


def test_keep_count_at_huge_temperature_is_the_above_mean_count():
    """T -> inf: uniform alignment weights, the threshold is the mean importance."""
    probs, head_out, match = _dtp_inputs(5, b=16, n=16, m=10, d=8)
    importance = madtp_importance(probs, head_out, match)
    mean = importance.mean(dim=1, keepdim=True)
    assert (importance - mean).abs().min() > 1e-5  # no token on the threshold
    expected = (importance > mean).sum(dim=1)
    assert torch.equal(madtp_keep_count(importance, match, 1e7), expected)


def test_keep_count_at_tiny_temperature_thresholds_at_the_best_matched_tokens():
    """T -> 0: the threshold is min over alignment tokens of the importance of each one's best-matching token."""
    probs, head_out, match = _dtp_inputs(6, b=16, n=16, m=10, d=8)
    importance = madtp_importance(probs, head_out, match)
    top2 = match.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # each alignment token has one best match
    threshold = importance.gather(1, match.argmax(dim=1)).amin(dim=1, keepdim=True)
    expected = (importance > threshold).sum(dim=1)  # strict: the threshold token itself is not counted
    assert torch.equal(madtp_keep_count(importance, match, 1e-6), expected)
    assert (expected < 16).all()


# ------------------------------------------------------------------------------------------ 2: the reducer


def test_reducer_keeps_the_top_k_in_order_and_fuses_the_rest_by_importance():
    """Output 1 + K + 1 tokens: the first, the K most important in positional order, their importance-weighted mean."""
    x, sd, probs, head_out = _block_case(0)
    importance, k = _expected(x, sd, probs, head_out, 1.0)
    n = x.shape[1] - 1
    assert 1 <= k <= n - 2
    keep = importance.topk(k, dim=1).indices.sort(dim=1).values
    rest = [sorted(set(range(n)) - set(row)) for row in keep.tolist()]
    mask = torch.zeros(2, 1 + n, dtype=torch.long)
    mask[:, 0] = 1
    mask.scatter_(1, keep + 1, 1)
    mask[0, keep[0, -1] + 1] = 0  # a kept padding token stays padding
    mask[1, rest[1][0] + 1] = 1  # sample 1 fuses one real token, sample 0 only padding

    out, state = _reduce(_bound(1.0, sd), x, TokenState(mask=mask), probs, head_out)
    assert out.shape == (2, 1 + k + 1, x.shape[2])
    state.check(out)
    assert torch.equal(out[:, 0], x[:, 0])
    assert state.positions[:, 0].tolist() == [0, 0] and state.positions[:, -1].tolist() == [-1, -1]
    assert torch.equal(state.positions[:, 1 : k + 1], keep + 1)
    assert torch.equal(out[:, 1 : k + 1], x.gather(1, (keep + 1)[..., None].expand(-1, -1, x.shape[2])))
    for s in range(2):
        w = importance[s, rest[s]]
        assert_close(out[s, -1], (w[:, None] / w.sum() * x[s, [r + 1 for r in rest[s]]]).sum(0), atol=1e-6, rtol=1e-5)
    assert torch.equal(
        state.mask[:, : k + 1], mask.gather(1, torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], 1))
    )
    assert state.mask[:, -1].tolist() == [0, 1]


def test_fusion_weights_sum_to_one():
    """Identical fused tokens fuse to themselves (no alignment signal: the threshold is the mean importance)."""
    x, _, probs, head_out = _block_case(1)
    x[:, 1:] = torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0, 4.0, -1.0, 2.0])
    sd = torch.zeros(5, 8)  # every match 0
    importance, k = _expected(x, sd, probs, head_out, 1.0)
    assert k == int((importance > importance.mean(1, keepdim=True)).sum(1).max()) and k <= 10
    out, _ = _reduce(_bound(1.0, sd), x, TokenState(), probs, head_out)
    assert out.shape[1] == k + 2
    assert_close(out[:, -1], x[:, 1], atol=1e-6, rtol=1e-6)


def test_reducer_passes_tokens_through_when_fewer_than_two_would_be_fused():
    """N - K <= 1 leaves the block's tokens and state unchanged."""
    x, sd, probs, head_out = _block_case(1, n=4, m=40)
    _, k = _expected(x, sd, probs, head_out, 1e-4)
    assert k == 3  # every token is some alignment token's best match: only the least important one is below
    state = TokenState()
    out, new = _reduce(_bound(1e-4, sd), x, state, probs, head_out)
    assert out is x and new.positions is None and new.mask is None


def test_reducer_passes_tokens_through_when_k_is_within_max_keep():
    """K <= max_keep (CLIP vision: 1) leaves the tokens unchanged; one more than max_keep prunes."""
    x, sd, probs, head_out = _block_case(0)
    _, k = _expected(x, sd, probs, head_out, 1.0)
    out, _ = _reduce(_bound(1.0, sd, max_keep=k), x, TokenState(), probs, head_out)
    assert out is x
    out, _ = _reduce(_bound(1.0, sd, max_keep=k - 1), x, TokenState(), probs, head_out)
    assert out.shape[1] == k + 2


def test_temperature_zero_asks_for_nothing_matches_nothing_and_changes_nothing():
    """T = 0: no attention maps asked for, no pre-attention match, the tokens pass; T > 0 asks and matches."""
    x, sd, probs, head_out = _block_case(0)
    off = _bound(0.0, sd)
    assert off.needs == frozenset() and off.also_at == () and off.out_tokens(17) == 17 and off.macs(17, 8) == 0
    state = TokenState()
    out, new = run_hooks([off], "pre_attn", x, state, HookContext(0, "pre_attn"))
    assert out is x and new.scratch == {}
    out, new = run_hooks([off], "post_attn", x, new, HookContext(0, "post_attn"))
    assert out is x and new is state and new.positions is None

    on = _bound(1.0, sd)
    assert on.needs == {"probs", "head_out"} and on.also_at == ("pre_attn",) and on.out_tokens is None
    state = TokenState()
    out, state = run_hooks([on], "pre_attn", x, state, HookContext(0, "pre_attn"))
    assert out is x
    assert_close(state.scratch["madtp_match0"], x[:, 1:] @ sd.t())


def test_keep_marked_keeps_the_marked_token_even_when_it_is_the_least_important():
    """CLIP's end-of-text token survives though its importance is the lowest; K - 1 others are kept by rank."""
    x, sd, probs, head_out = _block_case(0, b=1)
    importance, _ = _expected(x, sd, probs, head_out, 1.0)
    x, probs, head_out = _to_front(int(importance.argmin()), x, probs, head_out)
    importance, k = _expected(x, sd, probs, head_out, 1.0)
    assert int(importance.argmin()) == 0  # the token at position 1 is now the least important
    assert 3 < k <= x.shape[1] - 3  # above the limit 1 + 2, at least two fused
    state = TokenState()
    state.scratch["keep_positions"] = torch.tensor([1])
    out, state = _reduce(_bound(1.0, sd, keep_marked=True), x, state, probs, head_out)
    others = (importance[0, 1:].topk(k - 1).indices + 2).tolist()
    assert out.shape[1] == k + 2
    assert state.positions[0].tolist() == [0, *sorted([1, *others]), -1]
    assert torch.equal(out[0, 1], x[0, 1])


def test_keep_marked_raises_the_skip_limit_to_the_marked_index_plus_two():
    """K <= marked index + 2 passes the tokens through; K = index + 3 prunes; a lost marked token is an error."""
    x, sd, probs, head_out = _block_case(0, b=1)
    _, k = _expected(x, sd, probs, head_out, 1.0)
    assert k >= 4
    reducer = _bound(1.0, sd, keep_marked=True)
    for marked, pruned in ((k - 2, False), (k - 3, True)):
        state = TokenState()
        state.scratch["keep_positions"] = torch.tensor([marked])
        out, state = _reduce(reducer, x, state, probs, head_out)
        assert (out is not x) == pruned
        if pruned:
            assert marked in state.positions[0].tolist()
    state = TokenState(positions=torch.arange(1, 14)[None])
    state.scratch["keep_positions"] = torch.tensor([0])
    with pytest.raises(ValueError, match="marked token"):
        _reduce(reducer, x, state, probs, head_out)


def test_keep_marked_limit_is_the_original_end_of_text_position_in_every_layer():
    """The seed's CLIP text rule skips when K <= max original EOT index + 2, fixed for all layers."""
    x, sd, probs, head_out = _block_case(0, b=1)
    _, k = _expected(x, sd, probs, head_out, 1.0)
    assert k == 5
    # After an earlier layer removed tokens 2..6, the end-of-text token (input position 7) is the third token: the
    # seed's limit is 7 + 2 = 9 >= K, so the layer must pass its tokens through.
    positions = torch.tensor([[0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])
    state = TokenState(positions=positions)
    state.scratch["keep_positions"] = torch.tensor([7])
    out, state = _reduce(_bound(1.0, sd, keep_marked=True), x, state, probs, head_out)
    assert out is x and torch.equal(state.positions, positions)


# ------------------------------------------------------------------------------------------ 3: alignment (MAG)


def test_alignment_features_sum_the_pooled_tokens_of_every_block_while_training():
    """One record per encoder forward in training: F = sum over blocks of the tokens pooled per alignment token."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=0)
    attach_reducers(vit, reducer_plan(vit, 1.0, SD_NUM, 32, towers=("vision",)))
    inputs = []
    for block in vit.blocks:
        block.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    images = _images(2, size=32)
    vit.train()
    vit.forward_tokens(images)
    calls = vit.madtp.calls
    assert len(calls) == 1
    features = calls[0]["features"]
    assert features.shape == (2, SD_NUM, 32)
    assert inputs[-1].shape[1] < inputs[0].shape[1]  # the later blocks pooled pruned tokens
    sd = vit.madtp.space_dict.detach()
    pooled = []
    for x in inputs:
        q = x[:, 1:]
        pooled.append(((q @ sd.t()) / math.sqrt(32)).softmax(dim=1).transpose(1, 2) @ q)
    assert_close(features.detach(), sum(pooled), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features.detach(), pooled[0], atol=1e-3)
    features.pow(2).sum().backward()
    assert vit.madtp.space_dict.grad.abs().sum() > 0

    vit.madtp.calls.clear()
    vit.eval()
    vit.forward_tokens(images)
    vit.train()
    with torch.no_grad():
        vit.forward_tokens(images)
    assert vit.madtp.calls == []
    vit.forward_tokens(images)
    vit.forward_tokens(images)
    assert len(vit.madtp.calls) == 2


def test_alignment_loss_pairs_each_statement_with_the_mean_of_its_two_images(cfg):
    """L_sim = weight * mean(1 - cos(F_img, F_txt)), NLVR2's image side the mean of each statement's two images."""
    model = _nlvr(cfg)
    pruner = MADTP({"p": 0.5, "madtp": {"controller": "nlvr", "reference_gflops": 132.54, "sd_num": SD_NUM}})
    pruner.attach(model)
    assert _temperatures(model) == {1.0} and len(reducer_specs(model)) == 4
    model.train()
    model(_images(4), TEXTS)
    calls = list(model.madtp.calls)
    assert [tuple(c["features"].shape) for c in calls] == [(4, SD_NUM, WIDTH), (2, SD_NUM, WIDTH)]
    image, text = calls[0]["features"], calls[1]["features"]
    rows = torch.tensor([[0, 2], [1, 3]])
    expected = 0.1 * (1 - F.cosine_similarity((image[rows[:, 0]] + image[rows[:, 1]]) / 2, text, dim=-1)).mean()
    loss = pruner.loss(model, {"loss": torch.tensor(2.0), "image_rows": rows})
    assert_close(loss, expected)
    assert loss > 1e-3
    assert model.madtp.calls == []  # read and cleared
    loss.backward()
    assert model.madtp.space_dict.grad.abs().sum() > 0

    # Text features equal to the image side: no loss (the pairs (i, n + i) without image_rows).
    same = torch.stack(image.detach().chunk(2), dim=1).mean(dim=1)
    model.madtp.calls = [dict(calls[0]), {"tower": calls[1]["tower"], "features": same.clone()}]
    assert abs(float(pruner.loss(model, {"loss": torch.tensor(2.0)}).detach())) < 1e-6
    model.madtp.calls = [dict(calls[0]), dict(calls[1])]
    with pruner.bypassed():  # T = 0: no alignment term (the seed's fallback is off by default)
        assert pruner.loss(model, {"loss": torch.tensor(2.0)}) is None


def test_image_side_pairs_texts_with_their_image_rows():
    """image_rows averages the named rows; without them one image per text, or the mean of two stacked halves."""
    image = torch.randn(4, 3, 5)
    assert_close(
        _image_side(image, 2, torch.tensor([[3, 0], [1, 1]])), torch.stack([(image[3] + image[0]) / 2, image[1]])
    )
    assert_close(_image_side(image, 2, None), torch.stack([(image[0] + image[2]) / 2, (image[1] + image[3]) / 2]))
    assert _image_side(image, 4, None) is image
    with pytest.raises(ValueError, match="image_rows"):
        _image_side(image, 3, None)


# ------------------------------------------------------------------------------------------ 4: controller

# Spec 4, written from its table: (threshold, step) rows, a step applying when abs(cur - target) > threshold;
# the last row is the "else".
SPEC_EPOCH = {
    "nlvr": [(30, 1.0), (10, 0.5), (5, 0.25), (1, 0.1), (0, 0.01)],
    "caption": [(50, 0.5), (30, 0.3), (20, 0.2), (10, 0.1), (5, 0.05), (2, 0.02), (0, 0.01)],
    "vqa": [(50, 0.25), (30, 0.15), (10, 0.1), (5, 0.05), (2, 0.01), (0, 0.0)],
}
SPEC_EPOCH["retrieval"] = SPEC_EPOCH["clip"] = SPEC_EPOCH["caption"]
SPEC_CALIBRATION = {
    "caption": [(100, 1.0), (50, 0.5), (30, 0.3), (20, 0.2), (10, 0.1), (5, 0.05), (0, 0.02)],
    "clip": [(100, 0.5), (50, 0.25), (30, 0.15), (20, 0.1), (10, 0.05), (0, 0.02)],
}
SPEC_CALIBRATION["retrieval"] = SPEC_CALIBRATION["caption"]


@pytest.mark.parametrize(
    "table, rows",
    [(CONTROLLERS[k], SPEC_EPOCH[k]) for k in SPEC_EPOCH]
    + [(CALIBRATION[k], SPEC_CALIBRATION[k]) for k in SPEC_CALIBRATION],
    ids=[f"epoch-{k}" for k in SPEC_EPOCH] + [f"calibration-{k}" for k in SPEC_CALIBRATION],
)
def test_temperature_step_reproduces_the_seed_tables(table, rows):
    """Each row applies strictly above its threshold, up when the cost is above the target, down otherwise."""
    target = 100.0
    for i, (threshold, step) in enumerate(rows[:-1]):
        for diff, expected in ((threshold + 0.01, step), (threshold, rows[i + 1][1])):
            assert temperature_step(target + diff, target, table) == pytest.approx(expected), (diff, "above")
            assert temperature_step(target - diff, target, table) == pytest.approx(-expected), (diff, "below")
    assert temperature_step(target + 1e6, target, table) == pytest.approx(rows[0][1])
    assert temperature_step(target, target, table) == pytest.approx(-rows[-1][1])


# ------------------------------------------------------------------------------------------ 5: T = 0 and T > 0


def test_temperature_zero_is_the_dense_nlvr_model_in_outputs_and_flops(cfg):
    """Reducers at T = 0: the dense logits exactly, the dense traced and analytic costs."""
    model = _nlvr(cfg)
    images = _images(4)
    dense = _logits(model, images)
    with torch.no_grad():
        _, dense_cost = count(lambda: model(images, TEXTS), model)
    dense_analytic = model.cost_probe("seed").analytic()
    _madtp(model, 0.0)
    assert len(reducer_specs(model)) == 4 and _temperatures(model) == {0.0}
    assert torch.equal(_logits(model, images), dense)
    with torch.no_grad():
        _, cost = count(lambda: model(images, TEXTS), model)
    assert (cost.macs, cost.flops) == (dense_cost.macs, dense_cost.flops)
    assert model.cost_probe("seed").analytic() == dense_analytic


def test_a_positive_temperature_prunes_image_and_text_tokens_and_trains(cfg):
    """T > 0: fewer image tokens reach the later blocks, text shrinks after self-attention; logits keep their shape."""
    model = _madtp(_nlvr(cfg), PRUNE_T)
    with torch.no_grad(), recorded_counts(model) as log:
        logits = model(_images(4), TEXTS)
    counts = {name: calls[0] for name, calls in log.per_block().items()}
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert counts["visual_encoder.blocks.0"][0] == 17 and counts["visual_encoder.blocks.0"][2] < 17
    assert counts["visual_encoder.blocks.1"][0] == counts["visual_encoder.blocks.0"][2]
    t_in, t_mid, t_out = counts["text_encoder.encoder.layer.0"]
    assert t_mid < t_in and t_out == t_mid  # pruned before the cross-attention
    assert counts["text_encoder.encoder.layer.1"][0] == t_out

    model.train()
    model(_images(4), TEXTS).logsumexp(-1).sum().backward()  # the fusion weights carry gradient to space_dict
    assert model.madtp.space_dict.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ 6: cost model


def test_nlvr_analytic_cost_with_replayed_counts_equals_the_traced_count(cfg):
    """replayed_cost (analytic, each forward's token counts) == average_cost (traced) exactly, with pruning."""
    model = _nlvr(cfg)
    images = _images(4)
    batch = (images[:2], images[2:], TEXTS, torch.tensor([0, 1]))
    dense = average_cost(model, [batch])
    _madtp(model, PRUNE_T)
    analytic, traced = replayed_cost(model, [batch]), average_cost(model, [batch])
    assert (analytic["macs"], analytic["flops"]) == (traced["macs"], traced["flops"])
    assert traced["macs"] < dense["macs"]
    assert analytic["tokens"]["visual_encoder.blocks.0"] < 17


def test_retrieval_analytic_cost_with_replayed_counts_equals_the_traced_count(cfg):
    """The retrieval training step (momentum towers, three ITM passes) costs analytically what is traced, exactly."""
    torch.manual_seed(0)
    model = _madtp(BlipRetrieval(cfg, SIZE, queue_size=tiny_blip.QUEUE, embed_dim=tiny_blip.EMBED).eval(), PRUNE_T)
    assert any(name.startswith("visual_encoder_m.") for name in reducer_specs(model))
    probe = model.cost_probe("batch", batch=(_images(2), torch.tensor([0, 1])), dataset=_Split())
    with inference(model), preserved_state(model, probe.mutates), recorded_counts(model) as log:
        _, traced = count(probe.run, model)
    per_block = log.per_block()
    assert len(per_block["text_encoder.encoder.layer.0"]) == 3  # text mode and two ITM passes
    assert per_block["visual_encoder_m.blocks.0"][0][2] < 17 and per_block["text_encoder_m.encoder.layer.0"][0][1] < 35
    with replayed_counts(log):
        analytic = probe.analytic()
    assert (analytic.seed_macs, analytic.flops) == (traced.macs, traced.flops)
    assert all(not calls for calls in log.per_block().values())  # every recorded forward was costed


# ------------------------------------------------------------------------------------------ 7: checkpoints


def test_reducers_round_trip_through_the_architecture_and_a_compressed_file(cfg, tmp_path):
    """The architecture holds the reducers at their temperature; a fresh dense model rebuilt from it is the same."""
    model = _madtp(_nlvr(cfg), 2.5)
    expected = _logits(model)
    arch = architecture(model)
    assert set(arch["reducers"]) == set(reducer_plan(model, 2.5, SD_NUM, WIDTH))
    assert all(s == [{**s[0], "kind": "madtp", "temperature": 2.5}] for s in arch["reducers"].values())

    fresh = _nlvr(cfg, seed=1)
    apply_architecture(fresh, arch)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_logits(fresh), expected)

    files = save_compressed(tmp_path / "madtp", model.state_dict(), arch)
    loaded = _nlvr(cfg, seed=2)
    blip_loader("nlvr")(loaded, str(files["safetensors"]), {}, evaluate=True)
    assert architecture(loaded) == arch
    assert torch.equal(_logits(loaded), expected)


def test_a_state_dict_without_the_alignment_tokens_is_refused_by_name(cfg, tmp_path):
    """Strict loading of a MADTP architecture names the missing madtp.space_dict."""
    model = _madtp(_nlvr(cfg), 2.5)
    arch = architecture(model)
    sd = {k: v for k, v in model.state_dict().items() if k != "madtp.space_dict"}
    fresh = _nlvr(cfg)
    apply_architecture(fresh, arch)
    with pytest.raises(RuntimeError, match=r"madtp\.space_dict"):
        fresh.load_state_dict(sd)
    files = save_compressed(tmp_path / "no_space_dict", sd, arch)
    with pytest.raises(CheckpointError, match=r"madtp\.space_dict"):
        blip_loader("nlvr")(_nlvr(cfg), str(files["pth"]), {})


def test_the_seeds_release_file_loads_with_its_temperature_and_alignment_tokens(cfg, tmp_path):
    """{'model': sd + space_dict, 'epoch', 'temperature'}: reducers at the file's T, its alignment tokens."""
    dense_sd = _nlvr(cfg).state_dict()
    space = torch.randn(SD_NUM, WIDTH, generator=torch.Generator().manual_seed(7))
    ckpt = {"model": {**dense_sd, "space_dict": space}, "epoch": 3, "temperature": 2.5}
    path = tmp_path / "model_base_nlvr_nlvr2_p0.5_compressed.pth"
    torch.save(ckpt, path)

    sd, arch = from_release(_nlvr(cfg, seed=1), ckpt["model"], ckpt, str(path))
    assert "space_dict" not in sd and torch.equal(sd["madtp.space_dict"], space)
    assert set(arch["reducers"]) == set(reducer_plan(_nlvr(cfg), 2.5, SD_NUM, WIDTH))
    assert {s[0]["temperature"] for s in arch["reducers"].values()} == {2.5}

    loaded = _nlvr(cfg, seed=1)
    blip_loader("nlvr")(loaded, str(path), {}, evaluate=True)
    assert _temperatures(loaded) == {2.5} and len(reducer_specs(loaded)) == 4
    assert torch.equal(loaded.madtp.space_dict, space)
    reference = _madtp(_nlvr(cfg), 2.5)
    with torch.no_grad():
        reference.madtp.space_dict.copy_(space)
    assert torch.equal(_logits(loaded), _logits(reference))

    no_t = tmp_path / "no_temperature.pth"
    torch.save({"model": ckpt["model"], "epoch": 3}, no_t)
    with pytest.raises(CheckpointError, match="temperature"):
        from_release(_nlvr(cfg), ckpt["model"], {"model": ckpt["model"], "epoch": 3}, str(no_t))
    with pytest.raises(CheckpointError, match="temperature"):
        blip_loader("nlvr")(_nlvr(cfg), str(no_t), {})
    with pytest.raises(CheckpointError, match="space_dict"):
        from_release(_nlvr(cfg), dense_sd, {"model": dense_sd, "epoch": 3, "temperature": 2.5}, "no_space_dict.pth")


def test_the_task_loader_refuses_a_release_file_with_a_temperature_but_no_alignment_tokens(cfg, tmp_path):
    """A MADTP file (it has 'temperature') without space_dict must not load as the dense model (spec 8, trap 2)."""
    path = tmp_path / "no_space_dict.pth"
    torch.save({"model": _nlvr(cfg).state_dict(), "epoch": 3, "temperature": 2.5}, path)
    with pytest.raises(CheckpointError, match="space_dict"):
        blip_loader("nlvr")(_nlvr(cfg), str(path), {}, evaluate=True)


# ------------------------------------------------------------------------------------------ 8: CLIP


def test_clip_reducers_project_per_block_share_projections_with_momentum_towers_and_pool_at_eot():
    """CLIP: q_map per block key shared by the momentum twins, vision max_keep 1, text keeps and pools at EOT."""
    model = _clip()
    with pytest.raises(ValueError, match="q_map"):
        reducer_plan(model, 100.0, 6, 24)  # widths 64 differ from sd_dim 24
    plan = reducer_plan(model, 100.0, 6, 24, q_map=True)
    assert set(plan) == {f"{t}.blocks.{i}" for t in ("visual", "text", "visual_m", "text_m") for i in (0, 1)}
    for path, (spec,) in plan.items():
        modality = "vision" if path.startswith("visual") else "text"
        assert spec["q_map"] == f"{modality}_{path[-1]}" and spec["in_dim"] == 64 and spec["sd_dim"] == 24
        assert spec["max_keep"] == (1 if modality == "vision" else 0)
        assert spec["keep_marked"] == (modality == "text")
    attach_reducers(model, plan)
    align = model.madtp
    assert set(align.q_maps) == {"vision_0", "vision_1", "text_0", "text_1"}
    assert sorted(k for k in model.state_dict() if "q_map" in k) == sorted(
        f"madtp.q_maps.{key}.{p}" for key in align.q_maps for p in ("weight", "bias")
    )
    online, twin = model.visual.blocks[0].token_hooks[0], model.visual_m.blocks[0].token_hooks[0]
    assert online.align is twin.align is align and online.q_map == twin.q_map == "vision_0"

    used = {key: 0 for key in align.q_maps}
    for key, linear in align.q_maps.items():
        linear.register_forward_hook(lambda m, a, o, key=key: used.__setitem__(key, used[key] + 1))
    images = _images(3, size=32)
    ids = model.text_inputs(["a red circle", "one shape", "two"], "cpu").input_ids
    with torch.no_grad():
        model._momentum_features(images, ids)
    assert used == {key: 1 for key in used}  # the momentum towers ran the shared projections

    with torch.no_grad():
        x, state = model.text.forward_tokens(ids)
        embedding = model.text_features(ids)
    eot = ids.argmax(dim=-1)
    assert x.shape[1] < ids.shape[1] and state.positions is not None  # the text was pruned
    assert (state.positions == eot[:, None]).any(dim=1).all()  # the end-of-text token survived in every row
    assert_close(embedding, F.normalize(ClipTextTower.pool(x, state, ids) @ model.text.proj, dim=-1))
    rows = (state.positions == eot[:, None]).float().argmax(dim=1)
    assert_close(ClipTextTower.pool(x, state, ids), x[torch.arange(3), rows])


def test_clip_training_step_records_online_towers_and_costs_what_is_traced():
    """A CLIP step records the online towers' features only; its analytic cost with replayed counts is the traced."""
    model = _clip()
    attach_reducers(model, reducer_plan(model, 100.0, 6, 24, q_map=True))
    model.train()
    model(_images(3, size=32), ["a red circle", "one shape", "two"], 0.0, torch.arange(3))
    assert [tuple(c["features"].shape) for c in model.madtp.calls] == [(3, 6, 24), (3, 6, 24)]
    assert [c["tower"] for c in model.madtp.calls] == ["visual", "text"]

    model.eval()
    probe = model.cost_probe("seed")
    with inference(model), preserved_state(model, probe.mutates), recorded_counts(model) as log:
        _, traced = count(probe.run, model)
    assert log.per_block()["visual.blocks.0"][0][2] < 17
    with replayed_counts(log):
        analytic = probe.analytic()
    assert (analytic.seed_macs, analytic.flops) == (traced.macs, traced.flops)
