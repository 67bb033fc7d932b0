"""The decode batch's key/value slabs (serve/batch.py) against a plain reference: every row's real keys and values
where they belong after any sequence of appends, joins and drops, and padding that is always finite."""

from __future__ import annotations

import random

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from peftkit.serve.batch import KVBatch, SlabLayer

HEADS, DIM, LAYERS = 2, 3, 2


def _batch(rows: list[torch.Tensor]) -> KVBatch:
    """A fresh prefill's batch: rows (layers, 2, heads, n, dim) right-aligned, the padding random (as a prefill's
    pad tokens' keys are), wrapped as the scheduler wraps a prefill's cache."""
    width = max(r.shape[3] for r in rows)
    cache = DynamicCache()
    cache.layers = []
    for layer in range(LAYERS):
        kv = torch.randn(2, len(rows), HEADS, width, DIM)
        for b, r in enumerate(rows):
            kv[:, b, :, width - r.shape[3] :] = r[layer]
        one = DynamicLayer()
        one.update(kv[0], kv[1])
        cache.layers.append(one)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        mask[b, width - r.shape[3] :] = True
    return KVBatch(cache, mask, mask.sum(dim=1))


def _check(batch: KVBatch, rows: list[torch.Tensor]) -> None:
    assert batch.size == len(rows) and batch.width == max(r.shape[3] for r in rows)
    for b, r in enumerate(rows):
        n = r.shape[3]
        assert batch.mask[b, -n:].all() and not batch.mask[b, :-n].any() and int(batch.lengths[b]) == n
        for layer, slab in enumerate(batch.cache.layers):
            assert torch.equal(slab.keys[b, :, -n:], r[layer, 0]) and torch.equal(slab.values[b, :, -n:], r[layer, 1])
    for slab in batch.cache.layers:
        assert torch.isfinite(slab.keys).all() and torch.isfinite(slab.values).all()


def _row(n: int) -> torch.Tensor:
    return torch.randn(LAYERS, 2, HEADS, 1, DIM).expand(-1, -1, -1, n, -1) + torch.randn(LAYERS, 2, HEADS, n, DIM)


def test_slabs_hold_every_row_through_appends_joins_and_drops():
    rng = random.Random(0)
    torch.manual_seed(0)
    rows = [_row(rng.randint(1, 9)) for _ in range(3)]
    batch = _batch(rows)
    _check(batch, rows)
    for step in range(300):
        op = rng.random()
        if op < 0.6:  # a decode step (or a chunk of 1-40 columns)
            n = 1 if rng.random() < 0.9 else rng.randint(2, 40)
            new = torch.randn(LAYERS, 2, len(rows), HEADS, n, DIM)
            for layer, slab in enumerate(batch.cache.layers):
                keys, values = slab.update(new[layer, 0], new[layer, 1])
                assert keys.shape == (len(rows), HEADS, batch.width + n, DIM) and torch.equal(values, slab.values)
            batch.advance(n)
            rows = [torch.cat([r, new[:, :, b]], dim=3) for b, r in enumerate(rows)]
        elif op < 0.8 or len(rows) < 2:  # newcomers, sometimes wider than the batch
            newcomers = [_row(rng.randint(1, batch.width + 20)) for _ in range(rng.randint(1, 5))]
            batch.extend(_batch(newcomers))
            rows += newcomers
        else:  # some rows finish
            gone = set(rng.sample(range(len(rows)), rng.randint(1, len(rows) - 1)))
            order = batch.drop(gone)
            assert sorted(order) == [i for i in range(len(rows)) if i not in gone]
            assert len(gone) > 1 or sum(a != b for a, b in enumerate(order)) <= 1  # one row moved per row gone
            rows = [rows[i] for i in order]
        _check(batch, rows)


def test_a_decode_step_writes_in_place_and_stale_storage_never_shows():
    torch.manual_seed(1)
    rows = [_row(30), _row(5), _row(7)]
    batch = _batch(rows)
    slab = batch.cache.layers[0]
    assert isinstance(slab, SlabLayer)

    def step() -> None:
        for layer in batch.cache.layers:
            layer.update(torch.randn(batch.size, HEADS, 1, DIM), torch.randn(batch.size, HEADS, 1, DIM))
        batch.advance()

    step()  # a prefill's storage has no spare room: the first step makes some (a quarter of the width, >= 16)
    storage = slab._k.data_ptr()
    for _ in range(15):
        step()
    assert slab._k.data_ptr() == storage and batch.width == 46  # written in place

    def poison(rows: slice, columns: slice) -> None:  # what an earlier row that overflowed may have left there
        for layer in batch.cache.layers:
            layer._k[rows, :, columns] = float("nan")
            layer._v[rows, :, columns] = float("inf")

    assert batch.drop({0}) == [2, 1] and batch.width == 23  # the last row moved into the first's place
    poison(slice(2, 3), slice(None))
    batch.extend(_batch([_row(3)]))  # into the left row's storage, narrower: its padding is written
    _check_finite(batch)
    batch.drop({2})
    poison(slice(None), slice(0, slab.start))
    batch.extend(_batch([_row(40)]))  # wider than the batch: the running rows' new padding is written
    _check_finite(batch)
    assert slab._k.data_ptr() == storage and (batch.size, batch.width) == (3, 40)


def _check_finite(batch: KVBatch) -> None:
    for layer in batch.cache.layers:
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
