"""Intrinsic dimension (TwoNN) of the output of every PLATON-masked Linear of a model.

The IDs weight PLATON's importance scores (``--useID`` in the seed). As the seed's ComputeID.py:
the model in eval mode sees ``-n`` training samples (rounded up to a multiple of the batch size)
under the training transform, every target Linear's whole output (tokens x channels) is flattened
into one vector per sample, text zero-padded across batches to the longest length, and the seed's
estimator (TwoNN without discard, block analysis over b = 1..20) gives one ID per module.

Unlike the seed nothing is written to disk but the results, and memory stays under --max-memory:
each forward pass over the same n samples keeps the outputs of as many modules as fit, estimates
them, and frees them; further passes are made only for modules that did not fit. Every pass sees
identical inputs (the sample set is a seeded draw and each sample's augmentation is seeded by its
index), which the tool checks batch by batch.

  python compute_id.py --demo                                   # tiny BLIP captioner, synthetic world
  python compute_id.py -n 2000 --config configs/caption_coco.yaml --gpu 0 --max-memory 100GB
  python compute_id.py --config configs/nlvr.yaml --pretrained model_base_nlvr.pth --cpu
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pruners.intrinsic_dim import (
    DEFAULT_CHUNK_BYTES,
    REPRESENTATIONS,
    SEED_BLOCKS,
    IntrinsicDimError,
    fingerprint,
    first_group,
    format_bytes,
    pairwise_distances,
    parse_bytes,
    plan_groups,
    representation,
    seed_id,
    twonn,
)
from pruners.targets import Target, targets
from tasks import registry

# ------------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Adapter:
    """How one task's train batches reach its model: samples per batch and the forward call."""

    samples: Callable[[Sequence[Any]], int]
    forward: Callable[[nn.Module, Sequence[Any], torch.device], Any]


ADAPTERS: dict[str, Adapter] = {
    # (image, caption, image index): the teacher-forced training forward, whose loss is discarded
    "caption": Adapter(lambda b: len(b[1]), lambda m, b, d: m(b[0].to(d), list(b[1]))),
    # (image0, image1, sentence, label): the model takes both images stacked as one batch
    "nlvr": Adapter(lambda b: len(b[2]), lambda m, b, d: m(torch.cat([b[0], b[1]]).to(d), list(b[2]), b[3].to(d))),
    "classification": Adapter(lambda b: b[0].shape[0], lambda m, b, d: m(b[0].to(d))),
}


def _embed_pairs(model: nn.Module, batch: Sequence[Any], device: torch.device) -> Any:
    """(image, caption, image index): both towers embed their half (CLIP has no cross-modal module to feed)."""
    text = model.text_inputs(list(batch[1]), device)
    return model.image_features(batch[0].to(device)), model.text_features(text.input_ids, text.attention_mask)


# Per (task, backbone) where a task's backbones differ in what they are fed.
BACKBONE_ADAPTERS: dict[tuple[str, str], Adapter] = {("retrieval", "clip"): Adapter(lambda b: len(b[1]), _embed_pairs)}

# Tasks whose training forward compute_id knows (ADAPTERS, BACKBONE_ADAPTERS); their modules, configs and datasets come
# from the (task, backbone) table of tasks/registry.py.
TASKS = tuple(task for task in registry.tasks() if task in ADAPTERS or any(k[0] == task for k in BACKBONE_ADAPTERS))


def adapter_for(entry: registry.Entry) -> Adapter:
    """The adapter of ``entry``'s (task, backbone), else of its task; an error names what exists."""
    found = BACKBONE_ADAPTERS.get((entry.task, entry.backbone)) or ADAPTERS.get(entry.task)
    if found is None:
        known = sorted({*(f"{t} ({b})" for t, b in BACKBONE_ADAPTERS), *ADAPTERS})
        raise SystemExit(f"error: compute_id has no forward for task {entry.task} on {entry.backbone}; known: {known}")
    return found


