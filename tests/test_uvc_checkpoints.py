"""UVC's released checkpoints (dense weights + ``mask`` buffers + block gates, VITA-Group/UVC layout) convert to an
ordinary compressed DeiT: it loads strictly through the architecture description, computes what UVC's stage-2 model
computes (masked weights, skipped blocks) with fewer MACs, survives save_compressed + load_pretrained, and a file
that does not fit is an error naming the file and the key."""

import argparse

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from models.arch import apply_architecture, architecture, save_compressed
from models.cost import vit_cost
from models.layers import SkippedBlock
from models.uvc_checkpoints import convert_uvc_state_dict, is_uvc_state_dict, load_uvc_checkpoint
from models.vit import VisionTransformer
from utils import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

GEO = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}
HEAD_DIM, HIDDEN = 16, 192
HEAD_1 = list(range(16, 32))  # block 0: head 1 removed
IN_HEAD = {0: [2, 5], 2: [0, 1, 15]}  # block 1: value coordinates removed inside heads 0 and 2
NEURONS = [3, 7, *range(100, 111)]  # block 2: 13 neurons removed
SKIP = (1.2, -1.2)  # block 3: (skip, execute) logits, skipped


def _dense(distilled, seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(**GEO, distilled=distilled).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases everywhere: masked columns must not hide a live bias
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _masks(model):
    """UVC's mask buffers: ones like every module weight, zeros where the search pruned."""
    masks = {f"{n}.mask": torch.ones_like(m.weight) for n, m in model.named_modules() if hasattr(m, "weight")}
    masks["blocks.0.attn.proj.mask"][:, HEAD_1] = 0
    for head, dims in IN_HEAD.items():
        masks["blocks.1.attn.proj.mask"][:, [head * HEAD_DIM + d for d in dims]] = 0
    masks["blocks.2.mlp.fc2.mask"][:, NEURONS] = 0
    masks["blocks.2.mlp.fc1.mask"][NEURONS] = 0
    masks["norm.mask"][5] = 0  # not a pruning mask, but the release multiplies every mask in
    masks["head.mask"][2, 7] = 0
    return masks


def _uvc_state(distilled, seed=0):
    """A state dict laid out as UVC's DistilledVisionTransformer saves it (timm names, ``*.mask`` beside every module
    weight, block and part gates, the token scorer ``gumbel``); the weights are not multiplied by the masks."""
    model = _dense(distilled, seed)
    gumbel = nn.Linear(GEO["embed_dim"], 1)
    sd = dict(model.state_dict())
    sd |= {"gumbel.weight": gumbel.weight.detach(), "gumbel.bias": gumbel.bias.detach()}
    sd |= _masks(model) | {"gumbel.mask": torch.ones_like(gumbel.weight)}
    for i in range(GEO["depth"]):
        sd[f"blocks.{i}.attn_skip_gating"] = torch.tensor([-1.0, 1.0])
        sd[f"blocks.{i}.mlp_skip_gating"] = torch.tensor([-1.0, 1.0])
    gates = torch.tensor([[-4.5, 4.5], [-0.3, 0.3], [-2.0, 2.0], SKIP])
    return sd | {"block_skip_gating": gates}


def _reference(distilled, seed=0):
    """UVC's stage-2 model: every weight times its mask, block 3 not run."""
    model = _dense(distilled, seed)
    masks = _masks(model)
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "weight"):
                m.weight.mul_(masks[f"{name}.mask"])
    model.blocks[3] = SkippedBlock(3)
    return model.eval()


def _images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _build(sd, arch, distilled, seed=7):
    fresh = VisionTransformer(**GEO, distilled=distilled)
    torch.manual_seed(seed)
    apply_architecture(fresh, arch)
    fresh.load_state_dict(sd, strict=True)
    return fresh.eval()


def _file(tmp_path, sd, layout):
    if layout == "module":
        sd = {f"module.{k}": v for k, v in sd.items()}
    if layout == "wrapped":  # what save_model builds: the model's state dict beside the counts s and r
        sd = {"model": sd, "stats_s": torch.zeros(4, 2), "stats_r": torch.zeros(4, 3)}
    path = tmp_path / f"deit_tiny_patch16_224_{layout}.pth.tar"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
