"""Shared state under threads: the random-matrix cache and masking's per-call counter.

Models are called from several threads (inference servers, data-parallel CPU workers). The
switch interval is shortened so that the interpreter interleaves threads inside the shared
code paths on every run, as a loaded server would now and then.
"""
import sys
import threading

import pytest
import torch

import tinyrecon as tr
from tinyrecon import _random

THREADS = 8


@pytest.fixture
def busy_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(work, threads=THREADS):
    errors, start = [], threading.Barrier(threads)

    def body(i):
        try:
            start.wait()
            work(i)
        except BaseException as e:   # noqa: BLE001  (reported below, with the thread's traceback)
            errors.append(e)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def test_many_random_matrices_from_many_threads(busy_switching):
    """More frozen matrices in use than the cache holds, drawn from 8 threads, give the
    single-threaded values, and the cache stays consistent afterwards."""
    torch.manual_seed(0)
    layers = [tr.ReconciledLinear(12, 10, tr.random_matrix_adaption_reconciliation(r=2, seed=s))
              for s in range(12)]   # 24 matrices
    x = torch.randn(3, 12)
    _random.set_cache_budget(8 * (10 + 12) * 2 * 4)   # A (10 x 2) and B (12 x 2) of 8 layers: eviction all along
    try:
        _random.clear_cache()
        with torch.no_grad():
            expected = [layer(x) for layer in layers]
            draws = [_random.randn(s, (4, 5)) for s in range(24)]

            def work(i):
                for k in range(6):
                    j = (i * 5 + k) % len(layers)
                    torch.testing.assert_close(layers[j](x), expected[j], rtol=0, atol=0)
                    for s in range(24):   # the draws alone, the tightest loop over the cache
                        assert torch.equal(_random.randn(s, (4, 5)), draws[s])

            run_threads(work)
            info = _random.cache_info()
            assert 0 < info["bytes"] <= info["budget"]
            assert info["bytes"] == sum(v.numel() * 4 for v in _random._cache.values())
            for layer, y in zip(layers, expected):   # still right single-threaded
                torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    finally:
        _random.set_cache_budget(_random._budget_from_env())


def test_fresh_masks_are_never_shared_between_threads(busy_switching):
    rec = tr.masking_reconciliation(p=0.5, fixed_mask=False, seed=3)
    seeds = [[] for _ in range(THREADS)]

    def work(i):
        for _ in range(1000):
            seeds[i].append(rec.mask_seed())

    run_threads(work)
    drawn = [s for part in seeds for s in part]
    assert len(set(drawn)) == len(drawn) == THREADS * 1000
    assert rec.get_extra_state()["calls"] == THREADS * 1000


def test_cache_budget_is_respected_and_settable():
    _random.clear_cache()
    try:
        _random.set_cache_budget(1000)
        _random.randn(11, (10, 10))            # 400 bytes: kept
        _random.randn(12, (10, 10))            # 400 bytes: kept
        _random.randn(13, (10, 10))            # evicts the least recently used (seed 11)
        _random.randn(14, (30, 10))            # 1200 bytes: above the budget, never kept
        info = _random.cache_info()
        assert info["entries"] == 2 and info["bytes"] == 800 and info["misses"] == 4
        _random.randn(13, (10, 10))
        assert _random.cache_info()["hits"] == 1
        _random.set_cache_budget(0)
        assert _random.cache_info()["entries"] == 0
        assert tr.cache_info is _random.cache_info and tr.set_cache_budget is _random.set_cache_budget
    finally:
        _random.set_cache_budget(_random._budget_from_env())
        _random.clear_cache()


@pytest.mark.parametrize("bad", [-1, 1.5, "16M", True])
def test_bad_cache_budget_is_refused(bad):
    with pytest.raises(ValueError, match="non-negative int"):
        _random.set_cache_budget(bad)


def test_cache_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("TINYRECON_CACHE_BYTES", "4096")
    assert _random._budget_from_env() == 4096
    monkeypatch.setenv("TINYRECON_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="TINYRECON_CACHE_BYTES"):
        _random._budget_from_env()
