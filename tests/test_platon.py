"""PLATON (+ ID): the cubic schedule and its mask steps, the exact global count and the seed's per-tensor
rule, ID weighting by module name, persistent masks, resume, the magnitude baseline, and pruned BLIP
checkpoints that load for evaluation with the sparsity the pruner reported."""

import copy
import json
import subprocess
import sys

import pytest
import test_runs_vl
import torch
from test_runs_vl import REPO, run, tiny_args
from tiny_blip import SIZE, build, tiny_config

from models.vit import VisionTransformer
from pruners import PRUNER_DEFAULTS, PRUNERS
from pruners.platon import (
    Platon,
    load_ids,
    masked_tensors,
    measure_sparsity,
    prune_count,
    schedule,
    select_lowest,
)
from pruners.targets import targets
from tasks.common import blip_loader


def vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=0)


def pruner(model, max_epoch=1, **opts):
    p = Platon({"max_epoch": max_epoch, "platon": opts})
    p.attach(model)
    return p


def fake_grads(model, step):
    """Deterministic per-step gradients: the pruner reads only ``.grad``, so no data is needed."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


setup = test_runs_vl.setup  # the tiny world fixture


def train(model, pr, steps, total, opt=None, start=1):
    """The engine's order: backward, before_optimizer_step, optimizer step, pruner.step, zero_grad."""
    for s in range(start, start + steps):
        fake_grads(model, s)
        pr.before_optimizer_step(model)
        if opt is not None:
            opt.step()
        pr.step(model, s, total)
        model.zero_grad(set_to_none=True)


def keep_masks(pr):
    return [k.clone() for k in pr.keep]


def write_ids(path, values):
    path.write_text(json.dumps({name: {"id": v} for name, v in values.items()}))
    return str(path)


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_is_r0_until_ti_then_cubic_monotone_and_rf_after_T_minus_tf():
    T, ti, tf, r0, rf = 200, 40, 60, 1.0, 0.2
    rs = [schedule(t, T, ti, tf, r0, rf, 10)[0] for t in range(1, T + 1)]
    assert rs[:ti] == [r0] * ti  # t <= t_i
    assert rs[T - tf :] == [rf] * tf  # t > T - t_f
    assert all(a >= b for a, b in zip(rs, rs[1:]))
    for t in (41, 57, 100, 139, 140):
        x = (t - ti) / (T - ti - tf)
        assert schedule(t, T, ti, tf, r0, rf, 10)[0] == pytest.approx(rf + (r0 - rf) * (1 - x) ** 3, abs=1e-12)
    # No final warm-up: the last step lands exactly on rf.
    assert schedule(T, T, ti, 0, r0, rf, 7) == (rf, True)


def test_masking_fires_only_at_the_specified_steps():
    T, ti, tf, dt, epoch = 120, 20, 30, 7, 40
    fired = [t for t in range(1, T + 1) if schedule(t, T, ti, tf, 1.0, 0.1, dt, epoch)[1]]
    ramp = [t for t in range(ti + 1, T - tf + 1) if t % dt == 0 or t % epoch == 0]
    assert fired == ramp + list(range(T - tf + 1, T + 1))
    assert 40 in fired and 80 in fired  # epoch ends (not multiples of 7)

    # The pruner masks at exactly those steps, with warm-ups in epochs of the real steps per epoch (B1).
    model = vit()
    pr = pruner(model, max_epoch=3, initial_warmup=0.5, final_warmup=0.75, deltaT=dt, importance="magnitude")
    events = []
    original = pr.mask
    pr.mask = lambda r: (events.append(pr.last_step), original(r))
    train(model, pr, T, T)
    assert events == fired
    assert pr.report()["warmup_steps"] == 40


def test_prune_count_survives_float_error():
    assert prune_count(100, 0.43) == 57  # 100 * 0.57 = 56.99999999999999 in floats
    assert prune_count(69280, 0.2) == 55424
    assert prune_count(10, 1.0) == 0 and prune_count(10, 0.0) == 10


# ---------------------------------------------------------------------------------------------- selection


