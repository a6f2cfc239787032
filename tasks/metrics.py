"""Evaluation metrics of the task protocols (VQA accuracy, retrieval recall, COCO caption scores) and
the merge of per-rank result lists.

The VQA normalisation reproduces the official VQA evaluation, quirks included, so that local numbers
agree with the evaluation server; the caption scores use pycocotools and pycocoevalcap as the
published numbers do.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import utils
from utils import log

# ----------------------------------------------------------------------------------------------
# VQA accuracy

# Contracted forms the official evaluation restores when an answer drops one of their apostrophes
# ("isnt" -> "isn't", "hed've" -> "he'd've"). Dropping every apostrophe of a double contraction
# ("couldntve") is not restored there, so it is not restored here either.
_CONTRACTED_FORMS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've",
    "shouldn't", "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's",
    "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd",
    "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


def wilson_interval(hits: float, n: float, z: float = 1.96) -> list[float]:
    """The 95 % (``z`` = 1.96) Wilson score interval of an accuracy of ``hits`` out of ``n``, in percent: what a
    held-out split of this size can tell apart."""
    if n <= 0:
        return [0.0, 100.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2)]


def _one_apostrophe_dropped(form: str) -> list[str]:
    return [form[:i] + form[i + 1 :] for i, ch in enumerate(form) if ch == "'"]


VQA_CONTRACTIONS: dict[str, str] = {
    spelling: form for form in _CONTRACTED_FORMS for spelling in _one_apostrophe_dropped(form)
}
# The official table maps this one backwards; kept for parity. Its capitalised keys ("Im", "Ive",
# "Id've", "I'dve") can never match the lowercased words, so they are left out: "im" stays "im".
VQA_CONTRACTIONS["somebody'd"] = "somebodyd"

VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES = frozenset({"a", "an", "the"})
# Deleted outright when next to a space (or anywhere in an answer holding a digit-comma-digit group),
# otherwise replaced by a space. Periods and apostrophes are handled separately / kept.
VQA_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": meant as a look-behind, "(?!<=" is a look-ahead that
# can never match before a period, so in effect every period not followed by a digit is removed.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (32) where re.sub takes its count.
_PERIOD_STRIP_COUNT = 32


def _clean_whitespace(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _vqa_punctuation(text: str) -> str:
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in VQA_PUNCTUATION:
        # the official test looks at the input text, not at the partly processed one
        spaced = f"{p} " in text or f" {p}" in text
        out = out.replace(p, "" if delete_all or spaced else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def _vqa_digits_articles(text: str) -> str:
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation: punctuation, periods, lowercase, number words to digits,
    articles dropped, apostrophe-less contractions restored."""
    return _vqa_digits_articles(_vqa_punctuation(_clean_whitespace(answer)))


