"""The four BLIP task scripts end to end on a tiny world: train one epoch, then evaluate the checkpoint
with one process and with two (torchrun, gloo); the numbers must be equal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.synthetic import NLVR_FAMILIES, ensure_world

REPO = Path(__file__).resolve().parents[1]
MED = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "vocab_size": 134,
    "encoder_width": 32,
    "add_cross_attention": True,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "type_vocab_size": 2,
}


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    ensure_world(root / "world", n=48, image_size=32, seed=0, progress=False)
    (root / "med.json").write_text(json.dumps(MED))
    return root


def tiny_args(root, out, task):
    sets = {
        "world.dir": root / "world",
        "world.n": 48,
        "world.image_size": 32,
        "image_size": 32,
        "med_config": root / "med.json",
        "vit_embed_dim": 32,
        "vit_depth": 1,
        "vit_heads": 2,
        "batch_size_train": 8,
        "batch_size_test": 8,
        "warmup_steps": 0,
        "num_workers": 0,
        "pretrained": "",
    }
    if task == "caption":
        sets |= {"meteor": False, "max_length": 8, "min_length": 5, "num_beams": 2}
    if task == "retrieval":
        sets |= {"k_test": 4}
    if task == "vqa":
        sets |= {"k_test": 4}
    args = ["--demo", "--output_dir", str(out), "--epoch", "1"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def run(cmd):
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900, check=False)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


MAIN_METRIC = {
    "nlvr": ("val", "acc"),
    "text_assignment": ("val", "acc"),
    "caption": ("val", "CIDEr"),
    "vqa": ("test", "vqa_acc"),
    "retrieval": ("val", "r_mean"),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["nlvr", "caption", "vqa", "retrieval", "text_assignment"])
def test_train_then_equal_evaluation_on_one_and_two_processes(setup, tmp_path, task):
    script = "pretrain_nlvr.py" if task == "text_assignment" else f"compress_{task}.py"
    train = tmp_path / "train"
    run([sys.executable, script, *tiny_args(setup, train, task)])
    res = json.loads((train / "results.json").read_text())
    split, metric = MAIN_METRIC[task]
    assert res["task"] == task and metric in res["metrics"][split]
    assert (train / "log.jsonl").read_text().count("\n") == 1

    ckpt = res["checkpoint"]
    one, two = tmp_path / "eval1", tmp_path / "eval2"
    run([sys.executable, script, *tiny_args(setup, one, task), "--evaluate", "--pretrained", ckpt])
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            script,
            *tiny_args(setup, two, task),
            "--evaluate",
            "--pretrained",
            ckpt,
        ]
    )
    name = "eval_" + Path(ckpt).stem + ".json"
    m1 = json.loads((one / name).read_text())["metrics"]
    m2 = json.loads((two / name).read_text())["metrics"]
    assert m1 == m2
    assert m1[split][metric] == pytest.approx(res["metrics"][split][metric])


@pytest.mark.slow
def test_nlvr_fine_tunes_from_text_assignment_weights_without_their_head(setup, tmp_path):
    import torch

    ta = tmp_path / "ta"
    run([sys.executable, "pretrain_nlvr.py", *tiny_args(setup, ta, "text_assignment")])
    res = json.loads((ta / "results.json").read_text())
    val_images = json.loads((setup / "world" / "annotation" / "coco_karpathy_val.json").read_text())
    assert res["metrics"]["val"]["n"] == sum(len(e["caption"]) for e in val_images)  # every caption is an item
    assert "by_statement" not in res["metrics"]["val"]  # captions are no NLVR2 statements
    head = torch.load(res["checkpoint"], weights_only=True)["model"]["cls_head.2.weight"]
    assert head.shape[0] == 3

    twin = tmp_path / "twin.pth"
    run([sys.executable, "scripts/export_weights.py", res["checkpoint"], str(twin), "--drop", "cls_head"])
    out = tmp_path / "nlvr"
    p = run([sys.executable, "compress_nlvr.py", *tiny_args(setup, out, "nlvr"), "--set", f"pretrained={twin}"])
    assert "4 keys left initialised: cls_head.0.weight" in p.stderr + p.stdout
    nlvr = json.loads((out / "results.json").read_text())["metrics"]["val"]
    assert set(nlvr["by_statement"]) <= set(NLVR_FAMILIES)
