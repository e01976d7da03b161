"""The offline throughput benchmark, called from Python (what `varserve bench` runs).

    python examples/throughput_bench.py

Compares static batching (waves of max_num_seqs images) with continuous batching on one engine.
"""

from varserve import Engine, SamplingParams
from varserve.benchmark import format_table, run_benchmark

engine = Engine("test-small", num_pages=8192, max_num_seqs=2)  # random weights: the built-in prompts are free text
params = SamplingParams(size="256x256", cfg=4.0)

results = {}
for i, batching in enumerate(("static", "continuous")):
    results[batching] = run_benchmark(engine, num_prompts=4, params=params, batching=batching,
                                      warmup=1 if i == 0 else 0, use_tqdm=False)
    print(format_table(results[batching]))

for batching, r in results.items():
    print(f"{batching:>10}: {r['images_per_second']:.3f} images/s, {r['tokens_per_second']:,.0f} scale tokens/s, "
          f"p50 latency {r['latency_p50_s']:.2f} s, at most {r['max_images_in_flight']} in flight")
# write_json(result, path) from varserve.benchmark saves a result like `varserve bench --output-json`.
