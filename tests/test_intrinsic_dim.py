"""TwoNN estimators and exact distances (pruners/intrinsic_dim.py): known dimensions, scikit-dimension
as an oracle for the textbook estimator, a from-the-spec numpy reference for the seed's variant, and the
chunked / ragged distance computation against scipy."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform

from pruners.intrinsic_dim import (
    IntrinsicDimError,
    block_analysis,
    fingerprint,
    neighbour_distances,
    pairwise_distances,
    parse_bytes,
    plan_groups,
    representation,
    seed_id,
    seed_twonn,
    twonn,
    twonn_from_neighbours,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def embed(z, dim, rng):
    """``z`` rotated into ``dim`` dimensions by a random orthonormal map (a linear embedding)."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, z.shape[1])))
    return z @ q.T


def subspace(n, d, rng, dim=100):
    return embed(rng.standard_normal((n, d)), dim, rng)


def sphere(n, d, rng, dim=100):
    s = rng.standard_normal((n, d + 1))
    return embed(s / np.linalg.norm(s, axis=1, keepdims=True), dim, rng)


def dist(x):
    return pairwise_distances(torch.as_tensor(x))


# ------------------------------------------------------------------------------------------------ the spec's
# seed estimator, written out in numpy, unchunked (ComputeID.py's estimate and block_analysis)


def reference_estimate(x):
    s = np.sort(x, axis=1)
    r1, r2 = s[:, 1], s[:, 2]
    good = np.setdiff1d(np.arange(len(s)), np.where(r1 == 0)[0])
    good = np.setdiff1d(good, np.where(r1 == r2)[0])
    n = len(good)
    if n <= 3:
        raise ValueError("too few points")
    mu = np.sort(r2[good] / r1[good])
    f = np.arange(1, n + 1) / n
    xs, ys = np.log(mu[:-2]), -np.log(1 - f[:-2])
    return float(xs @ ys / (xs @ xs))


def reference_block_analysis(x, rs):
    n = len(x)
    means, stds = [], []
    for b in range(1, 21):
        idx = rs.permutation(n)
        m = n // b
        parts = np.split(idx[: m * b], b)
        est = [reference_estimate(x[np.ix_(p, p)]) for p in parts]
        means.append(np.mean(est))
        stds.append(np.std(est))
    return float(np.mean(means)), float(stds[19]), means


# ------------------------------------------------------------------------------------------------ textbook


@pytest.mark.parametrize("d", [2, 5, 10])
@pytest.mark.parametrize("shape", ["subspace", "sphere"])
def test_textbook_recovers_known_dimension(d, shape):
    rng = np.random.default_rng(d)
    x = (subspace if shape == "subspace" else sphere)(2000, d, rng)
    assert abs(twonn(dist(x)) - d) < 0.1 * d


# skdim also builds the (unused) -log(1 - F_emp) column in its MLE branch, which reaches log(0) at discard 0
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("discard, method", [(0.1, "linear"), (0.25, "linear"), (0.0, "mle"), (0.1, "mle")], ids=str)
def test_textbook_equals_scikit_dimension(discard, method):
    import skdim  # the oracle (requirements-dev.txt); imported here because numba takes seconds to load

    rng = np.random.default_rng(7)
    x = subspace(1000, 6, rng)  # continuous data: no duplicates, no ties, where the conventions agree
    d = dist(x)
    r1, r2 = neighbour_distances(d)
    assert bool((r1 > 0).all()) and bool((r1 != r2).all())
    ours = twonn(d, discard_fraction=discard, method=method)
    on_points = skdim.id.TwoNN(discard_fraction=discard, method=method).fit(x).dimension_
    # dist=True takes (r1, r2) columns, not a distance matrix
    on_neighbours = skdim.id.TwoNN(discard_fraction=discard, dist=True, method=method).fit(
        torch.stack([r1, r2], 1).numpy()
    )
    assert ours == pytest.approx(on_points, rel=1e-6, abs=1e-6)
    assert ours == pytest.approx(on_neighbours.dimension_, rel=1e-9)


