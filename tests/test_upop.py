"""UPop: the schedule, the unified cost-weighted ranking (against a reference written from the spec), and
on every BLIP task model: masked = compressed, p = 0 changes nothing, exact 0/1 masks at the end of the
search, compressed checkpoints round-trip through safetensors, .pth and a bare seed-style state dict."""

import math

import numpy as np
import pytest
import torch
from tiny_blip import SIZE, build, tiny_config

from models.arch import architecture, infer_architecture, read_weights, save_compressed
from models.blip import decoder_batch, tokenize
from models.vit import VisionTransformer
from pruners.upop import UPop, entry_weight_norms, is_update_step, progressive_ratio, unified_selection
from tasks.common import blip_loader
from utils import CheckpointError

TASKS = ["nlvr", "caption", "vqa", "retrieval"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("tiny_upop"))


def images(seed, b=2):
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


TEXTS = ["a red circle", "two picture of"]


def training_loss(task, model, seed):
    img = images(seed)
    if task == "nlvr":
        return model(torch.cat([img, images(seed + 100)]), TEXTS, torch.tensor([0, 1]))
    if task == "caption":
        return model(img, ["a picture of a red circle", "a picture of two"])
    if task == "vqa":
        return model(img, TEXTS, ["red", "circle", "two"], [2, 1], torch.tensor([0.5, 0.5, 1.0]))
    ita, itm = model(img, TEXTS, 0.4, torch.tensor([seed, seed + 1]))
    return ita + itm


@torch.no_grad()
def outputs(task, model):
    """The tensors each task's evaluation is computed from, on fixed inputs."""
    model.eval()
    img = images(7)
    tok = model.tokenizer
    if task == "nlvr":
        return [model(torch.cat([img, images(8)]), TEXTS)]
    if task == "caption":
        embeds, atts = model._image(img)
        text, _ = decoder_batch(tok, ["a picture of a red circle", "a picture of two"], img.device, 40)
        return [model.text_decoder(text.input_ids, text.attention_mask, embeds, atts).logits]
    if task == "vqa":
        states, q_mask = model.encode_question(img, TEXTS)
        a = tokenize(tok, ["red", "two"], img.device, first=tok.bos_token_id, padding="longest")
        return [states, model.text_decoder(a.input_ids, a.attention_mask, states, q_mask).logits]
    embeds, _, image_feat = model.image_features(img)
    t = model.text_inputs(TEXTS, img.device)
    ids = t.input_ids.clone()
    ids[:, 0] = tok.enc_token_id
    return [
        embeds,
        image_feat,
        model.text_features(t.input_ids, t.attention_mask),
        model.itm_logits(ids, t.attention_mask, embeds),
    ]


def search(task, model, p, steps=6, **opts):
    """A search of ``steps`` optimizer steps on fixed weights (no optimizer), ending binary."""
    pruner = UPop({"p": p, "max_epoch": 1, "upop": {"interval": 2, **opts}})
    pruner.attach(model)
    model.train()
    for step in range(1, steps + 1):
        training_loss(task, model, step).backward()
        pruner.before_optimizer_step(model)
        pruner.step(model, step, steps)
    model.zero_grad(set_to_none=True)
    return pruner


def assert_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- schedule


def test_progressive_ratio_is_a_sine_ending_exactly_at_p():
    total = 37
    values = [progressive_ratio(0.75, s, total) for s in range(total)]
    assert values[-1] == 0.75  # exactly: the last masks become exactly 0
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.75 * math.sin(math.pi / (2 * total)))
    assert values[total // 2] == pytest.approx(0.75 * math.sin(math.pi * (total // 2 + 1) / (2 * total)))


def test_updates_at_zero_every_interval_and_at_the_last_step():
    assert [s for s in range(23) if is_update_step(s, 23, 5)] == [0, 5, 10, 15, 20, 22]
    assert [s for s in range(20) if is_update_step(s, 20, 5)] == [0, 5, 10, 15, 19]


# ---------------------------------------------------------------------------------------------- ranking


def reference_selection(scores, is_attn, attn_cost, ratio):
    """The spec's pseudo-code (upop.md §2.2) in numpy, independent of the implementation."""
    attn = np.concatenate([s for s, a in zip(scores, is_attn) if a])
    ffn = np.concatenate([s for s, a in zip(scores, is_attn) if not a])
    z_attn = (attn - attn.mean()) / attn.std(ddof=1)
    z_ffn = (ffn - ffn.mean()) / ffn.std(ddof=1)
    z = np.concatenate([z_attn, z_ffn])
    cost = np.array([attn_cost] * len(z_attn) + [1.0] * len(z_ffn))
    order = np.argsort(-z, kind="stable")
    cum = np.cumsum(cost[order])
    k = int(np.argmin(np.abs(cum - ratio * cum[-1])))
    tau = z[order[k]]
    keeps, restored, ia, iff = [], 0.0, 0, 0
    for s, a in zip(scores, is_attn):
        if a:
            zi, ia = z_attn[ia : ia + len(s)], ia + len(s)
        else:
            zi, iff = z_ffn[iff : iff + len(s)], iff + len(s)
        keeps.append((zi <= tau) | (zi == zi.min()))
        if zi.min() > tau:  # a module ranked out entirely keeps its best entry
            restored += attn_cost if a else 1.0
    # Pruned cost: everything strictly above the threshold entry, less the restored minima.
    return keeps, cum[k] - cost[order[k]] - restored, cum[k]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9])
