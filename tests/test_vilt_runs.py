"""ViLT end to end through the entry scripts on a tiny world: VQA (metrics with intervals, the EvalAI result file),
SNLI-VE and NLVR2 fine-tuning, PuMer with a distilled teacher (its exported reducers evaluate without pruner code, at
fewer FLOPs), ToMe over the joint text + image sequence, ViLT pre-training (ITM + MLM), the refusals, and the
engine's PuMer recipe (linear decay after a warm-up share, AdamW betas), and image-text retrieval (recall over every
pair of a split, its collate, evaluation and train step checked by hand, PuMer on it, the rank head from ITM).

The model is a random 3-block ViLT (width 32, 2 heads, 8-px patches on 32-px images), saved by the module as the
"pre-trained" file with ITM and MLM heads, so no shipped checkpoint is needed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import cli
import compress_nlvr
import compress_retrieval
import compress_ve
import compress_vqa
import pretrain
import utils
from config import load_yaml
from data.synthetic import ensure_world
from engine import Engine, EngineConfig
from models.arch import read_weights
from models.token_ops import PuMerReducer, ToMeReducer
from models.vilt import ViLT
from pruners.token_budget import analytic_flops
from tasks import vilt_retrieval
from tasks.metrics import vqa_accuracy, wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
N, SIZE = 24, 32  # the world: 24 training scenes (72 VQA questions), 20-scene held-out splits, 32-px images
DEPTH, HIDDEN = 3, 32
TINY = {"vilt_hidden": HIDDEN, "vilt_depth": DEPTH, "vilt_heads": 2, "vilt_patch_size": 8, "image_size": SIZE}
IMAGE_TOKENS = (SIZE // 8) ** 2 + 1  # 16 patches and the image CLS
BATCH = 8


def _tiny_vilt(head: str, vocab: int, labels: int = 0, max_text_len: int = 32, seed: int = 0) -> ViLT:
    torch.manual_seed(seed)
    return ViLT(
        head, labels, hidden=HIDDEN, depth=DEPTH, heads=2, patch_size=8, image_size=SIZE, vocab_size=vocab,
        max_text_len=max_text_len,
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world, and a random ViLT with pre-training heads (ITM, MLM) as the pre-trained file."""
    root = tmp_path_factory.mktemp("vilt")
    ensure_world(root / "world", n=N, image_size=SIZE, seed=0, progress=False)
    ann = root / "world" / "annotation"
    vocab = len((root / "world" / "tokenizer" / "vocab.txt").read_text().split())
    pretrained = root / "vilt_tiny_pretrain.pth"
    torch.save({"model": _tiny_vilt("pretrain", vocab).state_dict()}, pretrained)
    answers = json.loads((ann / "vqa2_label2ans.json").read_text())
    return SimpleNamespace(root=root, ann=ann, vocab=vocab, pretrained=pretrained, answers=answers)