def test_select_lowest_is_exact_and_breaks_ties_by_position():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0, 0.5])
    chosen, tau = select_lowest(scores, 3)
    assert chosen.tolist() == [False, True, False, True, False, True] and tau == 1.0
    assert select_lowest(torch.zeros(10), 4)[0].tolist() == [True] * 4 + [False] * 6
    assert not select_lowest(scores, 0)[0].any() and select_lowest(scores, 6)[0].all()


@pytest.mark.parametrize("importance", ["platon", "magnitude", "taylor"])
@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.1337])
def test_one_mask_step_prunes_exactly_one_minus_r_of_the_masked_set(importance, ratio):
    model = vit(1)
    pr = pruner(model, importance=importance, deltaT=2, initial_warmup=10)  # warm-up: no masking while scoring
    train(model, pr, 5, 100)
    with torch.no_grad():  # ties everywhere: many equal magnitudes
        model.blocks[0].mlp.fc1.weight.copy_(model.blocks[0].mlp.fc1.weight.sign() * 0.01)
    fake_grads(model, 99)
    pr.mask(ratio)
    n = sum(t.param.numel() for t in pr.tensors)
    pruned = sum(int((~k).sum()) for k in pr.keep)
    assert pruned == prune_count(n, ratio)
    assert measure_sparsity(model)["masked_set"]["zeros"] >= pruned  # the pruned entries are zero


def test_seed_threshold_prunes_at_least_two_per_tensor_and_about_the_target():
    model = vit(2)
    pr = pruner(model, importance="magnitude", seed_threshold=True)
    with torch.no_grad():  # one tensor far more important than the rest: the global rule spares it entirely
        model.blocks[1].attn.proj.weight.mul_(1e3)
    pr.mask(0.5)
    per_tensor = [int((~k).sum()) for k in pr.keep]
    assert min(per_tensor) >= 2
    n = sum(t.param.numel() for t in pr.tensors)
    k = prune_count(n, 0.5)
    assert k - 1 <= sum(per_tensor) <= k - 1 + 2 * len(per_tensor)
    exact = pruner(vit(2), importance="magnitude")
    with torch.no_grad():
        exact.model.blocks[1].attn.proj.weight.mul_(1e3)
    exact.mask(0.5)
    assert sum(int((~k).sum()) for k in exact.keep) == k
    assert int((~exact.keep[[t.name for t in exact.tensors].index("blocks.1.attn.proj.weight")]).sum()) == 0


def test_magnitude_baseline_prunes_the_smallest_weights():
    model = vit(3)
    before = [t.param.detach().abs().clone() for t in masked_tensors(model)]
    pr = pruner(model, importance="magnitude")
    pr.mask(0.3)
    pruned = torch.cat([b[~k] for b, k in zip(before, pr.keep)])
    kept = torch.cat([b[k] for b, k in zip(before, pr.keep)])
    assert pruned.max() <= kept.min()
    assert all(bool((t.param[~k] == 0).all()) for t, k in zip(pr.tensors, pr.keep))


def test_biases_are_masked_with_the_weights_unless_switched_off():
    model = vit(4)
    names = [t.name for t in pruner(model).tensors]
    assert names[:2] == ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"] and len(names) == 16
    assert all(n.endswith(".weight") for n in (t.name for t in pruner(vit(4), mask_bias=False).tensors))


# ---------------------------------------------------------------------------------------------- ID weighting


def _platon_masks(model, ids_file=None, ratio=0.4):
    pr = pruner(model, deltaT=2, initial_warmup=10, use_id=ids_file or "")
    train(model, pr, 6, 100)
    fake_grads(model, 50)
    pr.mask(ratio)
    return keep_masks(pr)


def test_id_scale_invariance_and_all_ones_equals_off(tmp_path):
    names = [t.name for t in targets(vit())]
    gen = torch.Generator().manual_seed(5)
    ids = {n: float(v) for n, v in zip(names, 5 + 60 * torch.rand(len(names), generator=gen))}
    with_id = _platon_masks(vit(5), write_ids(tmp_path / "a.json", ids))
    times7 = _platon_masks(vit(5), write_ids(tmp_path / "b.json", {n: 7 * v for n, v in ids.items()}))
    assert all(torch.equal(a, b) for a, b in zip(with_id, times7))
    off = _platon_masks(vit(5))
    ones = _platon_masks(vit(5), write_ids(tmp_path / "c.json", dict.fromkeys(names, 1.0)))
    assert all(torch.equal(a, b) for a, b in zip(off, ones))
    assert not all(torch.equal(a, b) for a, b in zip(off, with_id))  # the IDs did change something


