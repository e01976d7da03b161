"""Dense reference generation: one request at a time, contiguous K/V per row, torch SDPA.

This is the oracle the paged engine is tested against; keep it plain. `PolicyDenseKV` is the oracle of the
compressed KV policies: per (row, layer, head) tensors, cut by rules written here without pages.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from varserve.cache.heatkv import alive_segments, prune_counts, source_ranks
from varserve.cache.plan import KVPolicy
from varserve.cache.window import SINK_SCALES
from varserve.models.config import ModelConfig
from varserve.models.generation import ScaleSampling, advance, num_rows, sample_scale, text_rows
from varserve.models.infinity import Infinity, make_batch
from varserve.models.sampler import make_generator
from varserve.models.schedule import ScaleSchedule
from varserve.models.text_encoder import TextEncoder
from varserve.models.vae import BSQVAE


class DenseKV:
    """Every row keeps all its K/V, concatenated scale after scale, per layer."""

    def __init__(self, rows: int, depth: int):
        self.k: list[list[Tensor | None]] = [[None] * rows for _ in range(depth)]
        self.v: list[list[Tensor | None]] = [[None] * rows for _ in range(depth)]
        self.spans: list[tuple[int, int]] = []

    def begin(self, row_lengths: list[int]) -> None:
        starts = [sum(row_lengths[:i]) for i in range(len(row_lengths))]
        self.spans = [(s, s + n) for s, n in zip(starts, row_lengths)]

    def wants_raw_query(self, layer: int) -> bool:
        return False

    def page_slots(self, layer: int) -> None:
        return None  # contiguous K/V: the model passes them to attend

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, raw_q: Tensor | None) -> Tensor:
        out = []
        for row, (a, b) in enumerate(self.spans):
            keys = self._append(self.k[layer], row, k[a:b])
            values = self._append(self.v[layer], row, v[a:b])
            o = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], scale=1.0
            )
            out.append(o[0].transpose(0, 1))
        return torch.cat(out)

    @staticmethod
    def _append(store: list[Tensor | None], row: int, new: Tensor) -> Tensor:
        old = store[row]
        store[row] = new if old is None else torch.cat([old, new])
        return store[row]


class PolicyDenseKV:
    """Dense oracle of a KV policy for one image size. Every (row, layer, head) holds its kept keys, values
    and each token's source scale as plain tensors; after a layer attends (plain softmax attention), the
    tokens to keep are picked from those tensors by the policy's rule, per row and head, and their number
    must equal the policy's plan."""

    def __init__(self, cfg: ModelConfig, schedule: ScaleSchedule, policy: KVPolicy):
        self.cfg, self.schedule, self.policy = cfg, schedule, policy
        self.kept = policy.plan(cfg, schedule).kept
        self.store: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor]] = {}
        self.spans: list[tuple[int, int]] = []
        self.scale = -1
        counts = prune_counts(schedule, cfg.depth * cfg.num_heads, policy.budget) if policy.name == "heatkv" else None
        if counts is not None and counts.any():  # which (layer, head) holds which source scale at every scale
            self.alive = alive_segments(schedule, source_ranks(policy.scas(cfg), schedule.num_scales), counts,
                                        policy.budget)

    def begin(self, row_lengths: list[int]) -> None:
        starts = np.cumsum([0] + row_lengths)
        self.spans = list(zip(starts[:-1].tolist(), starts[1:].tolist()))
        self.scale += 1

    def wants_raw_query(self, layer: int) -> bool:
        return self.policy.name == "scalekv"

    def page_slots(self, layer: int) -> None:
        return None  # contiguous K/V: the model passes them to attend

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, raw_q: Tensor | None) -> Tensor:
        out = torch.empty_like(q)
        for row, (a, b) in enumerate(self.spans):
            source = torch.full((b - a,), self.scale)
            for h in range(self.cfg.num_heads):
                old = self.store.get((row, layer, h))
                keys, values, sources = (x if old is None else torch.cat([o, x])
                                         for o, x in zip(old or (None,) * 3, (k[a:b, h], v[a:b, h], source)))
                out[a:b, h] = torch.softmax(q[a:b, h] @ keys.T, dim=-1) @ values
                keep = self._keep(layer, h, keys, sources, None if raw_q is None else raw_q[a:b, h])
                if len(keep) != self.kept[self.scale, layer, h]:
                    raise AssertionError(f"kept {len(keep)} tokens, the plan says {self.kept[self.scale, layer, h]}")
                self.store[row, layer, h] = (keys[keep], values[keep], sources[keep])
        return out

    def _keep(self, layer: int, head: int, keys: Tensor, sources: Tensor, raw_q: Tensor | None) -> Tensor:
        n, kept = len(keys), int(self.kept[self.scale, layer, head])
        if self.scale == self.schedule.num_scales - 1 or kept == n:
            return torch.arange(kept)
        name = self.policy.name
        if name == "window":
            return torch.arange(n - kept, n)
        if name == "streaming":
            sinks = min(int((sources < SINK_SCALES).sum()), kept // 2)
            return torch.cat([torch.arange(sinks), torch.arange(n - kept + sinks, n)])
        if name == "heatkv":
            return torch.nonzero(torch.from_numpy(self.alive[self.scale + 1, :, layer, head])[sources]).ravel()
        if name == "scalekv":
            return self._scalekv_keep(keys, raw_q, kept)
        raise ValueError(f"no dense oracle for policy {name!r}")

    def _scalekv_keep(self, keys: Tensor, raw_q: Tensor, kept: int) -> Tensor:
        h, w = self.schedule.scales[self.scale]
        local = torch.unique(torch.tensor([r * w + c for r in _grid_centres(h) for c in _grid_centres(w)]))
        window = len(keys) - h * w + local
        scores = raw_q[local] @ keys.T / math.sqrt(keys.shape[-1])
        scores[:, window] = -math.inf
        pooled = F.max_pool1d(scores.sum(0)[None, None], 5, stride=1, padding=2)[0, 0]
        pooled[window] = -math.inf
        order = np.lexsort((np.arange(len(keys)), -pooled.numpy()))  # score descending, then lower position
        chosen = torch.from_numpy(order[: kept - len(window)])
        return torch.sort(torch.cat([chosen, window])).values


def _grid_centres(side: int) -> list[int]:
    """Centres of 4 cells of side // 4 tokens (1 when the side is under 4) along one side of a map."""
    cell = side // 4 or 1
    return [min(side - 1, i * cell + (cell - 1) // 2) for i in range(4)]


@torch.no_grad()
def sample_dense(
    model: Infinity, vae: BSQVAE, encoder: TextEncoder, prompt: str, schedule: ScaleSchedule,
    params: ScaleSampling, seed: int, negative_prompt: str | None = None, kv: DenseKV | PolicyDenseKV | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """One image's accumulated codes and the sampled bits of every scale. `kv` (default: a DenseKV) must have
    `num_rows(params.cfg, negative_prompt is not None)` rows."""
    device = model.head.weight.device
    rows = num_rows(params.cfg, negative_prompt is not None)
    negative = encoder.encode([negative_prompt]) if negative_prompt is not None else None
    text = text_rows(model, encoder.encode([prompt]), 0, rows, negative, 0)
    kv, generator = kv or DenseKV(rows, model.cfg.depth), make_generator(seed, device)
    x, summed, all_bits = model.start_tokens(text.cond), None, []
    for scale, hw in enumerate(schedule.scales):
        kv.begin([hw[0] * hw[1]] * rows)
        batch = make_batch(model, text, [(scale, hw, schedule.rope_grid)] * rows)
        bits = sample_scale(model(x, batch, kv), rows, params, [generator])
        all_bits.append(bits[0])
        summed, x = advance(model, vae, summed, bits, schedule, scale, rows)
        x = None if x is None else x[0]
    return summed, all_bits


def generate_dense(
    model: Infinity, vae: BSQVAE, encoder: TextEncoder, prompt: str, schedule: ScaleSchedule,
    params: ScaleSampling, seed: int, negative_prompt: str | None = None, kv: DenseKV | PolicyDenseKV | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """One image: (uint8 RGB [H, W, 3], the sampled bits of every scale)."""
    summed, bits = sample_dense(model, vae, encoder, prompt, schedule, params, seed, negative_prompt, kv)
    return vae.decode(summed)[0], bits
