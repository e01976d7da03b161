"""Paged attention (every backend) against dense float64 attention computed here, on ragged batches."""

from __future__ import annotations

import logging
import math
import sys
import types
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from varserve.attention import (
    available_backends,
    gather_rows,
    paged_attention,
    select_backend,
    slot_mapping,
    token_rows,
    varlen_attention,
    write_kv,
)
from varserve.attention import paged
from varserve.attention.paged import _log_once
from varserve.attention.cudnn_paged import PagedGraph
from varserve.cache.allocator import BlockAllocator
from varserve.cache.block_table import BlockTables, pages_for

ROWS = 2  # rows per request: the cond and uncond halves of CFG


@dataclass
class Request:
    tables: BlockTables
    q: torch.Tensor  # [ROWS * lq, H, d]
    k: torch.Tensor  # [ROWS, max kv length, H, d]: dense copies of what was written to the pools
    v: torch.Tensor
    lens: np.ndarray  # [ROWS, H] kv length of each (row, head)


# cuDNN loads whole pages and masks the scores past each length, so a NaN there still poisons the sum (0 * NaN):
# its pools are poisoned with large finite values instead (the engine's pools start zeroed and hold only K/V).
CUDNN_POISON = 1e4


class Pool:
    """Pools poisoned with NaN (or `poison`), pages handed out in shuffled order, and the requests written into
    them."""

    def __init__(self, num_pages: int, page_size: int, heads: int, dim: int, dtype: torch.dtype,
                 device: str = "cpu", seed: int = 0, poison: float = math.nan) -> None:
        self.alloc = BlockAllocator(num_pages)
        self.alloc.free(np.random.default_rng(seed).permutation(self.alloc.allocate(num_pages - 1)))
        self.k_pages, self.v_pages = (torch.full((num_pages, page_size, dim), poison, dtype=dtype, device=device)
                                      for _ in range(2))
        self.page_size, self.heads, self.dim, self.dtype, self.device = page_size, heads, dim, dtype, device
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, lq: int, lens: np.ndarray) -> Request:
        lens = np.broadcast_to(np.asarray(lens, dtype=np.int32), (ROWS, self.heads))
        tables = BlockTables(ROWS, 1, self.heads, int(pages_for(lens, self.page_size).max()), self.page_size)
        assert tables.grow(0, lens, self.alloc)
        q = self._randn(ROWS * lq, self.heads, self.dim)
        k, v = (self._randn(ROWS, int(lens.max()), self.heads, self.dim) for _ in range(2))
        keep = torch.from_numpy(np.arange(lens.max())[None, :, None] < lens[:, None, :])
        slots = torch.from_numpy(tables.slots(0, 0, lens)).to(self.device)
        write_kv(self.k_pages, self.v_pages, k[keep][:, None], v[keep][:, None], slots[:, None])
        return Request(tables, q, k, v, lens)

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).to(self.dtype).to(self.device)


