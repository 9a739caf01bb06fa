"""A seeded compressed-sensing matrix is drawn on first use and shared; an explicit one stays eager."""
import time

import torch

from operators.sensing import CompressedSensing, SeededMatrices, gaussian_matrix


def test_construction_is_lazy_and_forward_unchanged():
    t0 = time.perf_counter()
    op = CompressedSensing((1, 64, 64), m=4096, seed=1)
    assert time.perf_counter() - t0 < 0.05
    assert op.obs_shape == (4096,)
    x = torch.randn((2, 1, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(op.forward(x), x.flatten(1) @ gaussian_matrix(4096, 4096, 1).T)


def test_same_seed_shares_one_matrix():
    a, b = CompressedSensing((1, 8, 8), m=20, seed=7), CompressedSensing((1, 8, 8), m=20, seed=7)
    assert a.matrix is b.matrix
    assert not torch.equal(a.matrix, CompressedSensing((1, 8, 8), m=20, seed=8).matrix)


def test_explicit_matrix_is_eager():
    m = torch.randn((5, 64), dtype=torch.float64)
    op = CompressedSensing((1, 8, 8), matrix=m)
    assert op.obs_shape == (5,) and torch.equal(op.matrix, m) and op.matrix is op.matrix


def test_cache_is_bounded_by_bytes():
    cache = SeededMatrices(max_bytes=2 * 10 * 64 * 8)  # room for two [10, 64] float64 matrices
    first = cache.get(10, 64, 0)
    cache.get(10, 64, 1)
    assert cache.get(10, 64, 0) is first  # a hit refreshes it
    cache.get(10, 64, 2)  # evicts seed 1, the least recently used
    assert cache.get(10, 64, 0) is first
    assert len(cache._items) == 2 and (10, 64, 1) not in cache._items
    assert torch.equal(cache.get(100, 64, 3), gaussian_matrix(100, 64, 3))  # over the budget: kept alone
    assert list(cache._items) == [(100, 64, 3)]