def vqa_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one answer, in [0, 1].

    For each of the n annotators, min(1, matches among the other n - 1 / 3); the mean over the n
    leave-one-out subsets. With 10 annotators, 1, 2, 3 and 4 matches give 0.3, 0.6, 0.9 and 1.0.
    Like the official script, answers are normalised only when the annotators disagree; a
    unanimous question is compared on the raw (whitespace-trimmed) strings.
    """
    if isinstance(gt_answers, str) or len(gt_answers) == 0:
        raise ValueError(f"gt_answers must be a non-empty list of annotator answers, got {gt_answers!r}")
    gts = [_clean_whitespace(a) for a in gt_answers]
    pred = _clean_whitespace(pred)
    if len(set(gts)) > 1:
        gts = [_vqa_digits_articles(_vqa_punctuation(a)) for a in gts]
        pred = _vqa_digits_articles(_vqa_punctuation(pred))
    hits = [a == pred for a in gts]
    matches = sum(hits)
    # leaving out a matching annotator leaves matches - 1 among the others, any other leaves matches
    return sum(min(1.0, (matches - hit) / 3) for hit in hits) / len(gts)


def _answer_type_key(answer_type: str) -> str:
    return "vqa_acc_" + re.sub(r"\W+", "_", answer_type).strip("_")


def vqa_score(results: Sequence[Mapping[str, Any]], answers_by_qid: Mapping[Any, Any]) -> dict[str, float]:
    """Mean official VQA accuracy (percent) of ``[{question_id, answer}]`` results.

    ``answers_by_qid[qid]`` is the list of annotator answers, or a mapping with ``answers`` and an
    optional ``answer_type`` ("yes/no", "number", "other"); with types, ``vqa_acc_<type>`` (non-word
    characters as ``_``, e.g. ``vqa_acc_yes_no``) is added. Results must cover every question exactly
    once, as the official evaluation requires.
    """
    by_qid: dict[Any, str] = {}
    duplicates = []
    for r in results:
        qid = r["question_id"]
        if qid in by_qid:
            duplicates.append(qid)
        by_qid[qid] = r["answer"]
    if duplicates:
        raise ValueError(f"{len(duplicates)} duplicate question_ids in the VQA results (e.g. {duplicates[:5]})")
    unknown = [q for q in by_qid if q not in answers_by_qid]
    if unknown:
        raise ValueError(f"{len(unknown)} result question_ids have no ground truth (e.g. {unknown[:5]})")
    missing = [q for q in answers_by_qid if q not in by_qid]
    if missing:
        raise ValueError(f"no answer for {len(missing)} of {len(answers_by_qid)} questions (e.g. {missing[:5]})")
    if not by_qid:
        raise ValueError("no VQA results to score")

    accs: list[float] = []
    by_type: dict[str, list[float]] = {}
    for qid, pred in by_qid.items():
        gt = answers_by_qid[qid]
        answers = gt["answers"] if isinstance(gt, Mapping) else gt
        acc = vqa_accuracy(pred, answers)
        accs.append(acc)
        if isinstance(gt, Mapping) and gt.get("answer_type") is not None:
            by_type.setdefault(gt["answer_type"], []).append(acc)
    out = {"vqa_acc": 100.0 * sum(accs) / len(accs), "n": len(accs)}
    for answer_type, values in sorted(by_type.items()):
        out[_answer_type_key(answer_type)] = 100.0 * sum(values) / len(values)
    return out


# ----------------------------------------------------------------------------------------------
# retrieval recall

RECALL_AT = (1, 5, 10)


def _score_tensor(scores: Any, name: str) -> torch.Tensor:
    t = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))
    t = t.detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-d score matrix, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN scores")
    return t


def _gt_ranks(scores: torch.Tensor, gt_cols: Sequence[Sequence[int]], chunk: int = 1024) -> torch.Tensor:
    """Per row, the best position of a ground-truth column in the row sorted by descending score.

    A non-ground-truth column tied with the best ground-truth score counts as ranked ahead of it,
    so a degenerate constant score matrix gives recall 0 rather than 100.
    """
    n_rows = scores.shape[0]
    ranks = torch.empty(n_rows, dtype=torch.long)
    for start in range(0, n_rows, chunk):
        block = scores[start : start + chunk]
        rows = [r for r in range(block.shape[0]) for _ in gt_cols[start + r]]
        cols = [c for r in range(block.shape[0]) for c in gt_cols[start + r]]
        gt = torch.zeros(block.shape, dtype=torch.bool, device=block.device)
        gt[rows, cols] = True
        best = torch.where(gt, block, torch.full_like(block, -torch.inf)).amax(dim=1, keepdim=True)
        ahead = (block > best).sum(1) + ((block == best) & ~gt).sum(1)
        ranks[start : start + block.shape[0]] = ahead.cpu()
    return ranks


def _recall(ranks: torch.Tensor) -> list[float]:
    return [100.0 * int((ranks < k).sum()) / len(ranks) for k in RECALL_AT]


def retrieval_metrics(
    scores_i2t: Any,
    scores_t2i: Any,
    txt2img: Mapping[int, int] | Sequence[int],
    img2txt: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
) -> dict[str, float]:
    """Recall@1/5/10 (percent) of image-to-text (``txt_r*``) and text-to-image (``img_r*``) retrieval.

    ``scores_i2t`` is (images x texts), ``scores_t2i`` (texts x images), as numpy arrays or tensors;
    ``img2txt[i]`` lists the texts of image i (its rank is the best one among them) and ``txt2img[j]``
    is the image of text j, both indexed 0..n-1 (lists or dicts). Adds ``txt_r_mean``, ``img_r_mean``
    (mean of the three recalls) and ``r_mean`` (mean of those two), and 95 % intervals: Wilson for ``txt_r1`` and
    ``img_r1`` (``*_ci95``), a bootstrap over the queries for ``r_mean`` (``r_mean_ci95``).
    """
    i2t = _score_tensor(scores_i2t, "scores_i2t")
    t2i = _score_tensor(scores_t2i, "scores_t2i")
    n_img, n_txt = i2t.shape
    if tuple(t2i.shape) != (n_txt, n_img):
        raise ValueError(
            f"scores_t2i has shape {tuple(t2i.shape)}, expected (texts, images) = ({n_txt}, {n_img}) "
            f"to match scores_i2t {tuple(i2t.shape)}"
        )
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(
            f"img2txt has {len(img2txt)} entries and txt2img {len(txt2img)}; the score matrices hold "
            f"{n_img} images and {n_txt} texts"
        )
    texts_of = [list(img2txt[i]) for i in range(n_img)]
    empty = [i for i, cols in enumerate(texts_of) if not cols]
    if empty:
        raise ValueError(f"{len(empty)} images have no ground-truth text in img2txt (e.g. {empty[:5]})")
    image_of = [[txt2img[j]] for j in range(n_txt)]
    for name, cols, bound in (("img2txt", texts_of, n_txt), ("txt2img", image_of, n_img)):
        bad = [c for cs in cols for c in cs if not 0 <= c < bound]
        if bad:
            raise ValueError(f"{name} holds indices outside 0..{bound - 1}: {bad[:5]}")

    txt_ranks, img_ranks = _gt_ranks(i2t, texts_of), _gt_ranks(t2i, image_of)
    txt_r, img_r = _recall(txt_ranks), _recall(img_ranks)
    out = {f"txt_r{k}": v for k, v in zip(RECALL_AT, txt_r)}
    out.update({f"img_r{k}": v for k, v in zip(RECALL_AT, img_r)})
    out["txt_r_mean"] = sum(txt_r) / len(txt_r)
    out["img_r_mean"] = sum(img_r) / len(img_r)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["txt_r1_ci95"] = wilson_interval(int((txt_ranks < 1).sum()), n_img)
    out["img_r1_ci95"] = wilson_interval(int((img_ranks < 1).sum()), n_txt)
    out["r_mean_ci95"] = _bootstrap_r_mean(txt_ranks, img_ranks)
    return out


def _bootstrap_r_mean(txt_ranks: torch.Tensor, img_ranks: torch.Tensor, draws: int = 1000) -> list[float]:
    """The 95 % percentile interval of ``r_mean`` over ``draws`` resamplings of the image queries and the text queries
    (a fixed generator: the same ranks always give the same interval)."""
    g = torch.Generator().manual_seed(0)
    ks = torch.tensor(RECALL_AT)

    def resampled(ranks: torch.Tensor) -> torch.Tensor:
        pick = ranks[torch.randint(len(ranks), (draws, len(ranks)), generator=g)]
        return 100.0 * (pick[:, :, None] < ks).double().mean(dim=1).mean(dim=1)

    r_mean = (resampled(txt_ranks.cpu()) + resampled(img_ranks.cpu())) / 2
    lo, hi = torch.quantile(r_mean, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [round(lo, 2), round(hi, 2)]


# ----------------------------------------------------------------------------------------------
# COCO caption scores

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
_JAVA_HINT = (
    "install a Java runtime (e.g. `apt-get install default-jre-headless` or `conda install -c conda-forge "
    "openjdk`) and make sure `java` is on PATH"
)


class CaptionEvalError(RuntimeError):
    """A caption metric could not be computed (no Java, missing packages, a scorer process failed)."""


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise CaptionEvalError(
            f"caption metrics need Java (PTB tokenisation and METEOR run as Java programs), but `java` was "
            f"not found on PATH: {_JAVA_HINT}"
        )
    return java


def _require_coco_eval() -> None:
    try:
        import pycocoevalcap  # noqa: F401
        import pycocotools  # noqa: F401
    except ImportError as e:
        raise CaptionEvalError(
            f"caption metrics need pycocotools and pycocoevalcap (pip install pycocotools pycocoevalcap): {e}"
        ) from e


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's caption tokenisation: Stanford PTBTokenizer (lowercased, one line per caption),
    then its punctuation tokens dropped.

    The same jar and flags as pycocoevalcap's ``PTBTokenizer``, but the input goes to the system
    temporary folder (the package writes next to its jar, which may be read-only) and the tokenizer's
    exit status and messages are checked.
    """
    _require_coco_eval()
    from pycocoevalcap.tokenizer import ptbtokenizer

    java = _require_java()
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    keys = [k for k, caps in captions.items() for _ in caps]
    # one caption per line: a line break inside a caption would shift every later caption
    lines = [c.replace("\r", " ").replace("\n", " ") for caps in captions.values() for c in caps]
    fd, path = tempfile.mkstemp(prefix="ptb_", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write("\n".join(lines).encode())
        proc = subprocess.run(
            [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path],
            capture_output=True,
        )
    finally:
        os.unlink(path)
    out = proc.stdout.decode().split("\n")
    if proc.returncode != 0 or len(out) < len(lines):
        raise CaptionEvalError(
            f"the PTB tokenizer ({jar.name}) failed with exit status {proc.returncode} and returned "
            f"{len(out)} lines for {len(lines)} captions: {proc.stderr.decode(errors='replace')[-2000:]}"
        )
    drop = set(ptbtokenizer.PUNCTUATIONS)
    tokenized: dict[Hashable, list[str]] = {k: [] for k in captions}
    for key, line in zip(keys, out):
        tokenized[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in drop))
    return tokenized