def test_textbook_zero_start_of_the_empirical_cdf():
    """Older scikit-dimension releases put F_emp at 0/N for the smallest ratio: one option away."""
    rng = np.random.default_rng(3)
    r1, r2 = neighbour_distances(dist(subspace(500, 4, rng)))
    mu = np.sort((r2 / r1).numpy())
    keep = int(len(mu) * 0.9)
    x, y = np.log(mu[:keep]), -np.log(1 - np.arange(keep) / len(mu))
    assert twonn_from_neighbours(r1, r2, 0.1, f_emp_start=0) == pytest.approx(x @ y / (x @ x), rel=1e-12)


# ------------------------------------------------------------------------------------------------ seed variant


def test_seed_variant_equals_the_spec_reference():
    rng = np.random.default_rng(11)
    layers = [subspace(400, 8, rng, 60), sphere(400, 3, rng, 60)]
    layers[0][5] = layers[0][9]  # an exact duplicate: r1 = 0 for both, a tie for their neighbours
    ours_rs, ref_rs = np.random.RandomState(999), np.random.RandomState(999)
    for x in layers:  # one stream consumed layer after layer, as the tool does
        ref = squareform(pdist(x))
        got = seed_id(dist(x), ours_rs)
        want_id, want_std, want_per_b = reference_block_analysis(ref, ref_rs)
        assert got.id == pytest.approx(want_id, rel=1e-10)
        assert got.std_b20 == pytest.approx(want_std, rel=1e-8)
        assert got.per_b == pytest.approx(want_per_b, rel=1e-10)
        assert seed_twonn(dist(x)) == pytest.approx(reference_estimate(ref), rel=1e-10)


def test_block_analysis_sizes_and_determinism():
    d = dist(subspace(203, 4, np.random.default_rng(0)))
    a = block_analysis(d, np.random.RandomState(5))
    b = block_analysis(d, np.random.RandomState(5))
    assert a.blocks == list(range(1, 21)) and a.points == [203 // k for k in range(1, 21)]
    assert a.mean == b.mean and a.std[0] == 0.0
    with pytest.raises(IntrinsicDimError, match="3 points per block"):
        block_analysis(dist(subspace(79, 4, np.random.default_rng(0))), np.random.RandomState(0))


# ------------------------------------------------------------------------------------------------ invariances, cleaning


def test_invariant_to_global_scaling_and_rotation():
    rng = np.random.default_rng(2)
    x = subspace(600, 5, rng, 40)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    y = 37.5 * x @ q + 3.0
    for estimate in (twonn, seed_twonn, lambda d: seed_id(d, np.random.RandomState(1)).id):
        assert estimate(dist(y)) == pytest.approx(estimate(dist(x)), rel=1e-9)


def test_duplicates_and_ties_are_removed():
    rng = np.random.default_rng(4)
    r1 = torch.as_tensor(rng.uniform(1, 2, 300))
    r2 = r1 * torch.as_tensor(rng.uniform(1.01, 3, 300))
    clean = twonn_from_neighbours(r1, r2)
    dup_r1 = torch.cat([r1, torch.zeros(7)])  # exact duplicates
    dup_r2 = torch.cat([r2, torch.ones(7)])
    tie = torch.full((5,), 2.0)  # r1 = r2
    assert twonn_from_neighbours(torch.cat([dup_r1, tie]), torch.cat([dup_r2, tie])) == clean


def test_duplicate_points_give_zero_distances():
    x = np.random.default_rng(0).standard_normal((50, 30)).astype(np.float32)
    x[3] = x[17]
    x[40] = x[17]
    d = dist(x)
    assert d[3, 17] == 0 and d[17, 40] == 0 and d[40, 3] == 0
    r1, _ = neighbour_distances(d)
    assert (r1 == 0).nonzero().flatten().tolist() == [3, 17, 40]


def test_fewer_than_four_valid_points_is_an_error():
    r1 = torch.tensor([1.0, 0.0, 0.0, 2.0, 1.0, 3.0])
    r2 = torch.tensor([2.0, 1.0, 1.0, 2.0, 1.5, 4.0])
    with pytest.raises(IntrinsicDimError, match=r"only 3 valid points \(of 6: 2 have an exact duplicate.*1 have equal"):
        twonn_from_neighbours(r1, r2)
    # two duplicate pairs and the point between them, whose two neighbours tie
    with pytest.raises(IntrinsicDimError, match=r"only 0 valid points \(of 5: 4 have an exact duplicate"):
        seed_twonn(dist(np.array([[0.0], [0.0], [1.0], [3.0], [3.0]])))


# ------------------------------------------------------------------------------------------------ distances


def test_chunked_ragged_distances_equal_the_padded_matrix():
    rng = np.random.default_rng(9)
    widths = [120, 75, 120, 30]  # e.g. text tokens x channels of four batches
    blocks = [rng.standard_normal((n, w)).astype(np.float32) for n, w in zip([16, 16, 9, 5], widths)]
    blocks[1][3] = 0.0  # a zero row
    blocks[2][0, :75] = blocks[1][5]  # equal to a narrower row once that one is zero-padded
    blocks[2][0, 75:] = 0.0
    padded = np.zeros((46, 120))
    r = 0
    for b in blocks:
        padded[r : r + len(b), : b.shape[1]] = b
        r += len(b)
    want = squareform(pdist(padded))
    one_shot = pairwise_distances(torch.from_numpy(padded))
    for chunk in (8 * 46, 8 * 46 * 7, 2**30):  # one feature per chunk, 7, all
        got = pairwise_distances([torch.from_numpy(b) for b in blocks], chunk_bytes=chunk)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.numpy(), one_shot.numpy(), rtol=1e-12, atol=1e-12)
    assert got[16 + 5, 32] == 0.0 and got.diagonal().abs().max() == 0.0