def batch(pool: Pool, requests: list[Request]) -> dict:
    """paged_attention arguments for the requests' rows, in order."""
    width = max(r.tables.max_pages for r in requests)
    tables = np.concatenate([np.pad(r.tables.table(0), ((0, 0), (0, 0), (0, width - r.tables.max_pages)))
                             for r in requests])
    lens = np.concatenate([r.lens for r in requests])
    lq = np.repeat([len(r.q) // ROWS for r in requests], ROWS)
    return dict(q=torch.cat([r.q for r in requests]), k_pages=pool.k_pages, v_pages=pool.v_pages,
                block_table=torch.from_numpy(tables).to(pool.device), seqlens_k=torch.from_numpy(lens),
                cu_seqlens_q=torch.from_numpy(np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)),
                max_seqlen_q=int(lq.max()), max_seqlen_k=int(lens.max()), softmax_scale=pool.dim ** -0.5)


def dense_attention(requests: list[Request], scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v in float64 per (row, head), from the dense copies."""
    out = []
    for r in requests:
        q = r.q.double().view(ROWS, -1, *r.q.shape[1:])
        for row in range(ROWS):
            heads = []
            for h in range(r.q.shape[1]):
                k, v = (x[row, : r.lens[row, h], h].double() for x in (r.k, r.v))
                heads.append(torch.softmax(q[row, :, h] @ k.T * scale, dim=-1) @ v)
            out.append(torch.stack(heads, dim=1))
    return torch.cat(out)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}


def ragged_requests(pool: Pool, rng: np.random.Generator) -> list[Request]:
    """Rows at scales of 1, 4, 16, 36 queries; uniform and per-head KV lengths; equal shapes not adjacent."""
    heads = pool.heads
    return [pool.add(16, 21), pool.add(1, 1), pool.add(16, 21), pool.add(36, rng.integers(36, 58, (ROWS, heads))),
            pool.add(4, rng.integers(4, 6, (ROWS, heads))), pool.add(36, 50), pool.add(16, [[21] * heads, [9] * heads])]


CPU_BACKENDS = ["reference", "sdpa_gather"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_paged_equals_dense_then_pages_are_reused(backend: str, dtype: torch.dtype, page_size: int) -> None:
    pool = Pool(4000, page_size, heads=4, dim=32, dtype=dtype)
    requests = ragged_requests(pool, np.random.default_rng(page_size))
    out = paged_attention(**batch(pool, requests), backend=backend)
    assert rel_error(out, dense_attention(requests, 32 ** -0.5)) < TOLERANCE[dtype]

    freed = set(requests[0].tables.table(0).ravel()) - {0}
    requests[0].tables.release(pool.alloc)
    reused = pool.add(36, 57)
    assert freed & set(reused.tables.table(0).ravel()), "the new request should land on freed pages"
    requests = [reused] + requests[1:]
    out = paged_attention(**batch(pool, requests), backend=backend)
    assert rel_error(out, dense_attention(requests, 32 ** -0.5)) < TOLERANCE[dtype]


def test_write_kv_reads_back_through_the_tables() -> None:
    pool = Pool(300, 4, heads=3, dim=8, dtype=torch.float64)
    request = pool.add(2, [[7, 3, 12], [1, 9, 4]])
    table = torch.tensor(request.tables.table(0)).long()
    for row, h in np.ndindex(ROWS, 3):
        t = torch.arange(request.lens[row, h])
        slots = table[row, h, t // 4] * 4 + t % 4
        for pages, dense in ((pool.k_pages, request.k), (pool.v_pages, request.v)):
            torch.testing.assert_close(pages.view(-1, 8)[slots], dense[row, t, h], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_write_kv_takes_new_rows_in_any_layout(dtype: torch.dtype) -> None:
    """Strided and offset views of K/V land as contiguous ones do (rows are copied as int64 words only where both
    sides are contiguous and 8-byte aligned)."""
    gen = torch.Generator().manual_seed(4)
    k_pages, v_pages = (torch.zeros(20, 4, 8, dtype=dtype) for _ in range(2))
    slots = torch.randperm(80, generator=gen)[:12].reshape(6, 2)  # 6 tokens x 2 heads
    wide = torch.randn(6, 2, 12, generator=gen).to(dtype)
    offset = torch.randn(1 + 6 * 2 * 8, generator=gen).to(dtype)[1:].view(6, 2, 8)  # contiguous, misaligned
    for k in (wide[..., :8], wide[..., 1:9], offset, wide[..., 2:10].contiguous()):
        write_kv(k_pages, v_pages, k, 2 * k, slots)
        assert torch.equal(k_pages.view(-1, 8)[slots.reshape(-1)], k.reshape(-1, 8))
        assert torch.equal(v_pages.view(-1, 8)[slots.reshape(-1)], 2 * k.reshape(-1, 8))


def test_slot_mapping_matches_block_tables() -> None:
    pool = Pool(500, 4, heads=3, dim=8, dtype=torch.float64)
    requests = [pool.add(5, [[9, 12, 20], [5, 7, 6]]), pool.add(3, [[4, 8, 3], [6, 3, 5]])]
    args = batch(pool, requests)
    start = np.concatenate([r.lens for r in requests]) - np.repeat([5, 3], ROWS)[:, None]
    expected = np.concatenate([r.tables.slots(0, start[2 * i: 2 * i + 2], n)
                               for i, (r, n) in enumerate(zip(requests, (5, 3)))]).reshape(-1, 3)
    tokens = token_rows(args["cu_seqlens_q"], 16, torch.device("cpu"))
    got = slot_mapping(args["block_table"], torch.from_numpy(start), tokens, 4)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_varlen_attention_equals_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    lq, lk, heads, dim = [3, 1, 7], [5, 2, 4], 2, 16
    q, k, v = (torch.randn(sum(n), heads, dim, generator=gen, dtype=torch.float64) for n in (lq, lk, lk))
    cu_q, cu_k = (torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32) for n in (lq, lk))
    out = varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.3)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        scores = torch.einsum("qhd,khd->hqk", q[qs], k[ks]) * 0.3
        expected = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v[ks])
        torch.testing.assert_close(out[qs], expected, rtol=1e-12, atol=1e-12)


def test_select_backend(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("VARSERVE_ATTENTION_BACKEND", raising=False)
    _log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="varserve"):
        assert select_backend("cpu") == select_backend("cpu") == "reference"
    assert sum("paged attention backend: reference" in m for m in caplog.messages) == 1
    monkeypatch.setenv("VARSERVE_ATTENTION_BACKEND", "sdpa_gather")
    assert select_backend("cpu") == "sdpa_gather" and select_backend("cpu", "reference") == "reference"
    for name in ("nope", "varlen_fa2"):
        with pytest.raises(ValueError, match="available: .*reference"):
            select_backend("cpu", name)


def test_cuda_default_is_cudnn_where_installed_else_hybrid(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    cuda = torch.device("cuda")
    for installed, expected in ((True, "cudnn"), (False, "hybrid")):
        _log_once.cache_clear()
        for name, available in (("cudnn", installed), ("hybrid", True)):
            monkeypatch.setitem(paged.BACKENDS, name, replace(paged.BACKENDS[name], available=lambda d, a=available: a))
        with caplog.at_level(logging.INFO, logger="varserve"):
            assert paged.default_backend(cuda) == expected
        assert any("cudnn is not available on cuda (pip install 'varserve[cudnn]'" in m
                   for m in caplog.messages) == (not installed)
        caplog.clear()
    monkeypatch.setitem(paged.BACKENDS, "hybrid", replace(paged.BACKENDS["hybrid"], available=lambda d: False))
    with pytest.raises(ValueError, match="'hybrid' is not available on cuda"):
        select_backend(cuda)


def test_varlen_fa2_gather_with_cpu_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The varlen_fa2 backend's per-row K/V gather, torch's CUDA kernel replaced by the padded CPU path."""
    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale):
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale)

    monkeypatch.setattr(paged, "varlen_attn", varlen_attn)
    pool = Pool(2000, 5, heads=3, dim=16, dtype=torch.float64)
    requests = [pool.add(16, 21), pool.add(4, 5), pool.add(16, [[9], [21]]), pool.add(1, 1)]
    out = paged.BACKENDS["varlen_fa2"].fn(**batch(pool, requests))
    assert rel_error(out, dense_attention(requests, 16 ** -0.5)) < 1e-12
    with pytest.raises(ValueError, match="same KV length"):
        paged.BACKENDS["varlen_fa2"].fn(**batch(pool, [pool.add(4, [[5, 4, 5], [5, 5, 5]])]))