def vilt_args(world, out, *extra, pretrained=None):
    """A one-epoch demo run of the tiny ViLT (``--set backbone=vilt`` picks the ViLT demo config)."""
    sets = {
        "backbone": "vilt",
        "world.dir": world.root / "world",
        "world.n": N,
        "world.image_size": SIZE,
        **TINY,
        "vilt_vocab_size": world.vocab,
        "pretrained": world.pretrained if pretrained is None else pretrained,
        "batch_size_train": BATCH,
        "batch_size_test": 32,
        "num_workers": 0,
        "measure_latency": False,
    }
    argv = ["--demo", "--output_dir", str(out), "--epoch", "1"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    return argv + [str(a) for a in extra]


def run(world, task, out, *extra, **kw) -> dict:
    return cli.main(task, argv=vilt_args(world, out, *extra, **kw))


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def check_interval(metrics: dict, key: str) -> None:
    lo, hi = metrics[f"{key}_ci95"]
    assert 0.0 <= lo <= metrics[key] <= hi <= 100.0


@pytest.fixture(scope="module")
def dense_vqa(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense_vqa") / "run"
    return run(world, compress_vqa.TASK, out), out


@pytest.fixture(scope="module")
def pumer_vqa(world, dense_vqa, tmp_path_factory):
    """PuMer at block 1 of 3 from the pre-trained file, distilling the dense VQA run."""
    out = tmp_path_factory.mktemp("pumer_vqa") / "run"
    teacher = dense_vqa[0]["checkpoint"]
    return run(world, "vqa", out, "--pruner", "pumer", "--reduce_layers", "1", "--set", f"pumer.teacher={teacher}"), out


def _model_from(config: dict, weights: str) -> ViLT:
    """The VQA model of ``config`` with ``weights`` loaded as for an evaluation (reducers from the description)."""
    import tasks.vilt_vqa as vqa

    model = vqa.build_model(config)
    vqa.load_pretrained(model, weights, config, evaluate=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------ 1, 2: dense runs


@pytest.mark.slow
def test_vqa_trains_and_writes_metrics_with_intervals_and_the_evalai_file(world, dense_vqa):
    res, out = dense_vqa
    assert res["task"] == "vqa" and res["backbone"] == "vilt" and res["pruner"] == "none"
    assert Path(res["config"]).name == "vilt_vqa.yaml"
    assert json.loads((out / "results.json").read_text())["metrics"] == res["metrics"]
    assert len(train_log(out)) == 1
    for split in ("val", "test"):
        m = res["metrics"][split]
        questions = json.loads((world.ann / f"vqa_{split}.json").read_text())
        assert m["n"] == len(questions) > 0
        check_interval(m, "vqa_acc")
        check_interval(m, "vqa_score")
        # The EvalAI result file: one {question_id, answer} per question, answers from the classifier's vocabulary.
        results = json.loads((out / "result" / f"vqa_{split}_result.json").read_text())
        assert all(set(r) == {"question_id", "answer"} for r in results)
        assert sorted(r["question_id"] for r in results) == sorted(q["question_id"] for q in questions)
        assert {r["answer"] for r in results} <= set(world.answers)
        truth = {q["question_id"]: q["answer"] for q in questions}
        acc = 100.0 * sum(vqa_accuracy(r["answer"], truth[r["question_id"]]) for r in results) / len(results)
        assert m["vqa_acc"] == pytest.approx(acc)
    head = torch.load(res["checkpoint"], weights_only=True)["model"]["vqa_classifier.3.weight"]
    assert head.shape[0] == len(world.answers)


@pytest.mark.slow
def test_vqa_run_uses_the_demo_recipe_linear_decay_warmup_share_and_betas(world, dense_vqa):
    """The demo config's lr_schedule linear, warmup_ratio 0.1, adam_betas (0.9, 0.98) and lr_mult reach the run."""
    res, out = dense_vqa
    ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.98) for g in groups)  # not AdamW's default (0.9, 0.999)
    n_train = len(json.loads((world.ann / "vqa_train.json").read_text()))
    assert n_train % BATCH == 0  # so that drop_last does not matter below
    steps = n_train // BATCH
    warm = round(0.1 * steps)
    assert warm >= 1
    init_lr = load_yaml(out / "config.yaml")["init_lr"]
    last = init_lr * (1 - (steps - 1 - warm) / (steps - warm))  # the linear decay's value at the last step
    assert train_log(out)[0]["lr"] == pytest.approx(last * groups[0]["lr_scale"])
    assert {g["lr_scale"] for g in groups} == {1.0, 10.0}  # the classifier at 10 x (lr_mult)
    for g in groups:
        assert g["lr"] == pytest.approx(last * g["lr_scale"])


@pytest.mark.slow
@pytest.mark.parametrize("script", [compress_ve, compress_nlvr])
def test_ve_and_nlvr_train_and_report_accuracy(world, tmp_path, script):
    out = tmp_path / "run"
    res = run(world, script.TASK, out)
    assert res["backbone"] == "vilt" and Path(res["config"]).name == f"vilt_{script.TASK}.yaml"
    assert len(train_log(out)) == 1
    splits = {"val": "dev", "test": "test"}
    if script.TASK == "ve":
        counts = {s: sum(1 for _ in (world.ann / f"snli_ve_{f}.jsonl").open()) for s, f in splits.items()}
    else:
        counts = {s: len(json.loads((world.ann / f"nlvr_{f}.json").read_text())) for s, f in splits.items()}
    for split in ("val", "test"):
        m = res["metrics"][split]
        assert set(m) == {"acc", "acc_ci95", "n"}
        assert m["n"] == counts[split] > 0
        check_interval(m, "acc")
    sd = torch.load(res["checkpoint"], weights_only=True)["model"]
    if script.TASK == "nlvr":
        assert sd["token_type_embeddings.weight"].shape == (3, HIDDEN)  # text, image, the second image
        assert sd["nlvr2_classifier.0.weight"].shape[1] == 2 * HIDDEN  # the two passes' pooled features
        assert sd["nlvr2_classifier.3.weight"].shape[0] == 2
    else:
        assert sd["token_type_embeddings.weight"].shape == (2, HIDDEN)
        assert sd["ve_classifier.3.weight"].shape[0] == 3


# ------------------------------------------------------------------------------------------------ 3, 4: PuMer


@pytest.mark.slow
def test_pumer_exports_its_reducers_and_the_export_evaluates_without_the_pruner(world, pumer_vqa, tmp_path):
    res, out = pumer_vqa
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["pruner"] == "pumer"
    for split in ("val", "test"):
        assert "vqa_acc" in on_disk["dense"]["metrics"][split]
    assert res["pruner_report"]["reduce_layers"] == [1]
    # Fewer FLOPs than the dense model, on the dummy input and averaged over real evaluation batches.
    assert res["flops"] < res["dense"]["flops"]
    assert res["eval_flops"] < res["dense"]["eval_flops"]

    st = out / "model_compressed.safetensors"
    assert on_disk["compressed_checkpoint"] == str(st) and st.is_file() and st.with_suffix(".json").is_file()
    _, arch = read_weights(st)
    assert list(arch["reducers"]) == ["transformer.blocks.1"]
    (spec,) = arch["reducers"]["transformer.blocks.1"]
    assert spec["kind"] == "pumer"
    assert (spec["prune_r"], spec["merge_r"], spec["merge_text"]) == (0.1, 0.3, 0.2)

    # A fresh process evaluates the export with no --pruner: the reducers come back from the description.
    ev = tmp_path / "eval"
    cmd = [sys.executable, "compress_vqa.py", *vilt_args(world, ev, "--evaluate", "--pretrained", st)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    again = json.loads((ev / "eval_model_compressed.json").read_text())
    assert again["pruner"] == "none"
    assert again["metrics"]["val"] == res["last_metrics"]["val"]
    assert again["metrics"]["test"] == res["last_metrics"]["test"]
    assert again["flops"] == pytest.approx(res["flops"])  # reduced: the reducers act in the evaluated model

    model = _model_from(again["config_values"], str(st))
    hooks = [[type(h) for h in block.token_hooks] for block in model.transformer.blocks]
    assert hooks == [[], [PuMerReducer], []]


@pytest.mark.slow
def test_pumer_distils_the_teacher_it_is_given(world, pumer_vqa, tmp_path):
    res, out = pumer_vqa
    with_teacher = train_log(out)[0]["train"]
    assert with_teacher["kd_loss"] > 0
    alpha = 0.5  # teacher.alpha's default
    expected = (1 - alpha) * with_teacher["task_loss"] + alpha * with_teacher["kd_loss"]
    assert with_teacher["loss"] == pytest.approx(expected, rel=1e-5)

    # Without a teacher (same seed and start): no KD term, and other training losses.
    alone = tmp_path / "alone"
    run(world, "vqa", alone, "--pruner", "pumer", "--reduce_layers", "1", "--set", "pumer.teacher=")
    no_teacher = train_log(alone)[0]["train"]
    assert "kd_loss" not in no_teacher
    assert no_teacher["loss"] != pytest.approx(with_teacher["task_loss"], rel=1e-6)

    # Another teacher's weights give another KD term: the teacher file is read, not a fresh model.
    other = tmp_path / "other_teacher.pth"
    torch.save({"model": _tiny_vilt("vqa", world.vocab, len(world.answers), 16, seed=1).state_dict()}, other)
    swapped = tmp_path / "swapped"
    run(world, "vqa", swapped, "--pruner", "pumer", "--reduce_layers", "1", "--set", f"pumer.teacher={other}")
    kd_other = train_log(swapped)[0]["train"]["kd_loss"]
    assert kd_other != pytest.approx(with_teacher["kd_loss"], rel=1e-3)


# ------------------------------------------------------------------------------------------------ 5: ToMe


@pytest.mark.slow
def test_tome_merges_the_joint_sequence_and_its_export_evaluates_alone(world, dense_vqa, tmp_path):
    out = tmp_path / "tome"
    teacher = dense_vqa[0]["checkpoint"]
    res = run(world, "vqa", out, "--pruner", "tome", "--p", "0.3", "--set", f"tome.teacher={teacher}")
    r = res["pruner_report"]["r"]
    assert r >= 1
    assert res["flops"] <= 0.7 * res["dense"]["flops"] * (1 + 1e-9)
    assert res["eval_flops"] < res["dense"]["eval_flops"]
    assert "kd_loss" in train_log(out)[0]["train"]  # tome.teacher became teacher.path

    st = res["compressed_checkpoint"]
    _, arch = read_weights(st)
    assert sorted(arch["reducers"]) == [f"transformer.blocks.{i}" for i in range(DEPTH)]
    assert all(s[0]["kind"] == "tome" and s[0]["r"] == r for s in arch["reducers"].values())

    ev = tmp_path / "eval"
    again = cli.main("vqa", argv=vilt_args(world, ev, "--evaluate", "--pretrained", st))
    assert again["metrics"] == res["last_metrics"]
    assert again["flops"] == pytest.approx(res["flops"])

    # The merging runs over text and image tokens together: r fewer tokens reach each block's MLP.
    model = _model_from(again["config_values"], st)
    seen = []
    for block in model.transformer.blocks:
        block.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    text = again["config_values"]["max_text_len"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, world.vocab, (2, text), generator=g)
    with torch.no_grad():
        model(ids, torch.ones_like(ids), torch.randn(2, 3, SIZE, SIZE, generator=g))
    joint = text + IMAGE_TOKENS
    assert seen == [joint - r * (i + 1) for i in range(DEPTH)]

    # r is the smallest that removes 30 % of the FLOPs.
    for reducer in (h for b in model.transformer.blocks for h in b.token_hooks if isinstance(h, ToMeReducer)):
        reducer.r = r - 1
    assert analytic_flops(model) > 0.7 * res["dense"]["flops"]


# ------------------------------------------------------------------------------------------------ 6: pre-training


@pytest.mark.slow
def test_vilt_pretraining_reports_itm_and_mlm_accuracy(world, tmp_path):
    out = tmp_path / "pretrain"
    res = cli.main(pretrain.TASK, argv=vilt_args(world, out, "--set", "vit_init=", pretrained=""))
    assert res["backbone"] == "vilt" and Path(res["config"]).name == "vilt_pretrain.yaml"
    m = res["metrics"]["val"]
    assert m["n"] == len(json.loads((world.ann / "coco_karpathy_val.json").read_text())) > 0
    check_interval(m, "itm_acc")
    assert 0.0 <= m["mlm_acc"] <= 100.0
    train = train_log(out)[0]["train"]
    assert train["loss"] == pytest.approx(train["loss_itm"] + train["loss_mlm"], rel=1e-5)
    sd = torch.load(res["checkpoint"], weights_only=True)["model"]
    assert sd["itm_score.fc.weight"].shape == (2, HIDDEN)
    assert sd["mlm_score.decoder.weight"].shape == (world.vocab, HIDDEN)


# ------------------------------------------------------------------------------------------------ 7: refusals


def _failure(world, out, *extra, task="vqa", pretrained=None) -> str:
    with pytest.raises((SystemExit, Exception)) as info:
        run(world, task, out, *extra, pretrained=pretrained)
    assert not (out / "checkpoint_last.pth").exists() and not (out / "log.jsonl").exists()  # nothing trained
    return str(info.value)


@pytest.mark.slow
def test_pumer_reduce_layers_outside_the_model(world, tmp_path):
    message = _failure(world, tmp_path / "out", "--pruner", "pumer", "--reduce_layers", "9", "--set", "pumer.teacher=")
    assert "reduce_layers" in message and "[9]" in message and f"{DEPTH} blocks" in message


def test_pumer_refuses_p(world, tmp_path):
    out = tmp_path / "out"
    message = _failure(world, out, "--pruner", "pumer", "--p", "0.5", "--set", "pumer.teacher=")
    assert "pumer" in message and "--p" in message
    assert not out.exists()  # refused while parsing, before any data or weights


def test_vqa_answer_vocabulary_missing(world, tmp_path):
    ann = tmp_path / "annotation"
    shutil.copytree(world.ann, ann)
    (ann / "vqa2_label2ans.json").unlink()
    message = _failure(world, tmp_path / "out", "--set", f"ann_root={ann}")
    assert str(ann / "vqa2_label2ans.json") in message


def test_vocab_size_smaller_than_the_tokenizer(world, tmp_path):
    message = _failure(world, tmp_path / "out", "--set", "vilt_vocab_size=50")
    assert str(world.vocab) in message and "50" in message and "vilt_vocab_size" in message


def test_evaluate_a_pretrained_file_without_the_task_head(world, tmp_path):
    message = _failure(world, tmp_path / "out", "--evaluate", "--pretrained", world.pretrained)
    assert str(world.pretrained) in message and "vqa" in message


# ------------------------------------------------------------------------------------------------ 8: the schedule


def test_linear_schedule_warms_up_then_decays_to_min_lr():
    init, low, epochs, per_epoch, warm = 1e-3, 1e-5, 2, 5, 2
    s = utils.LRSchedule(init, low, epochs, per_epoch, warmup_steps=warm, warmup_lr=0.0, kind="linear")
    values = [s(k // per_epoch, k % per_epoch) for k in range(epochs * per_epoch + 1)]
    assert values[0] == 0.0
    assert values[1] == pytest.approx(init / 2)
    assert values[warm] == pytest.approx(init)  # the end of the warm-up
    decay = values[warm:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly falling, in equal steps
    assert all(a - b == pytest.approx((init - low) / (epochs * per_epoch - warm)) for a, b in zip(decay, decay[1:]))
    # As Hugging Face's polynomial (power 1) decay that PuMer uses: the last step runs one decrement above min_lr,
    # which the schedule reaches at its end.
    assert values[-2] == pytest.approx(low + (init - low) / (epochs * per_epoch - warm))
    assert values[-1] == pytest.approx(low)


class _Regression:
    name = "toy"
    main_metric = "neg_mse"

    def train_step(self, model, batch, info):
        x, y = batch
        return {"loss": torch.nn.functional.mse_loss(model(x), y)}

    def evaluate(self, model, loader, split):
        x, y = next(iter(loader))
        return {"neg_mse": -float(torch.nn.functional.mse_loss(model(x), y))}


def test_engine_warmup_ratio_counts_optimizer_steps_of_the_run_and_betas_reach_adamw(tmp_path, monkeypatch):
    seen = []
    set_lr = utils.set_lr
    monkeypatch.setattr(utils, "set_lr", lambda opt, lr: (seen.append(lr), set_lr(opt, lr)))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g))
    torch.manual_seed(0)
    cfg = EngineConfig(
        max_epoch=2, init_lr=0.1, min_lr=0.01, weight_decay=0.0, lr_schedule="linear", warmup_ratio=0.13,
        adam_betas=[0.8, 0.95],
    )  # fmt: skip
    engine = Engine(torch.nn.Linear(4, 1), _Regression(), cfg, utils.DistInfo(), tmp_path)
    assert all(grp["betas"] == (0.8, 0.95) for grp in engine.optimizer.param_groups)
    engine.fit(DataLoader(data, batch_size=4), {"val": DataLoader(data, batch_size=40)})
    total = 2 * 10
    warm = round(0.13 * total)  # 3 (per epoch it would be round(1.3) = 1)
    assert len(seen) == total
    assert seen[:warm] == pytest.approx([0.1 * k / warm for k in range(warm)])
    assert seen[warm] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(seen[warm:], seen[warm + 1 :]))
    assert seen[-1] == pytest.approx(0.01 + 0.09 / (total - warm))
    groups = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)["optimizer"]["param_groups"]
    assert all(tuple(grp["betas"]) == (0.8, 0.95) for grp in groups)


# ------------------------------------------------------------------------------------------------ 9: retrieval

# The module's world keeps its own held-out splits (the retrieval demo config asks for 40 images), 3 false captions.
RETRIEVAL = ("--set", "world.n_eval=null", "--set", "negatives=3", "--set", "batch_size_train=4")


def _retrieval_split(world, split: str) -> tuple[int, int]:
    """(images, captions) of a held-out retrieval split of the world."""
    entries = json.loads((world.ann / f"coco_karpathy_{split}.json").read_text())
    return len(entries), sum(len(e["caption"]) for e in entries)


@pytest.fixture(scope="module")
def dense_retrieval(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense_retrieval") / "run"
    return run(world, compress_retrieval.TASK, out, *RETRIEVAL), out


def _retrieval_config(world, **changes) -> dict:
    """The config a retrieval run of the module resolves (what it writes to its config.yaml), with ``changes``."""
    args = cli.build_parser(compress_retrieval.TASK).parse_args(vilt_args(world, world.root / "unused", *RETRIEVAL))
    return {**cli.resolve_config(compress_retrieval.TASK, args), **changes}


def _tiny_retrieval(config: dict, seed: int = 0) -> ViLT:
    """A random retrieval ViLT in eval mode, its weight matrices 10 x the initial scale (std 0.2): at std 0.02 every
    pair scores the same to 1e-4, which would make any comparison of scores vacuous."""
    torch.manual_seed(seed)
    model = vilt_retrieval.build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10)
    return model


@pytest.mark.slow
def test_retrieval_reports_recall_over_every_image_and_caption_of_the_split(world, dense_retrieval):
    res, out = dense_retrieval
    resolved = _retrieval_config(world)
    resolved.pop("_source")
    assert load_yaml(out / "config.yaml") == resolved  # what the tests below build their data and models from
    assert res["task"] == "retrieval" and res["backbone"] == "vilt" and res["pruner"] == "none"
    assert Path(res["config"]).name == "vilt_retrieval.yaml"
    assert json.loads((out / "results.json").read_text())["metrics"] == res["metrics"]
    keys = {f"{way}_r{k}" for way in ("txt", "img") for k in (1, 5, 10)} | {"r_mean", "r_mean_ci95"}
    for split in ("val", "test"):
        m = res["metrics"][split]
        assert keys <= set(m)
        n_img, n_txt = _retrieval_split(world, split)
        assert (n_img, n_txt) == (20, 100)  # the module's world: 20 scenes, 5 captions each
        for k in (1, 5, 10):  # image queries rank the captions (txt_r*), caption queries the images (img_r*)
            for key, n in ((f"txt_r{k}", n_img), (f"img_r{k}", n_txt)):
                assert 0.0 <= m[key] <= 100.0
                assert m[key] * n / 100 == pytest.approx(round(m[key] * n / 100), abs=1e-6)
        # The Wilson intervals pin the query counts: every image, every caption of the split.
        assert m["txt_r1_ci95"] == wilson_interval(round(m["txt_r1"] * n_img / 100), n_img)
        assert m["img_r1_ci95"] == wilson_interval(round(m["img_r1"] * n_txt / 100), n_txt)
        assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
        check_interval(m, "r_mean")
    train = train_log(out)[0]["train"]
    assert train["loss"] == pytest.approx(train["loss_rank"] + 0.5 * train["loss_itm"], rel=1e-5)
    sd = torch.load(res["checkpoint"], weights_only=True)["model"]
    assert sd["rank_output.weight"].shape == (1, HIDDEN) and sd["itm_score.fc.weight"].shape == (2, HIDDEN)


def test_retrieval_collate_puts_the_caption_first_and_negatives_of_other_images(world):
    tokenizer = vilt_retrieval.vilt_tokenizer(
        {"tokenizer": str(world.root / "world" / "tokenizer"), "vilt_vocab_size": 159}
    )
    # Image 0 owns most of the pool, so its draws must reject; image 1's negatives come from image 0 and image 2.
    pool = [
        ("a red circle", 0), ("a red circle on the left", 0), ("one shape: a red circle", 0),
        ("a blue square", 1), ("a green triangle", 2), ("two shapes: a green triangle", 2),
    ]  # fmt: skip
    owners = {text: owner for text, owner in pool}
    length, negatives = 12, 5
    collate = vilt_retrieval.RetrievalCollate(tokenizer, length, pool, negatives)
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(3, SIZE, SIZE, generator=g), text, owner) for text, owner in (pool[0], pool[3], pool[4])]

    def tokens(text: str) -> tuple[list[int], list[int]]:
        enc = tokenizer([text], padding="max_length", truncation=True, max_length=length)
        return enc["input_ids"][0], enc["attention_mask"][0]

    by_tokens = {tuple(tokens(text)[0]): text for text in owners}
    assert len(by_tokens) == len(pool)  # every caption of the pool tokenizes apart
    torch.manual_seed(0)
    images, ids, mask = collate(items)
    assert images.shape == (3, 3, SIZE, SIZE) and torch.equal(images, torch.stack([it[0] for it in items]))
    assert ids.shape == mask.shape == (3, 1 + negatives, length)
    for row_ids, row_mask, (_, caption, owner) in zip(ids, mask, items):
        assert (row_ids[0].tolist(), row_mask[0].tolist()) == tokens(caption)  # its own caption first
        drawn = [by_tokens[tuple(r.tolist())] for r in row_ids[1:]]
        assert all(owners[text] != owner for text in drawn), (owner, drawn)
        assert [m.tolist() for m in row_mask[1:]] == [tokens(text)[1] for text in drawn]

    # The draws follow torch's global generator: the same seed gives the same batch, another seed another one.
    torch.manual_seed(0)
    again = collate(items)
    assert all(torch.equal(a, b) for a, b in zip((images, ids, mask), again))
    others = []
    for seed in range(1, 6):
        torch.manual_seed(seed)
        others.append(collate(items)[1])
    assert any(not torch.equal(ids, other) for other in others)


