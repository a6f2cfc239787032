"""End-to-end runs of an entry script in subprocesses: torchrun (gloo), kill and resume, bad inputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.synthetic import ensure_world

REPO = Path(__file__).resolve().parents[1]
# A tiny classifier so that each run takes seconds.
TINY = [
    "--set",
    "depth=2",
    "--set",
    "embed_dim=24",
    "--set",
    "num_heads=2",
    "--set",
    "batch_size_train=8",
    "--set",
    "batch_size_test=16",
    "--set",
    "warmup_steps=0",
    "--set",
    "num_workers=0",
]


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "w"
    ensure_world(root, n=96, image_size=32, seed=0)
    return root


def args_for(world, out, epochs=2, extra=()):
    return [
        "--demo",
        "--output_dir",
        str(out),
        "--set",
        f"world.dir={world}",
        "--set",
        "world.n=96",
        "--set",
        "world.image_size=32",
        "--set",
        "image_size=32",
        "--epoch",
        str(epochs),
        *TINY,
        *extra,
    ]


def run(cmd, check=True):
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def script(*args):
    return [sys.executable, "compress_classification.py", *args]


def torchrun(n, *args):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "compress_classification.py",
        *args,
    ]


def final_params(out):
    return torch.load(Path(out) / "checkpoint_last.pth", weights_only=True)["model"]


def test_help_explains_flags():
    p = run(script("--help"))
    for flag in ("--config", "--pretrained", "--evaluate", "--resume", "--pruner", "--set", "--demo", "torchrun"):
        assert flag in p.stdout


@pytest.mark.slow
def test_torchrun_two_processes_and_equal_evaluation(world, tmp_path):
    out = tmp_path / "ddp"
    run(torchrun(2, *args_for(world, out)))
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["task"] == "classification" and res["pruner"] == "none"
    assert res["params"] > 0 and Path(res["checkpoint"]).exists()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2

    # The same checkpoint evaluated by one process and by two gives the same numbers.
    ckpt = res["checkpoint"]
    one, two = tmp_path / "eval1", tmp_path / "eval2"
    run(script(*args_for(world, one), "--evaluate", "--pretrained", ckpt))
    run(torchrun(2, *args_for(world, two), "--evaluate", "--pretrained", ckpt))
    # An evaluation writes eval_<checkpoint name>.json, never results.json.
    assert not (one / "results.json").exists()
    m1 = json.loads((one / "eval_checkpoint_best.json").read_text())["metrics"]
    m2 = json.loads((two / "eval_checkpoint_best.json").read_text())["metrics"]
    assert m1 == m2 and m1["val"]["n"] == len(list((Path(world) / "imagenet" / "val").rglob("*.JPEG")))


# UPop: one search epoch (compression at its end), then two retrain epochs; the kill lands after the
# compression, so the resume must rebuild the compressed model and its fresh optimizer.
UPOP = ("--pruner", "upop", "--set", "upop.search_epochs=1", "--set", "upop.interval=2", "--set", "p=0.5")


# UVC: a warm-up epoch and one search epoch, then one post-training epoch; the kill lands after the warm-up, so the
# resume must restore the counts, duals, gates (and their buffers) and the noise of the search.
UVC = (
    "--pruner", "uvc", "--budget", "0.6", "--set", "uvc.search_epochs=2", "--set", "uvc.warmup_epochs=1",
    "--set", "uvc.search_warmup_steps=0", "--set", "uvc.gating_interval=2", "--set", "uvc.gating_weight=0.5",
    "--set", "uvc.select_by=last", "--set", "pruner_pretrained=", "--set", "teacher.path=",
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("pruner, epochs", [((), 3), (UPOP, 2), (UVC, 1)], ids=["dense", "upop", "uvc"])
def test_killed_run_resumes_to_the_same_parameters(world, tmp_path, pruner, epochs):
    full = tmp_path / "full"
    run(script(*args_for(world, full, epochs=epochs, extra=pruner)))

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        script(*args_for(world, cut, epochs=epochs, extra=pruner)),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = cut / "log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(log.read_text().splitlines()) < 3

    run(script(*args_for(world, cut, epochs=epochs, extra=pruner), "--resume", str(cut / "checkpoint_last.pth")))
    a, b = final_params(full), final_params(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(log.read_text().splitlines()) == 3
    if pruner:  # the resumed run finished compressed, exactly like the uninterrupted one
        res = json.loads((cut / "results.json").read_text())
        assert res["params"] < res["dense"]["params"] and Path(res["compressed_checkpoint"]).exists()


def test_unknown_config_key_is_named_and_nothing_written(world, tmp_path):
    out = tmp_path / "bad"
    p = run(script(*args_for(world, out, extra=["--set", "init_lrr=1e-4"])), check=False)
    assert p.returncode != 0
    assert "unknown config key 'init_lrr'" in p.stderr and "did you mean 'init_lr'" in p.stderr
    assert not out.exists()


def test_wrong_type_is_named(world, tmp_path):
    p = run(script(*args_for(world, tmp_path / "o", extra=["--set", "batch_size_train=big"])), check=False)
    assert p.returncode != 0 and "'batch_size_train'" in p.stderr and "expects int" in p.stderr


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "missing.yaml"
    p = run(script("--config", str(missing), "--output_dir", str(tmp_path / "o")), check=False)
    assert p.returncode != 0 and str(missing) in p.stderr


@pytest.mark.slow
def test_unreadable_image_is_named_and_overwrites_nothing(world, tmp_path):
    out = tmp_path / "run"
    run(script(*args_for(world, out, epochs=1)))
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.suffix in (".pth", ".json", ".yaml", ".jsonl")}

    broken = tmp_path / "broken_world"
    shutil.copytree(world, broken)
    victim = sorted((broken / "imagenet" / "train").rglob("*.JPEG"))[3]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: ImageFolder still lists it
    p = run(script(*args_for(broken, out, epochs=2), "--resume", str(out / "checkpoint_last.pth")), check=False)
    assert p.returncode != 0
    assert victim.name in p.stderr
    after = {f.name: f.read_bytes() for f in out.iterdir() if f.name in before}
    assert after == before


def test_existing_run_is_not_silently_restarted(world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint_last.pth").write_bytes(b"x")
    p = run(script(*args_for(world, out)), check=False)  # --demo runs are no exception
    assert p.returncode != 0 and "--resume" in p.stderr
    assert (out / "checkpoint_last.pth").read_bytes() == b"x"


def test_freeze_keeps_the_named_modules_fixed_in_a_dense_run(world, tmp_path):
    first = tmp_path / "first"
    run(script(*args_for(world, first, epochs=1)))
    start = final_params(first)
    frozen = tmp_path / "frozen"
    extra = ["--pretrained", str(first / "checkpoint_last.pth"), "--set", "freeze=[patch_embed, blocks.0]"]
    p = run(script(*args_for(world, frozen, epochs=1, extra=extra)))
    assert "froze" in p.stderr + p.stdout
    end = final_params(frozen)
    fixed = [k for k in start if k.startswith(("patch_embed.", "blocks.0."))]
    assert fixed and all(torch.equal(start[k], end[k]) for k in fixed)
    assert not torch.equal(start["blocks.1.mlp.fc1.weight"], end["blocks.1.mlp.fc1.weight"])

    p = run(script(*args_for(world, tmp_path / "bad", epochs=1, extra=["--set", "freeze=[blocks.9]"])), check=False)
    assert p.returncode != 0 and "'blocks.9' names no parameter" in p.stderr and "'blocks'" in p.stderr