def _meteor_score(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    proc = scorer.meteor_p
    try:
        score, _ = scorer.compute_score(gts, res)
        return score
    except (ValueError, OSError) as e:  # an empty reply or a broken pipe: the JVM is gone
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.kill()
        proc.wait()
        raise CaptionEvalError(
            f"the METEOR scorer (java) stopped with status {proc.returncode}: "
            f"{proc.stderr.read().decode(errors='replace')[-2000:]}"
        ) from e
    finally:
        # the scorer only stops its JVM (2 GB heap) when garbage-collected
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.kill()
        proc.wait()


def coco_caption_scores(
    gt_json_path: str | os.PathLike,
    results: Sequence[Mapping[str, Any]],
    spice: bool = False,
    meteor: bool = True,
) -> dict[str, float]:
    """COCO caption metrics of ``[{image_id: int, caption: str}]`` against a COCO-format ground truth.

    Scores are fractions under the pycocoevalcap names ``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``,
    ``CIDEr``, plus ``SPICE`` when ``spice`` is set (it downloads Stanford CoreNLP models on first use
    and needs a large Java heap, so it is never on by default). ``meteor=False`` skips METEOR, whose
    JVM takes seconds to start. As in BLIP, the images scored are those with a result. Needs Java.
    """
    _require_coco_eval()
    _require_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocotools.coco import COCO

    gt_json_path = Path(gt_json_path)
    if not gt_json_path.is_file():
        raise FileNotFoundError(f"caption ground truth not found: {gt_json_path} (a COCO-format coco_gt file)")
    if not results:
        raise ValueError("no caption results to score")
    bad = [r for r in results if not isinstance(r, Mapping) or "image_id" not in r or "caption" not in r]
    if bad:
        raise ValueError(f"caption results must be {{'image_id', 'caption'}} dicts; got e.g. {bad[0]!r}")
    ids = [r["image_id"] for r in results]
    dup = [i for i, count in Counter(ids).items() if count > 1]
    if dup:
        raise ValueError(f"{len(dup)} duplicate image_ids in the caption results (e.g. {dup[:5]}); de-duplicate first")

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress on stdout
        coco = COCO(str(gt_json_path))
        unknown = sorted(set(ids) - set(coco.getImgIds()), key=str)
        if unknown:
            raise ValueError(
                f"{len(unknown)} result image_ids are not in {gt_json_path} (e.g. {unknown[:5]}); "
                "image ids must be the integer COCO ids of that file"
            )
        # loadRes numbers the annotations in place, so it gets copies
        coco_res = coco.loadRes([dict(r) for r in results])
    img_ids = coco_res.getImgIds()
    if len(img_ids) < len(coco.getImgIds()):
        log.warning("captions for %d of %d ground-truth images; scoring those", len(img_ids), len(coco.getImgIds()))
    no_refs = [i for i in img_ids if not coco.imgToAnns[i]]
    if no_refs:
        raise ValueError(f"{len(no_refs)} images have no reference caption in {gt_json_path} (e.g. {no_refs[:5]})")

    # one tokenizer run for references and candidates (lines are tokenised independently)
    captions = {("gt", i): [a["caption"] for a in coco.imgToAnns[i]] for i in img_ids}
    captions.update({("res", i): [a["caption"] for a in coco_res.imgToAnns[i]] for i in img_ids})
    tokenized = ptb_tokenize(captions)
    gts = {i: tokenized[("gt", i)] for i in img_ids}
    res = {i: tokenized[("res", i)] for i in img_ids}

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)})
    if meteor:
        scores["METEOR"] = float(_meteor_score(gts, res))
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores


