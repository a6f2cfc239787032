"""Evaluation metrics against the official definitions, and the cross-rank merge of result lists."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tasks.metrics import (
    CAPTION_METRICS,
    CaptionEvalError,
    coco_caption_scores,
    collect_results,
    normalize_vqa_answer,
    ptb_tokenize,
    retrieval_metrics,
    vqa_accuracy,
    vqa_score,
)

# ----------------------------------------------------------------------------------------------
# VQA

# Outputs of the official VQA evaluation's processPunctuation + processDigitArticle on each input.
NORMALISATION_TABLE = [
    ("Two.", "2"),
    ("a dog", "dog"),
    ("isnt", "isn't"),
    ("yes!", "yes"),
    ("Yes", "yes"),
    ("  Ten  ", "10"),
    ("\tone\n", "1"),
    ("None", "0"),
    ("an apple.", "apple"),
    ("the the", ""),
    ("3.5", "3.5"),  # a period before a digit stays
    ("1.", "1"),
    ("U.S.A.", "usa"),
    ("1,000", "1000"),  # a digit-comma-digit group deletes punctuation instead of spacing it
    ("2,3 a-b", "23 ab"),
    ("a,b", "b"),  # "a b", then the article goes
    ("hot-dog", "hot dog"),
    ("t - shirt", "t shirt"),  # punctuation next to a space is deleted
    ("red/white", "red white"),
    ("(yes)", "yes"),
    ("no ?", "no"),
    ("50 %", "50 %"),
    ("8:00", "8:00"),
    ("what's up?", "what's up"),
    ("dont", "don't"),
    ("hed", "he'd"),
    ("couldnt've", "couldn't've"),
    ("couldntve", "couldntve"),  # both apostrophes dropped is not in the official table
    ("oclock", "o'clock"),
    ("Im", "im"),  # the official key is capitalised and never matches a lowercased word
    ("somebody'd", "somebodyd"),  # the official table maps this one backwards
    ("x" + "." * 40, "x" + "." * 8),  # at most 32 periods are stripped
]


@pytest.mark.parametrize("raw,expected", NORMALISATION_TABLE)
def test_normalize_vqa_answer_matches_official(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    "matches,expected",
    # (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10 over the ten leave-one-out subsets
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_leave_one_out(matches, expected):
    gts = ["cat"] * matches + ["dog", "bird", "cow", "fox", "owl", "pig", "ant", "bee", "elk", "emu"][: 10 - matches]
    assert vqa_accuracy("cat", gts) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_only_when_annotators_disagree():
    assert vqa_accuracy("Two.", ["2"] * 9 + ["two"]) == pytest.approx(1.0)
    assert vqa_accuracy("a Dog!", ["dog", "dog", "puppy"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    # unanimous answers are compared raw, as in the official script
    assert vqa_accuracy("Two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("2", [])


def test_vqa_score_overall_and_per_answer_type():
    answers = {
        1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},
        2: {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number"},
        3: {"answers": ["red"] * 10, "answer_type": "other"},
    }
    results = [
        {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": "2"},
        {"question_id": 3, "answer": "blue"},
    ]
    out = vqa_score(results, answers)
    assert out["n"] == 3
    assert out["vqa_acc"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
    assert out["vqa_acc_yes_no"] == pytest.approx(100.0)
    assert out["vqa_acc_number"] == pytest.approx(60.0)
    assert out["vqa_acc_other"] == pytest.approx(0.0)
    plain = vqa_score(results, {q: a["answers"] for q, a in answers.items()})
    assert plain == {"vqa_acc": out["vqa_acc"], "n": 3}


def test_vqa_score_rejects_incomplete_or_duplicated_results():
    answers = {1: ["yes"] * 10, 2: ["no"] * 10}
    with pytest.raises(ValueError, match="no answer for 1 of 2 questions"):
        vqa_score([{"question_id": 1, "answer": "yes"}], answers)
    with pytest.raises(ValueError, match="duplicate question_ids"):
        vqa_score([{"question_id": q, "answer": "yes"} for q in (1, 2, 1)], answers)
    with pytest.raises(ValueError, match="no ground truth"):
        vqa_score([{"question_id": q, "answer": "yes"} for q in (1, 2, 7)], answers)


# ----------------------------------------------------------------------------------------------
# retrieval


def _brute_force_recall(scores_i2t, scores_t2i, txt2img, img2txt):
    """The BLIP evaluation loop: best position of a ground-truth caption in each descending row."""
    txt_ranks = [
        min(int(np.where(np.argsort(row)[::-1] == t)[0][0]) for t in img2txt[i]) for i, row in enumerate(scores_i2t)
    ]
    img_ranks = [int(np.where(np.argsort(row)[::-1] == txt2img[j])[0][0]) for j, row in enumerate(scores_t2i)]

    def recall(ranks):
        ranks = np.asarray(ranks)
        return [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]

    tr, ir = recall(txt_ranks), recall(img_ranks)
    out = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2]}
    out["txt_r_mean"], out["img_r_mean"] = sum(tr) / 3, sum(ir) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def _retrieval_problem(n_img, seed, signal):
    rng = np.random.default_rng(seed)
    img2txt, txt2img = {}, {}
    for i in range(n_img):
        img2txt[i] = []
        for _ in range(rng.integers(1, 7)):
            txt2img[len(txt2img)] = i
            img2txt[i].append(len(txt2img) - 1)
    n_txt = len(txt2img)
    match = np.zeros((n_img, n_txt))
    for j, i in txt2img.items():
        match[i, j] = 1.0
    i2t = rng.normal(size=(n_img, n_txt)) + signal * match
    t2i = rng.normal(size=(n_txt, n_img)) + signal * match.T
    return i2t, t2i, txt2img, img2txt


@pytest.mark.parametrize("n_img,seed", [(12, 0), (40, 1), (300, 2)])  # 300 images: >1024 texts, two row chunks
def test_retrieval_metrics_match_brute_force(n_img, seed):
    i2t, t2i, txt2img, img2txt = _retrieval_problem(n_img, seed, signal=2.5)
    expected = _brute_force_recall(i2t, t2i, txt2img, img2txt)
    assert 0 < expected["txt_r1"] < 100 and 0 < expected["img_r1"] < 100  # the problem discriminates
    got = retrieval_metrics(i2t, t2i, txt2img, img2txt)
    intervals = {k: got.pop(k) for k in ("txt_r1_ci95", "img_r1_ci95", "r_mean_ci95")}
    assert got == pytest.approx(expected, abs=1e-9)
    for key, (lo, hi) in intervals.items():
        value = got[key.removesuffix("_ci95")]
        assert lo <= value <= hi and hi - lo < 200 / len(img2txt) ** 0.5  # around the value, narrowing with n
    # tensors and list-shaped ground truth give the same
    as_lists = retrieval_metrics(
        torch.from_numpy(i2t).float(),
        torch.from_numpy(t2i).float(),
        [txt2img[j] for j in range(len(txt2img))],
        [img2txt[i] for i in range(n_img)],
    )
    assert {k: v for k, v in as_lists.items() if not k.endswith("_ci95")} == pytest.approx(expected, abs=1e-9)


def test_retrieval_metrics_perfect_and_degenerate_scores():
    _, _, txt2img, img2txt = _retrieval_problem(15, 3, signal=0.0)
    n_img, n_txt = len(img2txt), len(txt2img)
    match = np.zeros((n_img, n_txt), dtype=np.float32)
    for j, i in txt2img.items():
        match[i, j] = 1.0
    perfect = retrieval_metrics(match, match.T, txt2img, img2txt)
    assert perfect.pop("r_mean_ci95") == [100.0, 100.0] and perfect.pop("txt_r1_ci95")[1] == 100.0
    perfect.pop("img_r1_ci95")
    assert perfect == {k: 100.0 for k in perfect} and len(perfect) == 9
    # ties count against the ground truth: a collapsed model scores nothing
    flat = retrieval_metrics(np.zeros((n_img, n_txt)), np.zeros((n_txt, n_img)), txt2img, img2txt)
    assert flat["r_mean"] == 0.0


def test_retrieval_metrics_rejects_mismatched_inputs():
    i2t, t2i, txt2img, img2txt = _retrieval_problem(5, 4, signal=1.0)
    with pytest.raises(ValueError, match="expected \\(texts, images\\)"):
        retrieval_metrics(i2t, i2t, txt2img, img2txt)
    with pytest.raises(ValueError, match="img2txt has 4 entries"):
        retrieval_metrics(i2t, t2i, txt2img, {i: img2txt[i] for i in range(4)})
    bad = i2t.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, t2i, txt2img, img2txt)


# ----------------------------------------------------------------------------------------------
# captions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need `java` on PATH")

GT_CAPTIONS = {
    11: ["A man is riding a brown horse on the beach.", "a person rides a horse along the sea shore"],
    22: ["Two cats are sleeping on a red couch.", "two kittens asleep on a sofa", "cats napping on the couch"],
    33: ["A plate of pasta with tomato sauce and basil.", "a dish of spaghetti with red sauce"],
    44: ["A child flying a kite in a park.", "a kid with a kite on the grass"],
}


@pytest.fixture(scope="module")
def caption_gt(tmp_path_factory):
    anns = [
        {"image_id": i, "caption": c, "id": n}
        for n, (i, c) in enumerate((i, c) for i, caps in GT_CAPTIONS.items() for c in caps)
    ]
    path = tmp_path_factory.mktemp("coco_gt") / "gt.json"
    path.write_text(json.dumps({"annotations": anns, "images": [{"id": i} for i in GT_CAPTIONS]}))
    return path


@pytest.fixture(scope="module")
def identical_scores(caption_gt):
    results = [{"image_id": i, "caption": caps[0]} for i, caps in GT_CAPTIONS.items()]
    return coco_caption_scores(caption_gt, results)


@needs_java
def test_caption_scores_of_reference_captions(identical_scores):
    from pycocoevalcap.cider.cider import Cider

    assert tuple(identical_scores) == CAPTION_METRICS  # no SPICE unless asked
    assert identical_scores["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert identical_scores["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert 0.9 < identical_scores["METEOR"] <= 1.0
    assert identical_scores["ROUGE_L"] == pytest.approx(1.0, abs=1e-6)
    gts = ptb_tokenize(GT_CAPTIONS)
    res = {i: caps[:1] for i, caps in gts.items()}
    oracle, _ = Cider().compute_score(gts, res)
    assert identical_scores["CIDEr"] == pytest.approx(oracle, rel=1e-12)


@needs_java
def test_caption_scores_drop_for_worse_captions(caption_gt, identical_scores):
    worse = [
        {"image_id": 11, "caption": "a dog on a beach"},
        {"image_id": 22, "caption": "two cats on a table"},
        {"image_id": 33, "caption": "a plate of food"},
        {"image_id": 44, "caption": "a child in a park"},
    ]
    scores = coco_caption_scores(caption_gt, worse, meteor=False)
    assert set(scores) == set(CAPTION_METRICS) - {"METEOR"}
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert scores[key] < identical_scores[key], key
    assert 0 < scores["CIDEr"] < identical_scores["CIDEr"]


@needs_java
def test_ptb_tokenize_matches_pycocoevalcap(tmp_path):
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not os.access(Path(ptbtokenizer.__file__).parent, os.W_OK):
        pytest.skip("pycocoevalcap's own tokenizer writes next to its jar, which is read-only here")
    captions = {
        1: ["Isn't it a dog's toy?", "A man -- riding (a) horse... on the beach!"],
        2: ['"Quoted" words; and: colons, 3.5 km & U.S.A.'],
        "x": ["Multi\nline caption", ""],
    }
    expected = ptbtokenizer.PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})
    assert ptb_tokenize(captions) == expected
    assert ptb_tokenize({1: ["A man riding a horse."]}) == {1: ["a man riding a horse"]}


@needs_java
def test_caption_scores_reject_bad_results(caption_gt):
    with pytest.raises(ValueError, match="not in .*gt.json"):
        coco_caption_scores(caption_gt, [{"image_id": 999, "caption": "a cat"}])
    with pytest.raises(ValueError, match="duplicate image_ids"):
        coco_caption_scores(caption_gt, [{"image_id": 11, "caption": "a"}, {"image_id": 11, "caption": "b"}])
    with pytest.raises(FileNotFoundError, match="caption ground truth not found"):
        coco_caption_scores(caption_gt.with_name("missing.json"), [{"image_id": 11, "caption": "a"}])


def test_caption_scores_name_java_when_missing(caption_gt, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CaptionEvalError, match="need Java.*install a Java runtime"):
        coco_caption_scores(caption_gt, [{"image_id": 11, "caption": "a man"}])


# ----------------------------------------------------------------------------------------------
# collecting results across ranks


def test_collect_results_single_process_dedups_and_writes(tmp_path):
    results = [
        {"image_id": np.int64(3), "caption": "first"},
        {"image_id": 5, "caption": "other"},
        {"image_id": 3, "caption": "repeat"},
    ]
    merged = collect_results(results, tmp_path / "res", "test_epoch0", dedup_key="image_id")
    assert merged == [{"image_id": 3, "caption": "first"}, {"image_id": 5, "caption": "other"}]
    assert json.loads((tmp_path / "res" / "test_epoch0.json").read_text()) == merged
    rank_file = json.loads((tmp_path / "res" / "test_epoch0_rank0.json").read_text())
    assert [r["caption"] for r in rank_file] == ["first", "other", "repeat"]
    assert collect_results(results, tmp_path / "res", "nodedup") == json.loads(json.dumps(results, default=int))
    with pytest.raises(KeyError, match="question_id"):
        collect_results(results, tmp_path / "res", "bad", dedup_key="question_id")


def _collect_worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mine = [{"question_id": 10 * rank + k, "answer": f"r{rank}"} for k in range(3)]
        if rank == 1:
            mine.append({"question_id": 0, "answer": "padding repeat"})  # rank 0 already holds question 0
        merged = collect_results(mine, out_dir, "vqa_result", dedup_key="question_id")
        Path(out_dir, f"returned_{rank}.json").write_text(json.dumps(merged))
    finally:
        dist.destroy_process_group()


def test_collect_results_two_ranks_gloo(tmp_path):
    mp.spawn(_collect_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    expected = [
        {"question_id": q, "answer": a}
        for q, a in [(0, "r0"), (1, "r0"), (2, "r0"), (10, "r1"), (11, "r1"), (12, "r1")]
    ]
    assert json.loads((tmp_path / "vqa_result.json").read_text()) == expected
    assert json.loads((tmp_path / "returned_0.json").read_text()) == expected
    assert json.loads((tmp_path / "returned_1.json").read_text()) == expected
    rank1 = json.loads((tmp_path / "vqa_result_rank1.json").read_text())
    assert [r["question_id"] for r in rank1] == [10, 11, 12, 0]
