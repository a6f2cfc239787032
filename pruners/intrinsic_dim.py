"""Intrinsic dimension (TwoNN) of layer representations: exact distances, estimators, collection.

Pure tensor functions; ``compute_id.py`` wires them to a model. Two estimators, never to be mixed
in one ID table (spec F1):

* **textbook** TwoNN (Facco et al. 2017, as scikit-dimension 0.5.0's ``TwoNN``): drop points whose
  nearest neighbour is a duplicate (r1 = 0) or whose two neighbours tie (r1 = r2); keep the
  ``int(N * (1 - discard_fraction))`` smallest ratios mu = r2 / r1 of the N valid points, and fit
  ``-log(1 - k/N) = d * log mu_(k)`` through the origin (``method="linear"``), or take the censored
  maximum-likelihood estimate (``method="mle"``).
* **seed** variant (Nofear18/ID_VL_Pruning ``ComputeID.py``): the same cleaning, no discard (the
  seed's ``fraction`` argument is ignored there), the fit over all valid points but the last two,
  and the *block analysis* aggregate: for b = 1..20, split a random permutation of the points into
  b blocks of ``N // b`` points, estimate each block from its sub-matrix of the distance matrix;
  the ID is the mean over b of the per-b mean, the error bar the std over the 20 blocks at b = 20.
  The permutations come from ``numpy.random.RandomState(seed)``, drawn exactly as the seed draws
  from numpy's global generator, so one stream consumed layer after layer reproduces the seed's
  permutations had it called ``np.random.seed(seed)`` (it does not seed at all).

Distances are exact (spec 1.5: for high-ID layers mu is close to 1, so approximate distances bias d
badly): the Gram matrix is accumulated in float64 over feature chunks, and pairs whose float64
Gram distance is tiny relative to their norms, where cancellation could dominate, are recomputed
from direct differences, so exact duplicates come out as exactly 0.

Rows may arrive as a list of 2-D blocks of different widths (one per batch): a narrower block is
read as zero-padded to the widest one, which is the seed's zero padding of text tokens across
batches, without ever building the padded matrix.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "REPRESENTATIONS",
    "SEED_BLOCKS",
    "DEFAULT_CHUNK_BYTES",
    "BlockAnalysis",
    "IntrinsicDimError",
    "SeedID",
    "block_analysis",
    "fingerprint",
    "neighbour_distances",
    "pairwise_distances",
    "first_group",
    "plan_groups",
    "representation",
    "seed_id",
    "seed_twonn",
    "twonn",
    "twonn_from_neighbours",
]

REPRESENTATIONS = ("flatten", "cls", "mean")
SEED_BLOCKS = tuple(range(1, 21))
MIN_VALID = 4  # the seed raises at 3 or fewer valid points
DEFAULT_CHUNK_BYTES = 128 * 2**20  # float64 feature chunk of the Gram accumulation


class IntrinsicDimError(ValueError):
    """An estimate is impossible on this data; the message says why (too few valid points, ...)."""


Rows = Tensor | Sequence[Tensor]


def _blocks(rows: Rows) -> list[Tensor]:
    blocks = [rows] if isinstance(rows, Tensor) else list(rows)
    if not blocks:
        raise IntrinsicDimError("no rows given: cannot compute distances of an empty set of points")
    for i, b in enumerate(blocks):
        if b.dim() != 2:
            raise ValueError(f"row block {i} must be 2-D (points x features), got shape {tuple(b.shape)}")
    return blocks


# ------------------------------------------------------------------------------------------------ distances


def pairwise_distances(
    rows: Rows,
    device: torch.device | str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    near_rtol: float = 1e-4,
) -> Tensor:
    """Exact Euclidean distance matrix (N, N), float64, of the rows of ``rows``, on ``device``.

    ``rows`` is one (N, D) tensor or a list of (n_i, D_i) blocks stacked along the rows, each read
    as zero-padded to the largest D_i. The Gram matrix is accumulated in float64 over feature
    chunks of at most ``chunk_bytes`` (N x chunk float64), so the working memory beyond the
    (N, N) result is bounded whatever D is. Pairs with d^2 <= ``near_rtol`` * (|x|^2 + |y|^2),
    where the Gram form loses digits, are recomputed from direct differences in float64; the
    diagonal is exactly 0.
    """
    blocks = _blocks(rows)
    device = torch.device(device) if device is not None else blocks[0].device
    n = sum(b.shape[0] for b in blocks)
    step = max(1, chunk_bytes // (8 * n))
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for chunk in _feature_chunks(blocks, step, device):
        gram.addmm_(chunk, chunk.T)
    sq = gram.diagonal().clone()
    d2 = gram.mul_(-2.0).add_(sq[:, None]).add_(sq[None, :]).clamp_(min=0.0)
    near = torch.triu(d2 <= near_rtol * (sq[:, None] + sq[None, :]), diagonal=1).nonzero()
    if near.numel():
        i, j = near[:, 0], near[:, 1]
        exact = torch.zeros(near.shape[0], dtype=torch.float64, device=device)
        for chunk in _feature_chunks(blocks, step, device):
            for p0 in range(0, near.shape[0], n):
                a, b = i[p0 : p0 + n], j[p0 : p0 + n]
                exact[p0 : p0 + n] += (chunk[a] - chunk[b]).square_().sum(dim=1)
        d2[i, j] = exact
        d2[j, i] = exact
    d2.fill_diagonal_(0.0)
    return d2.sqrt_()


def _feature_chunks(blocks: list[Tensor], step: int, device: torch.device) -> Iterable[Tensor]:
    """(N, step) float64 slices of the zero-padded row matrix, left to right."""
    n = sum(b.shape[0] for b in blocks)
    width = max(b.shape[1] for b in blocks)
    for f0 in range(0, width, step):
        f1 = min(width, f0 + step)
        chunk = torch.zeros(n, f1 - f0, dtype=torch.float64, device=device)
        r0 = 0
        for b in blocks:
            if b.shape[1] > f0:
                w = min(b.shape[1], f1) - f0
                chunk[r0 : r0 + b.shape[0], :w] = b[:, f0 : f0 + w].to(device=device, dtype=torch.float64)
            r0 += b.shape[0]
        yield chunk


# ------------------------------------------------------------------------------------------------ TwoNN


def neighbour_distances(dist: Tensor) -> tuple[Tensor, Tensor]:
    """(r1, r2): each point's distances to its first and second nearest neighbours.

    ``dist`` is a (..., N, N) distance matrix with a zero diagonal; as in the seed the row is sorted
    and its first entry (the point itself, or an equal zero) is skipped, so a point with an exact
    duplicate gets r1 = 0.
    """
    if dist.shape[-1] != dist.shape[-2]:
        raise ValueError(f"a distance matrix must be square, got shape {tuple(dist.shape)}")
    if dist.shape[-1] < 3:
        raise IntrinsicDimError(f"TwoNN needs at least 3 points to find two neighbours, got {dist.shape[-1]}")
    smallest = torch.topk(dist, 3, dim=-1, largest=False, sorted=True).values
    return smallest[..., 1], smallest[..., 2]


def _valid(r1: Tensor, r2: Tensor) -> Tensor:
    return (r1 > 0) & (r1 != r2)


def _too_few(r1: Tensor, r2: Tensor, where: str = "") -> IntrinsicDimError:
    n = r1.numel()
    dup = int((r1 == 0).sum())
    ties = int(((r1 != 0) & (r1 == r2)).sum())
    valid = n - dup - ties
    same = "; all points coincide, so this representation does not depend on the input" if dup == n else ""
    return IntrinsicDimError(
        f"only {valid} valid points{where} (of {n}: {dup} have an exact duplicate, r1 = 0; {ties} have "
        f"equal first and second neighbour distances, r1 = r2); TwoNN needs at least {MIN_VALID}{same}"
    )


def twonn_from_neighbours(
    r1: Tensor, r2: Tensor, discard_fraction: float = 0.1, method: str = "linear", f_emp_start: int = 1
) -> float:
    """Textbook TwoNN from first/second neighbour distances (1-D tensors of equal length).

    Points with r1 = 0 or r1 = r2 are removed; of the N valid ratios the
    ``int(N * (1 - discard_fraction))`` smallest are used (at most N - 1: F_emp = 1 has no finite
    log). ``method="linear"`` fits -log(1 - F_emp) = d log mu through the origin with
    F_emp(mu_(k)) = (k - 1 + f_emp_start) / N; ``f_emp_start=0`` gives the 0/N start of older
    scikit-dimension releases. ``method="mle"`` is (k - 1) / (sum log mu_(i<=k) + (N - k) log mu_(k)),
    the unbiased estimate with the discarded ratios censored (scikit-dimension 0.5.0).
    """
    if method not in ("linear", "mle"):
        raise ValueError(f"method must be 'linear' or 'mle', got {method!r}")
    if not 0.0 <= discard_fraction < 1.0:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    r1, r2 = r1.double().flatten(), r2.double().flatten()
    valid = _valid(r1, r2)
    n = int(valid.sum())
    if n < MIN_VALID:
        raise _too_few(r1, r2)
    mu = (r2[valid] / r1[valid]).sort().values
    keep = int(n * (1 - discard_fraction))
    log_mu = mu.log()
    if method == "mle":
        if keep < 2:
            raise IntrinsicDimError(f"discard_fraction {discard_fraction} leaves {keep} of {n} ratios; need 2")
        used = log_mu[:keep]
        return float((keep - 1) / (used.sum() + (n - keep) * used[-1]))
    keep = min(keep, n - 1 + (1 - f_emp_start))
    if keep < 1:
        raise IntrinsicDimError(f"discard_fraction {discard_fraction} leaves no ratio of {n} to fit")
    k = torch.arange(keep, dtype=torch.float64, device=mu.device) + f_emp_start
    x = log_mu[:keep]
    y = -torch.log(1.0 - k / n)
    return float((x * y).sum() / (x * x).sum())


def twonn(dist: Tensor, discard_fraction: float = 0.1, method: str = "linear", f_emp_start: int = 1) -> float:
    """Textbook TwoNN of the points behind the (N, N) distance matrix ``dist``."""
    r1, r2 = neighbour_distances(dist)
    return twonn_from_neighbours(r1, r2, discard_fraction, method, f_emp_start)


def _seed_fit(r1: Tensor, r2: Tensor, where: str = "") -> Tensor:
    """The seed's ``estimate`` on a batch of point sets: r1, r2 are (B, m); returns d, (B,)."""
    r1, r2 = r1.double(), r2.double()
    valid = _valid(r1, r2)
    n_valid = valid.sum(dim=1)
    bad = (n_valid < MIN_VALID).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise _too_few(r1[i], r2[i], f"{where} in block {i}" if r1.shape[0] > 1 else where)
    mu = torch.where(valid, r2 / torch.where(valid, r1, 1.0), torch.inf).sort(dim=1).values
    m = r1.shape[1]
    k = torch.arange(1, m + 1, dtype=torch.float64, device=r1.device)[None, :]
    nv = n_valid[:, None].double()
    used = k <= nv - 2  # the last two sorted ratios are left out: 1 - F_emp reaches 0 at k = N
    x = torch.where(used, mu.log(), 0.0)
    y = torch.where(used, -torch.log((1.0 - k / nv).clamp(min=1e-300)), 0.0)
    return (x * y).sum(dim=1) / (x * x).sum(dim=1)


