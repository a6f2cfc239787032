"""The analytic cost model against FlopCounterMode: real-size BLIP-base (all four tasks) and DeiT-T/S/B, dense,
compressed and token-reduced, counted on the meta device; and its continuous form differentiates."""

import copy

import pytest
import torch

from benchmarks.measure import model_cost
from benchmarks.presets import build_preset
from models.arch import model_units, sync_momentum_towers
from models.cost import vit_block_cost
from models.layers import SkippedBlock
from models.token_ops import EViTReducer, ToMeReducer
from pruners.upop import unified_selection

BLIP = ["blip-nlvr", "blip-caption", "blip-vqa", "blip-retrieval"]
DEIT = ["deit-tiny", "deit-small", "deit-base"]
WITHIN = 0.005  # the acceptance bound; in practice the two agree to the multiply-add


def _agree(model):
    cost = model_cost(model)
    assert cost["flops_analytic"] == pytest.approx(cost["flops"], rel=WITHIN)
    assert cost["macs_analytic"] == pytest.approx(cost["macs"], rel=WITHIN)
    return cost


@pytest.fixture(scope="module")
def presets():
    return {name: build_preset(name, "meta")[2] for name in BLIP + DEIT}


@pytest.mark.parametrize("name", BLIP + DEIT)
def test_dense_models_cost_what_is_traced(presets, name):
    cost = _agree(presets[name])
    assert cost["flops_analytic"] == cost["flops"]  # exact, not just within the bound


def _upop_compressed(model, seed):
    """A UPop-compressed copy: UPop's unified ranking at p = 0.5 on random scores, sliced like UPop's compression
    (uneven widths everywhere; momentum towers follow)."""
    small = copy.deepcopy(model)
    units = [u for u in model_units(small) if u.kind in ("head_dim", "neuron")]
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(u.size, generator=g, dtype=torch.float64) for u in units]
    keeps = unified_selection(scores, [u.kind == "head_dim" for u in units], 36, 0.5)
    for unit, keep in zip(units, keeps):
        unit.keep(keep.nonzero().flatten())
    sync_momentum_towers(small)
    return small


@pytest.mark.parametrize("name", BLIP + ["deit-small"])
def test_upop_compressed_models_cost_what_is_traced(presets, name):
    small = _upop_compressed(presets[name], seed=3)
    dense, cut = model_cost(presets[name]), _agree(small)
    assert cut["flops"] < 0.75 * dense["flops"]


@pytest.mark.parametrize("keep,loc", [(0.7, [3, 6, 9]), (0.5, [1, 4, 7, 10])])
def test_evit_schedules_on_blip_nlvr_and_deit_cost_what_is_traced(presets, keep, loc):
    for name in ("blip-nlvr", "deit-base"):
        model = copy.deepcopy(presets[name])
        vit = getattr(model, "visual_encoder", model)
        for i in loc:
            vit.blocks[i].token_hooks.append(EViTReducer(keep))
        assert _agree(model)["flops"] < model_cost(presets[name])["flops"]


def test_evit_on_text_tokens_costs_what_is_traced(presets):
    model = copy.deepcopy(presets["blip-vqa"])
    for layer in model.text_encoder.layers[2:]:
        layer.token_hooks.append(EViTReducer(0.6, point="post_self_attn"))
    for i in (3, 6, 9):
        model.visual_encoder.blocks[i].token_hooks.append(EViTReducer(0.7))
    _agree(model)


@pytest.mark.parametrize("r", [8, 13, [16] * 4])
def test_tome_schedules_on_deit_and_blip_cost_what_is_traced(presets, r):
    for name in ("deit-small", "blip-retrieval", "blip-nlvr"):  # NLVR2's seed runs two images: ToMe per sample
        model = copy.deepcopy(presets[name])
        vits = [m for m in model.modules() if hasattr(m, "blocks") and hasattr(m, "patch_embed")]
        for vit in vits:  # the momentum tower of retrieval too
            rs = r if isinstance(r, list) else [r] * len(vit.blocks)
            for block, value in zip(vit.blocks, rs):
                block.token_hooks.append(ToMeReducer(value))
        _agree(model)


def test_skipped_blocks_and_uneven_value_widths_cost_what_is_traced(presets):
    model = copy.deepcopy(presets["deit-small"])
    model.blocks[5] = SkippedBlock(5)
    model.blocks[9] = SkippedBlock(9)
    model.blocks[2].attn.keep_value_dims([torch.arange(w) for w in (64, 40, 12, 64, 33, 1)])
    cost = _agree(model)
    assert cost["flops"] < model_cost(presets["deit-small"])["flops"]


def test_the_continuous_form_differentiates_in_widths_and_keep_probabilities():
    heads = torch.tensor(6.0, requires_grad=True)  # a continuous head count (UVC's budget)
    hidden = torch.tensor(1536.0, requires_grad=True)
    keep = torch.tensor(0.9, requires_grad=True)  # expected share of tokens kept before the MLP
    cost = vit_block_cost(1, 384, heads, 64, hidden, 197, 197 * keep)
    cost.flops.backward()
    assert heads.grad > 0 and hidden.grad > 0 and keep.grad > 0
    # d(MACs)/d(hidden) = the two MLP products over the kept tokens
    assert hidden.grad.item() == pytest.approx(2 * (2 * 197 * 0.9 * 384), rel=1e-6)
