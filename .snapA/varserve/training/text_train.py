"""Text encoder warm-up: learn to parse prompts into their scenes before the transformer trains on them.

A prompt names up to three (colour, shape, size) objects by region and a background colour. A small head reads the
encoder's token features with one learned query per region (and one for the background) and classifies what the
prompt puts there. Trained from scratch, the encoder learns which colour goes with which region in a few hundred
steps this way; learnt only through the image loss, the binding came too slowly for a ~20-minute budget. The head is
thrown away; the transformer phase then trains the warmed-up encoder further.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varserve.training.common import Budget, log
from varserve.training.data import COLOUR_NAMES, MAX_OBJECTS, NUM_OBJECT_COLOURS, REGIONS, SHAPES, SIZES, Scenes

TARGETS = ("background", "colour", "shape", "size")


def scene_targets(scenes: Scenes) -> dict[str, np.ndarray]:
    """Class indices: background [N]; colour, shape, size [N, 9] by region, the last class meaning 'nothing'."""
    n = len(scenes)
    out = {
        "background": scenes.background.astype(np.int64),
        "colour": np.full((n, len(REGIONS)), NUM_OBJECT_COLOURS, np.int64),
        "shape": np.full((n, len(REGIONS)), len(SHAPES), np.int64),
        "size": np.full((n, len(REGIONS)), len(SIZES), np.int64),
    }
    for k in range(MAX_OBJECTS):
        rows = np.flatnonzero(scenes.count > k)
        regions = scenes.region[rows, k]
        for name in ("colour", "shape", "size"):
            out[name][rows, regions] = getattr(scenes, name)[rows, k]
    return out


class ParseHead(nn.Module):
    """One learned query per region plus one for the background, attending over the token features."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1 + len(REGIONS), d_model) * 0.1)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.classes = nn.ModuleDict({
            "background": nn.Linear(d_model, len(COLOUR_NAMES)),
            "colour": nn.Linear(d_model, NUM_OBJECT_COLOURS + 1),
            "shape": nn.Linear(d_model, len(SHAPES) + 1),
            "size": nn.Linear(d_model, len(SIZES) + 1),
        })

    def forward(self, features: Tensor, mask: Tensor) -> dict[str, Tensor]:
        scores = torch.einsum("qd,bld->bql", self.queries, self.key(features)) / math.sqrt(features.shape[-1])
        read = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ self.value(features)
        return {"background": self.classes["background"](read[:, 0]),
                **{name: self.classes[name](read[:, 1:]) for name in TARGETS[1:]}}


@dataclass
class TextPretrainConfig:
    minutes: float = 1.0
    batch_size: int = 256
    lr: float = 2e-3
    target_accuracy: float = 0.995  # stop early once held-out prompts are parsed this well
    eval_every: int = 100
    seed: int = 0


def _loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    return sum(F.cross_entropy(logits[n].reshape(-1, logits[n].shape[-1]), targets[n].reshape(-1)) for n in TARGETS)


def prompt_accuracy(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> float:
    """Share of prompts whose background and every region's colour, shape and size are all right."""
    ok = logits["background"].argmax(-1) == targets["background"]
    for name in TARGETS[1:]:
        ok &= (logits[name].argmax(-1) == targets[name]).all(-1)
    return ok.float().mean().item()


def pretrain_text_encoder(encoder: nn.Module, ids: Tensor, mask: Tensor, scenes: Scenes, eval_ids: Tensor,
                          eval_mask: Tensor, eval_scenes: Scenes, cfg: TextPretrainConfig) -> dict:
    """Train `encoder` (called as `encoder(input_ids=, attention_mask=)`) with a ParseHead on `scenes`' prompts.
    ids/mask: the tokenised prompts [N, Lt] on the training device. Returns the held-out parse accuracy."""
    device = ids.device
    head = ParseHead(encoder.config.d_model).to(device)
    encoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=cfg.lr, weight_decay=0.0)
    train_t = {k: torch.from_numpy(v).to(device) for k, v in scene_targets(scenes).items()}
    eval_t = {k: torch.from_numpy(v).to(device) for k, v in scene_targets(eval_scenes).items()}
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    budget, step, accuracy = Budget(cfg.minutes), 0, 0.0
    while not budget.over() and accuracy < cfg.target_accuracy:
        idx = torch.randint(0, len(scenes), (cfg.batch_size,), device=device, generator=gen)
        features = encoder(input_ids=ids[idx], attention_mask=mask[idx]).last_hidden_state
        loss = _loss(head(features, mask[idx]), {k: v[idx] for k, v in train_t.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.eval_every == 0:
            accuracy = parse_accuracy(encoder, head, eval_ids, eval_mask, eval_t)
            log(f"text encoder step {step}: loss {loss.item():.4f}, held-out prompts parsed {accuracy:.3f}")
    if step % cfg.eval_every:
        accuracy = parse_accuracy(encoder, head, eval_ids, eval_mask, eval_t)
    return {"steps": step, "seconds": budget.elapsed, "held_out_parse_accuracy": accuracy}


@torch.no_grad()
def parse_accuracy(encoder: nn.Module, head: ParseHead, ids: Tensor, mask: Tensor,
                   targets: dict[str, Tensor]) -> float:
    was_training = encoder.training
    encoder.eval()
    logits = head(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    encoder.train(was_training)
    return prompt_accuracy(logits, targets)