@pytest.mark.parametrize("layout", ["bare", "module", "wrapped"])
def test_converted_checkpoint_is_the_masked_model_with_fewer_macs(tmp_path, distilled, layout):
    path = _file(tmp_path, _uvc_state(distilled), layout)
    sd, arch = load_uvc_checkpoint(path, num_heads=3)
    assert not any(k.endswith(".mask") or "gating" in k or k.startswith("gumbel") for k in sd)
    assert arch["skipped"] == ["blocks.3"]
    assert arch["units"]["blocks.0.attn"] == {"head": 2, "head_dim": HEAD_DIM}
    assert arch["value_dims"] == {"blocks.1.attn": [HEAD_DIM - 2, HEAD_DIM, HEAD_DIM - 3]}
    assert arch["units"]["blocks.2.mlp"] == {"neuron": HIDDEN - len(NEURONS)}
    assert arch["units"]["blocks.1.mlp"] == {"neuron": HIDDEN}
    assert set(arch["scales"].values()) == {HEAD_DIM**-0.5}
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 2 * HEAD_DIM, 48)
    assert sd["blocks.1.attn.qkv.weight"].shape == (2 * 3 * HEAD_DIM + 3 * HEAD_DIM - 5, 48)
    assert "blocks.3.attn.qkv.weight" not in sd

    model = _build(sd, arch, distilled)
    assert architecture(model) == arch
    reference = _reference(distilled)
    x = _images()
    with torch.no_grad():
        assert_close(model(x), reference(x), rtol=0, atol=1e-5)
    assert vit_cost(model)[0].macs < vit_cost(_dense(distilled))[0].macs


@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
def test_round_trip_through_save_compressed_and_load_pretrained(tmp_path, distilled):
    from tasks.classification import load_pretrained

    sd, arch = convert_uvc_state_dict(_uvc_state(distilled), "uvc.pth", num_heads=3)
    expected = _build(sd, arch, distilled)
    paths = save_compressed(tmp_path / "uvc_compressed", sd, arch)
    x = _images()
    for path in (paths["pth"], paths["safetensors"]):
        fresh = VisionTransformer(**GEO, distilled=distilled)
        load_pretrained(fresh, str(path), {})
        with torch.no_grad():
            assert_close(fresh.eval()(x), expected(x), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["bare", "module", "wrapped"])
def test_a_released_uvc_file_loads_directly_as_the_pretrained_model(tmp_path, layout):
    """``--pretrained`` given UVC's own file: converted on the way in, the model is cut to what it describes."""
    from tasks.classification import load_pretrained

    path = _file(tmp_path, _uvc_state(True), layout)
    fresh = VisionTransformer(**GEO, distilled=True)
    load_pretrained(fresh, str(path), {})
    assert isinstance(fresh.blocks[3], SkippedBlock)
    x = _images()
    with torch.no_grad():
        assert_close(fresh.eval()(x), _reference(True)(x), rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="non-distilled"):  # the file's token layout is still checked first
        load_pretrained(VisionTransformer(**GEO, distilled=False), str(path), {})


def test_layout_is_recognised():
    sd = _uvc_state(False)
    assert is_uvc_state_dict(sd) and is_uvc_state_dict({f"module.{k}": v for k, v in sd.items()})
    assert is_uvc_state_dict({k: v for k, v in sd.items() if k != "block_skip_gating"})  # masks alone
    assert is_uvc_state_dict({k: v for k, v in sd.items() if not k.endswith(".mask")})  # gates alone
    assert not is_uvc_state_dict(_dense(False).state_dict())


def test_gates_decide_by_argmax_and_a_tie_skips():
    sd = _uvc_state(False)
    sd["block_skip_gating"] = torch.tensor([[0.5, 0.5], [-1.0, 1.0], [1.0, -1.0], [0.2, 0.3]])
    assert convert_uvc_state_dict(sd, "f", num_heads=3)[1]["skipped"] == ["blocks.0", "blocks.2"]
    del sd["block_skip_gating"]  # masks without gates: every block runs
    assert convert_uvc_state_dict(sd, "f", num_heads=3)[1]["skipped"] == []


