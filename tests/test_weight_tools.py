"""ViT initialisation from a classifier checkpoint, and the weight exporter."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils
from models.checkpoints import load_vit_weights
from models.vit import VisionTransformer, resample_pos_embed

REPO = Path(__file__).resolve().parents[1]


def vit(img_size, num_classes=0):
    torch.manual_seed(img_size + num_classes)
    return VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes
    )


def test_vit_init_drops_head_and_resamples(tmp_path):
    src = vit(32, num_classes=5)
    path = tmp_path / "cls.pth"
    torch.save({"model": src.state_dict(), "config": {}}, path)
    dst = vit(64)
    dropped = load_vit_weights(dst, path)
    assert dropped == ["head.weight", "head.bias"]
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert torch.allclose(dst.pos_embed, resample_pos_embed(src.pos_embed, 8))


def test_vit_init_rejects_another_architecture(tmp_path):
    other = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(utils.CheckpointError, match=r"other.pth does not fit the ViT.*shape mismatch"):
        load_vit_weights(vit(32), path)


def test_export_keeps_shared_tensors_and_halves(tmp_path):
    shared = torch.randn(4, 4)
    sd = {"a.weight": shared, "b.weight": shared, "c": torch.arange(3)}
    src, dst = tmp_path / "ckpt.pth", tmp_path / "w.pth"
    torch.save({"model": sd, "optimizer": {}, "rng": []}, src)
    subprocess.run(
        [sys.executable, "scripts/export_weights.py", str(src), str(dst), "--half"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    out = torch.load(dst, weights_only=True)
    assert set(out) == {"model"}
    m = out["model"]
    assert m["a.weight"].dtype == torch.float16 and m["c"].dtype == torch.int64
    assert m["a.weight"].data_ptr() == m["b.weight"].data_ptr()  # stored once, still shared
    assert torch.equal(m["a.weight"], shared.half())


def test_export_drops_a_module_and_names_a_missing_one(tmp_path):
    sd = {"cls_head.0.weight": torch.ones(2), "cls_head_extra.w": torch.ones(1), "text.w": torch.zeros(3)}
    src, dst = tmp_path / "ckpt.pth", tmp_path / "w.pth"
    torch.save({"model": sd}, src)

    def run(*extra):
        cmd = [sys.executable, "scripts/export_weights.py", str(src), str(dst), *extra]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)

    assert run("--drop", "cls_head").returncode == 0
    assert set(torch.load(dst, weights_only=True)["model"]) == {"cls_head_extra.w", "text.w"}  # whole names only
    bad = run("--drop", "merge_layer")
    assert bad.returncode != 0 and "no keys under merge_layer" in bad.stderr
