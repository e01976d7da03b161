"""Attention for varserve: paged self-attention (with backends) and varlen cross-attention."""

from varserve.attention.paged import (
    BACKENDS,
    CallShape,
    TritonTiles,
    available_backends,
    gather_rows,
    paged_attention,
    paged_attention_triton,
    paged_scores,
    paged_scores_gather,
    prepare_backend,
    select_backend,
    slot_mapping,
    token_rows,
    upload,
    wide_rows,
    write_kv,
)
from varserve.attention.varlen import varlen_attention
from varserve.attention.cudnn_paged import paged_attention_cudnn  # importing it registers the cudnn backend

__all__ = [
    "BACKENDS",
    "CallShape",
    "TritonTiles",
    "available_backends",
    "gather_rows",
    "paged_attention",
    "paged_attention_cudnn",
    "paged_attention_triton",
    "paged_scores",
    "paged_scores_gather",
    "prepare_backend",
    "select_backend",
    "slot_mapping",
    "token_rows",
    "upload",
    "varlen_attention",
    "wide_rows",
    "write_kv",
]
