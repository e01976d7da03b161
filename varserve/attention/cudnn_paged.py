"""The `cudnn` backend: cuDNN's paged SDPA (through the cuDNN frontend, `pip install varserve[cudnn]`).

cuDNN's pages hold a block of tokens of every head, read through one page table per sequence; varserve's pages
hold one head (HeatKV keeps different tokens per head). So each (row, head) is given to cuDNN as a sequence of
its own with one head, b' = row * H + head, its page table that (row, head)'s block table row. Its queries stay
where the model wrote them: ragged offsets point sequence b' at head `head` of its row's first token in the
token-major q `[T, H, d]` (token stride H * d), and the output lands in the same layout. So one call attends
every large row of a layer, whatever its scale and whatever KV length each head keeps, with nothing gathered.
Rows of fewer than HYBRID_MIN_Q queries go to one Triton launch, as in `hybrid` (faster there: 256 x 521 ran at
49% of dense cuDNN on Triton, 35% on paged cuDNN), which also keeps a captured small step's kernels those of the
eager one (`varserve/graphs.py`).

A cuDNN graph is built per (sequences, longest q, table width), each rounded up to a power of two so that a run
builds a few dozen and reuses them; padding sequences have no queries and no keys. A shape cuDNN refuses runs
on the hybrid backend, with a warning. Building takes ~45 ms a graph (some take ~0.7 s), so the engine builds
the graphs of an image size's steps before they run (`prepare_graphs`): built in the first steps, they took
~1 s of a 64-image run's ~16 s.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from varserve.attention.paged import (BACKENDS, HYBRID_MIN_Q, CallShape, _backend, _host_plan, _selector,
                                      _triton_rows, paged_attention_triton, upload)

logger = logging.getLogger("varserve")
MIN_CUDNN = 91000  # cuDNN 9.10: packed (ragged) queries with paged K/V
MAX_GRAPHS = 256  # built graphs kept (least recently used dropped)
FALLBACK = "hybrid"


def _frontend():
    """The cuDNN frontend module, or None where it is not installed or cannot load its library (imported once torch
    has loaded libcudnn)."""
    try:
        return importlib.import_module("cudnn")
    except Exception as exc:  # ImportError, or the library failing to load (OSError, the frontend's own asserts)
        logger.debug("cudnn backend: the cuDNN frontend does not import (%s: %s)", type(exc).__name__, exc)
        return None


@functools.lru_cache(maxsize=None)
def cudnn_available(device: torch.device) -> bool:
    """CUDA, the cuDNN frontend installed, and a cuDNN library new enough for ragged queries on paged K/V."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    cudnn = _frontend()
    return cudnn is not None and cudnn.backend_version() >= MIN_CUDNN


