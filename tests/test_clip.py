"""CLIP: our model against open_clip's OpenAI-architecture CLIP and transformers' CLIPModel on identical random
weights, every weight layout (OpenAI / open_clip, the forks' fine-tuned and UPop-compressed files, Hugging Face,
TorchScript behind its flag) loading strictly and round-tripping, the tokenizer, EOT pooling by position, UPop's
masked = compressed on both towers, PLATON's target set, and UPop's parameter and MAC counts at real size."""

import logging
import math

import pytest
import torch
from torch import nn

from models.arch import architecture
from models.clip import CLIP_PRESETS, ClipArch, ClipRetrieval, ClipTextTower
from models.clip_checkpoints import (
    detect_layout,
    infer_arch,
    load_clip_checkpoint,
    read_clip_weights,
    save_hf,
    save_weights,
    to_layout,
    to_ours,
)
from models.token_state import TokenState
from pruners.targets import targets
from pruners.upop import UPop
from tasks.retrieval_clip import load_pretrained
from utils import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "embed_dim": 24,
    "patch_size": 8,
    "vision_width": 64,
    "vision_layers": 2,
    "context_length": 16,
    "text_width": 64,
    "text_layers": 2,
}
SIZE = 32
TEXTS = ["a red circle", "two blue squares left of a green triangle", "one shape"]


def tiny_arch(**kw):
    return ClipArch.from_config("", {**TINY, **kw}, image_size=SIZE)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = ClipRetrieval(tiny_arch(**kw), queue_size=12).eval()
    with torch.no_grad():  # away from the init's zeros and ones, so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.reset_momentum()
    return model


def images(seed=0, b=3):
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def embeddings(model):
    img = images()
    ids = model.text_inputs(TEXTS, img.device).input_ids
    return model.image_features(img)[2], model.text_features(ids)