def test_retrieval_evaluation_scores_every_pair_as_the_model_does_one_at_a_time(world, monkeypatch):
    config = _retrieval_config(world, text_batch=32)  # 100 captions: passes of 32, 32, 32 and 4
    _, evals = vilt_retrieval.build_data(config, utils.DistInfo())
    loader = evals["val"]
    ds = loader.dataset
    model = _tiny_retrieval(config, seed=3)
    seen = []
    metrics = vilt_retrieval.retrieval_metrics
    monkeypatch.setattr(vilt_retrieval, "retrieval_metrics", lambda *args: (seen.append(args), metrics(*args))[1])
    result = vilt_retrieval.ViltRetrievalTask(config).evaluate(model, loader, "val")
    ((i2t, t2i, txt2img, img2txt),) = seen
    assert result == metrics(i2t, t2i, txt2img, img2txt)
    n_img, n_txt = _retrieval_split(world, "val")
    assert i2t.shape == (n_img, n_txt) and torch.equal(t2i, i2t.t())
    assert (txt2img, img2txt) == (ds.txt2img, ds.img2txt)

    enc = loader.tokenizer(list(ds.text), padding="max_length", truncation=True, max_length=config["max_text_len"])
    brute = torch.empty(n_img, n_txt)
    with torch.no_grad():
        for i in range(n_img):
            image = ds[i][0][None]
            for j in range(n_txt):
                ids, mask = torch.tensor([enc["input_ids"][j]]), torch.tensor([enc["attention_mask"][j]])
                brute[i, j] = model(ids, mask, image)[0, 0]
    torch.testing.assert_close(i2t, brute, rtol=1e-5, atol=1e-5)
    assert brute.std() > 0.1  # the scores tell pairs apart: the comparison is not between constants


