"""Offline generation: a few prompts in, PNG files out (runs on CPU with the tiny model in seconds).

    python examples/offline_generate.py [OUT_DIR]
"""

import sys
from pathlib import Path

from varserve import Engine, SamplingParams

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "out/offline_generate")
out_dir.mkdir(parents=True, exist_ok=True)

# "tiny" is a small random-weight model of the Infinity architecture. On a GPU use e.g. "infinity-2b".
# num_pages fixes a small KV pool (the default on CPU is 2 GiB, which takes seconds to allocate).
engine = Engine("tiny", num_pages=8192)

prompts = [
    "a red fox sitting in fresh snow at dawn",
    "a lighthouse on a cliff above a stormy sea",
    "a bowl of ramen, food photography",
]
# One SamplingParams for every prompt, or one per prompt (here: a fixed seed per image, one without CFG).
params = [
    SamplingParams(size="256x256", cfg=4.0, seed=0),
    SamplingParams(size="256x256", cfg=4.0, seed=1, negative_prompt="blurry, low quality"),
    SamplingParams(size="256x256", cfg=1.0, seed=2),  # cfg 1: no CFG row, half the work
]

outputs = engine.generate(prompts, params)  # outputs in input order
for i, out in enumerate(outputs):
    path = out_dir / f"{i}.png"
    out.image.save(path)
    m = out.metrics
    print(f"{path}: {out.size}, seed {out.seed}, {m.latency_s:.2f} s, {m.scales} scales, "
          f"peak KV {m.peak_kv_pages} pages ({m.peak_kv_bytes / 2**20:.1f} MiB)")
print(engine.cache_stats())
