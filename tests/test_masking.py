"""Block-wise masking: statistics against the reference measurements (§2.5), modes, grids, edge cases."""

import math

import numpy as np
import pytest

from beit.data.masking import MaskingGenerator, proportional_min_patches


@pytest.fixture(scope="module")
def official_masks():
    gen = MaskingGenerator()  # 14x14, 75, min 16, aspect 0.3, official
    rng = np.random.default_rng(0)
    return np.stack([gen(rng) for _ in range(20_000)])  # [20000, 14, 14] bool, ~1 s


def test_official_count_statistics(official_masks):
    counts = official_masks.sum(axis=(1, 2))
    assert abs(counts.mean() - 74.47) < 0.3
    assert counts.max() == 75
    assert counts.min() > 0
    # The reference's "min 64" is a sample minimum: the official algorithm (re-implemented with Python's
    # random) gives <= 63 about once per 80k masks, and this seed draws one 63. The tail is what matters.
    assert counts.min() >= 62
    assert (counts < 64).mean() < 1e-3
    assert abs((counts == 75).mean() - 0.666) < 0.02


def test_official_position_statistics(official_masks):
    p = official_masks.mean(axis=0)  # [14, 14] per-position mask probability
    assert p.min() > 0.02  # every position, incl. the last row/column (mmpretrain never masks them)
    assert p[-1].mean() > 0.1 and p[:, -1].mean() > 0.1
    # Reference "border ≈ 0.13" averages the two border rows and columns (56 entries, corners counted twice).
    border = np.concatenate([p[0], p[-1], p[:, 0], p[:, -1]])
    assert abs(border.mean() - 0.13) < 0.02
    corners = p[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert abs(corners.mean() - 0.04) < 0.015
    assert abs(p[2:12, 2:12].mean() - 0.54) < 0.02
    assert abs(p[6:8, 6:8].mean() - 0.71) < 0.03
    # Symmetry of the sampler: flipped statistics agree (a one-sided bound bug would break this).
    assert np.abs(p - p[::-1, ::-1]).max() < 0.03


def test_exact_mode_always_target():
    gen = MaskingGenerator(mode="exact")
    rng = np.random.default_rng(1)
    counts = [gen(rng).sum() for _ in range(3000)]
    assert set(counts) == {75}


def test_blocks_respect_bounds_and_aspect():
    gen = MaskingGenerator()
    rng = np.random.default_rng(2)
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    n_blocks = 0
    for _ in range(2000):
        mask, blocks = gen.sample(rng)
        rebuilt = np.zeros_like(mask)
        for top, left, h, w in blocks:
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
            assert 1 <= h < 14 and 1 <= w < 14  # official strict test: a block never spans the grid
            # h = round(sqrt(A·a)), w = round(sqrt(A/a)) => the drawn aspect a = sqrt(Aa)/sqrt(A/a) lies in
            # [(h - 0.5)/(w + 0.5), (h + 0.5)/(w - 0.5)]; that interval must meet [0.3, 1/0.3].
            assert math.log((h - 0.5) / (w + 0.5)) <= hi + 1e-9
            assert math.log((h + 0.5) / (w - 0.5)) >= lo - 1e-9
            rebuilt[top : top + h, left : left + w] = True
            n_blocks += 1
        assert (rebuilt == mask).all()  # official mode: the mask is exactly the union of its blocks
    assert n_blocks > 4000


@pytest.mark.parametrize("grid,target", [((8, 8), 26), ((7, 7), 20), ((7, 7), 1), ((3, 5), 6), ((1, 1), 1)])
@pytest.mark.parametrize("mode", ["official", "exact"])
def test_small_grids_never_empty(grid, target, mode):
    gen = MaskingGenerator(grid=grid, num_masking_patches=target, min_num_patches=None, mode=mode)
    rng = np.random.default_rng(3)
    counts = np.array([gen(rng).sum() for _ in range(500)])
    assert gen(rng).shape == grid
    assert counts.min() >= 1 and counts.max() <= target
    if mode == "exact":
        assert (counts == target).all()


def test_budget_of_one_is_never_empty():
    # Official code: min area 16 with a budget of 1 usually places nothing -> empty mask -> NaN loss (unilm#551).
    gen = MaskingGenerator(num_masking_patches=1, min_num_patches=16)
    rng = np.random.default_rng(4)
    masks = np.stack([gen(rng) for _ in range(2000)])
    assert (masks.sum(axis=(1, 2)) == 1).all()
    assert masks.mean(0).min() > 0  # the single cell can land anywhere


def test_proportional_min_patches():
    assert proportional_min_patches(196) == 16
    assert proportional_min_patches(64) == 5
    assert proportional_min_patches(49) == 4
    assert proportional_min_patches(4) == 1
    assert MaskingGenerator(grid=(7, 7), num_masking_patches=20, min_num_patches=None).min_num_patches == 4


def test_deterministic_per_seed():
    gen = MaskingGenerator()
    a = [gen(np.random.default_rng([7, 0, i])) for i in range(20)]
    b = [gen(np.random.default_rng([7, 0, i])) for i in range(20)]
    c = [gen(np.random.default_rng([8, 0, i])) for i in range(20)]
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_masking_patches=197), "num_masking_patches=197"),
        (dict(num_masking_patches=0), "num_masking_patches=0"),
        (dict(grid=(7, 7), num_masking_patches=75), r"\[1, 49\]"),
        (dict(min_num_patches=0), "min_num_patches"),
        (dict(min_aspect=0), "min_aspect"),
        (dict(min_aspect=2.0, max_aspect=1.0), "min_aspect"),
        (dict(mode="exactly"), "mode"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskingGenerator(**kwargs)
