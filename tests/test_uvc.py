"""UVC (pruners/uvc.py): the checks of spec uvc_deit.md section 10 on the pure functions and on a tiny DeiT.

Resource: dense MACs of DeiT-T/S/B, R = 1 when dense, one gate off removes one block's share, all-but-one heads;
the least-s op's gradient and the proximal step; dual update signs and projection; the count step's box
handling; the gates' own SGD against torch's; materialisation (analytic MACs = deterministic R x dense, logits of
the masked model); the oracle against timm with gates attached; state round trip and the DDP broadcast.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.cost import vit_cost
from models.vit import VisionTransformer, vit_config
from pruners.uvc import (
    UVC,
    Geometry,
    block_macs,
    box_sgd,
    ceil_st,
    dual_ascent,
    gate_weights,
    group_scores,
    least_s,
    prox_shrink,
    resource,
    select,
)


def meta_deit(name: str) -> VisionTransformer:
    with torch.device("meta"):
        return VisionTransformer(num_classes=1000, **vit_config(name))


def tiny(depth: int = 3, seed: int = 0, distilled: bool = False) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=3, num_classes=10, distilled=distilled
    ).eval()


def uvc(model: VisionTransformer, **opts) -> UVC:
    pruner = UVC({"uvc": {"budget": 0.5, **opts}})
    pruner.attach(model)
    return pruner


# ------------------------------------------------------------------------------------------------ resource


@pytest.mark.parametrize("name, gmacs", [("deit_tiny", 1.2535), ("deit_small", 4.5985), ("deit_base", 17.563)])
def test_dense_macs_of_deit_follow_the_six_terms(name, gmacs):
    geo = Geometry.of(meta_deit(name))
    assert geo.dense_macs() / 1e9 == pytest.approx(gmacs, abs=5e-4)
    # the shared cost model agrees (no LayerNorm, no head)
    assert vit_cost(meta_deit(name))[0].macs == geo.dense_macs()


def test_uvc_convention_is_twice_the_macs_for_tiny():
    assert 2 * Geometry.of(meta_deit("deit_tiny")).dense_macs() / 1e6 == pytest.approx(2506.98, abs=0.01)


def _dense_inputs(geo: Geometry):
    s = torch.zeros(geo.depth, 2)
    r = torch.zeros(geo.depth, geo.heads)
    return s, r, torch.ones(geo.depth), torch.zeros(geo.depth, geo.heads, dtype=torch.bool)


@pytest.mark.parametrize("kind", ["released", "materialised"])
def test_resource_is_exactly_one_when_dense(kind):
    geo = Geometry.of(meta_deit("deit_small"))
    assert float(resource(geo, *_dense_inputs(geo), kind=kind)) == 1.0


def test_one_gate_off_removes_exactly_one_block_share():
    geo = Geometry.of(meta_deit("deit_tiny"))
    s, r, execute, pruned = _dense_inputs(geo)
    execute[4] = 0
    block = block_macs(geo.dim, geo.tokens, geo.heads, geo.head_dim, geo.dim, geo.hidden)
    share = block / geo.dense_macs()
    assert 0.081 < share < 0.083
    assert float(resource(geo, s, r, execute, pruned)) == pytest.approx(1 - share, abs=1e-12)


def test_all_but_one_head_in_every_block():
    geo = Geometry.of(meta_deit("deit_small"))
    s, r, execute, pruned = _dense_inputs(geo)
    s[:, 0] = geo.heads - 1
    n, d = geo.tokens, geo.dim
    attention = 3 * n * d * d + n * n * d + n * n * d + n * d * d  # A1 + A2 + A3 + A4
    drop = geo.depth * (geo.heads - 1) / geo.heads * attention / geo.dense_macs()
    assert float(resource(geo, s, r, execute, pruned)) == pytest.approx(1 - drop, rel=1e-12)


def test_resource_gradients_flow_through_the_ceil_and_the_gates():
    geo = Geometry.of(meta_deit("deit_tiny"))
    s = torch.full((geo.depth, 2), 0.3, requires_grad=True)
    r = torch.full((geo.depth, geo.heads), 0.3, requires_grad=True)
    logits = torch.tensor([[-1.0, 1.0]] * geo.depth, requires_grad=True)
    execute = gate_weights(logits, "gumbel", 0.5)
    value = resource(geo, s, r, execute, torch.zeros(geo.depth, geo.heads, dtype=torch.bool))
    value.backward()
    assert (s.grad < 0).all() and (r.grad < 0).all()  # more pruning, less cost
    assert logits.grad is not None and (logits.grad[:, 1] != 0).any()
    # ceil: a count of 0.3 already removes one whole head / neuron / coordinate
    assert float(ceil_st(torch.tensor(0.3))) == 1.0


# ------------------------------------------------------------------------------------------------ least-s, prox


def test_least_s_sums_the_smallest_and_its_gradient_is_the_next_score():
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])
    count = torch.tensor(1.4, requires_grad=True)  # ceil -> 2 groups
    value = least_s(count, scores)
    assert float(value.detach()) == 3.0  # 1 + 2
    value.backward()
    assert float(count.grad) == 3.0  # the third smallest
    full = torch.tensor(5.0, requires_grad=True)
    least_s(full, scores).backward()
    assert float(full.grad) == 0.0  # nothing left to select


def test_prox_divides_exactly_the_selected_columns():
    model = tiny()
    pruner = uvc(model)
    block = model.blocks[0]
    with torch.no_grad():
        # make head 1 the weakest, coordinate 0 of head 0 the weakest of its head, neuron 3 the weakest
        block.attn.proj.weight[:, 16:32] *= 0.01
        block.attn.proj.weight[:, 0] *= 0.01
        block.mlp.fc2.weight[:, 3] *= 0.01
    pruner.s[0] = torch.tensor([0.5, 0.5])
    pruner.r[0, 0] = 0.5
    pruner.y[0] = torch.tensor([2.0, 3.0])
    pruner.p[0, 0] = 4.0
    pruner.selections = [select(b, pruner.s[i], pruner.r[i]) for i, b in enumerate(model.blocks)]
    before_proj = block.attn.proj.weight.detach().clone()
    before_fc2 = block.mlp.fc2.weight.detach().clone()
    other = model.blocks[1].attn.proj.weight.detach().clone()
    lr = 0.01
    pruner._prox(lr)
    after = block.attn.proj.weight.detach()
    expected = before_proj.clone()
    expected[:, 16:32] /= 1 + 2 * lr * 2.0
    expected[:, 0] /= 1 + 2 * lr * 4.0
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    fc2 = before_fc2.clone()
    fc2[:, 3] /= 1 + 2 * lr * 3.0
    torch.testing.assert_close(block.mlp.fc2.weight.detach(), fc2, rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[1].attn.proj.weight.detach(), other, rtol=0, atol=0)
    assert float(prox_shrink(torch.tensor(3.0), 1.0, 0.5)) == 1.5


def test_group_scores_are_squared_norms_of_proj_and_fc2_columns():
    block = tiny().blocks[0]
    heads, cols, neurons = group_scores(block)
    w = block.attn.proj.weight.detach()
    assert torch.allclose(cols[2, 5], w[:, 2 * 16 + 5].pow(2).sum())
    assert torch.allclose(heads[1], w[:, 16:32].pow(2).sum())
    assert torch.allclose(neurons[7], block.mlp.fc2.weight.detach()[:, 7].pow(2).sum())


# ------------------------------------------------------------------------------------------------ duals, counts


def test_dual_ascent_signs_and_projection():
    z = torch.tensor(0.2)
    assert float(dual_ascent(z, torch.tensor(0.3), 1.0)) == pytest.approx(0.5)  # R > B: z grows by lr (R - B)
    assert float(dual_ascent(z, torch.tensor(-0.5), 1.0)) == 0.0  # projected onto >= 0
    y = torch.tensor([0.0, 1e-3])
    assert (dual_ascent(y, torch.tensor([0.0, 2.0]), 1e-4) >= y).all()  # LeastS >= 0: y never falls


def test_box_sgd_respects_bounds_and_rescales():
    x = torch.tensor([0.0, 1.0, 2.999, 1.0])
    upper = torch.full_like(x, 2.999)
    grad = torch.tensor([4.0, -8.0, -1.0, 2.0])  # largest |g| 8: scaled to 1
    out = box_sgd(x, grad, upper, 0.02)
    assert float(out[0]) == 0.0  # at 0 it may only rise; a positive gradient would lower it: zeroed
    assert float(out[1]) == pytest.approx(1.0 + 0.02)  # -8 / 8 * -0.02
    assert float(out[2]) == pytest.approx(2.999)  # at the bound it may only fall
    assert float(out[3]) == pytest.approx(1.0 - 0.02 * 2 / 8)


def test_gate_sgd_matches_torch_sgd_with_momentum_and_weight_decay():
    model = tiny()
    pruner = uvc(model)
    reference = torch.nn.Parameter(pruner.gates.detach().clone())
    opt = torch.optim.SGD([reference], lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _k in range(3):
        grad = torch.randn_like(reference)
        reference.grad = grad.clone()
        opt.step()
        pruner._gate_sgd(grad)
    torch.testing.assert_close(pruner.gates.detach(), reference.detach())


def test_gate_modes():
    logits = torch.tensor([[-1.0, 1.0], [2.0, -2.0]])
    assert gate_weights(logits, "argmax").tolist() == [1.0, 0.0]
    assert gate_weights(logits, "half").tolist() == [0.5, 0.5]
    torch.manual_seed(0)
    hard = gate_weights(logits, "gumbel", 0.5, hard=True)
    assert set(hard.tolist()) <= {0.0, 1.0}
    assert gate_weights(logits, "soft_l0", eps=1.0).tolist() == pytest.approx([0.5, 0.8])


def test_z_learning_rate_schedule_released_and_intended():
    released = UVC({"uvc": {"search_epochs": 30, "zlr_schedule": [1, 5, 9, 13, 17]}})
    intended = UVC({"uvc": {"search_epochs": 30, "zlr_schedule": [1, 5, 9, 13, 17], "zlr_mode": "intended"}})
    for pruner in (released, intended):
        pruner.epoch = 13
    assert released._zlr() == 1.0  # the release's key bug: the first value throughout
    assert intended._zlr() == 9.0  # {0: 1, 6: 5, 12: 9, 18: 13, 24: 17}


@pytest.mark.parametrize(
    "opts, words",
    [
        ({"budget": 0.0}, "uvc.budget"),
        ({"zlr_mode": "fixed"}, "zlr_mode"),
        ({"patch_gating": 2}, "patch_gating"),
        ({"resource": "fvcore"}, "uvc.resource"),
        ({"warmup_epochs": 40}, "warmup_epochs"),
    ],
)
def test_bad_options_are_named(opts, words):
    with pytest.raises(ValueError, match=words):
        UVC({"uvc": opts})


def test_p_is_refused():
    with pytest.raises(ValueError, match="--budget"):
        UVC({"p": 0.5})


# ------------------------------------------------------------------------------------------------ the model


def test_gates_at_one_leave_the_model_equal_to_timm():
    ours = tiny(distilled=True)
    kind = timm.models.deit.VisionTransformerDistilled
    ref = kind(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10).eval()
    ref.load_state_dict(ours.state_dict())
    pruner = uvc(ours)
    pruner.warm = False  # after warm-up; evaluation takes the argmax gates, all executing
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_warm_up_halves_every_block():
    model = tiny()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = model.patch_embed(x)
        h = torch.cat([model.cls_token.expand(1, -1, -1), tokens], 1) + model.pos_embed
        for block in model.blocks:
            h = 0.5 * block(h)[0] + 0.5 * h
        expected = model.head(model.norm(h)[:, 0])
    uvc(model)  # warm from the start
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def _searched(seed: int = 0):
    """A tiny DeiT with a selection in every block and one block switched off."""
    model = tiny(depth=3, seed=seed)
    pruner = uvc(model)
    pruner.warm = False
    torch.manual_seed(seed)
    pruner.s = torch.tensor([[1.2, 20.5], [0.0, 7.0], [0.4, 100.0]])
    pruner.r = torch.tensor([[3.0, 0.5, 9.0], [2.0, 0.0, 15.0], [1.0, 1.0, 1.0]])
    with torch.no_grad():
        pruner.gates[1] = torch.tensor([1.0, -1.0])  # block 1 skipped
    pruner.refresh_selection()
    return model, pruner


def test_materialised_model_equals_the_masked_model_and_costs_r_times_dense():
    model, pruner = _searched()
    x = torch.randn(4, 3, 32, 32)
    pruner.apply_masks()
    with torch.no_grad():
        masked = model(x)
    dense_macs = pruner.geo.dense_macs()
    r_released = pruner.deterministic_resource("released")
    r_exact = pruner.deterministic_resource("materialised")
    pruner.materialise(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=0, atol=1e-4)
    macs = vit_cost(model)[0].macs
    assert macs == pytest.approx(r_exact * dense_macs, rel=1e-9)
    # UVC's own R differs by the value rows it does not credit in qkv and by the padded attention product
    credit = 0
    for block in model.blocks:
        if not hasattr(block, "attn"):
            continue
        a = block.attn
        gap = a.inner_dim - a.value_inner_dim
        credit += pruner.geo.tokens * pruner.geo.dim * gap - pruner.geo.tokens**2 * gap
    assert r_released * dense_macs == pytest.approx(macs + credit, rel=1e-9)
    assert r_exact < 1 and pruner.report()["skipped"] == ["blocks.1"]
    # the selection's widths, as built
    kept_heads = [model.blocks[i].attn.num_heads for i in (0, 2)]
    assert kept_heads == [3 - 2, 3 - 1]
    assert model.blocks[0].mlp.hidden == 192 - 21 and model.blocks[2].mlp.hidden == 192 - 100


def test_materialised_checkpoint_loads_without_the_pruner(tmp_path):
    from models.arch import architecture, save_compressed
    from tasks.classification import load_pretrained

    model, pruner = _searched(seed=1)
    pruner.materialise(model)
    paths = save_compressed(tmp_path / "model_compressed", model.state_dict(), architecture(model))
    fresh = tiny(depth=3, seed=5)
    load_pretrained(fresh, str(paths["weights"] if "weights" in paths else next(iter(paths.values()))), {})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_search_step_moves_counts_duals_and_gates_the_right_way():
    model = tiny()
    pruner = uvc(model, gating_interval=2, budget=0.6, slr=0.05)
    pruner.warm = False
    pruner.z = torch.tensor(5.0)  # a price high enough to beat the sparsity terms' pull back to 0
    z0 = float(pruner.z)
    y0 = pruner.y.clone()
    gates0 = pruner.gates.detach().clone()
    torch.manual_seed(0)
    for t in range(4):
        pruner.step(model, t + 1, 10, lr=1e-3)
    assert float(pruner.z) > z0  # R above the budget: the price rises
    assert (pruner.s > 0).any() and (pruner.r >= 0).all()  # counts pushed up by z dR/ds
    assert (pruner.y >= y0).all()
    assert not torch.equal(pruner.gates.detach(), gates0)  # two gate SGD steps (interval 2)
    assert pruner.t == 4


def test_violation_beyond_the_clip_gives_the_counts_no_resource_pressure():
    model = tiny()
    pruner = uvc(model, budget=0.3)  # R - B = 0.7 > z_grad_clip 0.5: the clamp passes no gradient
    pruner.warm = False
    pruner.z = torch.tensor(5.0)
    pruner.step(model, 1, 10, lr=1e-3)
    assert float(pruner.s.abs().sum() + pruner.r.abs().sum()) == 0.0
    assert float(pruner.z) == pytest.approx(5.0 + 1.0 * 0.7, abs=0.05)  # the dual still sees the whole violation


def test_warm_up_freezes_counts_duals_and_gates():
    model = tiny()
    pruner = uvc(model)
    before = {k: getattr(pruner, k).clone() for k in ("s", "r", "y", "p", "z")}
    pruner.step(model, 1, 10, lr=1e-3)
    for k, v in before.items():
        assert torch.equal(getattr(pruner, k), v), k
    assert pruner.t == 0


def test_state_round_trip_restores_the_search():
    model = tiny()
    pruner = uvc(model, gating_interval=3)
    pruner.warm = False
    torch.manual_seed(1)
    for t in range(4):
        pruner.step(model, t + 1, 10, lr=1e-3)
    state = pruner.state_dict()
    other = uvc(tiny(seed=0))
    other.load_state_dict(state)
    for k in ("s", "r", "y", "p", "z"):
        assert torch.equal(getattr(other, k), getattr(pruner, k)), k
    assert torch.equal(other.gates.detach(), pruner.gates.detach())
    assert len(other.gate_buffer) == len(pruner.gate_buffer) and other.t == pruner.t


def _ddp_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = tiny()
        pruner = uvc(model, gating_interval=2)
        pruner.warm = False
        torch.manual_seed(100 + rank)  # different Gumbel noise on each rank
        for t in range(3):
            pruner.step(model, t + 1, 10, lr=1e-3)
        torch.save(
            {k: getattr(pruner, k) for k in ("s", "r", "y", "p", "z")} | {"g": pruner.gates.detach()},
            f"{out}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_dual_state_is_identical_on_every_rank(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert float(a["z"]) > 1e-3


def test_patch_gating_extension_scales_the_patches_and_is_dropped_when_materialised():
    model = tiny()
    pruner = uvc(model, patch_gating=1)
    x = torch.randn(1, 3, 32, 32)
    tokens, _ = model.patch_embed(x)
    assert torch.allclose(
        tokens, model.patch_embed.proj(x).flatten(2).transpose(1, 2) * torch.sigmoid(torch.tensor(3.0))
    )
    assert float(pruner.loss(model, {}).detach()) == pytest.approx(0.01 * torch.sigmoid(torch.tensor(3.0)).item())
    pruner.materialise(model)
    tokens, _ = model.patch_embed(x)
    assert torch.allclose(tokens, model.patch_embed.proj(x).flatten(2).transpose(1, 2))


def test_uvc_refuses_a_compressed_model_and_other_backbones():
    model, pruner = _searched()
    pruner.materialise(model)
    with pytest.raises(ValueError, match="already compressed"):
        UVC({"uvc": {}}).attach(model)
    with pytest.raises(TypeError, match="VisionTransformer"):
        UVC({"uvc": {}}).attach(torch.nn.Linear(2, 2))