def seed_twonn(dist: Tensor) -> float:
    """The seed's single-set estimate (``estimate`` in ComputeID.py) on an (N, N) distance matrix."""
    r1, r2 = neighbour_distances(dist)
    return float(_seed_fit(r1[None], r2[None])[0])


@dataclass
class BlockAnalysis:
    blocks: list[int]
    mean: list[float]  # per b: mean of the b block estimates
    std: list[float]  # per b: population std (numpy's default) of the b block estimates
    points: list[int]  # per b: points per block


def block_analysis(dist: Tensor, rng: np.random.RandomState, blocks: Iterable[int] = SEED_BLOCKS) -> BlockAnalysis:
    """Block analysis of the seed: for each b, one ``rng.permutation(N)``, cut into b blocks of N // b.

    The b sub-matrices of one b are estimated together as a batch (same numbers as one at a time).
    """
    n = dist.shape[0]
    out = BlockAnalysis([], [], [], [])
    for b in blocks:
        perm = torch.from_numpy(rng.permutation(n)).to(dist.device)
        m = n // b
        if m < MIN_VALID:
            raise IntrinsicDimError(
                f"block analysis with b = {b} blocks of {n} points leaves {m} points per block; "
                f"at least {MIN_VALID} are needed, so use at least {MIN_VALID * b} samples"
            )
        idx = perm[: m * b].view(b, m)
        sub = dist[idx[:, :, None], idx[:, None, :]]
        r1, r2 = neighbour_distances(sub)
        try:
            d = _seed_fit(r1, r2, f" at b = {b}")
        except IntrinsicDimError as e:
            e.blocks = b  # callers can tell "too few points per block" from "too few points"
            raise
        out.blocks.append(b)
        out.mean.append(float(d.mean()))
        out.std.append(float(d.std(correction=0)))
        out.points.append(m)
    return out


