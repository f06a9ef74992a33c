"""ChunkStream: fixed sizes, ragged mask, resumable positions, generators, bad input."""

import numpy as np
import pytest

from engine import checks, streaming


def collect(stream):
    return [(c.arrays, c.mask, c.start) for c in stream]


def test_fixed_chunks_and_ragged_mask():
    x = np.arange(23, dtype=np.float32).reshape(23, 1)
    chunks = list(streaming.ChunkStream(x, 5))
    assert [c.start for c in chunks] == [0, 5, 10, 15, 20]
    assert all(c.arrays[0].shape == (5, 1) for c in chunks)
    last = chunks[-1]
    np.testing.assert_array_equal(last.mask, [True, True, True, False, False])
    np.testing.assert_array_equal(last.arrays[0][:3, 0], [20, 21, 22])
    np.testing.assert_array_equal(last.arrays[0][3:, 0], [0, 0])  # zero padding
    rows = np.concatenate([c.arrays[0][c.mask] for c in chunks])
    np.testing.assert_array_equal(rows, x)


def test_drop_remainder():
    chunks = list(streaming.ChunkStream(np.zeros((23, 2)), 5, drop_remainder=True))
    assert len(chunks) == 4 and all(c.mask.all() for c in chunks)


def test_seek_resumes_identically():
    x = np.random.default_rng(0).normal(size=(50, 3))
    a = streaming.ChunkStream(x, 4, repeat=True, shuffle_seed=3)
    seen = [next(a).arrays[0] for _ in range(30)]  # crosses two epochs
    b = streaming.ChunkStream(x, 4, repeat=True, shuffle_seed=3)
    for _ in range(11):
        next(b)
    pos = b.position
    c = streaming.ChunkStream(x, 4, repeat=True, shuffle_seed=3)
    c.seek(pos)
    for i in range(11, 30):
        np.testing.assert_array_equal(next(c).arrays[0], seen[i])


def test_shuffle_is_a_permutation_per_epoch():
    x = np.arange(12).reshape(12, 1)
    s = streaming.ChunkStream(x, 4, repeat=True, shuffle_seed=0)
    epoch1 = np.concatenate([next(s).arrays[0][:, 0] for _ in range(3)])
    epoch2 = np.concatenate([next(s).arrays[0][:, 0] for _ in range(3)])
    assert sorted(epoch1) == list(range(12)) and sorted(epoch2) == list(range(12))
    assert not np.array_equal(epoch1, epoch2)


def test_generator_source_rechunks_and_resumes():
    data = np.arange(37, dtype=np.float32)[:, None]

    def open_at(start):
        # Blocks of irregular sizes, starting at any row.
        sizes = [3, 8, 1, 5]
        i, lo = 0, start
        while lo < len(data):
            hi = min(lo + sizes[i % 4], len(data))
            yield data[lo:hi], -data[lo:hi]
            lo, i = hi, i + 1

    s = streaming.ChunkStream(open_at, 6)
    chunks = list(s)
    assert [c.start for c in chunks] == [0, 6, 12, 18, 24, 30, 36]
    np.testing.assert_array_equal(np.concatenate([c.arrays[1][c.mask] for c in chunks]), -data)
    s2 = streaming.ChunkStream(open_at, 6)
    s2.seek(chunks[3].start)
    np.testing.assert_array_equal(next(s2).arrays[0], chunks[3].arrays[0])


def test_prefetch_shards_over_data_axis(mesh4):
    x = np.arange(32, dtype=np.float32).reshape(16, 2)
    chunks = list(streaming.prefetch_to_device(streaming.ChunkStream(x, 8), mesh4))
    assert len(chunks) == 2
    assert len(chunks[0].arrays[0].sharding.device_set) == 4
    np.testing.assert_array_equal(np.asarray(chunks[1].arrays[0]), x[8:])


def test_bad_inputs():
    with pytest.raises(checks.InputError, match="chunk_size must be an integer >= 1"):
        streaming.ChunkStream(np.zeros((4, 2)), 0)
    with pytest.raises(checks.InputError, match="empty"):
        streaming.ChunkStream(np.zeros((0, 2)), 4)
    with pytest.raises(checks.InputError, match="empty"):
        list(streaming.ChunkStream(lambda start: iter(()), 4))
    with pytest.raises(checks.InputError, match="rows"):
        streaming.ChunkStream((np.zeros((4, 2)), np.zeros((5, 2))), 2)
    x = np.ones((10, 2))
    x[7, 1] = np.nan
    with pytest.raises(checks.InputError, match=r"non-finite .* index \(3, 1\)"):
        list(streaming.ChunkStream(x, 4, name="acts"))
