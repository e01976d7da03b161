"""The only engine file that touches tensors: loads the model, owns the KV pages and every request's
device state, runs one step over the current scale of every running request, samples and decodes."""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from varserve.attention import CallShape, prepare_backend, select_backend
from varserve.cache.block_manager import BlockManager, StepPages
from varserve.cache.kv_pool import SOFTMAX_SCALE, KVPool, PagedKV
from varserve.cache.policy import KVPlan, KVPolicy
from varserve.config import EngineConfig
from varserve.graphs import GRAPH_MAX_ROWS, GRAPH_MAX_TOKENS, STATIC_ROUTES, StepGraphs
from varserve.models.generation import advance, row_features, sample_scale
from varserve.models.infinity import TextMemory, make_batch
from varserve.models.loader import load_model
from varserve.models.sampler import make_generator
from varserve.models.schedule import ScaleSchedule
from varserve.scheduler.request import Request

logger = logging.getLogger("varserve")

# Tokens per page when not given, by measurement on the H100 (README): with 64 prompts the full policy ran ~4%
# faster at 64 than at 32 (half the table entries for the host to plan, larger gathers); policies that cut keep
# 32, as finer pages free more at each cut and waste less on rounding.
DEFAULT_PAGE_SIZES = {"full": 64}
CUT_PAGE_SIZE = 32
CPU_KV_BYTES = 512 * 2**20  # pool size on CPU when num_pages is not given
ACTIVATION_MARGIN = 1.2  # head room over the profiled peak step
DECODE_PIXELS = 2 * 1024 * 1024  # pixels per VAE decode call: bounds the decoder's activations
TEXT_AHEAD = 64  # requests whose text features may be held before they start (fp32, ~8 KB per token)
STAGES = ("text_encoder", "transformer", "sampling", "vae_decode")  # the parts of a step, in order


@dataclass(eq=False)
class Readback:
    """Decoded images of one VAE call on their way to the host: a pinned copy, done when `event` is."""

    request_ids: list[str | None]  # None: discarded (aborted, failed)
    host: Tensor  # uint8 [B, H, W, 3]
    event: torch.cuda.Event | None  # None on CPU: copied already
    step: int  # the runner's step that launched it


@dataclass
class RequestState:
    """Device state of one running request."""

    text: TextMemory
    x: Tensor  # the next scale's input, [rows * h * w, C]
    summed: Tensor | None  # accumulated codes
    generator: torch.Generator