def test_unified_selection_matches_the_spec_and_meets_the_budget(ratio):
    rng = np.random.default_rng(3)
    sizes = [16, 16, 16, 64, 64, 128]
    is_attn = [True, True, True, False, False, False]
    scores = [rng.normal(size=n) * (5 if a else 0.01) for n, a in zip(sizes, is_attn)]
    keeps = unified_selection([torch.from_numpy(s) for s in scores], is_attn, 36.0, ratio)
    expected, expected_pruned, threshold_cost = reference_selection(scores, is_attn, 36.0, ratio)
    for got, want in zip(keeps, expected):
        assert got.numpy().tolist() == want.tolist()
    pruned = sum((36.0 if a else 1.0) * int((~k).sum()) for k, a in zip(keeps, is_attn))
    total = sum((36.0 if a else 1.0) * n for n, a in zip(sizes, is_attn))
    assert pruned == expected_pruned
    assert abs(threshold_cost - ratio * total) <= 36.0  # the threshold sits within one entry of the budget
    if ratio <= 0.5:  # no module is ranked out entirely: the budget is met to one entry
        assert abs(pruned - ratio * total) <= 36.0
    assert all(bool(k.any()) for k in keeps)  # every module keeps at least one entry


def test_each_module_keeps_its_lowest_scoring_entry_even_when_everything_is_ranked_out():
    scores = [torch.tensor([10.0, 11.0, 12.0]), torch.tensor([-1.0, 0.0, 1.0, 2.0])]
    keeps = unified_selection(scores, [False, False], 1.0, 0.99)
    assert keeps[0].tolist() == [True, False, False]


def test_magnitude_scores_are_the_norms_of_the_gated_weights():
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    from models.vit import prunable_units

    units = {u.kind: u for u in prunable_units(vit)}
    attn = vit.blocks[0].attn
    w = attn.qkv.weight.detach().view(3, 2, 8, 16)
    proj = attn.proj.weight.detach().view(16, 2, 8)
    d = 5
    expected = (w[:, :, d].pow(2).sum() + proj[:, :, d].pow(2).sum()).sqrt()
    assert entry_weight_norms(units["head_dim"])[d] == pytest.approx(float(expected), rel=1e-6)
    mlp = vit.blocks[0].mlp
    n = 9
    expected = (mlp.fc1.weight[n].pow(2).sum() + mlp.fc2.weight[:, n].pow(2).sum()).sqrt().detach()
    assert entry_weight_norms(units["neuron"])[n] == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("task", TASKS)
def test_masked_model_at_the_end_of_search_equals_its_compressed_version(tiny, task):
    torch.manual_seed(0)
    model = build(task, tiny)
    dense = architecture(model)
    pruner = search(task, model, p=0.5)
    for m in pruner.masks:
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}  # exactly binary at the last step
    assert any(float(m.detach().min()) == 0.0 for m in pruner.masks)
    masked = outputs(task, model)
    pruner.compress(model)
    assert architecture(model)["units"] != dense["units"]
    assert_close(outputs(task, model), masked)
    # Masks are gone: the compressed model is an ordinary smaller model.
    assert all(u.module.head_dim_mask is None for u in model.prunable_units() if u.kind == "head_dim")
    if task == "retrieval":  # momentum towers cut alike and overwritten with the online weights
        a, b = model.visual_encoder.state_dict(), model.visual_encoder_m.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", TASKS)
def test_p_zero_leaves_the_model_unchanged(tiny, task):
    torch.manual_seed(1)
    model = build(task, tiny)
    before = outputs(task, model)
    dense = architecture(model)
    pruner = search(task, model, p=0.0, steps=3)
    assert all(bool((m == 1).all()) for m in pruner.masks)
    pruner.compress(model)
    assert architecture(model) == dense
    assert_close(outputs(task, model), before, atol=0)


def test_intermediate_masks_take_the_soft_value():
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    pruner = UPop({"p": 0.5, "max_epoch": 1, "upop": {"interval": 1}})
    pruner.attach(model)
    x = torch.randn(4, 3, 16, 16)
    for step in range(1, 4):
        model(x).logsumexp(1).sum().backward()
        pruner.before_optimizer_step(model)
        pruner.step(model, step, 10)
    p_t = progressive_ratio(0.5, 2, 10)
    values = torch.cat([m.detach() for m in pruner.masks]).unique().tolist()
    assert values == pytest.approx(sorted([1 - p_t / 0.5, 1.0]))
    with pytest.raises(RuntimeError, match="not binary"):
        pruner.compress(model)


