"""CUDA graphs of small steps, for the model runner.

With few requests a step is bound by the host: ~35 kernel launches per layer cost more than the kernels (at
batch 1, ~100 ms per step whatever the scale). A step of a few rows whose layers move no tokens and whose rows
all take one attention path that needs nothing from the host (`StepGraphs.route`: the Triton kernel, fed from
device copies of its metadata, or, for rows of one shape, gathered cuDNN planned from host copies) is captured
once per shape, that is the requests' (size, scale, rows, text-length bucket) in step order, and replayed
after. The block manager plans each step's pages on the host as always; its block tables, the inputs and the
text are copied into the graph's static buffers before every replay. Without capture (CPU) the same static
buffers run eagerly, which is how the CPU tests check them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from varserve.attention.paged import HYBRID_MIN_Q
from varserve.cache.block_manager import StepPages
from varserve.cache.kv_pool import KVPool, PagedKV
from varserve.models.infinity import Batch, Infinity, TextMemory, cu_seqlens, make_batch
from varserve.scheduler.request import Request

logger = logging.getLogger("varserve")

STATIC_ROUTES = ("hybrid", "triton", "sdpa_gather")  # backends with a path that a graph can hold

GRAPH_MAX_TOKENS = 8192  # steps of at most this many tokens (all rows: one 1024x1024 CFG image's last scale)
GRAPH_MAX_ROWS = 8  # and at most this many rows: larger steps keep the device busy on their own
MAX_GRAPHS = 64  # shapes kept; the least recently used one goes first
TEXT_BUCKET_MIN = 16  # a request's text capacity: its longest row's length rounded up to a power of 2, at least this


@dataclass
class _StepGraph:
    x: Tensor  # [T, C] the step's input tokens
    batch: Batch  # static metadata; its text holds the rows' text, cu_text their lengths
    kv: PagedKV
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None  # the captured output, rewritten by every replay


class StepGraphs:
    """The captured steps of one model runner, by shape. `capture=False` runs the same static buffers eagerly
    (the CPU tests); with a Triton backend the attention is then fed from device copies, as when captured."""

    def __init__(self, model: Infinity, pool: KVPool, backend: str, capture: bool):
        self.model, self.pool, self.backend, self.capture = model, pool, backend, capture
        self.graphs: OrderedDict[tuple, _StepGraph] = OrderedDict()
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self.steps = 0  # steps run from static buffers (replayed when capturing); the benchmark resets it
        if capture and backend not in STATIC_ROUTES:
            logger.warning("cuda_graphs: attention backend %r cannot run in a graph, so no step is captured (use "
                           "%s)", backend, " or ".join(STATIC_ROUTES))

    def eligible(self, reqs: list[Request]) -> bool:
        """Whether a step can run from static buffers: few rows and tokens, no layer moves tokens, and (when
        captured) one attention path that needs nothing from the host."""
        if sum(r.scale_tokens for r in reqs) > GRAPH_MAX_TOKENS or sum(r.rows for r in reqs) > GRAPH_MAX_ROWS:
            return False
        if any(r.plan.cut(r.scale, layer) is not None for r in reqs for layer in range(r.plan.kept.shape[1])):
            return False
        return not self.capture or self.route(reqs) is not None

    def route(self, reqs: list[Request]) -> str | None:
        """The attention backend of a captured step ('triton' or 'sdpa_gather'), None if it has none: the
        configured backend's choice for these rows, when that needs no host read or upload inside the step."""
        small = [r.schedule.tokens[r.scale] < HYBRID_MIN_Q for r in reqs]
        if self.backend == "triton" or (self.backend == "hybrid" and all(small)):
            return "triton"
        gathered = self.backend == "sdpa_gather" or (self.backend == "hybrid" and not any(small))
        one_shape = len({(r.schedule.name, r.scale) for r in reqs}) == 1 and _heads_equal(reqs[0])
        return "sdpa_gather" if gathered and one_shape else None  # one group of rows: slices, nothing uploaded

    def run(self, reqs: list[Request], x: list[Tensor], texts: list[TextMemory], pages: StepPages) -> Tensor:
        """Logits of the step (a buffer the next replay of its shape overwrites: read it before)."""
        key = tuple((r.schedule.name, r.scale, r.rows, _bucket(t)) for r, t in zip(reqs, texts))
        step = self.graphs.get(key)
        fresh = step is None
        if fresh:
            step = self.graphs[key] = self._build(reqs, texts, pages)
            if len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            step.kv.load(pages)
        _load_inputs(step, x, texts)
        self.steps += 1
        if not self.capture:
            return self.model(step.x, step.batch, step.kv)
        if fresh:
            self._capture(step)
            logger.info("captured a CUDA graph of a %d-token step (%d graphs)", step.x.shape[0], len(self.graphs))
        step.graph.replay()
        return step.logits

    def _build(self, reqs: list[Request], texts: list[TextMemory], pages: StepPages) -> _StepGraph:
        model, device = self.model, self.pool.k_pages.device
        capacity = [_bucket(t) for r, t in zip(reqs, texts) for _ in range(r.rows)]
        rows, L, H, d = len(capacity), model.cfg.depth, model.cfg.num_heads, model.cfg.head_dim
        dtype, width = model.residual_dtype, model.cfg.width
        text = TextMemory(
            cond=torch.empty(0, device=device), gss=torch.empty(rows, 6, width, dtype=dtype, device=device),
            head_ss=torch.empty(rows, 2, width, dtype=dtype, device=device),
            ca_kv=torch.zeros(L, 2, sum(capacity), H, d, dtype=texts[0].ca_kv.dtype, device=device),
            text_lens=capacity)
        row_scales = [(r.scale, r.schedule.scales[r.scale], r.schedule.rope_grid) for r in reqs for _ in range(r.rows)]
        batch = make_batch(model, text, row_scales)  # cu_text: the capacities until a load sets the real lengths
        x = torch.empty(sum(r.scale_tokens for r in reqs), width, dtype=dtype, device=device)
        static_route = self.route(reqs) if self.backend in STATIC_ROUTES else None
        return _StepGraph(x, batch, PagedKV(self.pool, reqs, pages, self.backend, static_route=static_route))

    def _capture(self, step: _StepGraph) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture. The warm-up
        writes the step's K/V, which the replay writes again identically."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model(step.x, step.batch, step.kv)
        torch.cuda.current_stream().wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self.mempool):
            step.logits = self.model(step.x, step.batch, step.kv)


def _heads_equal(req: Request) -> bool:
    """Whether every head of the request holds as many keys as the others at its current scale (no mask)."""
    attend = req.plan.attend_len[req.scale]
    return bool((attend == attend[..., :1]).all())


def _bucket(text: TextMemory) -> int:
    longest = max(TEXT_BUCKET_MIN, max(text.text_lens))
    return 1 << (longest - 1).bit_length()


def _load_inputs(step: _StepGraph, x: list[Tensor], texts: list[TextMemory]) -> None:
    """Copy the step's inputs and its rows' text into the static buffers (the text packed at its real lengths)."""
    torch.cat(x, out=step.x)
    text, static = TextMemory.concat(texts), step.batch.text
    static.gss.copy_(text.gss)
    static.head_ss.copy_(text.head_ss)
    static.ca_kv[:, :, : text.ca_kv.shape[2]].copy_(text.ca_kv)
    step.batch.cu_text.copy_(cu_seqlens(text.text_lens, step.x.device))
