"""The device side of the paged KV cache: the page pools and the per-step attention context that the
model calls for self-attention (implements varserve.models.infinity.SelfAttentionKV)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from varserve.attention import paged_attention, slot_mapping, upload, write_kv
from varserve.cache.block_manager import BlockManager
from varserve.scheduler.request import Request


class KVPool:
    """K and V pages: [num_pages, page_size, head_dim] each; page 0 is the null page."""

    def __init__(self, num_pages: int, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.page_size = page_size
        self.k_pages = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)

    @staticmethod
    def page_bytes(page_size: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * page_size * head_dim * torch.empty(0, dtype=dtype).element_size()


class PagedKV:
    """Self-attention over pages for one step. For each layer: the block manager grows the tables of
    every request (history + current scale), the current K/V are written into their slots, the rows
    attend through their block tables, then the tables are cut to what the policy keeps."""

    def __init__(self, pool: KVPool, blocks: BlockManager, reqs: list[Request], backend: str | None):
        self.pool, self.blocks, self.reqs, self.backend = pool, blocks, reqs, backend
        row_lengths = [r.schedule.tokens[r.scale] for r in reqs for _ in range(r.rows)]
        self.max_seqlen = max(row_lengths)
        # Host copies: the attention backends plan on the host, and host metadata spares a device sync.
        self.cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(row_lengths)]), dtype=torch.int32)

    def wants_raw_query(self, layer: int) -> bool:
        return False

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, raw_q: Tensor | None) -> Tensor:
        pages = self.blocks.begin_layer(self.reqs, layer)
        table = upload(pages.block_table, q.device)
        slots = slot_mapping(table, torch.from_numpy(pages.history), self.cu_seqlens, q.shape[0], self.pool.page_size)
        write_kv(self.pool.k_pages, self.pool.v_pages, k, v, slots)
        out = paged_attention(
            q, self.pool.k_pages, self.pool.v_pages, table, torch.from_numpy(pages.seqlens),
            self.cu_seqlens, self.max_seqlen, int(pages.seqlens.max()), 1.0, backend=self.backend,
        )
        self.blocks.end_layer(self.reqs, layer)
        return out