def test_masks_stay_out_of_the_model_parameters_and_the_gradient_sum_accumulates():
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    n_params = len(list(model.parameters()))
    pruner = UPop({"p": 0.5, "max_epoch": 1, "upop": {"interval": 100}})
    pruner.attach(model)
    assert len(list(model.parameters())) == n_params and not any("mask" in k for k in model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    grads = []
    for _ in range(2):
        model(x).logsumexp(1).sum().backward()
        grads.append(pruner.masks[0].grad.double().clone())
        pruner.before_optimizer_step(model)
    torch.testing.assert_close(pruner.accum[0], grads[0] + grads[1])


def test_magnitude_baseline_prunes_the_smallest_weights_first():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[:10] *= 1e-3
        model.blocks[1].mlp.fc2.weight[:, :10] *= 1e-3
    pruner = UPop({"p": 0.1, "max_epoch": 1, "upop": {"interval": 1, "importance": "magnitude", "attn_cost": 4}})
    pruner.attach(model)
    pruner.update(0.1)
    mask = pruner.masks[[u.name for u in pruner.units].index("blocks.1.mlp")]
    assert bool((mask[:10] == 0).all())


def test_round_to_keeps_widths_at_multiples():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    pruner = UPop({"p": 0.5, "max_epoch": 1, "upop": {"interval": 1, "importance": "magnitude", "round_to": 8}})
    pruner.attach(model)
    pruner.update(0.5)
    pruner.compress(model)
    widths = model.block_widths()
    assert all(w % 8 == 0 for w in widths["head_dims"] + widths["mlp_hidden"])


def test_qkv_bias_is_sliced_by_default_and_reinitialised_only_on_request():
    for reinit in (False, True):
        torch.manual_seed(0)
        model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
        with torch.no_grad():
            model.blocks[0].attn.qkv.bias.fill_(0.5)
        pruner = UPop(
            {
                "p": 0.5,
                "max_epoch": 1,
                "upop": {"interval": 1, "importance": "magnitude", "parity_qkv_bias_reinit": reinit},
            }
        )
        pruner.attach(model)
        pruner.update(0.5)
        pruner.compress(model)
        bias = model.blocks[0].attn.qkv.bias
        assert bool((bias == 0.5).all()) != reinit


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("task", TASKS)
def test_compressed_checkpoint_round_trips(tiny, task, tmp_path):
    torch.manual_seed(2)
    model = build(task, tiny)
    pruner = search(task, model, p=0.5)
    pruner.compress(model)
    expected = outputs(task, model)
    files = save_compressed(tmp_path / "m", model.state_dict(), architecture(model))
    load = blip_loader(task)
    for key in ("safetensors", "pth"):
        fresh = build(task, tiny)
        load(fresh, str(files[key]), {})
        assert architecture(fresh) == architecture(model)
        assert_close(outputs(task, fresh), expected, atol=0)


@pytest.mark.parametrize("task", TASKS)
def test_bare_seed_style_state_dict_loads_with_inferred_widths(tiny, task, tmp_path):
    """The seed's released files: a bare state dict at pruned shapes, BERT scale 1/sqrt(kept width)."""
    torch.manual_seed(3)
    model = build(task, tiny)
    pruner = search(task, model, p=0.5, parity_scale=True)
    pruner.compress(model)
    expected = outputs(task, model)
    path = tmp_path / "upop_compressed.pth"
    torch.save({"model": model.state_dict()}, path)
    sd, arch = read_weights(path)
    assert arch is None
    fresh = build(task, tiny)
    inferred = infer_architecture(fresh, sd)
    assert inferred["units"] == {
        name: {k: v for k, v in kinds.items() if k != "head"} for name, kinds in architecture(model)["units"].items()
    }
    with pytest.raises(CheckpointError, match="no architecture description.*--infer_arch"):
        blip_loader(task)(build(task, tiny), str(path), {})  # widths are never guessed unasked
    blip_loader(task)(fresh, str(path), {"infer_arch": True})
    assert architecture(fresh) == architecture(model)
    assert_close(outputs(task, fresh), expected, atol=0)


def test_resume_state_restores_masks_and_the_compressed_architecture(tiny):
    torch.manual_seed(4)
    model = build("nlvr", tiny)
    pruner = search("nlvr", model, p=0.5, steps=3)
    state = pruner.state_dict()
    other = build("nlvr", tiny)
    again = UPop({"p": 0.5, "max_epoch": 1, "upop": {"interval": 2}})
    again.attach(other)
    again.load_state_dict(state)
    for a, b in zip(pruner.masks, again.masks):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(pruner.accum, again.accum):
        assert torch.equal(a, b)

    pruner = search("nlvr", model, p=0.5)
    pruner.compress(model)
    other = build("nlvr", tiny)
    again = UPop({"p": 0.5, "max_epoch": 1})
    again.attach(other)
    again.load_state_dict(pruner.state_dict())
    assert again.compressed and architecture(other) == architecture(model)


@pytest.mark.parametrize("name", ["upop", "platon"])
def test_an_unknown_pruner_option_is_named_with_the_valid_ones(name):
    from pruners import PRUNERS

    with pytest.raises(ValueError, match=rf"unknown {name} option\(s\) \['intervall'\]; valid: \["):
        PRUNERS[name]({"p": 0.5, name: {"intervall": 3}})