def test_near_pairs_are_exact_despite_large_norms():
    """Two points 1e-6 apart at norm 1e3: the float64 Gram form alone would lose most digits."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 500)) + 1e3 / np.sqrt(500)
    x[7] = x[3] + 1e-6 * rng.standard_normal(500)
    np.testing.assert_allclose(dist(x).numpy(), squareform(pdist(x)), rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------------ collection helpers


def test_representations():
    out = torch.arange(2 * 3 * 3 * 2, dtype=torch.float32).view(6, 3, 2)  # 2 images of 3 samples
    flat = representation(out, 3, "flatten")
    assert flat.shape == (3, 12) and torch.equal(flat[1], torch.cat([out[1].flatten(), out[4].flatten()]))
    cls = representation(out, 3, "cls")
    assert torch.equal(cls[2], torch.cat([out[2, 0], out[5, 0]]))
    assert cls.untyped_storage().nbytes() == cls.numel() * 4  # not a view of the whole output
    text = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    mean = representation(text, 2, "mean", mask)
    torch.testing.assert_close(mean[0], text[0, :2].mean(0))
    torch.testing.assert_close(mean[1], text[1].mean(0))
    with pytest.raises(ValueError, match="not a multiple of the batch's 4 samples"):
        representation(torch.zeros(6, 2, 2), 4)


def test_plan_groups_fills_each_pass_in_order():
    sizes = {"a": 4, "b": 3, "c": 5, "d": 1, "e": 6}
    assert plan_groups(sizes, 8) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_groups(sizes, 100) == [list(sizes)]
    with pytest.raises(IntrinsicDimError, match="module e needs 6 B"):
        plan_groups(sizes, 5)


def test_parse_bytes_and_fingerprint():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1e6") == 10**6
    with pytest.raises(ValueError, match="cannot read memory size '8 parsecs'"):
        parse_bytes("8 parsecs")
    batch = (torch.ones(2, 3), ["a picture of", "b"], torch.tensor([1, 2]))
    assert fingerprint(batch) == fingerprint((torch.ones(2, 3), ["a picture of", "b"], torch.tensor([1, 2])))
    assert fingerprint(batch) != fingerprint((torch.ones(2, 3), ["a picture of", "c"], torch.tensor([1, 2])))
