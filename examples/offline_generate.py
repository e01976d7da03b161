"""Offline generation: a few prompts in, PNG files out (runs on CPU with the shipped tiny model in seconds).

    python examples/offline_generate.py [OUT_DIR]
"""

import sys
from pathlib import Path

from varserve import Engine
from varserve.params import default_params

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "out/offline_generate")
out_dir.mkdir(parents=True, exist_ok=True)

# "tiny" is the small Infinity model shipped inside the package, trained at 512x512 on pictures of coloured
# shapes: its prompts are made of its own words (varserve.training.data.VOCABULARY). On a GPU use e.g. "infinity-2b"
# for any prompt. num_pages fixes a small KV pool (the default on CPU is 512 MiB).
engine = Engine("tiny", num_pages=8192)

prompts = [
    "a red circle at the top left on a white background",
    "a big blue square at the center and a yellow triangle at the bottom right on a black background",
    "a small green circle at the right on a gray background",
]
# One SamplingParams for every prompt, or one per prompt (here: a fixed seed per image). default_params fills the
# fields not given with the model's own defaults (tiny: cfg 2, tau 0.5), as generate() does when given no params.
params = [default_params("tiny", size="512x512", seed=i) for i in range(len(prompts))]

outputs = engine.generate(prompts, params)  # outputs in input order
for i, out in enumerate(outputs):
    path = out_dir / f"{i}.png"
    out.image.save(path)
    m = out.metrics
    print(f"{path}: {out.size}, seed {out.seed}, {m.latency_s:.2f} s, {m.scales} scales, "
          f"peak KV {m.peak_kv_pages} pages ({m.peak_kv_bytes / 2**20:.1f} MiB)")
print(engine.cache_stats())
