"""Official BLIP checkpoint layouts and the loader's policies, on scaled-down files of the exact layout."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import pytest
import torch
from blip_layout import TASKS, official_keys, official_layout, official_state_dict
from torch import Tensor, nn

from models.checkpoints import copy_momentum_params, detect_blip_task, load_blip_checkpoint
from models.vit import resample_pos_embed
from utils import CheckpointError

DEC_W = "text_decoder.cls.predictions.decoder.weight"
DEC_B = "text_decoder.cls.predictions.decoder.bias"
WORD = "text_decoder.bert.embeddings.word_embeddings.weight"
LM_BIAS = "text_decoder.cls.predictions.bias"
BUFFERS = {"image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr"}


def standin(layout: Mapping[str, Tensor], tie_head: bool = True, seed: int = 123) -> nn.Module:
    """A module whose state dict has the keys and shapes of ``layout`` minus ``position_ids``.

    Leaves hold fresh random values (so loaded values are recognisable); queues are buffers. With
    ``tie_head`` the LM head's weight and bias are the word-embedding and bias Parameters themselves
    (listed twice by ``state_dict``, as in HF); otherwise the head keys are absent.
    """
    g = torch.Generator().manual_seed(seed)
    root = nn.Module()
    for key, value in layout.items():
        if key.endswith("position_ids") or key in (DEC_W, DEC_B):
            continue
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        if value.is_floating_point() and key not in BUFFERS:
            mod.register_parameter(leaf, nn.Parameter(torch.randn(value.shape, generator=g)))
        else:
            mod.register_buffer(leaf, torch.zeros_like(value) - 7)
    if tie_head and DEC_W in layout:
        head = root.get_submodule("text_decoder.cls.predictions")
        head.add_module("decoder", nn.Module())
        head.decoder.weight = root.get_parameter(WORD)
        head.decoder.bias = head.bias
    return root


def task_model(task: str, tie_head: bool = True, **dims) -> nn.Module:
    return standin(official_state_dict(task, seed=99, **dims), tie_head=tie_head)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# --------------------------------------------------------------------------- the layout itself


def test_official_key_counts_and_order():
    vit, bert, head = 4 + 12 * 12 + 2, 5 + 12 * 26, 7
    nlvr_bert = 5 + 12 * 34 + 6 * 2  # twin branches; merge_layer in layers 6..11
    expected = {
        "retrieval": 2 * vit + 2 * bert + 5 * 2 + 1 + 4,
        "nlvr": vit + nlvr_bert + 4,
        "vqa": vit + 2 * bert + head,
        "caption": vit + bert + head,
        "pretrain": 2 * vit + 3 * bert + 5 * 2 + 1 + 3 + head,
    }
    for task, n in expected.items():
        keys = official_keys(task)
        assert len(keys) == len(set(keys)) == n, task
    keys = official_keys("retrieval")
    assert keys[:5] == ["temp", "image_queue", "text_queue", "idx_queue", "ptr_queue"]
    assert keys[5:8] == [
        "visual_encoder.cls_token",
        "visual_encoder.pos_embed",
        "visual_encoder.patch_embed.proj.weight",
    ]
    assert (
        keys[keys.index("text_encoder.embeddings.position_ids") + 1] == "text_encoder.embeddings.word_embeddings.weight"
    )
    nlvr = official_keys("nlvr")
    assert "text_encoder.encoder.layer.5.crossattention.output.merge_layer.weight" not in nlvr
    assert "text_encoder.encoder.layer.6.crossattention.output.merge_layer.weight" in nlvr
    assert not any(".crossattention.self." in k for k in nlvr)
    assert official_keys("caption")[-2:] == [DEC_W, DEC_B]
    assert "queue_ptr" in official_keys("pretrain") and "idx_queue" not in official_keys("pretrain")
    assert len(official_keys("retrieval", depth_v=24)) == expected["retrieval"] + 2 * 12 * 12


@pytest.mark.parametrize("task, millions", [("nlvr", 259.5), ("caption", 224.0), ("vqa", 361.6), ("retrieval", 447.6)])
def test_base_layout_parameter_counts_match_published(task, millions):
    # UPop's README table (tied head counted once) sits 0.03-0.13 M above the bare layout; the tolerance
    # still catches a single missing Linear (>= 0.6 M at base size).
    shapes = official_layout(task)
    skip = BUFFERS | {DEC_W, DEC_B}
    n = sum(math.prod(s) for k, s in shapes.items() if k not in skip and not k.endswith("position_ids"))
    assert abs(n / 1e6 - millions) < 0.2


def test_base_layout_shapes():
    vqa = official_layout("vqa")
    assert vqa["visual_encoder.pos_embed"] == (1, 901, 768)
    assert vqa["text_encoder.encoder.layer.0.crossattention.self.key.weight"] == (768, 768)
    large = official_layout("caption", encoder_width=1024, depth=24, depth_t=12)
    assert large["visual_encoder.blocks.23.mlp.fc1.weight"] == (4096, 1024)
    assert large["text_decoder.bert.encoder.layer.11.crossattention.self.value.weight"] == (768, 1024)
    large_vqa = official_layout("vqa", encoder_width=1024, depth=24, depth_t=12)
    assert large_vqa["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"] == (768, 768)
    assert official_layout("retrieval")["image_queue"] == (256, 57600)
    assert official_layout("nlvr")["text_encoder.encoder.layer.11.crossattention.output.merge_layer.weight"] == (
        768,
        1536,
    )


def test_scaled_state_dict_matches_layout_and_sharing():
    sd = official_state_dict("pretrain", image_size=48, width=16, encoder_width=24)
    tiny = {"depth": 2, "heads": 2, "mlp": 32, "vocab": 30, "queue_size": 8, "embed_dim": 8, "max_positions": 12}
    layout = official_layout("pretrain", width=16, encoder_width=24, image_size=48, **tiny)
    assert {k: tuple(v.shape) for k, v in sd.items()} == layout
    assert sd["visual_encoder.pos_embed"].shape == (1, 1 + 3 * 3, 24)
    assert sd[DEC_W] is sd[WORD] and sd[DEC_B] is sd[LM_BIAS]
    assert sd["text_encoder.embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(sd["text_encoder.embeddings.position_ids"][0], torch.arange(12))
    assert torch.allclose(sd["image_queue"].norm(dim=0), torch.ones(8))
    assert sd["queue_ptr"].dtype == torch.int64 and sd["temp"].shape == ()
    # the pretrained decoder shares all but self-attention with the text encoder
    assert (
        sd["text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"]
        is (sd["text_encoder.encoder.layer.1.crossattention.self.key.weight"])
    )
    assert not torch.equal(
        sd["text_decoder.bert.encoder.layer.1.attention.self.key.weight"],
        sd["text_encoder.encoder.layer.1.attention.self.key.weight"],
    )


def test_detect_task_on_every_layout():
    for task in TASKS:
        assert detect_blip_task(official_state_dict(task)) == task
        prefixed = {"module." + k: v for k, v in official_state_dict(task).items()}
        assert detect_blip_task(prefixed) == task
    with pytest.raises(CheckpointError, match="does not look like a BLIP checkpoint.*found head, patch_embed"):
        detect_blip_task({"patch_embed.proj.weight": torch.zeros(1), "head.weight": torch.zeros(1)}, "deit.pth")


# --------------------------------------------------------------------------- loading task files


@pytest.mark.parametrize("task", TASKS)
def test_each_task_file_loads_exactly(tmp_path, task):
    sd = official_state_dict(task)
    model = task_model(task)
    report = load_blip_checkpoint(model, save(tmp_path, {"model": sd, "epoch": 3}), task)
    assert report.detected_task == task
    assert report.missing == []
    assert report.unexpected == [k for k in sd if k.endswith("embeddings.position_ids")]
    assert report.resampled == {} and report.duplicated == []
    assert report.tied == ([DEC_W, DEC_B] if DEC_W in sd else [])
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    if DEC_W in sd:
        head = model.get_submodule("text_decoder.cls.predictions.decoder")
        assert head.weight is model.get_parameter(WORD)


@pytest.mark.parametrize("container", ["bare", "wrapped", "module_prefix", "wrapped_module_prefix"])
@pytest.mark.parametrize("from_file", [False, True])
def test_containers_and_module_prefix(tmp_path, container, from_file):
    sd = official_state_dict("caption")
    obj = {"module." + k: v for k, v in sd.items()} if "module_prefix" in container else sd
    if "wrapped" in container:
        obj = {"model": obj}
    model = task_model("caption")
    load_blip_checkpoint(model, save(tmp_path, obj) if from_file else obj, "caption")
    assert torch.equal(
        model.get_parameter("visual_encoder.blocks.1.attn.qkv.weight"), sd["visual_encoder.blocks.1.attn.qkv.weight"]
    )
    assert torch.equal(model.get_parameter(WORD), sd[WORD])


def test_untied_head_model_without_head_keys_and_file_without_alias(tmp_path):
    sd = official_state_dict("vqa")
    model = task_model("vqa", tie_head=False)
    assert DEC_W not in model.state_dict()
    report = load_blip_checkpoint(model, sd, "vqa")
    assert report.missing == [] and DEC_W not in report.unexpected and report.tied == [DEC_W, DEC_B]
    assert torch.equal(model.get_parameter(WORD), sd[WORD])
    # a file that kept only one name of each tied pair still fills a tied model completely
    slim = {k: v for k, v in sd.items() if k not in (DEC_W, DEC_B)}
    tied = task_model("vqa")
    assert load_blip_checkpoint(tied, slim, "vqa").missing == []
    assert torch.equal(tied.get_submodule("text_decoder.cls.predictions.decoder").weight, sd[WORD])


def test_tied_head_mismatch_in_file_is_an_error(tmp_path):
    sd = official_state_dict("caption")
    sd[DEC_W] = sd[DEC_W].clone()
    sd[DEC_W][3, 1] += 1.0
    path = save(tmp_path, {"model": sd}, "bad_head.pth")
    with pytest.raises(CheckpointError, match=rf"bad_head\.pth.*{DEC_W} differs from {WORD}"):
        load_blip_checkpoint(task_model("caption"), path, "caption")


def test_pos_embed_resampled_for_online_and_momentum(tmp_path, caplog):
    sd = official_state_dict("retrieval", image_size=32)  # 2x2 grid
    model = task_model("retrieval", image_size=64)  # 4x4 grid
    with caplog.at_level(logging.INFO, logger="vlcompress"):
        report = load_blip_checkpoint(model, save(tmp_path, {"model": sd}), "retrieval")
    assert report.resampled == {"visual_encoder.pos_embed": (5, 17), "visual_encoder_m.pos_embed": (5, 17)}
    for key in report.resampled:
        got = model.get_parameter(key)
        assert got.shape == (1, 17, 16)
        assert torch.equal(got, resample_pos_embed(sd[key], 4))
        assert torch.equal(got[:, 0], sd[key][:, 0])
    assert "resampled visual_encoder_m.pos_embed from 5 to 17" in caplog.text
    assert torch.equal(model.get_parameter("visual_encoder.cls_token"), sd["visual_encoder.cls_token"])


@pytest.mark.parametrize("file_task, model_task", [("caption", "nlvr"), ("retrieval", "vqa"), ("nlvr", "retrieval")])
def test_wrong_task_names_both_tasks_and_file(tmp_path, file_task, model_task):
    path = save(tmp_path, {"model": official_state_dict(file_task)}, f"model_base_{file_task}.pth")
    model = task_model(model_task)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as err:
        load_blip_checkpoint(model, path, model_task)
    assert str(err.value) == f"{path} looks like a BLIP {file_task} checkpoint, but the model is {model_task}"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_ordinary_key_is_an_error(tmp_path):
    sd = official_state_dict("nlvr")
    del sd["visual_encoder.blocks.1.mlp.fc1.weight"]
    path = save(tmp_path, {"model": sd}, "cut.pth")
    with pytest.raises(
        CheckpointError, match=r"cut\.pth.*1 model keys missing.*visual_encoder\.blocks\.1\.mlp\.fc1\.weight"
    ):
        load_blip_checkpoint(task_model("nlvr"), path, "nlvr")


def test_nlvr_file_without_a_classifier_keeps_the_fresh_one(tmp_path):
    # Text-assignment pre-training is exported without its 3-way head: every other key loads, cls_head stays.
    sd = official_state_dict("nlvr")
    for k in [k for k in sd if k.startswith("cls_head.")]:
        del sd[k]
    model = task_model("nlvr")
    before = snapshot(model)
    report = load_blip_checkpoint(model, save(tmp_path, {"model": sd}, "twin.pth"), "nlvr")
    assert sorted(report.missing) == sorted(k for k in before if k.startswith("cls_head."))
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in report.missing)
    assert all(torch.equal(after[k], sd[k]) for k in sd if k in after)
    # Only the whole head may be absent: one layer of it missing is still an error.
    sd["cls_head.0.weight"] = before["cls_head.0.weight"]
    with pytest.raises(CheckpointError, match=r"model keys missing.*cls_head\.0\.bias"):
        load_blip_checkpoint(task_model("nlvr"), sd, "nlvr")


def test_shape_mismatch_is_an_error_even_when_not_strict(tmp_path):
    sd = official_state_dict("vqa")
    key = "text_encoder.encoder.layer.0.intermediate.dense.weight"
    sd[key] = torch.zeros(24, 16)
    path = save(tmp_path, {"model": sd}, "pruned.pth")
    model = task_model("vqa")
    before = snapshot(model)
    for strict in (True, False):
        with pytest.raises(
            CheckpointError, match=rf"pruned\.pth.*shape mismatch.*{key} \(checkpoint \(24, 16\), model \(32, 16\)\)"
        ):
            load_blip_checkpoint(model, path, "vqa", strict=strict)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_unexpected_keys_listed_with_count_and_non_strict_downgrade(tmp_path, caplog):
    sd = official_state_dict("caption", depth=4)
    path = save(tmp_path, {"model": sd}, "deep.pth")
    model = task_model("caption", depth=2)
    with pytest.raises(
        CheckpointError,
        match=r"deep\.pth.*(\d+) checkpoint keys the model does not have: visual_encoder\.blocks\.2\..*in all\)",
    ) as err:
        load_blip_checkpoint(model, path, "caption")
    n_extra = sum(
        k.startswith(
            (
                "visual_encoder.blocks.2.",
                "visual_encoder.blocks.3.",
                "text_decoder.bert.encoder.layer.2.",
                "text_decoder.bert.encoder.layer.3.",
            )
        )
        for k in sd
    )
    assert f"{n_extra} checkpoint keys the model does not have" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="vlcompress"):
        report = load_blip_checkpoint(model, path, "caption", strict=False)
    assert len(report.unexpected) == n_extra + 1  # plus position_ids
    assert f"{n_extra} unexpected" in caplog.text
    assert torch.equal(
        model.get_parameter("visual_encoder.blocks.1.norm1.weight"), sd["visual_encoder.blocks.1.norm1.weight"]
    )


def test_queues_may_be_absent_from_the_model():
    sd = official_state_dict("retrieval")
    model = standin({k: v for k, v in sd.items() if k not in BUFFERS})  # e.g. an evaluation-only model
    report = load_blip_checkpoint(model, sd, "retrieval")
    assert [k for k in report.unexpected if "position_ids" not in k] == [
        "image_queue",
        "text_queue",
        "idx_queue",
        "ptr_queue",
    ]
    assert report.missing == []
    # other top-level tensors the model lacks stay errors
    no_temp = standin({k: v for k, v in sd.items() if k != "temp"})
    with pytest.raises(CheckpointError, match=r"1 checkpoint keys the model does not have: temp$"):
        load_blip_checkpoint(no_temp, sd, "retrieval")


def test_method_extras_allowed_by_pattern():
    sd = official_state_dict("nlvr")
    sd["visual_encoder.blocks.0.attn.alpha"] = torch.ones(1, 1, 2, 1)
    model = task_model("nlvr")
    with pytest.raises(CheckpointError, match="attn.alpha"):
        load_blip_checkpoint(model, sd, "nlvr")
    report = load_blip_checkpoint(model, sd, "nlvr", allow_unexpected=["*.alpha"])
    assert "visual_encoder.blocks.0.attn.alpha" in report.unexpected


# --------------------------------------------------------------------------- starting from a pretrained file


def test_nlvr_from_pretrained_duplicates_cross_attention(tmp_path):
    sd = official_state_dict("pretrain", image_size=32)
    model = task_model("nlvr", image_size=48)
    fresh = [k for k in model.state_dict() if "merge_layer" in k or k.startswith("cls_head.")]
    assert any("merge_layer" in k for k in fresh)  # the stand-in has merge layers in its upper half
    before = {k: model.state_dict()[k].clone() for k in fresh}
    report = load_blip_checkpoint(model, save(tmp_path, {"model": sd}), "nlvr")
    assert report.detected_task == "pretrain"
    assert sorted(report.missing) == sorted(fresh)
    for i in range(2):
        layer = f"text_encoder.encoder.layer.{i}.crossattention."
        for part in ("query", "key", "value"):
            for suffix in ("weight", "bias"):
                src = sd[f"{layer}self.{part}.{suffix}"]
                assert torch.equal(model.get_parameter(f"{layer}self0.{part}.{suffix}"), src)
                assert torch.equal(model.get_parameter(f"{layer}self1.{part}.{suffix}"), src)
        for suffix in ("weight", "bias"):
            src = sd[f"{layer}output.dense.{suffix}"]
            assert torch.equal(model.get_parameter(f"{layer}output.dense0.{suffix}"), src)
            assert torch.equal(model.get_parameter(f"{layer}output.dense1.{suffix}"), src)
        assert torch.equal(
            model.get_parameter(f"{layer}output.LayerNorm.weight"), sd[f"{layer}output.LayerNorm.weight"]
        )
    assert len(report.duplicated) == 2 * 2 * (6 + 2)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)
    # towers the NLVR2 model does not use are ignored, not loaded
    assert {k.split(".")[0] for k in report.unexpected} == {
        "temp",
        "image_queue",
        "text_queue",
        "queue_ptr",
        "vision_proj",
        "text_proj",
        "itm_head",
        "visual_encoder_m",
        "vision_proj_m",
        "text_encoder_m",
        "text_proj_m",
        "text_decoder",
        "text_encoder",
    }
    assert not any(".crossattention.self." in k and k.startswith("text_encoder.") for k in report.unexpected)
    assert report.resampled == {"visual_encoder.pos_embed": (5, 10)}


@pytest.mark.parametrize("task", ["retrieval", "caption", "vqa"])
def test_task_models_fine_tune_from_pretrained(task):
    sd = official_state_dict("pretrain")
    model = task_model(task)
    report = load_blip_checkpoint(model, sd, task)
    assert report.missing == (["idx_queue", "ptr_queue"] if task == "retrieval" else [])
    for key, value in model.state_dict().items():
        if key not in report.missing:
            assert torch.equal(value, sd[key]), key


# --------------------------------------------------------------------------- momentum and file errors


def test_reset_momentum_copies_online_weights():
    sd = official_state_dict("retrieval")
    kept = task_model("retrieval")
    load_blip_checkpoint(kept, sd, "retrieval")
    assert torch.equal(
        kept.get_parameter("visual_encoder_m.blocks.0.attn.qkv.weight"), sd["visual_encoder_m.blocks.0.attn.qkv.weight"]
    )
    assert not torch.equal(
        sd["visual_encoder_m.blocks.0.attn.qkv.weight"], sd["visual_encoder.blocks.0.attn.qkv.weight"]
    )

    model = task_model("retrieval")
    report = load_blip_checkpoint(model, sd, "retrieval", reset_momentum=True)
    assert report.momentum_reset == ["visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m"]
    for name, p in model.named_parameters():
        head, _, rest = name.partition(".")
        if head.endswith("_m"):
            assert torch.equal(p, sd[f"{head[:-2]}.{rest}"]), name
        else:
            assert torch.equal(p, sd[name]), name
    assert torch.equal(model.get_buffer("idx_queue"), sd["idx_queue"])


def test_copy_momentum_rejects_towers_of_other_shapes():
    model = nn.Module()
    model.proj, model.proj_m = nn.Linear(4, 3), nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"proj_m\.weight has shape \(2, 4\) but proj\.weight has \(3, 4\)"):
        copy_momentum_params(model)


def test_truncated_file_names_the_path(tmp_path):
    path = save(tmp_path, {"model": official_state_dict("caption")}, "half.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.*truncated or corrupt"):
        load_blip_checkpoint(task_model("caption"), path, "caption")


def test_unknown_task_argument():
    with pytest.raises(ValueError, match="unknown BLIP task 'itm'"):
        load_blip_checkpoint(nn.Module(), {}, "itm")