def test_a_layer_with_higher_id_is_pruned_less(tmp_path):
    model = vit(6)
    with torch.no_grad():  # two layers with identical weights: only their ID differs
        model.blocks[1].attn.proj.weight.copy_(model.blocks[0].attn.proj.weight)
        model.blocks[1].attn.proj.bias.copy_(model.blocks[0].attn.proj.bias)
    ids = dict.fromkeys((t.name for t in targets(model)), 10.0)
    ids["blocks.1.attn.proj"] = 30.0
    pr = pruner(model, importance="magnitude", use_id=write_ids(tmp_path / "ids.json", ids))
    pr.mask(0.5)
    per_module = pr.report()["sparsity"]["per_module"]
    assert per_module["blocks.1.attn.proj"] < per_module["blocks.0.attn.proj"]
    assert pr.report()["id_mean"]["vision"] == pytest.approx(12.5)


def test_with_blip_like_ids_vision_is_pruned_less_than_language(tiny, tmp_path):
    """The seed's caption ID table averages 67.9 over vision modules and 30.4 over text ones."""
    torch.manual_seed(12)
    model = build("caption", tiny)
    ids = {t.name: 67.9 if t.modality == "vision" else 30.4 for t in targets(model)}
    pr = pruner(model, importance="magnitude", use_id=write_ids(tmp_path / "ids.json", ids))
    pr.mask(0.2)
    sp = pr.report()["sparsity"]
    assert sp["masked_set"]["zeros"] == prune_count(sp["masked_set"]["numel"], 0.2)
    assert sp["per_modality"]["vision"]["sparsity"] < 0.8 < sp["per_modality"]["text"]["sparsity"]
    plain = pruner(build("caption", tiny), importance="magnitude")
    plain.mask(0.2)
    assert plain.report()["sparsity"]["per_modality"]["vision"]["sparsity"] > sp["per_modality"]["vision"]["sparsity"]


def test_id_file_names_must_match_the_masked_modules(tmp_path):
    names = [t.name for t in targets(vit())]
    bad = dict.fromkeys(names[1:], 3.0) | {"blocks.9.attn.qkv": 3.0}
    with pytest.raises(ValueError, match=r"missing: blocks\.0\.attn\.qkv.*not masked here: blocks\.9\.attn\.qkv"):
        pruner(vit(), use_id=write_ids(tmp_path / "bad.json", bad))
    with pytest.raises(ValueError, match="positive"):
        load_ids(write_ids(tmp_path / "neg.json", dict.fromkeys(names, -1.0)), names)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_ids(tmp_path / "nope.json", names)


def test_positional_tables_need_a_name_list(tmp_path):
    names = [t.name for t in targets(vit())]
    table = tmp_path / "result_id.txt"
    table.write_text("".join(f"{10 + i}\n" for i in range(len(names))))
    with pytest.raises(ValueError, match="id_names"):
        load_ids(table, names)
    listing = tmp_path / "ID.txt"  # compute_id.py's listing
    listing.write_text("".join(f"name: {n}, modality: vision\n" for n in names))
    assert load_ids(table, names, listing) == {n: 10.0 + i for i, n in enumerate(names)}
    listing.write_text("".join(f"{n}\n" for n in reversed(names)))  # a plain list, in another order
    assert load_ids(table, names, listing)[names[0]] == 10.0 + len(names) - 1
    listing.write_text("".join(f"{n}\n" for n in names[:-1]))
    with pytest.raises(ValueError, match="names 7 modules"):
        load_ids(table, names, listing)


# ---------------------------------------------------------------------------------------------- persistence