@dataclass
class SeedID:
    id: float  # mean over b of the per-b mean
    std_b20: float  # std of the block estimates at the last b (b = 20)
    per_b: list[float] = field(default_factory=list)


def seed_id(dist: Tensor, rng: np.random.RandomState, blocks: Iterable[int] = SEED_BLOCKS) -> SeedID:
    """The ID the seed writes to ``result_id.txt`` (and ``result_bar.txt``) for one layer."""
    ba = block_analysis(dist, rng, blocks)
    return SeedID(float(np.mean(ba.mean)), ba.std[-1], ba.mean)


# ------------------------------------------------------------------------------------------------ collection


def representation(out: Tensor, samples: int, kind: str = "flatten", token_mask: Tensor | None = None) -> Tensor:
    """One row per sample from a Linear's output ``out`` (rows, T, C) or (rows, C).

    ``rows`` is ``samples`` or a multiple k of it (NLVR2's ViT sees [images0; images1]); the k
    images of a sample are concatenated. ``flatten`` keeps every token x channel (the seed's
    representation), ``cls`` the first token, ``mean`` the mean over tokens, over the positions
    where ``token_mask`` (samples, T) is 1 when it is given (text padding is then left out).
    """
    if kind not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {kind!r}; choose from {', '.join(REPRESENTATIONS)}")
    out = out.detach()
    if out.dim() == 2:
        out = out[:, None]
    rows = out.shape[0]
    if rows % samples:
        raise ValueError(f"a Linear output has {rows} rows, which is not a multiple of the batch's {samples} samples")
    k = rows // samples
    if kind == "cls":
        rep = out[:, :1]
    elif kind == "mean":
        if token_mask is not None:
            if k != 1 or token_mask.shape != out.shape[:2]:
                raise ValueError(
                    f"token mask of shape {tuple(token_mask.shape)} does not fit an output of shape {tuple(out.shape)}"
                )
            w = token_mask.to(out.dtype)[:, :, None]
            rep = (out * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1)
        else:
            rep = out.mean(dim=1, keepdim=True)
    else:
        rep = out
    if k > 1:
        rep = rep.reshape(k, samples, *rep.shape[1:]).transpose(0, 1)
    rep = rep.reshape(samples, -1)
    # A view would keep the module's whole output alive (cls, mean) or be non-contiguous (k > 1).
    if rep.untyped_storage().nbytes() != rep.numel() * rep.element_size() or not rep.is_contiguous():
        rep = rep.clone()
    return rep


