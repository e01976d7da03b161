"""Paged attention over head-granular pages (flash_attn_varlen_func-shaped), with a registry of backends.

Pools `k_pages`, `v_pages` are `[num_pages, page_size, d]`; slot = page * page_size + offset. Attention is
non-causal: every query of row b sees every valid key of (row b, head h).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the triton backend is simply unavailable
    triton = None

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

logger = logging.getLogger("varserve")
ENV_BACKEND = "VARSERVE_ATTENTION_BACKEND"
DEFAULT_BACKENDS = {"cpu": ("reference",), "cuda": ("cudnn", "hybrid")}  # the first available one
HYBRID_MIN_Q = 1024  # rows with at least this many queries go to dense SDPA, the rest to one Triton launch
# cuDNN first, whatever the process-wide order: after any `sdpa_kernel(..., set_priority=True)` elsewhere torch
# prefers FA2, which measured ~1.6x slower than cuDNN on the H100 at Infinity's large scales.
SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
LOG2E = 1.4426950408889634
GATHER_BLOCK = 64  # rows per program of gather_rows
SCORE_BLOCK = 64  # keys per program of paged_scores


@dataclass(frozen=True)
class CallShape:
    """The largest paged attention calls of one kind, for a backend to prepare for (`prepare_backend`): up to `rows`
    rows and `tokens` queries in all, none of more than `max_q` queries, block tables `pages` wide."""

    rows: int
    tokens: int
    max_q: int
    pages: int


@dataclass(frozen=True)
class Backend:
    fn: Callable[..., Tensor]  # same arguments as paged_attention, without `backend`
    available: Callable[[torch.device], bool]
    requires: str = ""  # what makes an unavailable backend available, for the log
    # (k_pages, heads, softmax_scale, shapes) -> things built ahead of the calls of those shapes
    prepare: Callable[[Tensor, int, float, list[CallShape]], int] | None = None


BACKENDS: dict[str, Backend] = {}


def _backend(name: str, available: Callable[[torch.device], bool] = lambda device: True, requires: str = "",
             prepare: Callable[[Tensor, int, float, list[CallShape]], int] | None = None):
    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        BACKENDS[name] = Backend(fn, available, requires, prepare)
        return fn

    return register


def prepare_backend(name: str, k_pages: Tensor, heads: int, softmax_scale: float, shapes: list[CallShape]) -> int:
    """Let backend `name` build now what its calls of these shapes over the pool `k_pages` need (cudnn: its graphs),
    instead of in the first calls that meet them; returns how many things it built (0: nothing to build)."""
    prepare = BACKENDS[name].prepare
    return prepare(k_pages, heads, softmax_scale, shapes) if prepare else 0


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [name for name, backend in BACKENDS.items() if backend.available(device)]


def select_backend(device: torch.device | str, name: str | None = None) -> str:
    """`name`, else $VARSERVE_ATTENTION_BACKEND, else the device's default; ValueError if unavailable."""
    device = torch.device(device)
    name = name or os.environ.get(ENV_BACKEND) or default_backend(device)
    if name not in BACKENDS or not BACKENDS[name].available(device):
        raise ValueError(f"attention backend {name!r} is not available on {device}; "
                         f"available: {available_backends(device)}")
    _log_once(f"paged attention backend: {name} ({device.type})")
    return name


def default_backend(device: torch.device) -> str:
    """The device's first available default backend (else its last, which select_backend then refuses); logs
    the preferred ones it passes over."""
    preferred = DEFAULT_BACKENDS.get(device.type, ("reference",))
    for name in preferred[:-1]:
        if BACKENDS[name].available(device):
            return name
        needs = BACKENDS[name].requires
        _log_once(f"paged attention backend {name} is not available on {device.type}"
                  + (f" ({needs})" if needs else ""))
    return preferred[-1]


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.info(message)