def assert_same(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def open_clip_model(seed=0):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    oc = CLIP(
        embed_dim=TINY["embed_dim"],
        vision_cfg={"image_size": SIZE, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
        quick_gelu=True,
    ).eval()
    with torch.no_grad():
        for p in oc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return oc


# ---------------------------------------------------------------------------------------------- oracles


def test_embeddings_equal_open_clip_and_the_layout_round_trips():
    oc = open_clip_model()
    model = ClipRetrieval(tiny_arch(), queue_size=12).eval()
    sd, layout = to_ours(oc.state_dict())
    assert layout == "openai"
    load_clip_checkpoint(model, sd, "open_clip", evaluate=True)
    img = images()
    ids = model.text_inputs(TEXTS, img.device).input_ids
    with torch.no_grad():
        torch.testing.assert_close(model.visual.embed(model.visual.forward_tokens(img)[0]), oc.encode_image(img))
        torch.testing.assert_close(model.text.embed(ids), oc.encode_text(ids), atol=1e-5, rtol=1e-5)
    back = to_layout(model.state_dict(), "openai", momentum=False)
    oc.load_state_dict(back, strict=True)  # every key, nothing extra
    assert all(torch.equal(back[k], v) for k, v in oc.state_dict().items())


def test_tokenizer_equals_open_clip_and_cuts_long_texts_once(caplog):
    import open_clip

    model = tiny_model()
    ids = model.tokenizer(TEXTS).input_ids
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-32")(TEXTS, context_length=16))
    assert ids[0, :5].tolist() == [49406, 320, 736, 7117, 49407] and int(ids[0, 5:].abs().sum()) == 0
    long = " ".join(["circle"] * 40)
    with caplog.at_level(logging.WARNING):
        out = model.tokenizer([long, long, "a"]).input_ids
    assert out[0, -1] == model.tokenizer.eot_token_id and out.shape == (3, 16)
    assert sum("cut to the context length 16" in r.getMessage() for r in caplog.records) == 1


def test_embeddings_equal_transformers_clipmodel_both_ways(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "hidden_act": "quick_gelu",
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": SIZE,
            "patch_size": 8,
            "hidden_act": "quick_gelu",
        },
        projection_dim=24,
    )
    hf = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    sd, description, facts = read_clip_weights(tmp_path / "hf")
    assert facts == {"layout": "hf", "act": "quick_gelu"} and description is None
    model = ClipRetrieval(tiny_arch(vision_heads=2, text_heads=2), queue_size=12).eval()
    load_clip_checkpoint(model, sd, "hf", evaluate=True)

    def hf_embeddings(m):
        img = images()
        ids = model.text_inputs(TEXTS, img.device).input_ids
        with torch.no_grad():
            outs = m.get_image_features(pixel_values=img), m.get_text_features(input_ids=ids)
        return [o if torch.is_tensor(o) else o.pooler_output for o in outs]

    ours = [model.visual.embed(model.visual.forward_tokens(images())[0])]
    with torch.no_grad():
        ours.append(model.text.embed(model.text_inputs(TEXTS, "cpu").input_ids))
    assert_same(ours, hf_embeddings(hf))
    save_hf(model.state_dict(), model.arch, tmp_path / "back")
    back, info = CLIPModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert_same(hf_embeddings(back.eval()), ours)


# ---------------------------------------------------------------------------------------------- files


def test_fork_file_loads_strictly_with_its_momentum_towers_and_queues(tmp_path):
    model = tiny_model(1)
    with torch.no_grad():  # momentum towers that differ from the online ones, and filled queues
        for p in model.visual_m.parameters():
            p.mul_(0.5)
        model.image_queue.normal_()
        model.ptr_queue.fill_(6)
    path = tmp_path / "clip_large_retrieval_flickr.pth"
    save_weights(model.state_dict(), path, "openai", momentum=True)
    raw = torch.load(path, weights_only=True)["model"]
    assert (
        {"visual_m.conv1.weight", "transformer_m.resblocks.0.attn.in_proj_weight", "token_embedding_m.weight"}
        <= set(raw)
        and "ln_final_m.weight" in raw
        and "positional_embedding_m" in raw
        and "text_projection_m" in raw
    )
    assert raw["image_queue"].shape == (24, 12) and detect_layout(raw) == "openai"
    config = {"trust_torchscript": False, "reset_momentum": False}
    fresh = ClipRetrieval(tiny_arch(), queue_size=12).eval()
    load_pretrained(fresh, str(path), config, evaluate=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    reset = ClipRetrieval(tiny_arch(), queue_size=12)
    load_pretrained(reset, str(path), {**config, "reset_momentum": True})
    assert torch.equal(reset.visual_m.patch_embed.proj.weight, reset.visual.patch_embed.proj.weight)


def test_a_state_dict_without_momentum_towers_gets_them_from_the_online_ones():
    model = tiny_model(2)
    online = {k: v for k, v in model.state_dict().items() if not k.startswith(("visual_m.", "text_m."))}
    fresh = ClipRetrieval(tiny_arch(), queue_size=12)
    load_clip_checkpoint(fresh, online, "open_clip file", reset_momentum=False)
    assert torch.equal(fresh.text_m.token_embedding.weight, model.text.token_embedding.weight)
    with pytest.raises(CheckpointError, match="missing: .*text.proj"):
        load_clip_checkpoint(fresh, {k: v for k, v in online.items() if k != "text.proj"}, "x", evaluate=True)
    with pytest.raises(CheckpointError, match="does not have: extra"):
        load_clip_checkpoint(fresh, {**online, "extra": torch.zeros(1)}, "x")


def test_another_resolution_is_refused_by_name():
    small = tiny_model(3)
    big = ClipRetrieval(ClipArch.from_config("", TINY, image_size=2 * SIZE), queue_size=12)
    with pytest.raises(CheckpointError, match=r"32 px images .* set image_size: 32"):
        load_clip_checkpoint(big, small.state_dict(), "small.pth")


def _torchscript_archive(sd, path):
    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, Holder())
            node = getattr(node, part)
        if value.is_floating_point():
            node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            node.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


def test_torchscript_release_is_refused_unless_trusted_and_converts_once(tmp_path):
    from scripts.convert_clip import main as convert

    model = tiny_model(4)
    openai = to_layout(model.state_dict(), "openai", momentum=False)
    release = {k: v.half() for k, v in openai.items()}  # the release is fp16, with three int entries
    release.update(input_resolution=torch.tensor(SIZE), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-tiny.pt"
    _torchscript_archive(release, path)
    with pytest.raises(CheckpointError, match="TorchScript archive.*convert_clip.py.*--trust-torchscript"):
        read_clip_weights(path)
    sd, _, facts = read_clip_weights(path, trust_torchscript=True)
    assert facts["layout"] == "openai" and all(v.dtype != torch.float16 for v in sd.values())
    out = convert([str(path), str(tmp_path / "clip.safetensors"), "--trust-torchscript"])
    fresh = ClipRetrieval(tiny_arch(), queue_size=12).eval()
    load_pretrained(fresh, str(out), {"trust_torchscript": False, "reset_momentum": True}, evaluate=True)
    rounded = ClipRetrieval(tiny_arch(), queue_size=12).eval()
    load_clip_checkpoint(rounded, {k: v.float() for k, v in to_ours(release)[0].items()}, "fp16", evaluate=True)
    assert_same(embeddings(fresh), embeddings(rounded), atol=0)


def test_infer_arch_reads_every_openai_size_from_shapes():
    for name, preset in CLIP_PRESETS.items():
        with torch.device("meta"):
            model = ClipRetrieval(ClipArch.from_config(name), queue_size=8)
        arch = infer_arch(model.state_dict(), name)
        assert {k: getattr(arch, k) for k in preset} == preset
        assert arch.heads("vision") == preset["vision_width"] // 64 and arch.heads("text") == preset["text_width"] // 64


# ---------------------------------------------------------------------------------------------- pooling


def test_text_pools_at_the_eot_token_by_its_position_after_token_reduction():
    model = tiny_model(5)
    ids = model.text_inputs(TEXTS, "cpu").input_ids
    tower = model.text
    with torch.no_grad():
        x, state = tower.forward_tokens(ids)
        dense = ClipTextTower.pool(x, state, ids)
        keep = torch.stack([torch.tensor([0, 2, int(e), 15]) for e in ids.argmax(-1)])  # kept tokens, EOT among them
        kept_state = state.select(keep)
        reduced = ClipTextTower.pool(x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1])), kept_state, ids)
        torch.testing.assert_close(reduced, dense)
        with pytest.raises(ValueError, match="removed the end-of-text token"):
            ClipTextTower.pool(x[:, :2], TokenState(positions=torch.tensor([[0, 1]] * 3)), ids)