def plan_groups(sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    """Cut the modules (in the mapping's order) into consecutive groups whose bytes fit ``budget``.

    Greedy in order, so every group is as large as the budget allows and the number of groups is
    the smallest possible for consecutive groups. A module larger than the budget is an error.
    """
    groups: list[list[str]] = []
    rest = dict(sizes)
    while rest:
        group = first_group(rest, budget)
        groups.append(group)
        for name in group:
            del rest[name]
    return groups


def first_group(sizes: Mapping[str, int], budget: int) -> list[str]:
    """The longest prefix of the modules (in the mapping's order) whose bytes fit ``budget``."""
    group: list[str] = []
    used = 0
    for name, size in sizes.items():
        if used + size > budget:
            break
        group.append(name)
        used += size
    if not group:
        name, size = next(iter(sizes.items()))
        raise IntrinsicDimError(
            f"module {name} needs {format_bytes(size)} of activations, more than the "
            f"{format_bytes(budget)} left for them; raise --max-memory, lower -n, or use --repr cls/mean"
        )
    return group


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} TB"


def parse_bytes(text: str) -> int:
    """``"8GB"`` -> 8e9, ``"512MiB"`` -> 512 * 2**20, ``"1e9"`` -> 1e9 (decimal units, binary with i)."""
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    s = str(text).strip().lower().replace(" ", "")
    i = len(s)
    while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    number, unit = s[:i], s[i:]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 8GB, 512MB or 16GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value)


def fingerprint(obj: Any, h: Any = None) -> str:
    """A hash of a batch (tensors, strings, numbers, nested sequences): equal iff the bytes are equal."""
    top = h is None
    h = hashlib.blake2b(digest_size=16) if top else h
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(f"seq{len(obj)}".encode())
        for item in obj:
            fingerprint(item, h)
    elif isinstance(obj, Mapping):
        for key in sorted(obj):
            h.update(str(key).encode())
            fingerprint(obj[key], h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else ""
