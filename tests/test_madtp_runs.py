"""MADTP end to end through the entry scripts on a tiny world: the four BLIP tasks and CLIP retrieval train with
tokens pruned in both towers, the controller's measured cost and keep counts reach results.json, the checkpoint
holds the temperature and the alignment tokens and evaluates again without pruner code; UPop's compressed model
pruned further by MADTP keeps its widths; the seed's selection switch and the refusals."""

import json

import pytest
import test_clip_runs
import test_runs_vl
import torch
from test_runs_vl import tiny_args

import cli
from models.arch import read_weights, save_compressed

setup = test_runs_vl.setup  # the tiny world and MED config


def madtp_args(*extra, p=0.05):
    """MADTP from the tiny random model, whose one or two blocks per tower can shed only a few tokens: a high
    temperature (near the most each layer prunes), four alignment tokens, the cost measured on two batches."""
    sets = {
        "pruner_pretrained": "",
        "madtp.cost_batches": 2,
        "madtp.sd_num": 4,
        "madtp.calibrate": "null",
        "madtp.temperature_init": 50.0,
        "measure_latency": False,
    }
    return ["--pruner", "madtp", "--p", str(p), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *extra]


def run(setup, out, task, *extra):
    return cli.main(task, argv=[str(a) for a in tiny_args(setup, out, task)] + madtp_args(*extra))


def check_run(res):
    """The pruner's report in results.json, and the exported checkpoint with its reducers and alignment tokens."""
    report = res["pruner_report"]
    assert report["reference_gmacs"] > report["eval_gmacs"] > 0  # tokens were pruned on the validation batches
    assert report["target_gmacs"] == pytest.approx(0.95 * report["reference_gmacs"])
    assert report["temperature"] > 0 and report["keep_counts"]
    assert all(isinstance(v, float) for v in report["keep_counts"].values())
    sd, arch = read_weights(res["compressed_checkpoint"])
    specs = [s for items in arch["reducers"].values() for s in items]
    assert specs and all(s["kind"] == "madtp" and s["temperature"] == report["temperature"] for s in specs)
    assert "madtp.space_dict" in sd
    return sd, arch


@pytest.mark.slow
@pytest.mark.parametrize("task", ["nlvr", "caption", "vqa", "retrieval"])
def test_madtp_trains_every_blip_task_and_its_checkpoint_evaluates_alone(setup, tmp_path, task):
    res = run(setup, tmp_path / "madtp", task)
    _, arch = check_run(res)
    towers = {name.split(".")[0] for name in arch["reducers"]}
    expected = {
        "nlvr": {"visual_encoder", "text_encoder"},
        "caption": {"visual_encoder"},  # the decoder runs with a cache: no text reducer, as the seed
        "vqa": {"visual_encoder", "text_encoder"},  # the question encoder; the answer decoder reads its state
        "retrieval": {"visual_encoder", "visual_encoder_m", "text_encoder", "text_encoder_m"},
    }[task]
    assert towers == expected
    if task != "caption":
        assert "alignment_loss" in res["pruner_report"]
    argv = [str(a) for a in tiny_args(setup, tmp_path / "eval", task)]
    again = cli.main(task, argv=argv + ["--evaluate", "--pretrained", res["compressed_checkpoint"]])
    assert again["metrics"] == res["metrics"]
    if task == "nlvr":  # with the pruner named too, the checkpoint's temperature still rules
        argv = [str(a) for a in tiny_args(setup, tmp_path / "eval2", task)] + madtp_args()
        argv += ["--set", "madtp.temperature_init=0.01", "--evaluate", "--pretrained", res["compressed_checkpoint"]]
        named = cli.main(task, argv=argv)
        assert named["pruner_report"]["temperature"] == res["pruner_report"]["temperature"] != 0.01
        assert named["metrics"] == res["metrics"]


@pytest.mark.slow
def test_madtp_on_clip_keeps_the_end_of_text_token_and_evaluates_alone(setup, tmp_path):
    extra = madtp_args("--set", "madtp.sd_dim=16", "--set", "madtp.q_map=true", "--set", "madtp.controller=clip")
    res = test_clip_runs.train(setup, tmp_path / "madtp", *extra)
    sd, arch = check_run(res)
    assert {"madtp.q_maps.vision_0.weight", "madtp.q_maps.text_0.weight"} <= set(sd)
    assert arch["reducers"]["text.blocks.0"][0]["keep_marked"] is True
    assert arch["reducers"]["visual_m.blocks.0"][0]["q_map"] == "vision_0"  # the momentum twin reads the online map
    metrics = test_clip_runs.evaluate(setup, res["compressed_checkpoint"], tmp_path / "eval")
    test_clip_runs.assert_same_metrics(metrics["test"], res["metrics"]["test"])


