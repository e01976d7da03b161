"""Dense reference generation: one request at a time, contiguous K/V per row, torch SDPA.

This is the oracle the paged engine is tested against; keep it plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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


@torch.no_grad()
def generate_dense(
    model: Infinity, vae: BSQVAE, encoder: TextEncoder, prompt: str, schedule: ScaleSchedule,
    params: ScaleSampling, seed: int, negative_prompt: str | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """One image: (uint8 RGB [H, W, 3], the sampled bits of every scale)."""
    device = model.head.weight.device
    rows = num_rows(params.cfg, negative_prompt is not None)
    negative = encoder.encode([negative_prompt]) if negative_prompt is not None else None
    text = text_rows(model, encoder.encode([prompt]), 0, rows, negative, 0)
    kv, generator = DenseKV(rows, model.cfg.depth), make_generator(seed, device)
    x, summed, all_bits = model.start_tokens(text.cond), None, []
    for scale, hw in enumerate(schedule.scales):
        kv.begin([hw[0] * hw[1]] * rows)
        batch = make_batch(model, text, [(scale, hw, schedule.rope_grid)] * rows)
        bits = sample_scale(model(x, batch, kv), rows, params, generator)
        all_bits.append(bits)
        summed, x = advance(model, vae, summed, bits, schedule, scale, rows)
    return vae.decode(summed)[0], all_bits
