"""CUDA graphs of small steps, for the model runner.

At small scales a step is bound by the host: ~35 kernel launches per layer cost more than the kernels. A step
whose rows all take the Triton attention kernel and whose layers cut nothing (`StepGraphs.eligible`) is
captured once per shape, that is the requests' (size, scale, rows, text-length bucket) in step order, and
replayed after. The block manager plans each step's pages on the host as always; its block tables, the inputs
and the text are copied into the graph's static buffers before every replay. Without capture (CPU) the same
static buffers run eagerly, which is how the CPU tests check them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from varserve.attention.paged import HYBRID_MIN_Q
from varserve.cache.block_manager import StepPages
from varserve.cache.kv_pool import KVPool, PagedKV
from varserve.models.infinity import Batch, Infinity, TextMemory, cu_seqlens, make_batch
from varserve.scheduler.request import Request

logger = logging.getLogger("varserve")

GRAPH_MAX_TOKENS = 4096  # steps of at most this many tokens (all rows) are captured
TEXT_BUCKET_MIN = 16  # a request's text capacity: its longest row's length rounded up to a power of 2, at least this
TRITON_ONLY = {"triton": None, "hybrid": HYBRID_MIN_Q}  # backends whose small rows take Triton: the row bound


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
        self.graphs: dict[tuple, _StepGraph] = {}
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self.steps = 0  # steps run from static buffers (replayed when capturing); the benchmark resets it
        if capture and backend not in TRITON_ONLY:
            logger.warning("cuda_graphs: attention backend %r never takes the Triton kernel, so no step is captured "
                           "(use hybrid or triton)", backend)

    def eligible(self, reqs: list[Request]) -> bool:
        """Whether a step can run from static buffers: small, no layer moves tokens, and (when the attention
        must be fed from the device) every row takes the Triton kernel."""
        if sum(r.scale_tokens for r in reqs) > GRAPH_MAX_TOKENS:
            return False
        if any(r.plan.cut(r.scale, layer) is not None for r in reqs for layer in range(r.plan.kept.shape[1])):
            return False
        if self.backend not in TRITON_ONLY:
            return not self.capture
        bound = TRITON_ONLY[self.backend]
        return bound is None or all(r.schedule.tokens[r.scale] < bound for r in reqs)

    def run(self, reqs: list[Request], x: list[Tensor], texts: list[TextMemory], pages: StepPages) -> Tensor:
        """Logits of the step (a buffer the next replay of its shape overwrites: read it before)."""
        key = tuple((r.schedule.name, r.scale, r.rows, _bucket(t)) for r, t in zip(reqs, texts))
        step = self.graphs.get(key)
        fresh = step is None
        if fresh:
            step = self.graphs[key] = self._build(reqs, texts, pages)
        else:
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
        on_device = self.backend in TRITON_ONLY
        return _StepGraph(x, batch, PagedKV(self.pool, reqs, pages, self.backend, on_device=on_device))

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