@pytest.mark.slow
def test_upop_then_madtp_keeps_the_compressed_widths_and_prunes_tokens(setup, tmp_path):
    upop = ["--pruner", "upop", "--p", "0.5", "--set", "upop.interval=2", "--set", "pruner_pretrained="]
    small = cli.main("nlvr", argv=[str(a) for a in tiny_args(setup, tmp_path / "upop", "nlvr")] + upop)
    _, upop_arch = read_weights(small["compressed_checkpoint"])
    res = run(setup, tmp_path / "both", "nlvr", "--pretrained", small["compressed_checkpoint"])
    _, arch = check_run(res)
    assert arch["units"] == upop_arch["units"]  # the structure UPop left, token reducers on top
    assert res["params"] == small["params"] + arch_alignment_params(arch)  # UPop's model and the alignment tokens
    argv = [str(a) for a in tiny_args(setup, tmp_path / "eval", "nlvr")]
    again = cli.main("nlvr", argv=argv + ["--evaluate", "--pretrained", res["compressed_checkpoint"]])
    assert again["metrics"] == res["metrics"]


def arch_alignment_params(arch):
    spec = next(s for items in arch["reducers"].values() for s in items)
    return spec["sd_num"] * spec["sd_dim"]


@pytest.mark.slow
def test_a_madtp_checkpoint_without_its_alignment_tokens_is_refused(setup, tmp_path):
    res = run(setup, tmp_path / "madtp", "nlvr")
    sd, arch = read_weights(res["compressed_checkpoint"])
    del sd["madtp.space_dict"]
    save_compressed(tmp_path / "broken", sd, arch)
    argv = [str(a) for a in tiny_args(setup, tmp_path / "eval", "nlvr")]
    with pytest.raises(Exception, match="madtp.space_dict"):
        cli.main("nlvr", argv=argv + ["--evaluate", "--pretrained", str(tmp_path / "broken.safetensors")])


@pytest.mark.slow
def test_selection_on_the_test_split_is_the_seeds_parity_switch(setup, tmp_path):
    res = run(setup, tmp_path / "test_sel", "nlvr", "--epoch", "2", "--set", "madtp.parity_select_on_test=true")
    log = [json.loads(line) for line in (tmp_path / "test_sel" / "log.jsonl").read_text().splitlines()]
    scored = [r for r in log if "test" in r and r["pruner"]["within_tolerance"]]
    if scored:  # the kept epoch is the best test accuracy among those within the FLOPs tolerance
        best = max(scored, key=lambda r: r["test"]["acc"])
        assert res["metrics"]["test"]["acc"] == best["test"]["acc"]


def test_madtp_needs_its_settings_before_any_work(setup, tmp_path):
    argv = [str(a) for a in tiny_args(setup, tmp_path / "x", "nlvr")]
    with pytest.raises(SystemExit, match="madtp: give --p"):
        cli.main("nlvr", argv=argv + ["--pruner", "madtp"])
    with pytest.raises(SystemExit, match="madtp.controller is 'nope'"):
        cli.main("nlvr", argv=argv + ["--pruner", "madtp", "--p", "0.5", "--set", "madtp.controller=nope"])
    assert not (tmp_path / "x" / "log.jsonl").exists()


def test_the_seed_release_file_without_temperature_is_refused(setup, tmp_path):
    from models.blip_nlvr import BlipNLVR

    cfg = cli.resolve_config("nlvr", cli.build_parser("nlvr").parse_args(tiny_args(setup, tmp_path / "c", "nlvr")))
    model = BlipNLVR(cfg, image_size=cfg["image_size"])
    sd = dict(model.state_dict(), space_dict=torch.randn(100, 32))
    torch.save({"model": sd, "epoch": 3}, tmp_path / "release.pth")
    argv = [str(a) for a in tiny_args(setup, tmp_path / "eval", "nlvr")]
    with pytest.raises(Exception, match="temperature"):
        cli.main("nlvr", argv=argv + ["--evaluate", "--pretrained", str(tmp_path / "release.pth")])
    torch.save({"model": sd, "epoch": 3, "temperature": 2.5}, tmp_path / "release.pth")
    res = cli.main("nlvr", argv=argv + ["--evaluate", "--pretrained", str(tmp_path / "release.pth"), "--overwrite"])
    assert set(res["metrics"]) == {"val", "test"}