def test_all_ones_masks_give_the_dense_architecture():
    sd = _uvc_state(False)
    for k in sd:
        if k.endswith(".mask"):
            sd[k] = torch.ones_like(sd[k])
    sd["block_skip_gating"] = torch.tensor([[-1.0, 1.0]] * 4)
    converted, arch = convert_uvc_state_dict(sd, "f", num_heads=3)
    dense = _dense(False)
    assert arch == architecture(dense)
    x = _images()
    with torch.no_grad():
        assert_close(_build(converted, arch, False)(x), dense(x), rtol=0, atol=0)


def test_head_count_comes_from_uvc_configs_by_width():
    torch.manual_seed(0)
    tiny = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=4)
    sd = dict(tiny.state_dict()) | {"block_skip_gating": torch.tensor([[-1.0, 1.0]])}
    sd["blocks.0.attn.proj.mask"] = torch.ones_like(sd["blocks.0.attn.proj.weight"])
    sd["blocks.0.attn.proj.mask"][:, 64:128] = 0
    _, arch = convert_uvc_state_dict(sd, "deit_tiny.pth")
    assert arch["units"]["blocks.0.attn"] == {"head": 2, "head_dim": 64}
    with pytest.raises(CheckpointError, match=r"odd\.pth: embed_dim 48 .*num_heads"):
        convert_uvc_state_dict(_uvc_state(False), "odd.pth")


def _error(tmp_path, sd, match):
    path = _file(tmp_path, sd, "bare")
    with pytest.raises(CheckpointError, match=match) as info:
        load_uvc_checkpoint(path, num_heads=3)
    assert str(path) in str(info.value)
    return str(info.value)


def test_mask_of_the_wrong_shape_names_file_and_key(tmp_path):
    sd = _uvc_state(False)
    sd["blocks.1.mlp.fc1.mask"] = torch.ones(HIDDEN, 47)
    _error(tmp_path, sd, r"blocks\.1\.mlp\.fc1\.mask has shape \(192, 47\) but blocks\.1\.mlp\.fc1\.weight has")
    sd = _uvc_state(False) | {"pre_logits.fc.mask": torch.ones(48, 48)}
    _error(tmp_path, sd, r"mask pre_logits\.fc\.mask has no weight pre_logits\.fc\.weight")


def test_unknown_and_missing_keys_are_listed(tmp_path):
    sd = _uvc_state(False) | {"blocks.0.attn.rel_pos": torch.zeros(3), "jump_weights": torch.zeros(4)}
    message = _error(tmp_path, sd, r"unknown keys blocks\.0\.attn\.rel_pos, jump_weights")
    assert "missing keys" not in message
    sd = _uvc_state(False)
    del sd["blocks.2.norm2.bias"]
    _error(tmp_path, sd, r"missing keys blocks\.2\.norm2\.bias")


def test_executed_block_without_heads_or_neurons_is_an_error(tmp_path):
    sd = _uvc_state(False)
    sd["blocks.1.attn.proj.mask"].zero_()
    _error(tmp_path, sd, r"block 1 is executed but every head's proj columns are masked .*blocks\.1\.attn\.proj\.mask")
    sd = _uvc_state(False)
    sd["blocks.2.mlp.fc2.mask"].zero_()
    _error(tmp_path, sd, r"block 2 is executed but every fc2 column is masked")
    sd = _uvc_state(False)
    sd["blocks.3.attn.proj.mask"].zero_()  # block 3 is skipped: its masks do not matter
    sd["blocks.3.mlp.fc2.mask"].zero_()
    assert convert_uvc_state_dict(sd, "f", num_heads=3)[1]["skipped"] == ["blocks.3"]


def test_gates_of_the_wrong_shape_and_pickled_args_are_refused(tmp_path):
    sd = _uvc_state(False)
    sd["block_skip_gating"] = torch.zeros(3, 2)
    _error(tmp_path, sd, r"block_skip_gating has shape \(3, 2\), expected \(4, 2\)")
    path = tmp_path / "with_args.pth.tar"  # the wrapper save_model builds holds an argparse Namespace
    torch.save({"args": argparse.Namespace(model_type="deit"), "model": _uvc_state(False)}, path)
    with pytest.raises(CheckpointError, match="refused to load .*with_args"):
        load_uvc_checkpoint(path, num_heads=3)
    plain = tmp_path / "dense.pth"
    torch.save({"model": _dense(False).state_dict()}, plain)
    with pytest.raises(CheckpointError, match=r"dense\.pth is not a UVC checkpoint"):
        load_uvc_checkpoint(plain)
