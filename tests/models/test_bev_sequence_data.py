"""BEV occupancy sequences: determinism, footprints move with the objects, ground truth agrees."""

from __future__ import annotations

import math

import pytest
import torch

from fxopt.models.bev_sequence_data import (
    CLUTTER,
    BevObject,
    BevSequenceConfig,
    footprint,
    generate_bev_batch,
)

CLEAN = BevSequenceConfig(dropout=0.0, false_occupancy=0.0)


@pytest.fixture(scope="module")
def clean():
    return generate_bev_batch(6, CLEAN, seed=5)


def _centroid(cells: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(cells, as_tuple=True)
    return torch.stack([xs.float().mean() + 0.5, ys.float().mean() + 0.5])


def test_same_seed_same_batch_other_seed_differs():
    a, b = generate_bev_batch(3, seed=1), generate_bev_batch(3, seed=1)
    for name in ("occupancy", "category", "displacement", "moving", "occupied", "instances"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.objects == b.objects
    assert not torch.equal(generate_bev_batch(3, seed=2).occupancy, a.occupancy)


def test_shapes_and_content(clean):
    assert clean.occupancy.shape == (6, 5, 4, 64, 64)
    assert set(clean.occupancy.unique().tolist()) == {0.0, 1.0}
    assert clean.category.shape == clean.moving.shape == clean.instances.shape == (6, 64, 64)
    assert clean.displacement.shape == (6, 2, 64, 64)
    assert set(clean.category.unique().tolist()) == {0, 1, 2}
    kinds = [o.kind for scene in clean.objects for o in scene]
    assert {0, 1, 2} <= set(kinds)
    assert any(o.moving for scene in clean.objects for o in scene)
    assert any(not o.moving and o.kind != CLUTTER for scene in clean.objects for o in scene)


def test_ground_truth_agrees_with_objects(clean):
    for b, scene in enumerate(clean.objects):
        inst = clean.instances[b]
        assert torch.equal(clean.occupied[b], inst >= 0)
        assert not (clean.moving[b] & ~clean.occupied[b]).any()
        assert (clean.displacement[b][:, ~clean.occupied[b]] == 0).all()
        for i, obj in enumerate(scene):
            cells = inst == i
            assert cells.any(), f"object {i} of scene {b} has no cell in the current frame"
            assert torch.equal(cells, footprint(obj, torch.zeros(1), 64)[0])  # objects never overlap
            assert (clean.category[b][cells] == obj.kind).all()
            assert (clean.moving[b][cells] == (obj.moving and obj.kind != CLUTTER)).all()
            expected = torch.tensor(obj.velocity) * CLEAN.horizon if obj.kind != CLUTTER else torch.zeros(2)
            assert torch.allclose(clean.displacement[b][:, cells], expected.view(2, 1))


def test_occupancy_is_the_union_of_moving_footprints(clean):
    offsets = torch.arange(-4, 1)
    for b, scene in enumerate(clean.objects):
        union = torch.zeros(5, 4, 64, 64, dtype=torch.bool)
        for obj in scene:
            union[:, obj.bins[0] : obj.bins[1]] |= footprint(obj, offsets, 64)[:, None]
        assert torch.equal(clean.occupancy[b] > 0, union)


def test_displacement_moves_the_current_cells_onto_the_future_footprint(clean):
    """The object's centroid now, plus the target displacement, is its centroid `horizon` frames on."""
    checked = 0
    for b, scene in enumerate(clean.objects):
        for i, obj in enumerate(scene):
            cells = clean.instances[b] == i
            future = footprint(obj, torch.tensor([CLEAN.horizon]), 64)[0]
            inside = 6 <= obj.centre[0] <= 58 and 6 <= obj.centre[1] <= 58
            if not (obj.moving and inside and future.any()):
                continue
            disp = clean.displacement[b][:, cells][:, 0]
            shift = _centroid(future) - _centroid(cells)
            # rasterising on whole cells moves a centroid by at most about half a cell
            assert torch.allclose(shift, disp, atol=0.75), (b, i, shift, disp)
            checked += 1
    assert checked >= 5


def test_past_frames_follow_the_velocity():
    obj = BevObject(kind=1, centre=(30.0, 30.0), size=(8.0, 4.0), heading=math.pi / 6, velocity=(1.5 * math.cos(math.pi / 6), 1.5 * math.sin(math.pi / 6)), bins=(0, 3))
    frames = footprint(obj, torch.arange(-4, 2), 64)
    centroids = torch.stack([_centroid(f) for f in frames])
    steps = centroids[1:] - centroids[:-1]
    assert torch.allclose(steps.mean(0), torch.tensor(obj.velocity), atol=0.15)
    assert (frames.sum((1, 2)) >= 28).all()  # an 8 x 4 rectangle covers about 32 cells


def test_noise_rates_match_the_config():
    config = BevSequenceConfig(dropout=0.1, false_occupancy=0.01)
    noisy = generate_bev_batch(4, config, seed=9)
    clean = generate_bev_batch(4, BevSequenceConfig(dropout=0.0, false_occupancy=0.0), seed=9)
    assert torch.equal(noisy.category, clean.category)  # ground truth ignores the sensor noise
    truth = clean.occupancy > 0
    dropped = (truth & (noisy.occupancy == 0)).sum() / truth.sum()
    spurious = (~truth & (noisy.occupancy > 0)).sum() / (~truth).sum()
    assert 0.07 < float(dropped) < 0.13
    assert 0.008 < float(spurious) < 0.012