# ----------------------------------------------------------------------------------------------
# cross-rank result collection


def _json_value(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"result value not JSON serialisable: {type(obj).__name__}")


def collect_results(
    results: Sequence[Any], result_dir: str | os.PathLike, name: str, dedup_key: str | None = None
) -> list[Any]:
    """Merge every rank's per-sample results, in rank order, into one list returned on every rank.

    Each rank writes ``<result_dir>/<name>_rank<r>.json``; rank 0 writes the merged list to
    ``<result_dir>/<name>.json``. With ``dedup_key`` the first item of each key value is kept (a
    padding sampler repeats samples on the last ranks). The lists travel as JSON text, so the
    returned list is exactly the file's content, identical on all ranks (and needs no shared
    filesystem). Collective: every rank must call it. Works without torch.distributed.
    """
    result_dir = Path(result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(list(results), default=_json_value)
    utils.atomic_write_bytes(result_dir / f"{name}_rank{utils.get_rank()}.json", text.encode())
    merged = [item for part in utils.all_gather_object(text) for item in json.loads(part)]
    if dedup_key is not None:
        kept, seen = [], set()
        for item in merged:
            if not isinstance(item, Mapping) or dedup_key not in item:
                raise KeyError(f"result item without the de-duplication key {dedup_key!r}: {item!r}")
            key = item[dedup_key]
            if key not in seen:
                seen.add(key)
                kept.append(item)
        if len(kept) < len(merged):
            log.info("%s: dropped %d duplicate results by %s", name, len(merged) - len(kept), dedup_key)
        merged = kept
    utils.write_json(result_dir / f"{name}.json", merged)
    utils.barrier()
    return merged