def test_pruned_weights_stay_exactly_zero_and_the_pruned_set_only_grows():
    model = vit(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    pr = pruner(model, max_epoch=4, initial_warmup=1, final_warmup=1, deltaT=5, mask_at_epoch_end=False)
    total = 40  # 10 steps per epoch: ramp over steps 11..30, masking every 5 steps
    train(model, pr, 15, total, opt)
    first = keep_masks(pr)
    assert sum(int((~k).sum()) for k in first) > 0
    for s in range(16, 41):
        train(model, pr, 1, total, opt, start=s)
        now = keep_masks(pr)
        assert all(bool((a | ~b).all()) for a, b in zip(first, now))  # pruned stays pruned
        assert all(bool((t.param[~k] == 0).all()) for t, k in zip(pr.tensors, now))
        first = now
    n = sum(k.numel() for k in first)
    assert sum(int((~k).sum()) for k in first) == prune_count(n, 0.2)


def test_seed_regrow_lets_pruned_weights_come_back_between_events():
    model = vit(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pr = pruner(model, max_epoch=4, initial_warmup=1, final_warmup=1, deltaT=5, seed_regrow=True)
    train(model, pr, 15, 40, opt)  # last event at step 15
    train(model, pr, 2, 40, opt, start=16)
    assert any(bool((t.param[~k] != 0).any()) for t, k in zip(pr.tensors, pr.keep))


def test_reset_each_epoch_restarts_the_scores():
    model = vit(8)
    pr = pruner(model, max_epoch=2, initial_warmup=10, deltaT=2, reset_each_epoch=True)
    train(model, pr, 6, 20)
    assert any(bool(x.any()) for x in pr.ibar)
    pr.epoch_end(0, None)
    assert not any(bool(x.any()) for x in (*pr.ipt, *pr.ibar, *pr.ubar))


def test_only_epochs_at_the_final_ratio_compete_for_the_best_checkpoint():
    model = vit(9)
    pr = pruner(model, max_epoch=3, initial_warmup=0, final_warmup=1, deltaT=3)
    train(model, pr, 10, 30)
    assert not pr.at_target()  # still ramping at the end of epoch 0
    train(model, pr, 10, 30, start=11)
    assert pr.at_target()  # the ramp ends with epoch 1
    train(model, pr, 10, 30, start=21)
    assert pr.at_target()


def test_resume_restores_scores_and_masks_exactly(tmp_path):
    def fresh():
        model = vit(10)
        return model, pruner(model, max_epoch=2, initial_warmup=0, final_warmup=0.5, deltaT=3)

    straight, pa = fresh()
    train(straight, pa, 20, 20)

    model, pb = fresh()
    train(model, pb, 9, 20)
    torch.save({"pruner": pb.state_dict(), "model": model.state_dict()}, tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    resumed, pc = fresh()
    pc.load_state_dict(ckpt["pruner"])
    resumed.load_state_dict(ckpt["model"])
    assert all(torch.equal(a, b) for a, b in zip(pb.ibar + pb.ubar + pb.keep, pc.ibar + pc.ubar + pc.keep))
    train(resumed, pc, 11, 20, start=10)
    for name in ("keep", "ipt", "ibar", "ubar"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(pa, name), getattr(pc, name))), name
    assert pc.report()["mask_events"] == pa.report()["mask_events"]
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))

    with pytest.raises(ValueError, match="tensors"):
        pruner(vit(), mask_bias=False).load_state_dict(ckpt["pruner"])


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("tiny_platon"))


