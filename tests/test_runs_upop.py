"""UPop end to end through the published-row scripts: search, compress and retrain a tiny BLIP NLVR under
torchrun with two processes (gloo), then evaluate the exported compressed checkpoint on one process."""

import json
import os
import subprocess
import sys

import pytest
import test_runs_vl
import torch
from test_runs_vl import REPO, env, tiny_args

from models.arch import read_weights

RUN = REPO / "scripts" / "upop" / "run.sh"
setup = test_runs_vl.setup  # the tiny world fixture


def sh(*args):
    e = dict(env(), NPROC="2", PYTHON=sys.executable)
    e["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{e['PATH']}"  # torchrun of this interpreter
    p = subprocess.run(["bash", str(RUN), *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"run.sh {args[:3]} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def test_every_row_script_is_valid_bash_and_names_its_ratio():
    scripts = sorted((REPO / "scripts" / "upop").glob("*.sh"))
    # 22 published rows (13 BLIP, 4 CLIP, 5 DeiT-S) x (compress, evaluate) + the shared runner
    assert len(scripts) == 45
    for path in scripts:
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert "compress nlvr configs/nlvr.yaml 0.75 23" in (REPO / "scripts/upop/compress_nlvr_4x.sh").read_text()
    clip = (REPO / "scripts/upop/compress_retrieval_flickr_clip_4x.sh").read_text()
    assert "compress retrieval configs/retrieval_flickr_clip.yaml 0.75 18" in clip


@pytest.mark.slow
def test_upop_nlvr_under_torchrun_then_evaluate_the_compressed_checkpoint(setup, tmp_path):
    out = tmp_path / "upop"
    # Without --demo --output_dir DIR (run.sh sets the output); from random weights, not a shipped model.
    tiny = [*tiny_args(setup, out, "nlvr")[3:], "--set", "pruner_pretrained="]
    sh(
        "compress",
        "nlvr",
        "configs/demo/nlvr.yaml",
        "0.5",
        "1",
        str(out),
        "--demo",
        *tiny,
        "--set",
        "upop.interval=2",
        "--set",
        "upop.search_epochs=1",
    )
    res = json.loads((out / "results.json").read_text())
    assert res["pruner"] == "upop" and res["world_size"] == 2
    assert res["params"] < res["dense"]["params"]
    assert res["pruner_report"]["compressed"] and res["pruner_report"]["p_t"] == 0.5
    phases = [json.loads(line)["phase"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert phases == ["search", "train"]

    st = res["compressed_checkpoint"]
    sd, arch = read_weights(st)
    assert arch["pruner"] == "upop" and arch["p"] == 0.5
    best = torch.load(res["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(sd[k], best[k]) for k in best)

    ev = tmp_path / "eval"
    sh("evaluate", "nlvr", "configs/demo/nlvr.yaml", st, str(ev), "--demo", *tiny)
    metrics = json.loads((ev / "eval_model_compressed.json").read_text())["metrics"]
    assert metrics["val"]["acc"] == pytest.approx(res["metrics"]["val"]["acc"])
    assert metrics["test"]["acc"] == pytest.approx(res["metrics"]["test"]["acc"])