def paged_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens_k: Tensor,
                    cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                    backend: str | None = None) -> Tensor:
    """Attention of packed queries `q [total_q, H, d]` (row b owns q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]) to
    the keys of `block_table [B, H, max_pages]` (int32, one layer) with `seqlens_k [B, H]` valid tokens each.
    Returns `[total_q, H, d]`. The gathering backends plan on the host: passing `seqlens_k` and
    `cu_seqlens_q` as CPU tensors spares them a device sync (triton copies them to the device instead)."""
    fn = BACKENDS[select_backend(q.device, backend)].fn
    return fn(q, k_pages, v_pages, block_table, seqlens_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale)


def write_kv(k_pages: Tensor, v_pages: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store `k, v [T, H, d]` at `slot_mapping [T, H]` (int64 flat slots): one index_copy_ per pool."""
    slots = upload(slot_mapping, k_pages.device, torch.int64).reshape(-1)
    for pages, x in ((k_pages, k), (v_pages, v)):
        rows, new = wide_rows(_flat(pages), x.reshape(-1, x.shape[-1]).to(pages.dtype))
        rows.index_copy_(0, slots, new)


def wide_rows(*rows: Tensor) -> tuple[Tensor, ...]:
    """The same bytes of row tensors `[N, d]` (one dtype) as int64 where every one's rows allow it, else as they
    are: PyTorch's index_copy_ copies one element per thread step, so 2-byte elements ran at ~1/3 of the H100's
    bandwidth."""
    def fits(x: Tensor) -> bool:
        return x.is_contiguous() and (x.shape[-1] * x.element_size()) % 8 == 0 and (
            x.storage_offset() * x.element_size()) % 8 == 0
    return tuple(x.view(torch.int64) for x in rows) if all(map(fits, rows)) else rows


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """`src[index]` of a contiguous `[N, d]` tensor: on CUDA (d a power of 2) a Triton copy of 64 rows per
    program; PyTorch's gather of 256-byte rows (a token's k or v of one head) measured ~1/4 of the H100's
    bandwidth. Plain indexing elsewhere."""
    d = src.shape[-1]
    if not (src.is_cuda and triton is not None and src.is_contiguous() and d & (d - 1) == 0):
        return src[index]
    index = index.contiguous()
    out = torch.empty(*index.shape, d, dtype=src.dtype, device=src.device)
    if index.numel():
        _gather_rows_kernel[(triton.cdiv(index.numel(), GATHER_BLOCK),)](src, index, out, index.numel(), D=d,
                                                                        BLOCK=GATHER_BLOCK)
    return out


def paged_scores(k_pages: Tensor, block_table: Tensor, rows: Tensor, query: Tensor, length: int, scale: float
                 ) -> Tensor:
    """`query [G, H, d] . key * scale` for the first `length` keys of (rows[g], head h) of a layer's
    `block_table [B, H, pages]` (keys past a table's pages read the null page), as `[G, H, length]` in the
    query's dtype. On CUDA one Triton pass reads each key from its page once (gathering the keys and copying them
    to fp32 first took ~11 ms per 1024x1024 ScaleKV image); elsewhere the keys are gathered."""
    heads, d, page = block_table.shape[1], k_pages.shape[-1], k_pages.shape[1]
    if paged_scores_gather(k_pages):
        keys = gather_rows(_flat(k_pages), _kv_slots(block_table[rows], length, page))
        return torch.einsum("ghld,ghd->ghl", keys.to(query.dtype), query) * scale
    out = torch.empty(len(rows), heads, length, dtype=query.dtype, device=k_pages.device)
    if out.numel():
        _paged_scores_kernel[(len(rows) * heads, triton.cdiv(length, SCORE_BLOCK))](
            k_pages, block_table.contiguous(), rows.contiguous(), query.contiguous(), out, length,
            block_table.shape[2], scale, HEADS=heads, PAGE=page, D=d, BLOCK=SCORE_BLOCK)
    return out


def paged_scores_gather(k_pages: Tensor) -> bool:
    """Whether paged_scores gathers the keys (a `[G, H, length, d]` temporary) instead of reading their pages."""
    d = k_pages.shape[-1]
    return not (k_pages.is_cuda and triton is not None and d & (d - 1) == 0)


def token_rows(cu_seqlens_q: Tensor, total_q: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(row, position within the row) of every packed token, int64 `[total_q]` each, built on `device`; the
    same for every layer of a step, so a step computes them once."""
    cu = upload(cu_seqlens_q, device, torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), torch.diff(cu), output_size=total_q)
    return rows, torch.arange(total_q, device=device) - cu[rows]


