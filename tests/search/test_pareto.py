"""Pareto utilities: brute-force checks of the non-dominated sets, exact 2-D hypervolume."""

from __future__ import annotations

import itertools

import pytest
import torch

from coalora.errors import ConfigError
from coalora.search.pareto import (
    hypervolume_2d,
    infer_reference,
    non_dominated,
    non_dominated_mask,
    segmented_selection,
)


def _dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def _brute_front(points) -> list[int]:
    return [i for i, p in enumerate(points) if not any(_dominates(q, p) for q in points)]


@pytest.mark.parametrize("m", [2, 3])
def test_non_dominated_matches_brute_force(m):
    g = torch.Generator().manual_seed(m)
    for n in (1, 7, 40):
        Y = torch.randint(0, 6, (n, m), generator=g).double()  # ties and duplicates on purpose
        expected = _brute_front(Y.tolist())
        assert non_dominated(Y).tolist() == expected
        assert non_dominated_mask(Y).nonzero().flatten().tolist() == expected


def test_non_dominated_empty():
    assert non_dominated_mask(torch.zeros(0, 2)).numel() == 0


def test_segmented_selection_brute_force():
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(60, generator=g) * 4 + 2  # [2, 6)
    loss = torch.rand(60, generator=g)
    edges = [2.0, 2.5, 3.0, 4.0, 5.0, 6.0]
    got = segmented_selection(bits, loss, edges).tolist()
    expected = []
    for lo, hi in itertools.pairwise(edges):
        last = hi == edges[-1]
        members = [i for i in range(60) if lo <= bits[i] < hi or (last and bits[i] == hi)]
        pts = [(bits[i].item(), loss[i].item()) for i in members]
        expected += [members[j] for j in _brute_front(pts)]
    assert got == sorted(expected)
    # every selected point is non-dominated within its own bin and some bins keep several points
    assert len(got) > len(edges) - 1


def test_segmented_selection_bin_edges():
    bits = torch.tensor([2.0, 2.5, 3.0, 3.5])
    loss = torch.tensor([1.0, 0.5, 0.4, 0.1])
    # [2, 2.5) holds 2.0; the last bin [2.5, 3.0] is closed and holds 2.5 (loss 0.5) and 3.0
    # (loss 0.4), both non-dominated; 3.5 lies outside the edges and is never selected.
    assert segmented_selection(bits, loss, [2.0, 2.5, 3.0]).tolist() == [0, 1, 2]
    # segments over the observed range [2, 3.5] in 3 bins of 0.5: each point in its own bin
    assert segmented_selection(bits, loss, segments=3).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("segments", [0, -2])
def test_segmented_selection_rejects_bad_segments(segments):
    with pytest.raises(ConfigError, match="segments"):
        segmented_selection(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]), segments=segments)


def test_hypervolume_hand_computed():
    # staircase of (1,3), (2,2), (3,1) under ref (4,4): 3*1 + 2*1 + 1*1 + strips -> 6
    pts = torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert hypervolume_2d(pts, [4.0, 4.0]) == pytest.approx(6.0)
    # a dominated point and a point outside the reference change nothing
    more = torch.cat([pts, torch.tensor([[3.0, 3.0], [5.0, 0.0]])])
    assert hypervolume_2d(more, [4.0, 4.0]) == pytest.approx(6.0)
    assert hypervolume_2d(torch.zeros(0, 2), [1.0, 1.0]) == 0.0


def test_hypervolume_monotone_under_adding_points():
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(30, 2, generator=g)
    ref = [1.1, 1.1]
    hv = [hypervolume_2d(pts[:k], ref) for k in range(1, 31)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(hv))
    # Monte Carlo cross-check of the last value
    u = torch.rand(200_000, 2, generator=g) * 1.1
    covered = (pts.unsqueeze(0) <= u.unsqueeze(1)).all(-1).any(-1).double().mean().item() * 1.21
    assert hv[-1] == pytest.approx(covered, abs=0.01)


def test_infer_reference_is_dominated_and_never_zero():
    Y = -torch.rand(20, 2) - 0.5  # all negative, like the reference code's negated objectives
    ref = infer_reference(Y)
    assert not torch.equal(ref, torch.zeros(2))
    assert bool((Y < ref).all())
    assert hypervolume_2d(Y, ref) > 0
    single = infer_reference(torch.zeros(1, 2))  # zero range and zero values
    assert bool((single > 0).all())