def test_flash_attn_layout_with_cpu_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flash_attn backend's (head, row) sequence layout, flash_attn_varlen_func replaced by the reference."""
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, block_table):
        assert not causal and k.shape[2] == 1
        lens = torch.diff(cu_k)[:, None]
        return paged.BACKENDS["reference"].fn(q, k[:, :, 0], v[:, :, 0], block_table[:, None], lens, cu_q, max_q,
                                              max_k, softmax_scale)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    pool = Pool(300, 256, heads=3, dim=16, dtype=torch.float64)
    requests = [pool.add(16, 300), pool.add(4, [[5, 3, 600], [1, 2, 3]])]
    out = paged.BACKENDS["flash_attn"].fn(**batch(pool, requests))
    assert rel_error(out, dense_attention(requests, 16 ** -0.5)) < 1e-12
    with pytest.raises(ValueError, match="256"):
        paged.BACKENDS["flash_attn"].fn(**batch(Pool(50, 16, 3, 16, torch.float64), requests))


class CudnnStandIn:
    """What the cudnn backend asks of cuDNN, done in plain torch: per sequence b' (< the graph's count), its
    queries at q's flat ragged offset with token stride H * d, keys through its table row, outputs to the same
    elements of out. Padding sequences must ask for nothing; no element may be written twice."""

    empty_runs = 0  # runs on no tokens (PagedGraph.load)

    def __init__(self, shape, dtype, pool_pages, page_size, head_dim, heads, scale, handle):
        self.shape, self.page_size, self.heads, self.scale = shape, page_size, heads, scale

    load = PagedGraph.load

    def run(self, q, k_pages, v_pages, table, meta, out, handle):
        n, d, stride = self.shape.sequences, q.shape[-1], self.heads * q.shape[-1]
        assert table.shape == (n, self.shape.pages) and meta.shape[1] % 4 == 0 and meta[0, n] == q.numel()
        CudnnStandIn.empty_runs += not meta[1].any()
        flat_q, flat_out, written = q.reshape(-1), out.view(-1), torch.zeros(q.numel(), dtype=torch.bool)
        for offset, lq, lk, pages in zip(meta[0, :n].tolist(), meta[1].tolist(), meta[2].tolist(), table):
            if lq == 0:
                assert lk == 0 and offset == q.numel()
                continue
            assert lq <= self.shape.max_q and lk <= self.shape.pages * self.page_size
            index = (offset + torch.arange(lq)[:, None] * stride + torch.arange(d)).reshape(-1)
            assert not written[index].any()
            written[index] = True
            position = torch.arange(lk)
            slots = pages[position // self.page_size].long() * self.page_size + position % self.page_size
            k, v = (x.view(-1, d)[slots] for x in (k_pages, v_pages))
            scores = flat_q[index].view(lq, d) @ k.T * self.scale
            flat_out[index] = (torch.softmax(scores, dim=-1) @ v).reshape(-1)


@pytest.mark.parametrize("min_q", [0, 16])
def test_cudnn_sequence_layout_with_cpu_stand_in(min_q: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cudnn backend's (row, head) sequences, ragged offsets, padding and tables, cuDNN replaced by
    CudnnStandIn and the Triton kernel by the reference backend. 7 requests of 2 rows and 3 heads; min_q 0: all
    42 sequences on cuDNN, padded to 64; 16: the rows of 16 and 36 queries on cuDNN, those of 1 and 4 on Triton."""
    from varserve.attention import cudnn_paged

    monkeypatch.setattr(cudnn_paged, "PagedGraph", CudnnStandIn)
    monkeypatch.setattr(cudnn_paged, "_handle", lambda device: None)
    monkeypatch.setattr(cudnn_paged, "HYBRID_MIN_Q", min_q)
    monkeypatch.setattr(paged, "paged_attention_triton", paged.BACKENDS["reference"].fn)
    cudnn_paged._graph.cache_clear()
    pool = Pool(4000, 4, heads=3, dim=16, dtype=torch.float64)
    requests = ragged_requests(pool, np.random.default_rng(3))
    out = cudnn_paged.paged_attention_cudnn(**batch(pool, requests))
    assert rel_error(out, dense_attention(requests, 16 ** -0.5)) < 1e-12
    assert cudnn_paged._graph.cache_info().currsize == 1  # one cuDNN call over the large rows: one graph
    cudnn_paged._graph.cache_clear()


def test_cudnn_prepares_the_graphs_its_calls_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_graphs builds a graph for every power of two of large rows up to a shape's (none for shapes of
    small rows), keyed as the calls key them, and runs each once on no tokens: the ragged batch's call then builds
    nothing."""
    from varserve.attention import CallShape, cudnn_paged

    monkeypatch.setattr(cudnn_paged, "PagedGraph", CudnnStandIn)
    monkeypatch.setattr(cudnn_paged, "_handle", lambda device: None)
    monkeypatch.setattr(cudnn_paged, "HYBRID_MIN_Q", 16)
    monkeypatch.setattr(paged, "paged_attention_triton", paged.BACKENDS["reference"].fn)
    cudnn_paged._graph.cache_clear()
    pool = Pool(4000, 4, heads=3, dim=16, dtype=torch.float64)
    requests = ragged_requests(pool, np.random.default_rng(3))
    args = batch(pool, requests)  # 14 rows, 10 of them of >= 16 queries
    tokens, width = int(args["cu_seqlens_q"][-1]), args["block_table"].shape[-1]
    shapes = [CallShape(rows=14, tokens=tokens, max_q=36, pages=width), CallShape(14, tokens, 4, width)]
    prepare, CudnnStandIn.empty_runs = paged.BACKENDS["cudnn"].prepare, 0
    assert prepare(pool.k_pages, 3, args["softmax_scale"], shapes) == 5  # 1, 2, 4, 8, 16 rows of 3 heads
    assert CudnnStandIn.empty_runs == 5  # each run once on no tokens, so CUDA loads its kernel at start
    built = cudnn_paged._graph.cache_info().misses
    out = cudnn_paged.paged_attention_cudnn(**args)
    assert cudnn_paged._graph.cache_info().misses == built
    assert prepare(pool.k_pages, 3, args["softmax_scale"], shapes) == 0
    assert rel_error(out, dense_attention(requests, 16 ** -0.5)) < 1e-12
    cudnn_paged._graph.cache_clear()


def test_cudnn_graph_shapes_round_up_to_powers_of_two() -> None:
    from varserve.attention.cudnn_paged import GraphShape, sequence_metadata

    assert GraphShape.of(rows=6, heads=16, max_q=1024, pages=80) == GraphShape(128, 1024, 128)
    assert GraphShape.of(rows=1, heads=1, max_q=1, pages=1) == GraphShape(1, 1, 1)
    cu, lens = np.array([0, 4, 5, 7]), np.array([[5, 3], [1, 1], [2, 9]])
    meta = sequence_metadata(cu, lens, np.array([0, 2]), head_dim=8, sequences=4)
    assert meta.dtype == np.int32 and meta.shape == (3, 8)
    assert meta[0].tolist() == [0, 8, 80, 88, 112, 112, 112, 112]  # (token * 2 heads + head) * 8; then the end
    assert meta[1, :4].tolist() == [4, 4, 2, 2] and meta[2, :4].tolist() == [5, 3, 2, 9]
    with pytest.raises(ValueError, match="int32"):
        sequence_metadata(np.array([0, 2**22]), np.ones((1, 64), dtype=np.int64), np.array([0]), head_dim=1024,
                          sequences=64)


@pytest.mark.skipif("triton" not in available_backends("cpu"),
                    reason="checks the Triton kernel on CPU only under TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("page_size", [4, 16, 64])
def test_triton_kernel_in_interpreter(page_size: int) -> None:
    pool = Pool(4000, page_size, heads=2, dim=32, dtype=torch.float32)
    requests = ragged_requests(pool, np.random.default_rng(page_size))
    out = paged_attention(**batch(pool, requests), backend="triton")
    assert rel_error(out, dense_attention(requests, 32 ** -0.5)) < 1e-5


@pytest.mark.skipif("hybrid" not in available_backends("cpu"),
                    reason="checks the Triton kernel on CPU only under TRITON_INTERPRET=1 with triton installed")
def test_hybrid_splits_rows_whose_heads_differ_in_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large rows with per-head lengths: dense attention over the keys every head has at its end, the Triton
    kernel over the rest resuming from its output and log-sum-exp; and the Triton kernel alone if the dense
    part cannot run."""
    monkeypatch.setattr(paged, "HYBRID_MIN_Q", 16)
    dense_calls = []
    attention_lse = paged._attention_lse
    monkeypatch.setattr(paged, "_attention_lse", lambda q, k, v, scale: dense_calls.append(k.shape) or
                        attention_lse(q, k, v, scale))
    pool = Pool(4000, 16, heads=2, dim=32, dtype=torch.float32)
    requests = [pool.add(16, [[16, 40], [19, 17]]), pool.add(4, 5), pool.add(36, 50),
                pool.add(16, [[30, 16], [17, 50]]), pool.add(36, [[37, 90], [36, 36]])]
    expected = dense_attention(requests, 32 ** -0.5)
    assert rel_error(paged_attention(**batch(pool, requests), backend="hybrid"), expected) < 1e-5
    # rows of 16 queries grouped by their shortest head (16: rows 0 and 6, 17: rows 1 and 7); of the last request's
    # rows, only the first has heads of different lengths; the rest go to the gathered path or the Triton kernel
    assert sorted(dense_calls) == [(1, 2, 37, 32), (2, 2, 16, 32), (2, 2, 17, 32)], dense_calls
    monkeypatch.setattr(paged, "_attention_lse", lambda q, k, v, scale: None)
    assert rel_error(paged_attention(**batch(pool, requests), backend="hybrid"), expected) < 1e-5


# --- GPU: every CUDA backend on bf16 at Infinity head sizes ------------------------------------------------

def gpu_requests(pool: Pool, rng: np.random.Generator, uniform: bool) -> list[Request]:
    """Scales of 1..256 queries, KV up to the full history of 521 tokens; per-head lengths unless uniform."""
    def lens(lq: int, full: int) -> np.ndarray:
        return np.full((ROWS, 1), full) if uniform else rng.integers(lq, full + 1, (ROWS, pool.heads))
    return [pool.add(lq, lens(lq, full)) for lq, full in ((256, 521), (1, 1), (64, 121), (256, 521), (144, 265),
                                                          (4, 5), (36, 57), (16, 21))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa_gather", "triton", "varlen_fa2", "hybrid", "cudnn"])
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_backends_match_dense(backend: str, page_size: int, dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not installed here")
    for module in ("paged", "cudnn_paged"):  # splits these rows between both paths of hybrid and cudnn
        monkeypatch.setattr(f"varserve.attention.{module}.HYBRID_MIN_Q", 100)
    pool = Pool(8000, page_size, heads=16, dim=dim, dtype=torch.bfloat16, device="cuda",
                poison=CUDNN_POISON if backend == "cudnn" else math.nan)
    rng = np.random.default_rng(page_size)
    for uniform in (True, False):
        requests = gpu_requests(pool, rng, uniform)
        args = batch(pool, requests)
        if backend == "varlen_fa2" and not uniform:
            with pytest.raises(ValueError, match="same KV length"):
                paged_attention(**args, backend=backend)
            continue
        out = paged_attention(**args, backend=backend)
        assert rel_error(out, dense_attention(requests, dim ** -0.5)) < TOLERANCE[torch.bfloat16]
        for r in requests:
            r.tables.release(pool.alloc)


@pytest.mark.gpu
def test_sdpa_gather_runs_cudnn_whatever_the_process_wide_order() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pool = Pool(8000, 32, heads=16, dim=128, dtype=torch.bfloat16, device="cuda")
    requests = [pool.add(lq, np.full((ROWS, 1), lk)) for lq, lk in ((256, 521), (144, 265), (256, 521))]
    flash_first = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(flash_first, set_priority=True), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = paged_attention(**batch(pool, requests), backend="sdpa_gather")
        torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]
    assert any("cudnn" in k for k in kernels) and not any("flash_fwd" in k for k in kernels), kernels
    assert rel_error(out, dense_attention(requests, 128 ** -0.5)) < TOLERANCE[torch.bfloat16]


def profiled(pool: Pool, requests: list[Request], backend: str,
             caplog: pytest.LogCaptureFixture) -> tuple[torch.Tensor, list[str]]:
    """paged_attention of the requests on `backend`, logs captured, and the device kernels it ran."""
    with caplog.at_level(logging.INFO, logger="varserve"), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = paged_attention(**batch(pool, requests), backend=backend)
        torch.cuda.synchronize()
    return out, [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]


@pytest.mark.gpu
def test_hybrid_runs_large_rows_of_ragged_heads_on_cudnn_and_triton(caplog: pytest.LogCaptureFixture) -> None:
    """HeatKV's shape at 1024 x 1024: 1024 queries, the current scale plus 21..1497 history tokens per head."""
    pool = Pool(20000, 32, heads=16, dim=128, dtype=torch.bfloat16, device="cuda")
    rng = np.random.default_rng(0)
    requests = [pool.add(1024, 1024 + rng.integers(21, 1498, (ROWS, 16))) for _ in range(2)] + [pool.add(256, 521)]
    out, kernels = profiled(pool, requests, "hybrid", caplog)
    assert any("cudnn" in k for k in kernels) and any("paged_attention" in k for k in kernels), kernels
    assert not any("failed" in m for m in caplog.messages), caplog.messages
    assert rel_error(out, dense_attention(requests, 128 ** -0.5)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_cudnn_runs_large_rows_of_ragged_heads_on_paged_cudnn(caplog: pytest.LogCaptureFixture) -> None:
    """HeatKV's 1024-query rows (per-head history) on cuDNN's paged SDPA, nothing gathered; the 256- and 1-query
    rows on the Triton kernel."""
    if "cudnn" not in available_backends("cuda"):
        pytest.skip("the cuDNN frontend is not installed")
    pool = Pool(20000, 32, heads=16, dim=128, dtype=torch.bfloat16, device="cuda", poison=CUDNN_POISON)
    rng = np.random.default_rng(1)
    requests = [pool.add(1024, 1024 + rng.integers(21, 1498, (ROWS, 16))) for _ in range(2)]
    requests += [pool.add(256, 521), pool.add(1, 1)]
    out, kernels = profiled(pool, requests, "cudnn", caplog)
    assert any("cudnn" in k for k in kernels) and any("paged_attention" in k for k in kernels), kernels
    assert not any("gather" in k for k in kernels), kernels
    assert not any("no paged SDPA graph" in m for m in caplog.messages), caplog.messages
    assert rel_error(out, dense_attention(requests, 128 ** -0.5)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_paged_scores_equal_dense_scores(device: str) -> None:
    """The window query's score of every key of some rows (one twice, in any order), read through their tables
    (the Triton kernel on CUDA, gathered keys elsewhere) against float64 dot products of the dense copies."""
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    pool = Pool(4000, 16, heads=3, dim=64, dtype=dtype, device=device)
    requests = ragged_requests(pool, np.random.default_rng(4))
    table = batch(pool, requests)["block_table"]
    rows = [7, 0, 10, 7, 6]  # request r's rows are 2r and 2r + 1
    length = max(int(requests[b // ROWS].lens[b % ROWS].max()) for b in rows)
    query = torch.randn(len(rows), 3, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    acc, tolerance = (torch.float64, 1e-12) if device == "cpu" else (torch.float32, 1e-5)
    scores = paged.paged_scores(pool.k_pages, table, torch.tensor(rows, device=device), query.to(device, acc),
                                length, 0.125)
    assert scores.shape == (len(rows), 3, length) and scores.dtype == acc
    for g, b in enumerate(rows):
        request = requests[b // ROWS]
        for head in range(3):
            n = int(request.lens[b % ROWS, head])
            keys = request.k[b % ROWS, :n, head].double().cpu()
            expected = keys @ query[g, head].to(acc).double() * 0.125
            torch.testing.assert_close(scores[g, head, :n].cpu().double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.int64, 32), (torch.float32, 64)])
def test_gather_rows_on_cuda_equals_indexing(dtype: torch.dtype, d: int) -> None:
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(5000, d, generator=gen).mul(1000).to(dtype).cuda()
    for shape in ((3, 5, 77), (1,), (0, 4)):
        index = torch.randint(0, 5000, shape, generator=gen).cuda()
        assert torch.equal(gather_rows(src, index), src[index])


@pytest.mark.gpu
def test_cuda_varlen_attention_bf16() -> None:
    gen = torch.Generator().manual_seed(0)
    lq, lk = [256, 1, 64], [77, 12, 512]
    q, k, v = (torch.randn(sum(n), 16, 128, generator=gen, dtype=torch.float64) for n in (lq, lk, lk))
    cu_q, cu_k = (torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32) for n in (lq, lk))
    expected = varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), 128 ** -0.5)
    bf16 = [x.to("cuda", torch.bfloat16) for x in (q, k, v)]
    out = varlen_attention(*bf16, cu_q.cuda(), cu_k.cuda(), max(lq), max(lk), 128 ** -0.5)
    assert rel_error(out.cpu(), expected) < TOLERANCE[torch.bfloat16]
