"""UVC through the entry script: search, materialise, post-train, the export evaluated without pruner code, and the
early refusals (exact resume in the middle of the search: tests/test_runs.py)."""

from __future__ import annotations

import json

import pytest

import cli
from models.arch import read_weights


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data.synthetic import ensure_world

    root = tmp_path_factory.mktemp("uvc_world")
    ensure_world(root / "world", n=96, image_size=32, seed=0, progress=False)
    return root


def args(world, out, *extra, **sets):
    sets = {
        "world.dir": world / "world",
        "world.n": 96,
        "world.image_size": 32,
        "image_size": 32,
        "patch_size": 8,
        "embed_dim": 48,
        "depth": 3,
        "num_heads": 3,
        "batch_size_train": 16,
        "max_epoch": 1,
        "pruner_pretrained": "",
        "teacher.path": "",
        "uvc.search_epochs": 3,
        "uvc.warmup_epochs": 1,
        "uvc.search_warmup_steps": 0,
        "uvc.gating_interval": 2,
        "uvc.gating_weight": 0.5,
        "uvc.glr": 1.0,
        "uvc.select_by": "last",
        **sets,
    }
    argv = ["--demo", "--output_dir", str(out), "--pruner", "uvc", "--budget", "0.6", *extra]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    return [str(a) for a in argv]


def test_search_materialise_post_train_and_evaluate_alone(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "run"
    res = cli.main("classification", argv=args(world, out))
    report = res["pruner_report"]
    assert report["materialised"] and 0 < report["R_materialised"] < 1
    assert res["flops"] < res["dense"]["flops"]
    assert res["flops_analytic"] == pytest.approx(res["flops"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["search"] * 3 + ["post_train"]
    assert log[0]["pruner"]["warm"] is True and log[1]["pruner"]["warm"] is False
    st = res["compressed_checkpoint"]
    sd, arch = read_weights(st)
    assert not any("gates" in k or "mask" in k for k in sd)
    full = args(world, tmp_path / "eval", "--evaluate", "--pretrained", st)
    plain, k = ["--config", "configs/demo/classification_uvc.yaml"], 0
    while k < len(full):  # evaluated without the pruner: no --pruner, --budget or uvc.* keys
        if full[k] in ("--pruner", "--budget") or (full[k] == "--set" and full[k + 1].startswith("uvc.")):
            k += 2
            continue
        plain.append(full[k])
        k += 1
    again = cli.main("classification", argv=plain)
    assert again["metrics"] == res["metrics"]


def test_bad_settings_fail_before_any_data_is_read(world, tmp_path):
    with pytest.raises((ValueError, SystemExit), match="budget"):
        cli.main("classification", argv=args(world, tmp_path / "a", "--p", "0.5"))
    with pytest.raises((ValueError, SystemExit), match="zlr_mode"):
        cli.main("classification", argv=args(world, tmp_path / "b", "--zlr_mode", "sometimes"))


def test_a_pruner_demo_config_is_read_only_where_the_pruner_declares_one():
    from tasks import registry

    _, config = registry.resolve("classification", None, demo=True, pruner="uvc")
    assert config["_source"].endswith("configs/demo/classification_uvc.yaml")
    # configs/demo/nlvr_evit.yaml is a demo of its own, named with --config; --demo --pruner evit keeps nlvr.yaml
    _, config = registry.resolve("nlvr", None, demo=True, pruner="evit")
    assert config["_source"].endswith("configs/demo/nlvr.yaml")