@pytest.mark.parametrize("task", ["nlvr", "caption"])
def test_pruned_blip_checkpoint_round_trips_with_the_reported_sparsity(tiny, task, tmp_path):
    torch.manual_seed(11)
    model = build(task, tiny)
    pr = pruner(model, max_epoch=1, initial_warmup=0, final_warmup=0.5, deltaT=2, final_threshold=0.2)
    total = 6
    train(model, pr, total, total)
    report = pr.report()
    n = report["mask"]["numel"]
    assert report["mask"]["pruned"] == prune_count(n, 0.2) and report["remaining_ratio"] == 0.2
    sp = report["sparsity"]
    parts = {"nlvr": {"vision", "text", "cross"}, "caption": {"vision", "decoder", "cross"}}[task]
    assert set(sp["per_part"]) == parts and set(sp["per_modality"]) == {"vision", "text"}
    assert sp["masked_set"]["numel"] == sp["weights"]["numel"] + sp["biases"]["numel"] == n
    assert len(sp["per_module"]) == len(targets(model))

    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": model.state_dict(), "config": {}}, path)
    fresh = build(task, tiny)
    blip_loader(task)(fresh, str(path), {})
    assert measure_sparsity(fresh) == sp
    if task == "nlvr":  # and it evaluates as the pruned model did
        model.eval()
        fresh.eval()
        img = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(fresh(img, ["a red circle", "two"]), model(img, ["a red circle", "two"]))


def test_registered_with_its_defaults_and_flags():
    assert PRUNERS["platon"] is Platon and PRUNER_DEFAULTS["platon"]["final_threshold"] == 0.2
    assert Platon.FLAGS["--final_threshold"][0] == "platon.final_threshold"
    assert Platon.FLAGS["--useID"][0] == "platon.use_id"
    with pytest.raises(ValueError, match="importance"):
        Platon({"platon": {"importance": "random"}})
    with pytest.raises(ValueError, match="final_threshold"):
        Platon({"platon": {"final_threshold": 1.5}})
    assert Platon({"platon": {"importance": "PLATON"}}).opts["importance"] == "platon"  # the seed's spelling
    assert copy.deepcopy(Platon.DEFAULTS) == Platon.DEFAULTS


@pytest.mark.slow
def test_demo_script_prunes_then_the_checkpoint_evaluates_to_the_same_accuracy(setup, tmp_path):
    """compress_nlvr.py --pruner platon end to end on a tiny world, then --evaluate --pretrained on its checkpoint."""
    out = tmp_path / "platon"
    args = [*tiny_args(setup, out, "nlvr"), "--set", "pruner_pretrained="]
    args += ["--pruner", "platon", "--final_threshold", "0.25", "--deltaT", "2", "--initial_warmup", "0"]
    run([sys.executable, "compress_nlvr.py", *args, "--final_warmup", "0.5"])
    res = json.loads((out / "results.json").read_text())
    rep = res["pruner_report"]
    assert res["pruner"] == "platon" and set(res["dense"]["metrics"]) == {"val", "test"}
    assert rep["mask"]["pruned"] == prune_count(rep["mask"]["numel"], 0.25) and rep["remaining_ratio"] == 0.25
    assert rep["sparsity"]["masked_set"]["zeros"] >= rep["mask"]["pruned"]
    logged = [json.loads(line)["pruner"]["mask_events"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged[-1] == rep["mask_events"] > 0

    ev = tmp_path / "eval"
    run(
        [
            sys.executable,
            "compress_nlvr.py",
            *tiny_args(setup, ev, "nlvr"),
            "--evaluate",
            "--pretrained",
            res["checkpoint"],
        ]
    )
    metrics = json.loads((ev / "eval_checkpoint_best.json").read_text())["metrics"]
    assert metrics["val"]["acc"] == pytest.approx(res["metrics"]["val"]["acc"])
    assert metrics["test"]["acc"] == pytest.approx(res["metrics"]["test"]["acc"])


def test_row_scripts_are_valid_bash_and_run_the_seeds_80_percent_rows():
    scripts = sorted((REPO / "scripts" / "platon").glob("*.sh"))
    assert len(scripts) == 16  # 6 rows x (compress, evaluate) + 3 ID tables + the shared runner
    for path in scripts:
        subprocess.run(["bash", "-n", str(path)], check=True)
    text = (REPO / "scripts/platon/compress_nlvr_80_id.sh").read_text()
    assert "compress nlvr configs/nlvr.yaml 0.2" in text and "--useID" in text and "compute_ids_nlvr.sh" in text
    text = (REPO / "scripts/platon/compress_retrieval_flickr_clip_80_id.sh").read_text()
    assert "compress retrieval configs/retrieval_flickr_clip.yaml 0.2" in text and "--useID" in text