# ---------------------------------------------------------------------------------------------- pruners


def _search(model, p, steps=6, **opts):
    pruner = UPop({"p": p, "max_epoch": 1, "upop": {"interval": 2, "attn_cost": 36, **opts}})
    pruner.attach(model)
    model.train()
    for step in range(1, steps + 1):
        model(images(step, 4), TEXTS + ["a"], 0.4, torch.arange(4)).backward()
        pruner.before_optimizer_step(model)
        pruner.step(model, step, steps)
    model.zero_grad(set_to_none=True)
    return pruner


def test_upop_masks_both_towers_and_the_compressed_model_equals_the_masked_one():
    model = tiny_model(6)
    dense = architecture(model)
    pruner = _search(model, 0.5)
    names = {u.name.split(".")[0] for u in pruner.units}
    assert names == {"visual", "text"}  # the momentum towers are never searched
    masked = embeddings(model)
    pruner.compress(model)
    assert architecture(model)["units"] != dense["units"]
    assert_same(embeddings(model), masked)
    a, b = model.text.state_dict(), model.text_m.state_dict()  # momentum towers cut alike, then copied
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_upop_at_p_zero_changes_nothing():
    model = tiny_model(7)
    before, dense = embeddings(model), architecture(model)
    pruner = _search(model, 0.0, steps=3)
    pruner.compress(model)
    assert architecture(model) == dense
    assert_same(embeddings(model), before, atol=0)