def test_retrieval_train_step_is_rank_cross_entropy_plus_weighted_itm(world):
    weight = 0.7  # not the default 0.5: the step reads itm_weight from the config
    config = _retrieval_config(world, itm_weight=weight)
    train_loader, _ = vilt_retrieval.build_data(config, utils.DistInfo())
    torch.manual_seed(0)
    images, ids, mask = batch = next(iter(train_loader))
    b, pairs = ids.shape[:2]
    assert (b, pairs) == (4, 4)  # batch_size_train 4, 1 + negatives 3
    model = _tiny_retrieval(config, seed=1)  # eval(): no dropout, so the two computations see the same network
    out = vilt_retrieval.ViltRetrievalTask(config).train_step(model, batch, None)
    assert set(out) == {"loss", "loss_rank", "loss_itm"}

    rank, itm = torch.empty(b, pairs), torch.empty(b, pairs, 2)
    with torch.no_grad():
        for i in range(b):
            for k in range(pairs):
                pooled = model.pooled(ids[i, k][None], mask[i, k][None], images[i][None])
                rank[i, k] = model.rank_output(pooled)[0, 0]
                itm[i, k] = model.itm_score(pooled)[0]
    assert rank.std() > 0.1 and itm.std() > 0.1
    loss_rank = -torch.log_softmax(rank, dim=1)[:, 0].mean()  # the true caption (column 0) is the target
    match = torch.zeros(b, pairs, dtype=torch.long)
    match[:, 0] = 1  # ITM: the first pair matches, the false captions do not
    loss_itm = -torch.log_softmax(itm, dim=2).gather(2, match[..., None]).mean()
    torch.testing.assert_close(out["loss_rank"].detach(), loss_rank, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_itm"].detach(), loss_itm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), out["loss_rank"].detach() + weight * out["loss_itm"].detach())
    out["loss"].backward()
    assert model.rank_output.weight.grad.abs().sum() > 0 and model.itm_score.fc.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_retrieval_pumer_exports_its_reducer_and_the_export_evaluates_alone(world, tmp_path):
    out = tmp_path / "pumer"
    res = run(world, compress_retrieval.TASK, out, *RETRIEVAL, "--pruner", "pumer", "--reduce_layers", "1")
    assert json.loads((out / "results.json").read_text())["pruner"] == "pumer"
    assert res["pruner_report"]["reduce_layers"] == [1]
    assert "kd_loss" not in train_log(out)[0]["train"]  # nothing to distil from a one-unit score
    assert res["eval_flops"] < res["dense"]["eval_flops"]  # the evaluation batches' probe (images, indices)
    for split in ("val", "test"):
        assert {"txt_r1", "img_r1", "r_mean"} <= set(res["metrics"][split])
    export = res["compressed_checkpoint"]
    _, arch = read_weights(export)
    assert list(arch["reducers"]) == ["transformer.blocks.1"]
    (spec,) = arch["reducers"]["transformer.blocks.1"]
    assert spec["kind"] == "pumer"
    again = run(world, "retrieval", tmp_path / "eval", *RETRIEVAL, "--evaluate", "--pretrained", export)
    assert again["pruner"] == "none" and again["metrics"] == res["last_metrics"]  # the reducer came with the file
    assert again["flops"] == pytest.approx(res["flops"])


def test_retrieval_rank_head_starts_from_the_itm_match_row_of_a_pretrained_file(world):
    """The pre-trained file has ITM and MLM heads but no rank head: training starts it from ITM's "match" row."""
    file = torch.load(world.pretrained, weights_only=True)["model"]
    assert "rank_output.weight" not in file and "itm_score.fc.weight" in file
    config = _retrieval_config(world)
    model = _tiny_retrieval(config, seed=5)
    assert not torch.equal(model.rank_output.weight[0], file["itm_score.fc.weight"][1])
    vilt_retrieval.load_pretrained(model, str(world.pretrained), config)
    assert torch.equal(model.rank_output.weight[0], file["itm_score.fc.weight"][1])
    assert torch.equal(model.rank_output.bias, file["itm_score.fc.bias"][1:2])
    assert torch.equal(model.itm_score.fc.weight, file["itm_score.fc.weight"])
    # Evaluating wants a fine-tuned rank head: the ITM row is a starting point, not a retrieval model.
    with pytest.raises(utils.CheckpointError, match="no retrieval head"):
        vilt_retrieval.load_pretrained(_tiny_retrieval(config), str(world.pretrained), config, evaluate=True)