class ModelRunner:
    def __init__(self, config: EngineConfig, policy: KVPolicy):
        self.config, self.policy = config, policy
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, config.dtype) if config.dtype else _default_dtype(self.device)
        self.backend = select_backend(self.device, config.attention_backend)
        self.graphs_refusal = graphs_refusal(self.device, self.dtype, self.backend)
        if config.cuda_graphs and self.graphs_refusal:
            raise ValueError(f"cuda_graphs needs {self.graphs_refusal}")
        if self.device.type == "cuda":
            _growable_segments()
        loaded = load_model(config.model, device=self.device, dtype=self.dtype,
                            random_weights=config.random_weights, weights=config.weights, seed=config.seed)
        self.model_config, self.model, self.vae, self.text_encoder = (
            loaded.config, loaded.transformer, loaded.vae, loaded.text_encoder)
        self.page_size = config.page_size or DEFAULT_PAGE_SIZES.get(policy.name, CUT_PAGE_SIZE)
        self.page_bytes = KVPool.page_bytes(self.page_size, self.model_config.head_dim, self.dtype)
        self.max_num_batched_tokens = config.max_num_batched_tokens or _default_token_budget(self.device)
        self.num_pages = config.num_pages or self._size_pool()
        self.pool = KVPool(self.num_pages, self.page_size, self.model_config.head_dim, self.dtype, self.device)
        self.states: dict[str, RequestState] = {}
        self.texts: dict[str, tuple[Tensor, list[int]]] = {}  # text features of requests not started yet
        self._unprepared: list[tuple[str, list[CallShape]]] = []  # (image size, calls) for prepare_pending
        self.readbacks: list[Readback] = []
        self.steps = 0  # steps executed
        self.timer: StageTimer | None = None  # set by the benchmark to split device time by stage
        self.graphs = self._step_graphs()

    def _step_graphs(self) -> StepGraphs | None:
        """Captured small steps when asked for, or by default wherever they can run (`graphs_refusal`)."""
        wanted = self.config.cuda_graphs
        if wanted is None:
            wanted = self.graphs_refusal is None
        logger.info("CUDA graphs: %s", f"on (steps of at most {GRAPH_MAX_ROWS} rows and {GRAPH_MAX_TOKENS} tokens)"
                    if wanted else "off")
        return StepGraphs(self.model, self.pool, self.backend, capture=True) if wanted else None

    # ---- memory sizing --------------------------------------------------------------------------------
    def _size_pool(self) -> int:
        if self.device.type != "cuda":
            return max(2, CPU_KV_BYTES // self.page_bytes)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_allocated(self.device)
        budget = total * self.config.gpu_memory_utilization - used_by_others - torch.cuda.memory_allocated(self.device)
        budget -= ACTIVATION_MARGIN * max(self._profile_step(), self._profile_decode())
        pages = int(budget // self.page_bytes)
        if pages < 2:
            raise RuntimeError(
                f"no memory left for KV pages: {total / 2**30:.1f} GiB x {self.config.gpu_memory_utilization} "
                f"minus weights and a {self.max_num_batched_tokens}-token step leaves {budget / 2**30:.2f} GiB")
        return pages

    @torch.no_grad()
    def _profile_step(self) -> int:
        """Peak extra memory of one step of max_num_batched_tokens tokens, in bytes: rows at the 64x64
        scale attending over history as long as the 1024x1024 schedule's (K/V gathered densely)."""
        rows = max(1, self.max_num_batched_tokens // 4096)
        side = int((self.max_num_batched_tokens // rows) ** 0.5)
        text = self.model.encode_text(torch.randn(rows * 8, self.model_config.text_dim, device=self.device), [8] * rows)
        kv = _ProfileKV(rows, history_factor=10521 / 4096)
        batch = make_batch(self.model, text, [(0, (side, side), (side, side))] * rows)
        x = torch.randn(rows * side * side, self.model_config.width, device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.model(x, batch, kv)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        logger.info("profiled step of %d tokens: %.2f GiB of activations", rows * side * side, peak / 2**30)
        return peak

    @torch.no_grad()
    def _profile_decode(self) -> int:
        """Peak extra memory of one VAE decode call of the largest image (1024x1024), in bytes."""
        latent = self.vae.config.latent_hw((64, 64))
        summed = torch.randn(_decode_chunk(1024 * 1024), self.vae.config.codebook_dim, *latent, device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.autocast("cuda", torch.bfloat16):
            self.vae.decode(summed)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        logger.info("profiled VAE decode of %d 1024x1024 images: %.2f GiB", summed.shape[0], peak / 2**30)
        return peak

    # ---- requests -------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str, negative_prompt: str | None) -> None:
        """ValueError, its message starting with the field ('prompt ...', 'negative_prompt ...'), if the text
        encoder cannot take a text (too long; words a closed vocabulary lacks)."""
        for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is None:
                continue
            try:
                self.text_encoder.check_lengths(self.text_encoder.tokenizer.token_ids([text]))
            except ValueError as exc:  # the encoder names it 'prompt 0'
                raise ValueError(f"{field}{str(exc).removeprefix('prompt 0')}") from None

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        self.texts.pop(request_id, None)

    def prepare_attention(self, plan: KVPlan, schedule: ScaleSchedule, rows: int) -> None:
        """Have the attention backend build what the steps of requests of this size and plan need (cudnn: its
        graphs) before the next step (`prepare_pending`), not inside the layers that meet them; queued, so that
        adding a request never waits for it. A step whose largest scale is s has tables as wide as the widest of
        scales <= s (all its rows are at those scales)."""
        widths = np.maximum.accumulate(plan.table_widths(self.page_size))
        most_rows = self.config.max_num_seqs * rows
        self._unprepared.append((schedule.name, [CallShape(most_rows, self.max_num_batched_tokens, n, int(w))
                                                 for n, w in zip(schedule.tokens, widths)]))

    def prepare_pending(self) -> None:
        """Build what `prepare_attention` queued (the engine calls it once at start; steps call it first)."""
        while self._unprepared:
            name, shapes = self._unprepared.pop(0)
            start = time.perf_counter()
            built = prepare_backend(self.backend, self.pool.k_pages, self.model_config.num_heads, SOFTMAX_SCALE,
                                    shapes)
            if built:
                logger.info("attention backend %s: prepared %d kernel graphs for %s steps in %.2f s", self.backend,
                            built, name, time.perf_counter() - start)

    def _encode(self, reqs: list[Request], upcoming: Sequence[Request]) -> None:
        """Text encoder features of the requests that start now and, up to TEXT_AHEAD held, of those expected to
        start next: one encoder call for a burst of arrivals instead of one per step of its staggered admission
        (each call runs one encoder pass per prompt length, ~3 ms of host time each, while those steps are
        bound by the host)."""
        todo = [r for r in reqs if r.request_id not in self.texts]
        room, known = max(0, TEXT_AHEAD - len(self.texts) - len(todo)), {r.request_id for r in reqs}
        todo += itertools.islice((r for r in upcoming if r.request_id not in self.texts and r.request_id not in known),
                                 room)
        if not todo:
            return
        negatives = [r for r in todo if r.negative_prompt is not None]
        prompts = self.text_encoder.encode([r.prompt for r in todo])
        neg = self.text_encoder.encode([r.negative_prompt for r in negatives]) if negatives else None
        for i, req in enumerate(todo):
            self.texts[req.request_id] = row_features(self.model, prompts, i, req.rows, neg,
                                                      negatives.index(req) if req in negatives else None)

    def _start(self, reqs: list[Request]) -> None:
        """The new requests' text memory and start tokens, all rows through the text layers at once (per request,
        ~100 small launches each kept the host busy in steps that admit requests)."""
        rows = [self.texts.pop(req.request_id) for req in reqs]
        memory = self.model.encode_text(torch.cat([f for f, _ in rows]), [n for _, lens in rows for n in lens])
        start_tokens, first = self.model.start_tokens(memory.cond), 0
        for req, (_, lens) in zip(reqs, rows):
            stop = first + len(lens)
            self.states[req.request_id] = RequestState(memory.rows(first, stop), start_tokens[first:stop], None,
                                                       make_generator(req.seed, self.device))
            first = stop

    # ---- one step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, reqs: list[Request], pages: StepPages, launched: Callable[[], None] = lambda: None,
                upcoming: Sequence[Request] = ()) -> None:
        """Run the next scale of every request on its planned pages (`plan`); `upcoming`: requests expected to
        start in the next steps, whose prompts may be encoded now (`_encode`). `launched` is called once the
        transformer's kernels are queued, before sampling: the engine plans the next step then, while the device
        is busy. Finished images are decoded and copied to the host without waiting for the device: `collect`
        hands them over."""
        self.prepare_pending()
        self.steps += 1
        order = self._order(reqs)
        self._lap(begin={r.scale for r in reqs})
        new = [r for r in order if r.request_id not in self.states]
        self._encode(new, upcoming)
        self._lap()
        if new:
            self._start(new)
        states, scales = [self.states[r.request_id] for r in order], [r.scale for r in order]
        logits = self._forward(order, states, pages)
        launched()
        self._lap()
        finished = self._sample(order, scales, states, logits)
        self._lap()
        self._decode(finished)
        self._lap()

    @staticmethod
    def _order(reqs: list[Request]) -> list[Request]:
        """The step's row order: large rows first and contiguous (attention slices them), requests of one shape
        together (sampling runs)."""
        return sorted(reqs, key=lambda r: (-r.scale_tokens, r.schedule.name, r.scale))

    def _sample(self, reqs: list[Request], scales: list[int], states: list[RequestState], logits: Tensor
                ) -> list[Request]:
        """Sample every request's scale (`scales`: the engine may have moved `Request.scale` on by now) and prepare
        its next input, a run of requests at the same scale of the same size and params at a time (a few kernels
        per run, not per request: ~30 launches each otherwise, which kept the host busy while the device idled);
        return the requests whose last scale this was."""
        start, finished = 0, []
        runs = itertools.groupby(zip(reqs, scales, states), key=lambda rs: (rs[0].schedule, rs[1], rs[0].rows,
                                                                            rs[0].sampling))
        for (schedule, scale, rows, sampling), run in runs:
            group, _, group_states = zip(*run)
            n = rows * schedule.tokens[scale] * len(group)
            bits = sample_scale(logits[start : start + n], rows, sampling, [s.generator for s in group_states])
            summed = None if group_states[0].summed is None else torch.cat([s.summed for s in group_states])
            summed, x = advance(self.model, self.vae, summed, bits, schedule, scale, rows)
            for i, (req, state) in enumerate(zip(group, group_states)):
                state.summed, state.x = summed[i : i + 1], None if x is None else x[i]
                if x is None:
                    finished.append(req)
            start += n
        return finished

    def collect(self, latest: bool) -> dict[str, np.ndarray]:
        """uint8 RGB images of the decodes launched before the last `execute` (waiting for them: by then the
        device has that step queued, so it does not idle while the host waits) and, with `latest`, of the last
        step's too (when nothing follows it)."""
        ready, self.readbacks = _split(self.readbacks, lambda r: latest or r.step < self.steps)
        images: dict[str, np.ndarray] = {}
        for readback in ready:
            if readback.event is not None:
                readback.event.synchronize()
            pixels = readback.host.numpy().copy()  # out of pinned memory, which the host allocator reuses
            images.update((rid, pixels[i]) for i, rid in enumerate(readback.request_ids) if rid is not None)
        return images

    def discard(self, request_id: str) -> None:
        """Forget a request's image in flight, if any (its pinned copy goes once no request of it is left)."""
        for readback in self.readbacks:
            readback.request_ids = [None if rid == request_id else rid for rid in readback.request_ids]
        self.readbacks = [r for r in self.readbacks if any(rid is not None for rid in r.request_ids)]

    def plan(self, reqs: list[Request], blocks: BlockManager) -> StepPages:
        """The step's page tables, rows in `execute`'s order. On CUDA they are planned straight into pinned memory
        and uploaded from there (tens of MB a step: a staging copy and fresh pageable memory each step kept the
        host planning while the device idled)."""
        order = self._order(reqs)
        if self.device.type != "cuda":
            return blocks.plan_step(order)
        pinned: list[Tensor] = []

        def empty(shape: tuple[int, ...]) -> np.ndarray:
            pinned.append(torch.empty(shape, dtype=torch.int32, pin_memory=True))
            return pinned[-1].numpy()

        pages = blocks.plan_step(order, empty)
        return replace(pages, block_tables=pinned[0])

    def _forward(self, reqs: list[Request], states: list[RequestState], pages: StepPages) -> Tensor:
        """The transformer over the step's tokens: replayed from a CUDA graph when the step is small enough."""
        if self.graphs is not None and self.graphs.eligible(reqs):
            logits = self.graphs.run(reqs, [s.x for s in states], [s.text for s in states], pages)
            if logits is not None:
                return logits
        rows = [(r.scale, r.schedule.scales[r.scale], r.schedule.rope_grid) for r in reqs for _ in range(r.rows)]
        batch = make_batch(self.model, TextMemory.concat([s.text for s in states]), rows)
        return self.model(torch.cat([s.x for s in states]), batch, PagedKV(self.pool, reqs, pages, self.backend))

    def _lap(self, begin: set[int] | None = None) -> None:
        """With a timer: a step that runs `begin` scales starts, or the current stage of the step ends."""
        if self.timer is not None:
            self.timer.lap(begin)

    def _decode(self, reqs: list[Request]) -> None:
        """VAE-decode finished images, batched by size, into readbacks."""
        by_size: dict[str, list[Request]] = {}
        for req in reqs:
            by_size.setdefault(req.schedule.name, []).append(req)
        for group in by_size.values():
            width, height = group[0].schedule.image_size
            chunk = _decode_chunk(width * height)
            for i in range(0, len(group), chunk):
                self.readbacks.append(self._decode_chunk(group[i : i + chunk]))

    def _decode_chunk(self, reqs: list[Request]) -> Readback:
        summed = torch.cat([self.states[r.request_id].summed for r in reqs])
        with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            pixels = self.vae.decode(summed)
        ids = [r.request_id for r in reqs]
        if self.device.type != "cuda":
            return Readback(ids, pixels.cpu(), None, self.steps)
        host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Readback(ids, host, event, self.steps)


class StageTimer:
    """Device time of each stage (STAGES) of every step it sees: CUDA events on CUDA, recorded in the stream
    and read only by `report`, so timing adds no host synchronisation to a step; the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[tuple[frozenset[int], list]] = []  # (scales of the step, stage boundaries)

    def lap(self, begin: set[int] | None = None) -> None:
        if begin is not None:
            self.steps.append((frozenset(begin), []))
        self.steps[-1][1].append(self._now())

    def _now(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def report(self) -> dict:
        """Seconds per stage, summed over steps; the transformer's seconds per scale from the steps that ran
        a single scale (a step mixing scales cannot be split: its time goes to `transformer_time_s_mixed_steps`)."""
        if self.cuda:
            torch.cuda.synchronize()
        stages, by_scale, mixed = dict.fromkeys(STAGES, 0.0), {}, 0.0
        for scales, marks in self.steps:
            spans = [a.elapsed_time(b) / 1e3 if self.cuda else b - a for a, b in zip(marks, marks[1:])]
            for stage, seconds in zip(STAGES, spans):
                stages[stage] += seconds
            transformer = spans[1] if len(spans) > 1 else 0.0
            if len(scales) == 1:
                (scale,) = scales
                by_scale[scale] = by_scale.get(scale, 0.0) + transformer
            else:
                mixed += transformer
        return {"stage_time_s": stages, "transformer_time_s_by_scale": {str(k): by_scale[k] for k in sorted(by_scale)},
                "transformer_time_s_mixed_steps": mixed}


class _ProfileKV:
    """Attention over the step's own K/V repeated to history length, then discarded."""

    def __init__(self, rows: int, history_factor: float):
        self.rows, self.factor = rows, history_factor

    def wants_raw_query(self, layer: int) -> bool:
        return False

    def page_slots(self, layer: int) -> None:
        return None  # contiguous K/V: the model passes them to attend

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, raw_q: Tensor | None) -> Tensor:
        q, k, v = (x.view(self.rows, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        reps = max(1, round(self.factor))
        k, v = k.repeat(1, 1, reps, 1), v.repeat(1, 1, reps, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
        return out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1])


def graphs_refusal(device: torch.device, dtype: torch.dtype, backend: str) -> str | None:
    """What captured steps would need that this runner lacks, or None where they can run."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return f"a CUDA device and bfloat16 or float16 (FlashAttention's varlen cross-attention), not {device} {dtype}"
    if backend not in STATIC_ROUTES:
        return f"an attention backend a graph can hold ({', '.join(STATIC_ROUTES)}), not {backend!r}"
    return None


def _growable_segments() -> None:
    """Let PyTorch's caching allocator grow its segments (unless the user configured it): with fixed segments, steps of
    changing sizes split the free blocks until a large activation fits in none (256 ScaleKV prompts at 262,144-token
    steps failed to place 3.85 GiB with 8.7 GiB reserved but unallocated)."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        with warnings.catch_warnings():  # torch 2.11 calls this name deprecated; its successor is private too
            warnings.simplefilter("ignore", FutureWarning)
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def _decode_chunk(pixels_per_image: int) -> int:
    return max(1, DECODE_PIXELS // pixels_per_image)


def _split(items: list, keep: Callable[[object], bool]) -> tuple[list, list]:
    """(the items `keep` accepts, the others), each in order."""
    return [x for x in items if keep(x)], [x for x in items if not keep(x)]


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _default_token_budget(device: torch.device) -> int:
    return 131072 if device.type == "cuda" else 32768
