"""Tile planning, padding, blending weights and the streaming accumulator (c3dseg.tiling)."""

import numpy as np
import pytest

from c3dseg.errors import C3DError
from c3dseg.tiling import (BLENDINGS, TileAccumulator, TileStream, extract_tile, iter_tile_batches, plan_tiles,
                           predict_tiled, round_up, stride_to_overlap)


def _identity4(batch):
    """A fake network: 4 output channels, each a fixed multiple of the input."""
    return np.concatenate([batch * 1.0, batch * 2.0, batch * -1.0, batch + 0.5], axis=1).astype(np.float32)


def _expected4(vol):
    return np.stack([vol, 2 * vol, -vol, vol + 0.5]).astype(np.float32)


CASES = [
    # volume,        tile,          overlap
    ((20, 30, 40), (8, 16, 16), 4),        # many tiles, odd sizes
    ((5, 7, 3), (16, 16, 16), 4),          # volume smaller than a tile on every axis
    ((1, 1, 1), (8, 8, 8), 0),             # a single voxel
    ((9, 33, 17), (8, 8, 24), 6),          # anisotropic tiles, sizes just above a multiple
    ((31, 12, 50), (-1, 8, 16), 8),        # whole axis + tiles
    ((17, 17, 17), (16, 16, 16), 12),      # large overlap (more than half a tile after shrinking)
    ((40, 24, 24), (12, 8, 8), 0),         # tile sizes not multiples of 8 (rounded up), no overlap
]


@pytest.mark.parametrize("shape,tile,overlap", CASES)
@pytest.mark.parametrize("blending", BLENDINGS)
def test_identity_model_gives_back_its_input(shape, tile, overlap, blending):
    rng = np.random.default_rng(sum(shape))
    vol = rng.normal(size=shape).astype(np.float32)
    plan = plan_tiles(shape, tile, overlap, multiple=8)
    out = predict_tiled(vol, _identity4, plan, channels=4, batch_size=3, blending=blending)
    assert out.shape == (4, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out, _expected4(vol), rtol=2e-6, atol=2e-6)


def test_identity_random_plans():
    rng = np.random.default_rng(0)
    for _ in range(25):
        shape = tuple(int(s) for s in rng.integers(1, 45, size=3))
        tile = tuple(int(t) for t in rng.integers(1, 40, size=3))
        overlap = int(rng.integers(0, 20))
        vol = rng.random(shape, dtype=np.float32)
        plan = plan_tiles(shape, tile, overlap, multiple=8)
        out = predict_tiled(vol, lambda b: np.repeat(b, 4, axis=1), plan, channels=4, batch_size=2)
        np.testing.assert_allclose(out, np.broadcast_to(vol, (4, *shape)), rtol=2e-6, atol=2e-6,
                                   err_msg=f"shape {shape} tile {tile} overlap {overlap}")


def test_plan_covers_volume_with_requested_overlap_and_divisible_tiles():
    for shape, tile, ov in [((100, 512, 512), (128, 192, 192), 16), ((37, 70, 90), (16, 32, 24), 8)]:
        plan = plan_tiles(shape, tile, ov, multiple=8)
        assert all(t % 8 == 0 for t in plan.tile)
        assert all(t <= round_up(m, 8) for t, m in zip(plan.tile, tile))
        for a in range(3):
            st = plan.starts[a]
            assert st[0] <= 0 and st[-1] + plan.tile[a] >= shape[a]
            for s0, s1 in zip(st, st[1:]):
                assert s0 + plan.tile[a] - s1 >= ov  # actual overlap >= requested


def test_redundancy_at_default_filter_settings():
    # the OnnxModel defaults: tiles up to 128 x 192 x 192, overlap 16
    plan = plan_tiles((100, 512, 512), (128, 192, 192), 16)
    assert plan.redundancy <= 1.3
    # XPIWIT's stride 0.5 on the same volume, for contrast
    xp = plan_tiles((100, 512, 512), (64, 256, 256), (32, 128, 128))
    assert xp.redundancy > 2 * plan.redundancy


def test_weights_partition_of_unity_and_fade():
    plan = plan_tiles((50, 20, 70), (16, 16, 24), 8)
    for blending in BLENDINGS:
        w = plan.axis_weights(blending)
        for a in range(3):
            total = np.zeros(plan.shape[a])
            for s, wa in zip(plan.starts[a], w[a]):
                lo, hi = max(s, 0), min(s + plan.tile[a], plan.shape[a])
                total[lo:hi] += wa[lo - s:hi - s]
            np.testing.assert_allclose(total, 1.0, atol=1e-6)
    wx = plan.axis_weights("cosine")[2]
    assert len(wx) >= 3
    mid = wx[1]
    assert mid[0] < 0.05 and mid[-1] < 0.05 and mid[len(mid) // 2] > 0.9  # fades at shared borders
    assert wx[0][0] > 0.9  # but not at the volume border


def test_extract_tile_reflect_padding_small_volumes():
    vol = np.arange(3, dtype=np.float32).reshape(1, 1, 3)
    t = extract_tile(vol, (-3, -4, -2), (8, 8, 8))
    assert t.shape == (8, 8, 8)
    assert np.all(t[:, :, 2] == vol[0, 0, 0]) and set(np.unique(t)) <= {0.0, 1.0, 2.0}
    view = extract_tile(np.zeros((4, 10, 10, 10)), (2, 2, 2), (4, 4, 4))
    assert view.shape == (4, 4, 4, 4)


def test_streaming_accumulates_batch_by_batch():
    vol = np.random.default_rng(1).random((30, 30, 30), dtype=np.float32)
    plan = plan_tiles(vol.shape, (16, 16, 16), 4)
    acc = TileAccumulator(plan, 1)
    seen = []
    for idx, batch in iter_tile_batches(vol, plan, batch_size=2):
        seen.append(acc.count)  # tiles already blended when this batch was produced
        assert batch.shape[0] <= 2
        for i, b in zip(idx, batch):
            acc.add(i, b)
    assert seen == list(range(0, plan.n_tiles, 2))
    np.testing.assert_allclose(acc.result()[0], vol, atol=2e-6)


def test_tile_stream_is_lazy():
    vol = np.ones((20, 20, 20), np.float32)
    plan = plan_tiles(vol.shape, (8, 8, 8), 0)
    calls = []

    def produce():
        for idx, batch in iter_tile_batches(vol, plan, 4):
            calls.append(len(idx))
            yield idx, np.repeat(batch, 4, axis=1)

    stream = TileStream(plan=plan, channels=4, produce=produce, spacing=(2.0, 1.0, 1.0))
    assert calls == []  # nothing runs before merging
    with pytest.raises(C3DError, match="TileMerger"):
        stream.data  # another filter reading it as an image gets a clear error
    out = stream.merge()
    assert sum(calls) == plan.n_tiles and out.shape == (4, 20, 20, 20)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan_tiles((10, 10), (8, 8, 8))
    with pytest.raises(ValueError):
        plan_tiles((10, 10, 10), (8, 8, 8), -1)
    with pytest.raises(ValueError):
        plan_tiles((10, 10, 10), (8, 8, 8)).axis_weights("triangle")
    plan = plan_tiles((10, 10, 10), (8, 8, 8), 2)
    acc = TileAccumulator(plan, 4)
    with pytest.raises(ValueError):
        acc.add((0, 0, 0), np.zeros((4, 4, 4, 4)))


def test_stride_to_overlap():
    assert stride_to_overlap(64, 0.5) == 32
    assert stride_to_overlap(64, 48) == 16
    assert stride_to_overlap(64, 1.0) == 0
    assert stride_to_overlap(64, 100) == 0
