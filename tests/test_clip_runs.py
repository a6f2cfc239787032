"""CLIP retrieval end to end through compress_retrieval.py on a tiny world: a dense run evaluated with one process and
with two (torchrun, gloo) to equal numbers; UPop searching both towers, whose exported model evaluates without pruner
code to the run's numbers; compute_id on CLIP, and PLATON with and without its IDs at an exact sparsity."""

import json
import sys
from pathlib import Path

import pytest
import test_runs_vl
from test_runs_vl import run

from models.arch import read_weights

setup = test_runs_vl.setup  # the tiny world fixture
CONFIG = "configs/demo/retrieval_clip.yaml"


def clip_sets(root):
    """--set flags of a tiny CLIP (one block per tower, width 32) on the tiny world, from random weights."""
    sets = {
        "world.dir": root / "world",
        "world.n": 48,
        "world.image_size": 32,
        "image_size": 32,
        "clip_arch.vision_width": 32,
        "clip_arch.vision_layers": 1,
        "clip_arch.vision_heads": 2,
        "clip_arch.text_width": 32,
        "clip_arch.text_layers": 1,
        "clip_arch.text_heads": 2,
        "clip_arch.embed_dim": 16,
        "queue_size": 16,
        "batch_size_train": 8,
        "batch_size_test": 8,
        "warmup_steps": 0,
        "num_workers": 0,
        "pretrained": "",
        "pruner_pretrained": "",  # pruners start from these random weights, not the shipped demo model
        "measure_latency": False,
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def train(root, out, *extra, epochs=1):
    run(
        script("--demo", "--config", CONFIG, "--output_dir", str(out), "--epoch", str(epochs), *clip_sets(root), *extra)
    )
    return json.loads((out / "results.json").read_text())


def evaluate(root, checkpoint, out, launcher=()):
    cmd = ["compress_retrieval.py", "--demo", "--config", CONFIG, "--evaluate", "--pretrained", str(checkpoint)]
    run([*(launcher or [sys.executable]), *cmd, "--output_dir", str(out), *clip_sets(root)])
    name = f"eval_{Path(checkpoint).stem}.json"
    return json.loads((out / name).read_text())["metrics"]


def assert_same_metrics(a, b):
    """Recalls and their 95 % intervals (lists) equal to float tolerance."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key]), key


def script(*args):
    return [sys.executable, "compress_retrieval.py", *args]


@pytest.mark.slow
def test_dense_clip_run_evaluates_alike_on_one_and_two_processes(setup, tmp_path):
    res = train(setup, tmp_path / "dense")
    assert res["backbone"] == "clip" and set(res["metrics"]["test"]) >= {"txt_r1", "img_r10", "r_mean"}
    assert res["macs"] == pytest.approx(res["macs_analytic"])
    one = evaluate(setup, res["checkpoint"], tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--"]
    two = evaluate(setup, res["checkpoint"], tmp_path / "two", launcher=torchrun)
    assert one == two
    assert_same_metrics(one["test"], res["metrics"]["test"])


@pytest.mark.slow
def test_upop_on_clip_exports_a_model_that_evaluates_without_the_pruner(setup, tmp_path):
    upop = ["--pruner", "upop", "--p", "0.5", "--set", "upop.interval=2", "--set", "upop.attn_cost=36"]
    res = train(setup, tmp_path / "upop", *upop)
    assert res["params"] < res["dense"]["params"] and res["pruner_report"]["compressed"]
    assert set(res["pruner_report"]["kept"]) == {"vision_attn", "vision_ffn", "text_attn", "text_ffn"}
    sd, arch = read_weights(res["compressed_checkpoint"])
    assert arch["scales"]["visual.blocks.0.attn"] == pytest.approx(16**-0.5)  # the dense scale, kept
    assert sd["visual_m.blocks.0.mlp.fc1.weight"].shape == sd["visual.blocks.0.mlp.fc1.weight"].shape
    metrics = evaluate(setup, res["compressed_checkpoint"], tmp_path / "eval")
    assert_same_metrics(metrics["test"], res["metrics"]["test"])


@pytest.mark.slow
def test_compute_id_on_clip_then_platon_with_and_without_ids_is_exact(setup, tmp_path):
    ids = tmp_path / "ids"
    run([sys.executable, "compute_id.py", "--demo", "--config", CONFIG, "-n", "24", "--batch_size", "8", "--cpu",
         "--estimator", "textbook", "--output", str(ids), *clip_sets(setup)])  # fmt: skip
    table = json.loads((ids / "ids.json").read_text())
    assert list(table) == [f"{t}.blocks.0.{m}" for t in ("visual", "text") for m in ("attn.proj", "mlp.fc1", "mlp.fc2")]
    for use_id in ("", str(ids / "ids.json")):
        tag = "_id" if use_id else ""
        res = train(setup, tmp_path / f"platon{tag}", "--pruner", "platon", "--p", "0.8",
                    *(["--useID", use_id] if use_id else []), epochs=2)  # fmt: skip
        assert res["pruner_report"]["mask"]["sparsity"] == pytest.approx(0.8, abs=1e-4)
        assert res["pruner_report"]["sparsity"]["masked_set"]["sparsity"] == pytest.approx(0.8, abs=1e-4)
        metrics = evaluate(setup, res["checkpoint"], tmp_path / f"eval{tag}")
        assert_same_metrics(metrics["test"], res["metrics"]["test"])