def test_upop_released_clip_files_load_with_inferred_widths_and_the_seed_attention_scale(tmp_path):
    """UPop's *_compressed.pth: OpenAI keys at pruned shapes, momentum twins alike, no description; CLIP attention
    takes 1/sqrt(kept width)."""
    model = tiny_model(8)
    pruner = _search(model, 0.5, parity_scale=True)
    pruner.compress(model)
    block = model.visual.blocks[0].attn
    assert block.scale == pytest.approx(block.head_dim**-0.5) and block.head_dim < 64
    path = tmp_path / "clip_large_retrieval_flickr_2x_compressed.pth"
    torch.save({"model": to_layout(model.state_dict(), "openai", momentum=True)}, path)
    config = {"trust_torchscript": False, "reset_momentum": True}
    with pytest.raises(CheckpointError, match="no architecture description.*--infer_arch"):
        load_pretrained(ClipRetrieval(tiny_arch(), queue_size=12), str(path), config)
    fresh = ClipRetrieval(tiny_arch(), queue_size=12).eval()
    load_pretrained(fresh, str(path), {**config, "infer_arch": True}, evaluate=True)
    assert architecture(fresh) == architecture(model)
    assert_same(embeddings(fresh), embeddings(model), atol=0)
    with pytest.raises(ValueError, match="CLIPModel cannot express"):
        save_hf(model.state_dict(), model.arch, tmp_path / "hf")


def test_platon_and_compute_id_target_out_proj_c_fc_c_proj_of_both_towers():
    with torch.device("meta"):
        model = ClipRetrieval(ClipArch.from_config("ViT-L/14@336px"), queue_size=8)
    found = targets(model)
    assert len(found) == 108 and [t.modality for t in found] == ["vision"] * 72 + ["text"] * 36
    assert {t.name.rsplit(".", 2)[-2] + "." + t.name.rsplit(".", 1)[-1] for t in found} == {
        "attn.proj",
        "mlp.fc1",
        "mlp.fc2",
    }
    assert not any("_m." in t.name for t in found)


def test_shipped_demo_clip_loads_strictly_and_its_id_table_names_its_platon_targets():
    import json

    from tasks import registry
    from tasks.retrieval_clip import build_model

    _, config = registry.resolve("retrieval", "configs/demo/retrieval_clip.yaml", demo=True)
    for path in (config["pretrained"], config["pruner_pretrained"]):
        model = build_model(config)
        load_pretrained(model, path, config, evaluate=path == config["pruner_pretrained"])
        assert model.visual_m.blocks[0].mlp.fc1.weight.equal(model.visual.blocks[0].mlp.fc1.weight)
    table = json.loads(open("checkpoints/demo/clip_tiny_retrieval_ids.json").read())
    assert list(table) == [t.name for t in targets(model)]
    assert all(v["id"] > 1 for v in table.values())


# ---------------------------------------------------------------------------------------------- cost


def test_real_size_params_and_macs_are_upops():
    """UPop's table: 856.0 M parameters with the momentum towers, 395.7 G MACs on its dummy training step."""
    from benchmarks.measure import model_cost

    with torch.device("meta"):
        model = ClipRetrieval(ClipArch.from_config("ViT-L/14@336px"), queue_size=57600)
    cost = model_cost(model.eval())
    assert math.isclose(cost["params"] / 1e6, 856.0, rel_tol=0.01)
    assert cost["params_momentum"] * 2 == cost["params"] - 1  # everything but logit_scale is copied
    assert math.isclose(cost["macs"] / 1e9, 395.7, rel_tol=0.01)
    assert cost["macs_analytic"] == cost["macs"] and cost["flops_analytic"] == cost["flops"]


@pytest.mark.parametrize("ranking", ["uniform", "magnitude"])
def test_speed_benchmark_upop_copy_meets_the_budget_and_leaves_the_dense_model(ranking):
    from argparse import Namespace

    from benchmarks.speed import compressed_copy

    model = tiny_model()
    small, how = compressed_copy(model, "upop", Namespace(p=0.5, round_to=1, ranking=ranking))
    assert f"{ranking} ranking" in how
    assert float(how.rsplit("mask budget ", 1)[1].rstrip(")")) == pytest.approx(0.5, abs=0.02)
    assert model.visual.blocks[0].mlp.fc1.out_features == 4 * model.arch.vision_width  # the dense model untouched
    fc1 = [b.mlp.fc1.out_features for tower in (small.visual, small.text) for b in tower.blocks]
    if ranking == "uniform":
        assert fc1 == [2 * small.arch.vision_width] * len(small.visual.blocks) + [2 * small.arch.text_width] * len(
            small.text.blocks
        )
    assert [b.mlp.fc1.out_features for b in small.visual_m.blocks] == fc1[: len(small.visual.blocks)]
