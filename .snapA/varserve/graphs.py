"""CUDA graphs of small steps, for the model runner.

With few requests a step is bound by the host: ~35 kernel launches per layer cost more than the kernels (at
batch 1, ~100 ms per step whatever the scale). A step of a few rows whose rows take, on every layer, one
attention path that needs nothing from the host (`StepGraphs.route`: the Triton kernel, fed from device copies
of its metadata, or, for rows of one shape, gathered cuDNN planned from host copies) is captured
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

# backends with a path that a graph can hold; cudnn's captured steps take hybrid's routes (its calls upload metadata)
STATIC_ROUTES = ("hybrid", "cudnn", "triton", "sdpa_gather")

GRAPH_MAX_TOKENS = 8192  # steps of at most this many tokens (all rows: one 1024x1024 CFG image's last scale)
GRAPH_MAX_ROWS = 8  # and at most this many rows: larger steps keep the device busy on their own
MAX_GRAPHS = 64  # shapes kept; the least recently used one goes first
TEXT_BUCKET_MIN = 16  # a request's text capacity: its longest row's length rounded up to a power of 2, at least this
TEXT_ROOM = GRAPH_MAX_ROWS * 64  # text tokens the shared text buffer holds at first (2B: 128 MiB)


@dataclass
class _StepGraph:
    x: Tensor  # [T, C] the step's input tokens (a view of the shared input buffer)
    batch: Batch  # static metadata; its text (views of the shared text buffers) holds the rows' text
    kv: PagedKV
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None  # the captured output, rewritten by every replay (of any shape: they share a pool)


class StepGraphs:
    """The captured steps of one model runner, by shape. `capture=False` runs the same static buffers eagerly
    (the CPU tests); with a Triton backend the attention is then fed from device copies, as when captured.

    Graphs replay one at a time on one stream, so their inputs are views of one set of buffers (input tokens,
    AdaLN rows, text K/V: the text buffer grows, dropping the graphs, when a shape needs more) and their
    activations share one memory pool. The first step of a shape runs eagerly (the warm-up: Triton compiles,
    cuBLAS and cuDNN pick their kernels) and gives the step's logits; the capture that follows runs nothing.
    A shape whose capture fails runs eagerly from then on, with a warning; later shapes capture into a new pool.
    Their memory (the input buffers, the text buffer from 128 MiB on Infinity-2B, and the pool of the largest
    captured step) comes out of the margin the KV pool's sizing leaves over the profiled largest step
    (model_runner.ACTIVATION_MARGIN)."""

    def __init__(self, model: Infinity, pool: KVPool, backend: str, capture: bool):
        self.model, self.pool, self.backend, self.capture = model, pool, backend, capture
        self.graphs: OrderedDict[tuple, _StepGraph] = OrderedDict()
        self.refused: set[tuple] = set()  # shapes whose capture failed
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self.steps = 0  # steps run from static buffers (replayed when capturing); the benchmark resets it
        self._inputs: Tensor | None = None
        self._text: TextMemory | None = None

    def eligible(self, reqs: list[Request]) -> bool:
        """Whether a step can run from static buffers: few rows and tokens, and (when captured) an attention path
        on every layer that needs nothing from the host."""
        if sum(r.scale_tokens for r in reqs) > GRAPH_MAX_TOKENS or sum(r.rows for r in reqs) > GRAPH_MAX_ROWS:
            return False
        return not self.capture or self.route(reqs) is not None

    def route(self, reqs: list[Request]) -> tuple[str, ...] | None:
        """Per layer, the attention backend of a captured step ('triton' or 'sdpa_gather'), None if a layer has
        none: the configured backend's choice for these rows there, when it needs no host read or upload inside
        the step (hybrid's, which cudnn's steps take too: gathered cuDNN for rows of >= HYBRID_MIN_Q queries and
        one KV length on every head, the Triton kernel for the others; gathered cuDNN needs rows of one shape, one
        group of rows)."""
        depth = reqs[0].plan.kept.shape[1]
        if self.backend == "triton":
            return ("triton",) * depth
        one_shape = len({(r.schedule.name, r.scale) for r in reqs}) == 1
        routes = []
        for layer in range(depth):
            equal = [_heads_equal(r, layer) for r in reqs]
            if self.backend in ("hybrid", "cudnn"):
                large = [e and r.schedule.tokens[r.scale] >= HYBRID_MIN_Q for r, e in zip(reqs, equal)]
                route = "triton" if not any(large) else "sdpa_gather" if all(large) and one_shape else None
            else:
                route = "sdpa_gather" if self.backend == "sdpa_gather" and one_shape and all(equal) else None
            if route is None:
                return None
            routes.append(route)
        return tuple(routes)

    def run(self, reqs: list[Request], x: list[Tensor], texts: list[TextMemory], pages: StepPages) -> Tensor | None:
        """Logits of the step, to read before the next step (a graph's output buffer); None if its shape runs
        eagerly (its capture failed), the caller then runs it."""
        key = tuple((r.schedule.name, r.scale, r.rows, _bucket(t)) for r, t in zip(reqs, texts))
        if key in self.refused:
            return None
        step = self.graphs.get(key)
        if step is not None:
            self.graphs.move_to_end(key)
            step.kv.load(reqs, pages)
            _load_inputs(step, x, texts)
            self.steps += 1
            if step.graph is None:
                return self.model(step.x, step.batch, step.kv)
            step.graph.replay()
            return step.logits
        step = self._build(reqs, texts, pages)
        _load_inputs(step, x, texts)
        logits = self._warm_up(step)
        if self.capture and not self._capture(key, step):
            return logits
        self.graphs[key] = step
        if len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        self.steps += 1
        return logits

    def _build(self, reqs: list[Request], texts: list[TextMemory], pages: StepPages) -> _StepGraph:
        model = self.model
        capacity = [_bucket(t) for r, t in zip(reqs, texts) for _ in range(r.rows)]
        shared = self._text_buffers(sum(capacity), texts[0].ca_kv.dtype)
        text = TextMemory(shared.cond, shared.gss[: len(capacity)], shared.head_ss[: len(capacity)],
                          shared.ca_kv[:, :, : sum(capacity)], capacity)
        row_scales = [(r.scale, r.schedule.scales[r.scale], r.schedule.rope_grid) for r in reqs for _ in range(r.rows)]
        batch = make_batch(model, text, row_scales)  # cu_text: the capacities until a load sets the real lengths
        x = self._input_buffer()[: sum(r.scale_tokens for r in reqs)]
        static_route = self.route(reqs) if self.backend in STATIC_ROUTES else None
        return _StepGraph(x, batch, PagedKV(self.pool, reqs, pages, self.backend, static_route=static_route))

    def _input_buffer(self) -> Tensor:
        if self._inputs is None:
            self._inputs = torch.empty(GRAPH_MAX_TOKENS, self.model.cfg.width, dtype=self.model.residual_dtype,
                                       device=self.pool.k_pages.device)
        return self._inputs

    def _text_buffers(self, tokens: int, dtype: torch.dtype) -> TextMemory:
        """The shared text buffers, with room for `tokens` text tokens; growing them drops every graph."""
        if self._text is None or self._text.ca_kv.shape[2] < tokens:
            cfg, device, acc = self.model.cfg, self.pool.k_pages.device, self.model.residual_dtype
            room = max(tokens, 2 * self._text.ca_kv.shape[2] if self._text is not None else TEXT_ROOM)
            self.graphs.clear()
            self._text = TextMemory(
                cond=torch.empty(0, device=device),
                gss=torch.empty(GRAPH_MAX_ROWS, 6, cfg.width, dtype=acc, device=device),
                head_ss=torch.empty(GRAPH_MAX_ROWS, 2, cfg.width, dtype=acc, device=device),
                ca_kv=torch.zeros(cfg.depth, 2, room, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device),
                text_lens=[room])
        return self._text

    def _warm_up(self, step: _StepGraph) -> Tensor:
        """The step itself, eagerly; on CUDA on a side stream, as a capture needs its first run to be."""
        if not self.capture:
            return self.model(step.x, step.batch, step.kv)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.model(step.x, step.batch, step.kv)
        torch.cuda.current_stream().wait_stream(side)
        logits.record_stream(torch.cuda.current_stream())
        return logits

    def _capture(self, key: tuple, step: _StepGraph) -> bool:
        """Record the step's kernels (nothing runs); False, with a warning, if the capture fails."""
        graph, device = torch.cuda.CUDAGraph(), step.x.device
        rng, stream = torch.cuda.default_generators[device.index], torch.cuda.current_stream()
        rng_state = rng.clone_state()
        try:
            with torch.cuda.graph(graph, pool=self.mempool):
                step.logits = self.model(step.x, step.batch, step.kv)
        except Exception as exc:  # the step already ran (the warm-up): only later steps of this shape run eagerly
            self.refused.add(key)
            self.mempool = _undo_failed_capture(rng, rng_state, stream)
            first = exc.__context__ or exc  # the error inside the capture, when ending the capture raised after it
            logger.warning("cuda_graphs: capturing a %d-token step failed (%s: %s); steps of its shape run eagerly",
                           step.x.shape[0], type(first).__name__, str(first).splitlines()[0] if str(first) else "")
            return False
        step.graph = graph
        logger.info("captured a CUDA graph of a %d-token step (%d graphs)", step.x.shape[0], len(self.graphs) + 1)
        return True


def _undo_failed_capture(rng: torch.Generator, rng_state: torch.Generator, stream: torch.cuda.Stream) -> tuple:
    """A capture that fails inside `torch.cuda.graph` ends the stream capture and nothing else (capture_end raises
    first), which measured on torch 2.11: the default CUDA generator stays in capture mode, so every later random
    op on the device raises ("Offset increment outside graph capture"); the graph pool stays marked as recording,
    so every later capture into it raises; the capture stream stays the current stream. Give the generator its
    state from before, the caller its stream back, and later captures a new pool (returned)."""
    rng.graphsafe_set_state(rng_state)
    torch.cuda.set_stream(stream)
    return torch.cuda.graph_pool_handle()


def _heads_equal(req: Request, layer: int) -> bool:
    """Whether every head of the request's layer attends to as many keys as the others at its current scale."""
    attend = req.plan.attend_len[req.scale, layer]
    return bool((attend == attend[0]).all())


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