def infer_task(config_path: str | None) -> str:
    if config_path is None:
        return "caption"  # the only model the seed measures
    stem = Path(config_path).stem.lower()
    for task, words in (
        ("caption", ("caption",)),
        ("nlvr", ("nlvr",)),
        ("retrieval", ("retrieval",)),
        ("classification", ("deit", "imagenet", "classif")),
    ):
        if any(w in stem for w in words):
            return task
    raise SystemExit(f"error: cannot tell the task from the config file name {config_path}; pass --task")


# ------------------------------------------------------------------------------------------------ samples


def _sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class SeededSamples(Dataset):
    """The samples ``indices`` of ``dataset``, each drawn under random generators seeded by its index.

    Augmentations (torch crops and flips, NumPy RandomAugment, Python's NLVR2 image swap) are then
    the same in every pass and with any number of loader workers; the caller's generator states are
    restored afterwards.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], seed: int) -> None:
        self.dataset, self.indices, self.seed = dataset, [int(i) for i in indices], seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Any:
        index = self.indices[k]
        s = _sample_seed(self.seed, index)
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            np.random.seed(s)
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)


def draw_samples(size: int, n: int, seed: int) -> np.ndarray:
    """A seeded draw of ``n`` of ``size`` indices without replacement (OnlineComputeID's draw for seed 999)."""
    if n > size:
        raise IntrinsicDimError(f"{n} samples requested but the training split has only {size}; lower -n")
    return np.random.RandomState(seed).choice(size, n, replace=False)


# ------------------------------------------------------------------------------------------------ collection


class Collector:
    """Forward hooks on the target Linears: record output shapes, keep the representations of a group."""

    def __init__(self, model: nn.Module, found: list[Target], kind: str) -> None:
        modules = dict(model.named_modules())
        self.targets = {t.name: t for t in found}
        self.kind = kind
        self.samples = 0
        self.storing: set[str] = set()
        self.record = False
        self.shapes: dict[str, list[tuple[int, ...]]] = {t.name: [] for t in found}
        self.dtypes: dict[str, torch.dtype] = {}
        self.store: dict[str, list[Tensor]] = {}
        self.stored_bytes = 0
        self.peak_bytes = 0
        self.text_mask: Tensor | None = None
        self.handles = []
        for t in found:
            module = modules.get(t.name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target {t.name} is not an nn.Linear of {type(model).__name__}")
            self.handles.append(module.register_forward_hook(self._hook(t)))
        if kind == "mean":
            from models.med import BertModel

            for module in modules.values():
                if isinstance(module, BertModel):
                    self.handles.append(module.register_forward_pre_hook(self._mask_hook, with_kwargs=True))

    def _mask_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        self.text_mask = bound.get("attention_mask")

    def _hook(self, t: Target) -> Callable:
        def hook(module: nn.Module, inputs: Any, out: Tensor) -> None:
            if self.record:
                self.shapes[t.name].append(tuple(out.shape))
                self.dtypes[t.name] = out.dtype
            if t.name not in self.storing:
                return
            mask = None
            if self.kind == "mean" and t.tokens == "text" and self.text_mask is not None:
                mask = self.text_mask
            rep = representation(out, self.samples, self.kind, mask)
            self.store.setdefault(t.name, []).append(rep)
            self.stored_bytes += rep.numel() * rep.element_size()
            self.peak_bytes = max(self.peak_bytes, self.stored_bytes)

        return hook

    def release(self, name: str) -> list[Tensor]:
        rows = self.store.pop(name)
        self.stored_bytes -= sum(r.numel() * r.element_size() for r in rows)
        return rows

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _sample_width(shape: tuple[int, ...], samples: int, kind: str, tokens: int | None = None) -> int:
    """Elements of one sample's representation, from one batch's output shape (``tokens`` overrides T)."""
    k = shape[0] // samples
    t = 1 if len(shape) == 2 else shape[1]
    if tokens is not None:
        t = tokens
    return k * shape[-1] * (t if kind == "flatten" else 1)


def _text_token_bound(model: nn.Module) -> int | None:
    from models.clip import ClipTextTower
    from models.med import BertModel

    bounds = [m.config.max_position_embeddings for m in model.modules() if isinstance(m, BertModel)]
    bounds += [m.context_length for m in model.modules() if isinstance(m, ClipTextTower)]
    return max(bounds) if bounds else None


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class ModuleID:
    name: str
    modality: str
    id: float  # NaN when the estimate failed (see error)
    std_b20: float | None = None
    per_b: list[float] | None = None
    error: str | None = None


@dataclass
class IDResult:
    modules: list[ModuleID]
    n: int
    estimator: str
    repr: str
    passes: list[dict] = field(default_factory=list)  # per pass: modules, activation bytes, seconds
    budget_bytes: int = 0
    reserve_bytes: int = 0  # distance matrix and its working buffers, set aside from the budget
    peak_activation_bytes: int = 0
    forward_s: float = 0.0
    estimate_s: float = 0.0


def measure(
    model: nn.Module,
    adapter: Adapter,
    batches: Callable[[], Iterable[Sequence[Any]]],
    n: int,
    *,
    found: list[Target] | None = None,
    kind: str = "flatten",
    estimator: str = "seed",
    max_memory: int = 8 * 10**9,
    seed: int = 999,
    device: torch.device | str = "cpu",
    discard_fraction: float = 0.1,
    fit: str = "linear",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    keep_going: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> IDResult:
    """IDs of ``found`` (default: :func:`pruners.targets.targets` of ``model``), in that order.

    ``batches()`` must yield the same ``n`` samples, identically, every time it is called: one
    call per pass (plus one for a first batch that measures the output shapes). ``max_memory``
    bounds the kept representations plus the distance work; the model and one batch's forward
    are not counted. A module whose estimate is impossible (too few valid points) raises, or with
    ``keep_going`` gets a NaN ID and an ``error`` while the others go on.
    """
    if kind not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {kind!r}; choose from {', '.join(REPRESENTATIONS)}")
    if estimator not in ("seed", "textbook"):
        raise ValueError(f"estimator must be 'seed' or 'textbook', got {estimator!r}")
    device = torch.device(device)
    progress = progress and not os.environ.get("TQDM_DISABLE")
    found = targets(model) if found is None else found
    model.eval()
    collector = Collector(model, found, kind)
    rng = np.random.RandomState(seed)  # the block-analysis permutations, consumed in module order
    result = IDResult([], n, estimator, kind, budget_bytes=max_memory)
    modality = {t.name: t.modality for t in found}
    try:
        # The shapes of one batch size the first pass; text lengths vary by batch, so until a full
        # pass has shown them, text-token modules are planned at the text model's position limit.
        first = next(iter(batches()))
        collector.samples = adapter.samples(first)
        collector.record = True
        with torch.no_grad():
            adapter.forward(model, first, device)
        bound = _text_token_bound(model)
        sizes, widest, exact = {}, 1, []
        for t in found:
            if not collector.shapes[t.name]:
                raise RuntimeError(f"the forward pass never called target module {t.name}")
            t_tokens = bound if t.tokens == "text" and kind == "flatten" else None
            if t_tokens is None:
                exact.append(t.name)
            width = _sample_width(collector.shapes[t.name][0], collector.samples, kind, t_tokens)
            sizes[t.name] = n * width * collector.dtypes[t.name].itemsize
            widest = max(widest, width)
        # Distance work: the float64 (n, n) matrix twice over (Gram and comparisons, or the result
        # and a block-analysis gather), plus up to four (n, chunk) float64 feature chunks.
        chunk = min(widest, max(1, chunk_bytes // (8 * n)))
        reserve = 16 * n * n + n * n + 32 * n * chunk
        result.reserve_bytes = reserve
        budget = max_memory - reserve
        if budget <= 0:
            raise IntrinsicDimError(
                f"--max-memory {format_bytes(max_memory)} leaves nothing for activations: the {n} x {n} "
                f"distance matrix and its buffers need {format_bytes(reserve)}"
            )
        plan_groups({name: sizes[name] for name in exact}, budget)  # a module too large for any pass fails now
        collector.shapes = {t.name: [] for t in found}

        pending = [t.name for t in found]
        prints: list[str] = []
        batch_samples: list[int] = []
        p = 0
        while pending:
            group = first_group({name: sizes[name] for name in pending}, budget)
            collector.storing = set(group)
            collector.record = p == 0
            t0 = time.time()
            bar = tqdm(total=n, desc=f"pass {p + 1}: forward, keeping {len(group)} modules", disable=not progress)
            seen = 0
            with torch.no_grad():
                for i, batch in enumerate(batches()):
                    stamp = fingerprint(batch)
                    if p == 0:
                        prints.append(stamp)
                    elif i >= len(prints) or stamp != prints[i]:
                        raise RuntimeError(
                            f"pass {p + 1} got other inputs than pass 1 at batch {i}: the batches must be "
                            "identical in every pass (fixed samples, seeded augmentation)"
                        )
                    collector.samples = adapter.samples(batch)
                    if p == 0:
                        batch_samples.append(collector.samples)
                    adapter.forward(model, batch, device)
                    seen += collector.samples
                    bar.update(collector.samples)
            bar.close()
            if seen != n:
                raise RuntimeError(f"pass {p + 1} saw {seen} samples, expected {n}")
            forward_s = time.time() - t0
            if p == 0:
                # Every batch's output shapes are known now: plan the later passes exactly.
                for t in found:
                    shapes = collector.shapes[t.name]
                    if len(shapes) != len(batch_samples):
                        raise RuntimeError(
                            f"module {t.name} ran {len(shapes)} times in {len(batch_samples)} batches; "
                            "a target must run exactly once per forward"
                        )
                    item = collector.dtypes[t.name].itemsize
                    sizes[t.name] = sum(
                        b * _sample_width(shape, b, kind) * item for shape, b in zip(shapes, batch_samples)
                    )
                rest = plan_groups({name: sizes[name] for name in pending[len(group) :]}, budget)
                if rest:
                    log(f"pass 1 measured every module's output: {len(rest)} more pass(es) needed")
            stored = sum(sum(r.numel() * r.element_size() for r in collector.store.get(name, [])) for name in group)
            t0 = time.time()
            for name in tqdm(group, desc=f"pass {p + 1}: TwoNN", disable=not progress):
                rows = collector.release(name)
                dist = pairwise_distances(rows, device=device, chunk_bytes=chunk_bytes)
                del rows
                state = rng.get_state()
                try:
                    if estimator == "seed":
                        s = seed_id(dist, rng)
                        result.modules.append(ModuleID(name, modality[name], s.id, s.std_b20, s.per_b))
                    else:
                        result.modules.append(ModuleID(name, modality[name], twonn(dist, discard_fraction, fit)))
                except IntrinsicDimError as e:
                    hint = ""
                    if getattr(e, "blocks", 1) > 1:
                        hint = f" (each of the {e.blocks} blocks needs 4 valid points: more samples help)"
                    message = f"module {name}: {e}{hint}"
                    if not keep_going:
                        raise IntrinsicDimError(message) from None
                    log(f"no ID: {message}")
                    result.modules.append(ModuleID(name, modality[name], math.nan, error=message))
                    # Later modules must get the permutations they would get had this one succeeded.
                    rng.set_state(state)
                    for _ in SEED_BLOCKS:
                        rng.permutation(n)
                del dist
            estimate_s = time.time() - t0
            result.passes.append(
                {
                    "modules": group,
                    "activation_bytes": stored,
                    "forward_s": round(forward_s, 3),
                    "estimate_s": round(estimate_s, 3),
                }
            )
            result.forward_s += forward_s
            result.estimate_s += estimate_s
            log(
                f"pass {p + 1}: {len(group)} modules ({group[0]} .. {group[-1]}), {format_bytes(stored)} of "
                f"activations, forward {forward_s:.1f} s, TwoNN {estimate_s:.1f} s"
            )
            pending = pending[len(group) :]
            p += 1
    finally:
        collector.close()
    result.peak_activation_bytes = collector.peak_bytes
    return result


# ------------------------------------------------------------------------------------------------ outputs


def write_outputs(result: IDResult, out: Path, meta: dict) -> None:
    """ids.json, ids.csv, the seed's result_id.txt / result_bar.txt / ID.txt, ID.png and run.json."""
    out.mkdir(parents=True, exist_ok=True)
    seed = result.estimator == "seed"
    ids = {}
    for m in result.modules:
        if m.error is not None:
            ids[m.name] = {"id": None, "error": m.error}
        else:
            ids[m.name] = {"id": m.id, "std_b20": m.std_b20, "per_b": m.per_b} if seed else {"id": m.id}
    (out / "ids.json").write_text(json.dumps(ids, indent=1) + "\n")
    with open(out / "ids.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "modality", "id"])
        for m in result.modules:
            w.writerow([m.name, m.modality, "" if m.error else repr(m.id)])
    # The seed's files: one value per line in module order; ID.txt names the order.
    (out / "result_id.txt").write_text("".join(f"{m.id!r}\n" for m in result.modules))
    bar = out / "result_bar.txt"
    if seed:
        bar.write_text("".join(f"{math.nan if m.error else m.std_b20!r}\n" for m in result.modules))
    elif bar.exists():
        bar.unlink()  # a textbook run has no block analysis; a stale seed file must not survive
    (out / "ID.txt").write_text("".join(f"name: {m.name}, modality: {m.modality}\n" for m in result.modules))
    plot_ids(result, out / "ID.png", title=meta.get("title", ""))
    run = {
        **meta,
        "n": result.n,
        "estimator": result.estimator,
        "repr": result.repr,
        "modules": len(result.modules),
        "failed": {m.name: m.error for m in result.modules if m.error},
        "passes": len(result.passes),
        "pass_details": result.passes,
        "max_memory_bytes": result.budget_bytes,
        "distance_reserve_bytes": result.reserve_bytes,
        "peak_activation_bytes": result.peak_activation_bytes,
        "forward_s": round(result.forward_s, 2),
        "estimate_s": round(result.estimate_s, 2),
    }
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")


def plot_ids(result: IDResult, path: Path, title: str = "") -> None:
    """ID against relative depth, vision on [0, 1) and text on [1, 2), as the seed's ID.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 4))
    for offset, (modality, colour, label) in enumerate(
        (("vision", "#fdf2f6", "Vision"), ("text", "#f2f7fd", "Language"))
    ):
        mods = [m for m in result.modules if m.modality == modality]
        ax.axvspan(offset, offset + 1, color=colour, zorder=0)
        if not mods:
            continue
        ax.text(offset + 0.5, 0.93, label, transform=ax.get_xaxis_transform(), ha="center", fontsize=13)
        x = np.array([offset + i / len(mods) for i in range(len(mods))])
        y = np.array([m.id for m in mods])
        first = offset == 0 or not any(m.modality == "vision" for m in result.modules)
        ax.plot(x, y, marker="*", color="#5b4de0", lw=1.5, ms=6, label="ID" if first else None)
        if result.estimator == "seed":
            err = np.array([math.nan if m.error else m.std_b20 for m in mods])
            band = "± std over the 20 blocks at b = 20" if first else None
            ax.fill_between(x, y - err, y + err, color="#5b4de0", alpha=0.15, lw=0, label=band)
    ax.set_xlim(0, 2)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax.set_xlabel("Relative depth (vision 0-1, language 1-2)")
    ax.set_ylabel("Intrinsic dimension")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI


OUTPUTS_HELP = """Outputs in --output:
  ids.json        module name -> {id, std_b20, per_b} (seed estimator) or {id} (textbook); PLATON reads it by name
  ids.csv         name, modality, id
  result_id.txt   the seed's file: one ID per line, in module order
  result_bar.txt  the seed's file: one std over the b = 20 blocks per line (seed estimator only)
  ID.txt          the module order of those files, one name per line
  ID.png          ID against relative depth, vision then language
  run.json        settings, passes, memory and times"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compute_id.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join([*__doc__.split("\n\n")[1:], OUTPUTS_HELP]),
    )
    p.add_argument(
        "-n",
        "--nsamples",
        type=int,
        default=2000,
        help="samples (rounded up to a multiple of --batch_size; default 2000)",
    )
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--cpu", action="store_true", help="run everything on the CPU")
    dev.add_argument(
        "--gpu", type=int, default=None, metavar="K", help="run on cuda:K (default: cuda:0 when present, else CPU)"
    )
    p.add_argument(
        "--config",
        default=None,
        help="task YAML (default: configs/caption_coco.yaml, or the task's demo config with --demo)",
    )
    p.add_argument(
        "--demo", action="store_true", help="the tiny demo model on the synthetic world (generated on first use)"
    )
    p.add_argument(
        "--task", choices=sorted(TASKS), default=None, help="task of the model (default: from the config file name)"
    )
    p.add_argument(
        "--pretrained", default=None, help="weights to measure (overrides the config; '' measures random weights)"
    )
    p.add_argument(
        "--output", default=None, help="result folder (default output/id/<task>, output/demo/id/<task> with --demo)"
    )
    p.add_argument(
        "--max-memory",
        default="8GB",
        help="budget for the kept activations plus the n x n distance work (model and one forward not counted); "
        "modules that do not fit go to further passes (default 8GB; units KB/MB/GB, KiB/MiB/GiB)",
    )
    p.add_argument(
        "--repr",
        choices=REPRESENTATIONS,
        default="flatten",
        help="per-sample vector: flatten = all tokens x channels, text zero-padded across batches (the seed's); "
        "cls = first token; mean = mean over tokens, text padding left out",
    )
    p.add_argument(
        "--estimator",
        choices=("seed", "textbook"),
        default="seed",
        help="seed = the seed's TwoNN (no discard) averaged by block analysis over b = 1..20; textbook = "
        "Facco TwoNN on all n points with --discard-fraction. Never mix tables of the two.",
    )
    p.add_argument(
        "--discard-fraction", type=float, default=0.1, help="textbook: largest ratios left out (default 0.1)"
    )
    p.add_argument(
        "--fit", choices=("linear", "mle"), default="linear", help="textbook: line fit or maximum likelihood"
    )
    p.add_argument(
        "--batch_size", "--batch-size", type=int, default=16, help="forward batch size (default 16, the seed's)"
    )
    p.add_argument(
        "--seed", type=int, default=999, help="sample draw, augmentation and block permutations (default 999)"
    )
    p.add_argument(
        "--transform",
        choices=("train", "eval"),
        default="train",
        help="train = training augmentation, seeded per sample (the seed's); eval = the test transform",
    )
    p.add_argument("--workers", type=int, default=0, help="data loader workers (default 0)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, typed, repeatable (as in the compress_* scripts)",
    )
    return p


def _resolve(args: argparse.Namespace, task: str) -> tuple[registry.Entry, dict]:
    from config import ConfigError

    flags = {"pretrained": args.pretrained} if args.pretrained is not None else {}
    try:
        return registry.resolve(task, args.config, demo=args.demo, overrides=args.overrides, flags=flags)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def _device(args: argparse.Namespace) -> torch.device:
    if args.cpu:
        return torch.device("cpu")
    if args.gpu is not None:
        if not torch.cuda.is_available() or args.gpu >= torch.cuda.device_count():
            raise SystemExit(f"error: --gpu {args.gpu} given but that CUDA device is not available; pass --cpu")
        return torch.device(f"cuda:{args.gpu}")
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _train_split(entry: registry.Entry, config: dict, transform: str) -> Dataset:
    from data import build_imagenet_transform, build_transform, create_dataset

    task = entry.task
    # One sample per NLVR2 statement, as the seeds take them, even where training batches a pair's statements.
    split = create_dataset(entry.dataset, {**config, "nlvr_group_pairs": False})[0]
    if task == "classification":
        if config["num_classes"] is None:
            config["num_classes"] = len(split.classes)
        if transform == "eval":
            split.transform = build_imagenet_transform("val", config["image_size"], config)
    elif transform == "eval":
        split.transform = build_transform("test", config["image_size"], config)
    return split


def main(argv: list[str] | None = None) -> IDResult:
    args = build_parser().parse_args(argv)
    task = args.task or infer_task(args.config)
    entry, config = _resolve(args, task)
    try:
        max_memory = parse_bytes(args.max_memory)
    except ValueError as e:
        raise SystemExit(f"error: --max-memory: {e}") from None
    if args.nsamples < 1 or args.batch_size < 1:
        raise SystemExit("error: -n and --batch_size must be positive")
    device = _device(args)
    out = Path(args.output or (f"output/demo/id/{task}" if args.demo else f"output/id/{task}"))
    if args.demo:
        from data.synthetic import ensure_demo_world

        ensure_demo_world(config["world"])

    module = entry.load()
    adapter = adapter_for(entry)
    dataset = _train_split(entry, config, args.transform)
    n = math.ceil(args.nsamples / args.batch_size) * args.batch_size
    try:
        indices = draw_samples(len(dataset), n, args.seed)
    except IntrinsicDimError as e:
        raise SystemExit(f"error: {e}") from None
    torch.manual_seed(args.seed)  # random weights, when no checkpoint is given, are reproducible too
    model = module.build_model(config)
    if config.get("pretrained"):
        module.load_pretrained(model, config["pretrained"], config)
    else:
        print("note: no --pretrained weights: measuring a randomly initialised model", file=sys.stderr)
    model.to(device).eval()
    samples = SeededSamples(dataset, indices, args.seed)

    def batches() -> DataLoader:
        return DataLoader(samples, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)

    found = targets(model)
    print(
        f"compute_id: {task}, {len(found)} modules ({sum(t.modality == 'vision' for t in found)} vision), n = {n}, "
        f"repr {args.repr}, estimator {args.estimator}, {device}, max memory {format_bytes(max_memory)}",
        file=sys.stderr,
    )
    t0 = time.time()
    try:
        result = measure(
            model,
            adapter,
            batches,
            n,
            found=found,
            kind=args.repr,
            estimator=args.estimator,
            max_memory=max_memory,
            seed=args.seed,
            device=device,
            discard_fraction=args.discard_fraction,
            fit=args.fit,
            keep_going=True,
            log=lambda s: print(s, file=sys.stderr),
        )
    except IntrinsicDimError as e:
        raise SystemExit(f"error: {e}") from None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    meta = {
        "task": task,
        "config": config["_source"],
        "pretrained": config.get("pretrained") or None,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "transform": args.transform,
        "device": str(device),
        "discard_fraction": args.discard_fraction if args.estimator == "textbook" else None,
        "fit": args.fit if args.estimator == "textbook" else None,
        "peak_rss_bytes": peak_rss,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "time_s": round(time.time() - t0, 2),
        "command": " ".join(sys.argv),
        "title": f"{task}: {args.estimator} TwoNN, repr {args.repr}, n = {n}",
    }
    write_outputs(result, out, meta)
    print(
        f"{len(result.modules)} IDs in {out} after {len(result.passes)} pass(es): peak activations "
        f"{format_bytes(result.peak_activation_bytes)} + distance work {format_bytes(result.reserve_bytes)} "
        f"(budget {format_bytes(max_memory)}), process peak RSS {format_bytes(peak_rss)}, {meta['time_s']} s",
        file=sys.stderr,
    )
    failed = [m for m in result.modules if m.error]
    if failed:
        raise SystemExit(
            f"error: {len(failed)} of {len(result.modules)} modules have no ID (null in ids.json, nan in "
            f"result_id.txt), the first: {failed[0].error}"
        )
    return result


if __name__ == "__main__":
    main()