@dataclass(frozen=True)
class GraphShape:
    """What a built graph is specialised to (powers of two): sequences (rows * heads), longest q, pages per
    table."""

    sequences: int
    max_q: int
    pages: int

    @staticmethod
    def of(rows: int, heads: int, max_q: int, pages: int) -> "GraphShape":
        return GraphShape(_pow2(rows * heads), _pow2(max_q), _pow2(pages))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def sequence_metadata(cu: np.ndarray, lens: np.ndarray, rows: np.ndarray, head_dim: int, sequences: int
                      ) -> np.ndarray:
    """int32 `[3, width]` for `rows` (indices into packed query offsets `cu [B+1]` and KV lengths `lens [B, H]`)
    as sequences b' = i * H + head for the i-th of them (`sequences` >= len(rows) * H, the rest padding): row 0
    the ragged offset of each sequence's first query in elements of q `[T, H, d]`, then the end (T * H * d) for
    the padding and one past the last; row 1 the query counts; row 2 the key counts. `width` (>= sequences + 1)
    is a multiple of 4, so each row starts 16-byte aligned."""
    heads = lens.shape[1]
    n = len(rows) * heads
    width = -(-(sequences + 1) // 4) * 4
    meta = np.zeros((3, width), dtype=np.int64)
    meta[0, :] = cu[-1] * heads * head_dim
    meta[0, :n] = ((cu[rows, None] * heads + np.arange(heads)) * head_dim).reshape(-1)
    meta[1, :n] = np.repeat(np.diff(cu)[rows], heads)
    meta[2, :n] = lens[rows].reshape(-1)
    if meta.max() >= 2**31:
        raise ValueError(f"cudnn backend: offsets past int32 ({int(meta.max())} elements of q)")
    return meta.astype(np.int32)


class PagedGraph:
    """One built cuDNN paged-SDPA graph: run() binds a call's tensors to it."""

    def __init__(self, shape: GraphShape, dtype: torch.dtype, pool_pages: int, page_size: int, head_dim: int,
                 heads: int, scale: float, handle):
        cudnn = _frontend()
        io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]
        i32 = cudnn.data_type.INT32
        graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        n, d = shape.sequences, head_dim
        packed = ([n, 1, shape.max_q, d], [shape.max_q * heads * d, d, heads * d, 1])  # token-major, ragged

        def column(name: str, length: int):
            return graph.tensor(name=name, dim=[length, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)

        self.q = graph.tensor(name="q", dim=packed[0], stride=packed[1], data_type=io)
        self.q_offsets, self.o_offsets = column("q_offsets", n + 1), column("o_offsets", n + 1)
        self.q.set_ragged_offset(self.q_offsets)
        pool = ([pool_pages, 1, page_size, d], [page_size * d, page_size * d, d, 1])
        self.k = graph.tensor(name="k_pages", dim=pool[0], stride=pool[1], data_type=io)
        self.v = graph.tensor(name="v_pages", dim=pool[0], stride=pool[1], data_type=io)
        table = ([n, 1, shape.pages, 1], [shape.pages, shape.pages, 1, 1])
        self.k_table = graph.tensor(name="k_table", dim=table[0], stride=table[1], data_type=i32)
        self.v_table = graph.tensor(name="v_table", dim=table[0], stride=table[1], data_type=i32)
        self.seq_q, self.seq_kv = column("seq_q", n), column("seq_kv", n)
        self.o, _ = graph.sdpa(
            name="paged_sdpa", q=self.q, k=self.k, v=self.v, is_inference=True, attn_scale=scale,
            use_padding_mask=True, seq_len_q=self.seq_q, seq_len_kv=self.seq_kv,
            paged_attention_k_table=self.k_table, paged_attention_v_table=self.v_table,
            paged_attention_max_seq_len_kv=shape.pages * page_size)
        self.o.set_output(True).set_dim(packed[0]).set_stride(packed[1]).set_ragged_offset(self.o_offsets)
        graph.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        self.graph, self.workspace_bytes, self.shape, self.set_stream = (graph, graph.get_workspace_size(), shape,
                                                                         cudnn.set_stream)
        self.heads = heads

    def load(self, pages: Tensor, handle) -> None:
        """Run once on no tokens: CUDA loads a kernel at its first launch, which took 3-50 ms of host time inside
        the first step that ran the graph."""
        n, heads = self.shape.sequences, self.heads
        ends = np.array([self.shape.max_q])  # every sequence empty, at the end of q
        meta = upload(sequence_metadata(ends, np.zeros((0, heads), dtype=np.int64), np.zeros(0, dtype=np.int64),
                                        pages.shape[-1], n), pages.device)
        q = torch.zeros(self.shape.max_q, heads, pages.shape[-1], dtype=pages.dtype, device=pages.device)
        table = torch.zeros(n, self.shape.pages, dtype=torch.int32, device=pages.device)
        self.run(q, pages, pages, table, meta, torch.empty_like(q), handle)

    def run(self, q: Tensor, k_pages: Tensor, v_pages: Tensor, table: Tensor, meta: Tensor, out: Tensor,
            handle) -> None:
        """Attention of the sequences' queries in q `[T, H, d]` over the pages, written to the same elements of
        out; table `[sequences, pages]`, meta from sequence_metadata."""
        n = self.shape.sequences
        offsets, seq_q, seq_kv = meta[0, : n + 1], meta[1, :n], meta[2, :n]
        workspace = torch.empty(max(1, self.workspace_bytes), dtype=torch.uint8, device=q.device)
        self.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        self.graph.execute({self.q: q, self.q_offsets: offsets, self.o_offsets: offsets, self.k: k_pages,
                            self.v: v_pages, self.k_table: table, self.v_table: table, self.seq_q: seq_q,
                            self.seq_kv: seq_kv, self.o: out}, workspace, handle=handle)


@functools.lru_cache(maxsize=None)
def _handle(device: torch.device):
    with torch.cuda.device(device):
        return _frontend().create_handle()


@functools.lru_cache(maxsize=MAX_GRAPHS)
def _graph(shape: GraphShape, dtype: torch.dtype, pool_pages: int, page_size: int, head_dim: int, heads: int,
           scale: float, device: torch.device) -> PagedGraph | None:
    """The built graph of a shape, or None (logged) where cuDNN refuses it."""
    try:
        graph = PagedGraph(shape, dtype, pool_pages, page_size, head_dim, heads, scale, _handle(device))
    except Exception as exc:  # the frontend raises its own error types, by version
        logger.warning("cudnn backend: no paged SDPA graph for %s (%s: %s); these calls run on %s",
                       shape, type(exc).__name__, exc, FALLBACK)
        return None
    logger.debug("cudnn backend: built a paged SDPA graph for %s", shape)
    return graph


def prepare_graphs(k_pages: Tensor, heads: int, softmax_scale: float, shapes: list[CallShape]) -> int:
    """Build the graphs of every call of these shapes (any number of rows of >= HYBRID_MIN_Q queries, up to the
    shape's, as powers of two) and run each new one once on no tokens (`PagedGraph.load`); returns how many were
    not built before."""
    wanted = {GraphShape.of(rows, heads, shape.max_q, shape.pages) for shape in shapes if shape.max_q >= HYBRID_MIN_Q
              for rows in _powers_of_two(min(shape.rows, shape.tokens // HYBRID_MIN_Q))}
    built = 0
    for shape in sorted(wanted, key=lambda g: (g.max_q, g.pages, g.sequences)):
        misses = _graph.cache_info().misses
        graph = _graph(shape, k_pages.dtype, k_pages.shape[0], k_pages.shape[1], k_pages.shape[2], heads,
                       float(softmax_scale), k_pages.device)
        if _graph.cache_info().misses > misses:
            built += 1
            if graph is not None:
                graph.load(k_pages, _handle(k_pages.device))
    return built


def _powers_of_two(most: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= most (none for most < 1)."""
    return [1 << i for i in range(_pow2(most).bit_length())] if most >= 1 else []


@_backend("cudnn", cudnn_available, prepare=prepare_graphs,
          requires="pip install 'varserve[cudnn]': the cuDNN frontend, cuDNN >= 9.10")
def paged_attention_cudnn(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens_k: Tensor,
                          cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float) -> Tensor:
    """paged_attention: one cuDNN call over the rows of >= HYBRID_MIN_Q queries, one Triton launch over the
    others (see the module docstring); bf16 or fp16."""
    cu, lens = _host_plan(cu_seqlens_q, seqlens_k)
    large = np.diff(cu) >= HYBRID_MIN_Q
    if not large.any():
        return paged_attention_triton(q, k_pages, v_pages, block_table, seqlens_k, cu_seqlens_q, max_seqlen_q,
                                      max_seqlen_k, softmax_scale)
    q, out = q.contiguous(), torch.empty_like(q)
    if not _cudnn_rows(q, k_pages, v_pages, block_table, cu, lens, np.flatnonzero(large), softmax_scale, out):
        return BACKENDS[FALLBACK].fn(q, k_pages, v_pages, block_table, seqlens_k, cu_seqlens_q, max_seqlen_q,
                                     max_seqlen_k, softmax_scale)
    if not large.all():
        tokens, part = _triton_rows(q, k_pages, v_pages, block_table, cu, lens, np.flatnonzero(~large), softmax_scale)
        out[tokens] = part
    return out


def _cudnn_rows(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, cu: np.ndarray, lens: np.ndarray,
                rows: np.ndarray, scale: float, out: Tensor) -> bool:
    """Attention of `rows` into their tokens of out, in one cuDNN call; False where cuDNN has no graph."""
    heads, pages = block_table.shape[1:]
    shape = GraphShape.of(len(rows), heads, int(np.diff(cu)[rows].max()), pages)
    graph = _graph(shape, q.dtype, k_pages.shape[0], k_pages.shape[1], q.shape[-1], heads, float(scale), q.device)
    if graph is None:
        return False
    meta = upload(sequence_metadata(cu, lens, rows, q.shape[-1], shape.sequences), q.device)
    tables = block_table[_selector(rows, q.device)].reshape(len(rows) * heads, pages)
    tables = F.pad(tables, (0, shape.pages - pages, 0, shape.sequences - len(rows) * heads)).contiguous()
    graph.run(q, k_pages, v_pages, tables, meta, out, _handle(q.device))
    return True
