"""Architecture description v2: uneven value widths per head, skipped blocks and token reducers survive a save and
a load into a freshly built dense model (outputs identical); version 1 files still load; no library module
imports the command-line layer."""

import ast
import json
from pathlib import Path

import pytest
import tiny_blip
import torch
from torch.testing import assert_close

from models.arch import apply_architecture, architecture, fit_to_checkpoint, read_weights, save_compressed
from models.layers import SkippedBlock
from models.token_ops import EViTReducer, ToMeReducer
from models.vit import VisionTransformer
from utils import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 4, "num_classes": 5}


def _vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(**TINY).eval()


def _images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_value_widths_skipped_blocks_and_reducers_round_trip(tmp_path):
    model = _vit()
    model.blocks[0].attn.keep_value_dims([torch.tensor([0, 3, 5]), torch.arange(8), torch.tensor([7]), torch.arange(6)])
    model.blocks[1].mlp.keep_neurons(torch.arange(50))
    model.blocks[2] = SkippedBlock(2)
    model.blocks[1].token_hooks.append(EViTReducer(0.6))
    model.blocks[3].token_hooks.append(ToMeReducer(2, prop_attn=False))
    x = _images()
    with torch.no_grad():
        expected = model(x)
    arch = architecture(model)
    assert arch["version"] == 2 and arch["skipped"] == ["blocks.2"]
    assert arch["value_dims"] == {"blocks.0.attn": [3, 8, 1, 6]}
    assert arch["reducers"]["blocks.3"] == [{"kind": "tome", "r": 2, "prop_attn": False, "protect": 1}]
    assert "blocks.2.attn.qkv.weight" not in model.state_dict()
    paths = save_compressed(tmp_path / "m", model.state_dict(), arch)

    for path in (paths["safetensors"], paths["pth"]):
        fresh = _vit(seed=1)
        sd, arch_read = read_weights(path)
        fit_to_checkpoint(fresh, sd, arch_read, str(path))
        fresh.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert_close(fresh(x), expected, atol=0, rtol=0)
        assert architecture(fresh) == arch


@pytest.mark.parametrize(
    "keep",
    [
        [torch.tensor([1, 2]), torch.arange(8), torch.tensor([0, 4, 6]), torch.tensor([5])],
        [torch.tensor([0, 3, 7]), torch.tensor([1, 2, 5]), torch.tensor([0, 4, 6]), torch.tensor([2, 5, 6])],
    ],
    ids=["uneven", "one_width"],
)
def test_value_widths_equal_the_masked_dense_attention(keep):
    model = _vit()
    block = model.blocks[0]
    mask = torch.zeros(4, 8)
    for h, k in enumerate(keep):
        mask[h, k] = 1
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        # dense: zero the value coordinates that are cut (their proj columns then read zeros)
        qkv = block.attn.qkv.weight.clone()
        v_rows = slice(64, 96)
        block.attn.qkv.weight[v_rows] *= mask.flatten()[:, None]
        block.attn.qkv.bias[v_rows] *= mask.flatten()
        dense = block(x)[0]
        block.attn.qkv.weight.copy_(qkv)
        block.attn.keep_value_dims(keep)
        width = sum(len(k) for k in keep)
        assert block.attn.value_inner_dim == width and block.attn.proj.in_features == width
        assert_close(block(x)[0], dense, atol=1e-5, rtol=1e-5)


def test_version_one_descriptions_still_load(tmp_path):
    model = _vit()
    model.blocks[1].attn.keep_head_dims(torch.arange(5))
    v1 = {"version": 1, "units": architecture(model)["units"], "scales": architecture(model)["scales"]}
    fresh = _vit(seed=1)
    apply_architecture(fresh, v1)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close(fresh(_images()), model(_images()))
    with pytest.raises(CheckpointError, match="version 3"):
        apply_architecture(_vit(), {"version": 3, "units": {}})


def test_a_description_naming_blocks_the_model_lacks_is_an_error():
    with pytest.raises(CheckpointError, match="blocks.7 is not a block"):
        apply_architecture(_vit(), {"version": 2, "units": {}, "skipped": ["blocks.7"]})
    with pytest.raises(CheckpointError, match="not blocks of the model"):
        apply_architecture(_vit(), {"version": 2, "units": {}, "reducers": {"head": [{"kind": "tome", "r": 1}]}})


def test_a_reduced_blip_model_round_trips_momentum_towers_included(tmp_path):
    cfg = tiny_blip.tiny_config(tmp_path)
    model = tiny_blip.build("retrieval", cfg)
    for vit in (model.visual_encoder, model.visual_encoder_m):
        vit.blocks[1].token_hooks.append(EViTReducer(0.5))
    arch = architecture(model)
    assert set(arch["reducers"]) == {"visual_encoder.blocks.1", "visual_encoder_m.blocks.1"}
    fresh = tiny_blip.build("retrieval", cfg)
    apply_architecture(fresh, json.loads(json.dumps(arch)))
    assert architecture(fresh) == arch


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_library_module_imports_the_command_line_layer():
    for folder in ("models", "pruners", "benchmarks", "tasks", "data"):
        for path in sorted((REPO / folder).glob("*.py")):
            assert "cli" not in _imports(path), f"{path.relative_to(REPO)} imports cli"
