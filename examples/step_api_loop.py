"""Embedding the step API in your own loop: requests arrive at different times with priorities, one is
aborted midway, and every page goes back to the pool.

    python examples/step_api_loop.py

`Engine.step()` runs the next scale of every running request and returns the requests that ended (an image
finished while others run comes back from the next step: its decode overlaps that step). Each step is planned
while the device runs the one before: a request added now joins the step after the next.
Lower priority values are admitted first; `max_num_seqs=2` makes the queue visible.
"""

from varserve import Engine, SamplingParams

engine = Engine("test-small", num_pages=4096, max_num_seqs=2)  # random weights: fast, any prompt
def add(name: str, prompt: str, priority: int, seed: int) -> None:
    params = SamplingParams(size="256x256", seed=seed)  # 7 scales: each image needs 7 steps
    engine.add_request(prompt, params, request_id=name, priority=priority)
    print(f"  + {name} (priority {priority})")


# Arrivals by step: at step 0 two normal requests, then a background job and an urgent one.
arrivals = {
    0: [("lighthouse", "a lighthouse at dusk", 1, 0), ("cherries", "a bowl of cherries", 1, 1)],
    1: [("background", "a field of wheat, wide shot", 5, 2)],
    2: [("urgent", "a red balloon in a blue sky", 0, 3)],
}
ABORT_AT = (3, "cherries")  # abort this request before step 3

step = 0
while step in arrivals or engine.has_unfinished_requests():
    for name, prompt, priority, seed in arrivals.get(step, []):
        add(name, prompt, priority, seed)
    if step == ABORT_AT[0]:
        engine.abort(ABORT_AT[1])
        print(f"  x aborted {ABORT_AT[1]}: it runs with the step planned already, then its pages go")
    finished = engine.step()
    stats = engine.cache_stats()
    running = [r.request_id for r in engine.scheduler.running]
    waiting = [r.request_id for r in engine.scheduler.waiting]
    print(f"step {step:2d}: running {running}, waiting {waiting}, used pages {stats['used_pages']}")
    for out in finished:
        print(f"  = {out.request_id} {out.finish_reason}: seed {out.seed}, {out.metrics.latency_s:.2f} s "
              f"(queued {out.metrics.queue_s:.2f} s), peak {out.metrics.peak_kv_pages} pages")
    step += 1

stats = engine.cache_stats()
print("final cache_stats:", stats)
assert stats["used_pages"] == 0 and stats["free_pages"] == stats["total_pages"], "pages leaked"
print(f"all {stats['total_pages']} pages are back in the pool (peak use {stats['peak_used_pages']})")