def slot_mapping(block_table: Tensor, start: Tensor, tokens: tuple[Tensor, Tensor], page_size: int) -> Tensor:
    """`[total_q, H]` int64 slots for `write_kv` of packed new tokens (`tokens` from `token_rows`), on the
    table's device: token i of row b goes to position start[b, h] + i of (row b, head h)."""
    rows, position = tokens
    positions = upload(start, rows.device, torch.int64)[rows] + position[:, None]
    heads = torch.arange(block_table.shape[1], device=rows.device)
    return block_table[rows[:, None], heads, positions // page_size].long() * page_size + positions % page_size


def _flat(pages: Tensor) -> Tensor:
    """`[num_pages * page_size, d]` view of a pool (a view, so writes land in the pool)."""
    return pages.view(-1, pages.shape[-1])


def _kv_slots(tables: Tensor, length: int, page_size: int, start: np.ndarray | None = None) -> Tensor:
    """int64 slots `[..., length]` of the first `length` tokens through page tables `[..., pages]`, or of the
    `length` tokens from position `start [...]` of each table on."""
    t = torch.arange(length, device=tables.device)
    if start is None:
        return tables[..., t // page_size].long() * page_size + t % page_size
    positions = upload(start, tables.device, torch.int64)[..., None] + t
    return torch.gather(tables, -1, positions // page_size).long() * page_size + positions % page_size


def upload(x: np.ndarray | Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Host metadata to `device` without stalling the host: a copy from pageable memory waits for the
    device, so CUDA uploads go through a pinned staging copy (the caching host allocator keeps it alive
    until the transfer is done). No-op when already there."""
    t = torch.as_tensor(x)
    if device.type != "cuda" or t.is_cuda:
        return t.to(device, dtype)
    return t.pin_memory().to(device, dtype, non_blocking=True)


def _host_plan(cu_seqlens_q: Tensor, seqlens_k: Tensor) -> tuple[np.ndarray, np.ndarray]:
    return cu_seqlens_q.cpu().numpy().astype(np.int64), seqlens_k.cpu().numpy().astype(np.int64)


# --- reference: the CPU oracle ------------------------------------------------------------------------------

@_backend("reference")
def _reference(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens_k: Tensor,
               cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float) -> Tensor:
    """Per (row, head): gather exactly the valid keys, plain softmax attention in q's dtype."""
    cu, lens = _host_plan(cu_seqlens_q, seqlens_k)
    out = torch.empty_like(q)
    for b, h in np.ndindex(*lens.shape):
        slots = _kv_slots(block_table[b, h], int(lens[b, h]), k_pages.shape[1])
        k, v = (_flat(pages)[slots].to(q.dtype) for pages in (k_pages, v_pages))
        scores = q[cu[b]:cu[b + 1], h] @ k.T * softmax_scale
        out[cu[b]:cu[b + 1], h] = torch.softmax(scores, dim=-1) @ v
    return out


# --- sdpa_gather: dense SDPA per group of rows over K/V gathered from pages ---------------------------------

@_backend("sdpa_gather")
def _sdpa_gather(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens_k: Tensor,
                 cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float) -> Tensor:
    """Rows with the same q length and the same k length on every head form one dense SDPA call (cuDNN on
    Hopper). Rows whose heads differ in k length (HeatKV) pad to their longest head under a key mask."""
    cu, lens = _host_plan(cu_seqlens_q, seqlens_k)
    parts = _sdpa_parts(q, k_pages, v_pages, block_table, cu, lens, np.arange(len(lens)), softmax_scale)
    if len(parts) == 1 and isinstance(parts[0][0], slice) and len(parts[0][1]) == len(q):
        return parts[0][1]
    return _place(torch.empty_like(q), parts)


def _sdpa_parts(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, cu: np.ndarray, lens: np.ndarray,
                rows: np.ndarray, scale: float) -> list[tuple[slice | Tensor, Tensor]]:
    """(token selector into q, output) of every group of `rows`."""
    groups = _group_rows(cu, lens, rows)
    return [_sdpa_group(q, k_pages, v_pages, block_table, cu, lens, group, scale) for group in groups]


def _place(out: Tensor, parts: list[tuple[slice | Tensor, Tensor]]) -> Tensor:
    for tokens, part in parts:
        out[tokens] = part
    return out


def _group_rows(cu: np.ndarray, lens: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """`rows` that have queries, grouped by (q length, longest head's k length, all heads equal?)."""
    live = rows[np.diff(cu)[rows] > 0]
    longest = lens[live].max(1)
    return _groups(live, np.stack([np.diff(cu)[live], longest, (lens[live] == longest[:, None]).all(1)], axis=1))


def _groups(rows: np.ndarray, keys: np.ndarray) -> list[np.ndarray]:
    """`rows` grouped by equal rows of `keys [len(rows), k]`."""
    if not len(rows):
        return []
    _, group = np.unique(keys, axis=0, return_inverse=True)
    return [rows[group.ravel() == g] for g in range(group.max() + 1)]


def _sdpa_group(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, cu: np.ndarray,
                lens: np.ndarray, rows: np.ndarray, scale: float) -> tuple[slice | Tensor, Tensor]:
    """(token selector, output `[tokens, H, d]`) of one group of rows."""
    num_rows, num_heads, d = len(rows), q.shape[1], q.shape[2]
    lq = int(cu[rows[0] + 1] - cu[rows[0]])
    tokens = _row_tokens(cu, rows, q.device)
    tables = block_table[_selector(rows, q.device)]
    if (lens[rows] == lens[rows[0], 0]).all():
        k, v = (_gather_pages(pages, tables, int(lens[rows[0], 0])).to(q.dtype) for pages in (k_pages, v_pages))
        mask = None
    else:
        slots, mask = _head_mask(_kv_slots(tables, int(lens[rows].max()), k_pages.shape[1]), lens[rows])
        k, v = (gather_rows(_flat(pages), slots).to(q.dtype) for pages in (k_pages, v_pages))
    q_rows = q[tokens].view(num_rows, lq, num_heads, d).transpose(1, 2)
    with sdpa_kernel(SDPA_ORDER, set_priority=True):
        out = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask, scale=scale)
    return tokens, out.transpose(1, 2).reshape(num_rows * lq, num_heads, d)


def _gather_pages(pages: Tensor, tables: Tensor, length: int) -> Tensor:
    """`[B, H, length, d]` (a view) of the first `length` tokens of every (row, head): whole pages are
    copied by one advanced-indexing gather (PyTorch's 16-byte vectorised gather kernel; index_select copies
    element by element and reached only ~0.45 TB/s on the H100)."""
    page_size = pages.shape[1]
    used = tables[..., : -(-length // page_size)]
    gathered = pages[used.reshape(-1).long()]
    return gathered.view(*used.shape[:2], -1, pages.shape[-1])[:, :, :length]


def _head_mask(slots: Tensor, lens: np.ndarray) -> tuple[Tensor, Tensor | None]:
    """Key mask `[B, H, 1, Lk]` for rows whose heads differ in length (None when all are full). Masked
    positions are pointed at the head's first token: a slot past the length may hold NaN garbage, and a
    masked NaN value still poisons the weighted sum (0 * NaN)."""
    if (lens == slots.shape[-1]).all():
        return slots, None
    _log_once("sdpa_gather: rows whose heads differ in KV length take the masked SDPA path")
    valid = torch.arange(slots.shape[-1], device=slots.device) < upload(lens, slots.device)[..., None]
    return torch.where(valid, slots, slots[..., :1]), valid[:, :, None, :]


def _row_tokens(cu: np.ndarray, rows: np.ndarray, device: torch.device) -> slice | Tensor:
    """Selector of the packed tokens of `rows`, in order."""
    return _selector(np.concatenate([np.arange(cu[r], cu[r + 1]) for r in rows]), device)


def _selector(index: np.ndarray, device: torch.device) -> slice | Tensor:
    """Index of a leading dimension: a slice (a view, no copy) when the sorted `index` is a contiguous range."""
    if len(index) and index[-1] - index[0] == len(index) - 1:
        return slice(int(index[0]), int(index[-1]) + 1)
    return upload(index, device)


# --- varlen_fa2: torch's FlashAttention-2 varlen over K/V gathered contiguously per row ---------------------

@_backend("varlen_fa2", lambda device: device.type == "cuda" and varlen_attn is not None)
def _varlen_fa2(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens_k: Tensor,
                cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float) -> Tensor:
    """torch.nn.attention.varlen.varlen_attn over `[total_k, H, d]` K/V gathered per row; needs every head
    of a row to have the same k length (ValueError otherwise)."""
    lens = seqlens_k.cpu().numpy().astype(np.int64)
    if (lens != lens[:, :1]).any():
        raise ValueError("varlen_fa2 needs the same KV length on every head of a row: use sdpa_gather or triton")
    slots = _row_major_slots(block_table, lens[:, 0], k_pages.shape[1])
    k, v = (gather_rows(_flat(pages), slots).to(q.dtype) for pages in (k_pages, v_pages))
    cu_k = upload(np.concatenate([[0], np.cumsum(lens[:, 0])]), q.device, torch.int32)
    cu_q = upload(cu_seqlens_q, q.device, torch.int32)
    return varlen_attn(q, k, v, cu_q, cu_k, max_seqlen_q, int(lens.max()), scale=softmax_scale)


def _row_major_slots(block_table: Tensor, lens: np.ndarray, page_size: int) -> Tensor:
    """Slots `[sum(lens), H]` of rows whose heads all hold `lens[b]` tokens, packed row after row."""
    longest = int(lens.max())
    slots = _kv_slots(block_table, longest, page_size).transpose(1, 2).reshape(-1, block_table.shape[1])
    valid = np.arange(len(lens))[:, None] * longest + np.arange(longest)
    return slots[upload(valid[np.arange(longest) < lens[:, None]], slots.device)]


# --- flash_attn: flash_attn_varlen_func with block_table ----------------------------------------------------

@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@_backend("flash_attn", lambda device: device.type == "cuda" and _installed("flash_attn"),
          requires="pip install 'varserve[flash]'")
def _flash_attn(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens_k: Tensor,
                cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float) -> Tensor:
    """UNVERIFIED: flash_attn is not installed on any machine this was written or tested on.
    Head-granular pages become B*H sequences with one KV head, ordered (head, row); flash-attn 2 needs
    page_size % 256 == 0."""
    from flash_attn import flash_attn_varlen_func

    if k_pages.shape[1] % 256:
        raise ValueError(f"flash_attn paged KV needs page_size % 256 == 0, got {k_pages.shape[1]}")
    (num_rows, num_heads, max_pages), (total_q, _, d) = block_table.shape, q.shape
    cu_q = _cumsum0(torch.diff(upload(cu_seqlens_q, q.device)).repeat(num_heads))
    cu_k = _cumsum0(upload(seqlens_k, q.device).t().reshape(-1))
    out = flash_attn_varlen_func(
        q.transpose(0, 1).reshape(num_heads * total_q, 1, d), k_pages[:, :, None], v_pages[:, :, None],
        cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale, causal=False,
        block_table=block_table.transpose(0, 1).reshape(num_heads * num_rows, max_pages).contiguous())
    return out.view(num_heads, total_q, d).transpose(0, 1).contiguous()


def _cumsum0(lengths: Tensor) -> Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


# --- hybrid: dense SDPA for large scales, one Triton launch for all small ones ------------------------------

@_backend("hybrid", lambda device: _triton_available(device))
def _hybrid(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens_k: Tensor,
            cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float) -> Tensor:
    """Rows with >= HYBRID_MIN_Q queries and one KV length on every head: sdpa_gather (cuDNN is fastest there,
    and its ~1 ms of host time per call is amortised). Such rows whose heads differ in length (HeatKV) would need
    a key mask, with which cuDNN measured ~2.5x slower than without (23 vs 9.3 ms at 16 x 4096 x 10521): cuDNN
    attends the keys at the end that every head has (the current scale at least), the Triton kernel the rest
    of each head, resuming cuDNN's softmax state (`_split_parts`). All other rows: one Triton launch, however
    many scales they span."""
    cu, lens = _host_plan(cu_seqlens_q, seqlens_k)
    large = np.diff(cu) >= HYBRID_MIN_Q
    equal = (lens == lens[:, :1]).all(1)
    if (large & equal).all() or not large.any():
        fn = _sdpa_gather if large.all() else paged_attention_triton
        return fn(q, k_pages, v_pages, block_table, seqlens_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, softmax_scale)
    # the large rows' outputs go straight to their tokens (one copy; a sub-call's assembled output was a second)
    out = torch.empty_like(q)
    _place(out, _sdpa_parts(q, k_pages, v_pages, block_table, cu, lens, np.flatnonzero(large & equal), softmax_scale))
    _place(out, _split_parts(q, k_pages, v_pages, block_table, cu, lens, np.flatnonzero(large & ~equal), softmax_scale))
    if not large.all():
        tokens, part = _triton_rows(q, k_pages, v_pages, block_table, cu, lens, np.flatnonzero(~large), softmax_scale)
        out[tokens] = part
    return out


def _triton_rows(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, cu: np.ndarray, lens: np.ndarray,
                 rows: np.ndarray, scale: float) -> tuple[slice | Tensor, Tensor]:
    """(token selector, output) of one Triton launch over `rows`."""
    qlen = np.diff(cu)[rows]
    tokens = _row_tokens(cu, rows, q.device)
    sub_cu = torch.from_numpy(np.concatenate([[0], np.cumsum(qlen)]).astype(np.int32))
    return tokens, paged_attention_triton(q[tokens], k_pages, v_pages, block_table[_selector(rows, q.device)],
                                          torch.from_numpy(lens[rows]), sub_cu, int(qlen.max()), int(lens[rows].max()),
                                          scale)


def _split_parts(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, cu: np.ndarray,
                 lens: np.ndarray, rows: np.ndarray, scale: float) -> list[tuple[slice | Tensor, Tensor]]:
    """(token selector, output) of each group of `rows` with the same q length and the same shortest head: the
    last `tail` keys of every head (tail = the shortest head's length) by dense attention, which also gives the
    log-sum-exp of their scores; then the Triton kernel over each head's first `lens - tail` keys, starting
    from that output and log-sum-exp, so the result is softmax attention over all keys."""
    parts = []
    for group in _groups(rows, np.stack([np.diff(cu)[rows], lens[rows].min(1)], axis=1)):
        num_rows, lq, tail = len(group), int(cu[group[0] + 1] - cu[group[0]]), int(lens[group].min())
        tokens, tables = _row_tokens(cu, group, q.device), block_table[_selector(group, q.device)]
        slots = _kv_slots(tables, tail, k_pages.shape[1], start=lens[group] - tail)
        k, v = (gather_rows(_flat(pages), slots).to(q.dtype) for pages in (k_pages, v_pages))
        q_group = q[tokens]
        state = _attention_lse(q_group.view(num_rows, lq, *q.shape[1:]).transpose(1, 2), k, v, scale)
        rest = lens[group] if state is None else lens[group] - tail
        cu_group = torch.arange(0, (num_rows + 1) * lq, lq, dtype=torch.int32)
        out = paged_attention_triton(q_group, k_pages, v_pages, tables, torch.from_numpy(rest), cu_group, lq,
                                     int(rest.max()), scale, resume=state)
        parts.append((tokens, out))
    return parts


def _attention_lse(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor] | None:
    """softmax(q k^T * scale) v `[B, H, Lq, d]` and the natural log-sum-exp of those scores `[B, H, Lq]` (fp32):
    cuDNN on CUDA (None, logged, where it fails: the caller then runs the Triton kernel alone), plain math in
    at least fp32 elsewhere."""
    if not q.is_cuda:
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = q.to(acc) @ k.to(acc).transpose(-1, -2) * scale
        return (torch.softmax(scores, -1) @ v.to(acc)).to(q.dtype), torch.logsumexp(scores, -1).float()
    try:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]
    except RuntimeError as exc:
        _log_once(f"hybrid: cuDNN attention with log-sum-exp failed ({exc}); rows whose heads differ in KV "
                  "length run on the Triton kernel alone")
        return None
    return out, lse.reshape(q.shape[:3]).float()


# --- triton: a paged flash-attention kernel of our own ------------------------------------------------------

@dataclass(frozen=True)
class TritonTiles:
    """Tile sizes of the Triton kernel, to tune on the target GPU. block_m shrinks to the longest q of a call
    (at least 16); block_n may span several pages or part of one (any page size works)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


TRITON_TILES = TritonTiles()


def _triton_available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


@_backend("triton", _triton_available)
def paged_attention_triton(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens_k: Tensor,
                           cu_seqlens_q: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                           tiles: TritonTiles | None = None, resume: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """paged_attention on Triton: one program per (query block, head, row), online softmax in fp32 over that
    (row, head)'s pages. `tiles` defaults to the module's TRITON_TILES; max_seqlen_k is not needed. `resume`
    (output `[B, H, Lq, d]`, natural log-sum-exp `[B, H, Lq]` fp32 of row b's queries over other keys, Lq >= its
    q length) starts each softmax from that state instead of from nothing: the result attends both key sets."""
    tiles = tiles or TRITON_TILES
    num_rows, num_heads, max_pages = block_table.shape
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256) or q.stride(-1) != 1 or k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1:
        raise ValueError(f"triton backend needs head_dim in (16, 32, 64, 128, 256) and unit last strides (d={d})")
    block_m = max(16, min(tiles.block_m, triton.next_power_of_2(max(max_seqlen_q, 1))))
    table, lens, cu = (upload(x, q.device, torch.int32).contiguous() for x in (block_table, seqlens_k, cu_seqlens_q))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    init, lse = resume or (out, out)
    if resume is not None and init.stride(-1) != 1:
        raise ValueError("triton backend: the resumed output needs a unit last stride")
    strides = (*init.stride()[:3], *lse.stride()) if resume is not None else (0,) * 6
    grid = (triton.cdiv(max_seqlen_q, block_m), num_heads, num_rows)
    _paged_attention_kernel[grid](
        q, k_pages, v_pages, out, table, lens, cu, init, lse, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pages.stride(0), k_pages.stride(1), v_pages.stride(0), v_pages.stride(1), *strides,
        max_pages, softmax_scale * LOG2E, PAGE=k_pages.shape[1], HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        RESUME=resume is not None, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


if triton is not None:

    @triton.jit
    def _paged_scores_kernel(K, Table, Rows, Query, Out, length, width, scale, HEADS: tl.constexpr,
                             PAGE: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        sequence = tl.program_id(0)  # g * HEADS + head
        row = tl.load(Rows + sequence // HEADS).to(tl.int64)
        positions = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = positions < length
        table = Table + (row * HEADS + sequence % HEADS) * width
        page = tl.load(table + positions // PAGE, mask=valid, other=0).to(tl.int64)
        offs = tl.arange(0, D)
        keys = tl.load(K + (page * PAGE + positions % PAGE)[:, None] * D + offs[None, :], mask=valid[:, None],
                       other=0.0)
        query = tl.load(Query + sequence.to(tl.int64) * D + offs)
        scores = tl.sum(keys.to(query.dtype) * query[None, :], axis=1) * scale
        tl.store(Out + sequence.to(tl.int64) * length + positions, scores, mask=valid)

    @triton.jit
    def _gather_rows_kernel(Src, Index, Out, n, D: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = (rows < n)[:, None]
        src = tl.load(Index + rows, mask=rows < n, other=0).to(tl.int64)
        offs = tl.arange(0, D)[None, :]
        tl.store(Out + rows[:, None] * D + offs, tl.load(Src + src[:, None] * D + offs, mask=valid), mask=valid)

    @triton.jit
    def _attend_tile(acc, l_i, m_i, q, K, V, table, start, kv_len, qk_scale, stride_kp, stride_kt, stride_vp,
                     stride_vt, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     MASKED: tl.constexpr):
        offs_n = start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        valid = offs_n < kv_len
        page = tl.load(table + offs_n // PAGE, mask=valid, other=0).to(tl.int64)
        offset = offs_n % PAGE
        k = tl.load(K + (page * stride_kp + offset * stride_kt)[:, None] + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
        if MASKED:  # only the last tile: full tiles skip the per-element select
            qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(V + (page * stride_vp + offset * stride_vt)[:, None] + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, l_i * alpha + tl.sum(p, 1), m_new

    @triton.jit
    def _paged_attention_kernel(Q, K, V, Out, Table, SeqlensK, CuQ, Init, Lse, stride_qt, stride_qh, stride_ot,
                                stride_oh, stride_kp, stride_kt, stride_vp, stride_vt, stride_ib, stride_ih, stride_im,
                                stride_lb, stride_lh, stride_lm, max_pages, qk_scale, PAGE: tl.constexpr,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                RESUME: tl.constexpr):
        m_block, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_start = tl.load(CuQ + b)
        q_len = tl.load(CuQ + b + 1) - q_start
        if m_block * BLOCK_M >= q_len:
            return
        kv_len = tl.load(SeqlensK + b * tl.num_programs(1) + h)
        table = Table + (b * tl.num_programs(1) + h).to(tl.int64) * max_pages
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        tokens = (q_start + offs_m).to(tl.int64)[:, None]
        q_mask = (offs_m < q_len)[:, None]
        q = tl.load(Q + tokens * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        if RESUME:  # the state after keys attended elsewhere: output o, log-sum-exp s -> acc = o, l = 1, m = s
            init = Init + b.to(tl.int64) * stride_ib + h * stride_ih
            acc = tl.load(init + offs_m[:, None].to(tl.int64) * stride_im + offs_d[None, :], mask=q_mask,
                          other=0.0).to(tl.float32)
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
            m_i = tl.load(Lse + b.to(tl.int64) * stride_lb + h * stride_lh + offs_m * stride_lm,
                          mask=offs_m < q_len, other=0.0) * 1.4426950408889634  # natural log to log2
        else:
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        full_end = kv_len // BLOCK_N * BLOCK_N
        for start in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, K, V, table, start, kv_len, qk_scale, stride_kp,
                                         stride_kt, stride_vp, stride_vt, PAGE, HEAD_DIM, BLOCK_N, False)
        if full_end < kv_len:
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, K, V, table, full_end, kv_len, qk_scale, stride_kp,
                                         stride_kt, stride_vp, stride_vt, PAGE, HEAD_DIM, BLOCK_N, True)
        out = acc / l_i[:, None]
        tl.store(Out + tokens * stride_ot + h * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=q_mask)
