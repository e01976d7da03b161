"""The HTTP server end to end: a real uvicorn server on 127.0.0.1 (a free port) in a background thread, or
`varserve serve` in a subprocess, talked to over real connections. Every request, wait and join is bounded,
so no test can hang.

Exact image checks run the test-small model in float64: float32 CPU kernels are deterministic run to run but not
batch-invariant (an image can change in its last bits with what it is batched with), and the server batches
concurrent requests as they come.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from varserve import AsyncEngine, Engine, SamplingParams  # noqa: E402
from varserve.server import ImageService, create_app, make_server, resolve_size  # noqa: E402

SMALL = "256x256"  # 7 scales: ~0.1-1 s per image on CPU
SLOW = "512x512"  # 10 scales: a few seconds for a few images, long enough to act while they run
TIMEOUT = httpx.Timeout(120.0, connect=10.0)
IMAGES = "/v1/images/generations"


def make_engine(dtype: str = "float32") -> Engine:
    return Engine("test-small", dtype=dtype, num_pages=40000, page_size=16)


@dataclass
class Server:
    url: str
    port: int
    engine: Engine
    service: ImageService
    stop: Callable[[], None]  # SIGTERM's path: drain, then uvicorn exits; returns once the thread ended
    http: Any  # the uvicorn.Server
    thread: threading.Thread  # where it runs

    def post(self, body: dict[str, Any], client: Any = None) -> Any:
        return (client or httpx).post(self.url + IMAGES, json=body, timeout=TIMEOUT)

    def get(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=TIMEOUT)


@contextmanager
def serve(engine: Engine, **options: Any) -> Iterator[Server]:
    app = create_app(AsyncEngine(engine), model_name="test-small", **options)
    server = make_server(app, "127.0.0.1", 0, log_level="warning")
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="server start")
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop() -> None:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=120)
        assert not thread.is_alive(), "the server did not stop"

    running = Server(f"http://127.0.0.1:{port}", port, engine, app.state.service, stop, server, thread)
    try:
        yield running
    finally:
        if thread.is_alive():
            stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def decode(item: dict[str, Any]) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def assert_error(response: Any, status: int, param: str | None = None, match: str = "",
                 code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code, error
    assert re.search(match, error["message"]), error["message"]


def assert_clean(engine: Engine) -> None:
    wait_until(lambda: engine.cache_stats()["used_pages"] == 0 and not engine.has_unfinished_requests(),
               what="the engine to free every page")


def queued(engine: Engine) -> int:
    stats = engine.cache_stats()
    return stats["waiting"] + stats["running"]


def spy_aborts(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    aborted: list[str] = []
    original = engine.abort

    def abort(request_id: str) -> bool:
        done = original(request_id)
        if done:
            aborted.append(request_id)
        return done

    monkeypatch.setattr(engine, "abort", abort)
    return aborted


def in_background(fn: Callable[[], Any]) -> Any:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve(make_engine(), max_queue=64) as running:
        yield running


# ---- images ---------------------------------------------------------------------------------------------
def test_concurrent_images_equal_engine_generate() -> None:
    requests = [
        {"prompt": "a red fox", "size": SMALL, "seed": 11},
        {"prompt": "a blue whale", "size": SMALL, "seed": 7, "n": 2},
        {"prompt": "a green field", "size": "1:2@256", "seed": 3, "cfg": 2.5, "tau": 0.8, "top_p": 0.9,
         "negative_prompt": "blurry", "model": "test-small"},
        {"prompt": "a tall tower", "size": SMALL, "seed": 5, "response_format": "png"},
    ]
    with serve(make_engine("float64")) as running, ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(running.post, requests))
        assert_clean(running.engine)
    expected = iter(make_engine("float64").generate(
        [r["prompt"] for r in requests for _ in range(r.get("n", 1))],
        [SamplingParams(seed=r["seed"] + i, **{k: r[k] for k in ("size", "cfg", "tau", "top_p", "negative_prompt")
                                                if k in r})
         for r in requests for i in range(r.get("n", 1))], use_tqdm=False))
    for request, response in zip(requests[:3], responses[:3]):
        assert response.status_code == 200, response.text
        body = response.json()
        n = request.get("n", 1)
        assert isinstance(body["created"], int) and len(body["data"]) == n
        assert body["usage"]["seeds"] == [request["seed"] + i for i in range(n)]
        for item in body["data"]:
            assert item["revised_prompt"] is None
            assert np.array_equal(decode(item), np.array(next(expected).image))
    png = responses[3]
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-varserve-seed"] == "5"
    assert np.array_equal(np.array(Image.open(io.BytesIO(png.content))), np.array(next(expected).image))


def test_usage_reports_the_size_made_and_drawn_seeds(server: Server) -> None:
    response = server.post({"prompt": "no seed", "size": "1:2@256", "n": 2})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["images"] == 2 and usage["size"] == "176x352" and usage["latency_s"] > 0
    assert len(set(usage["seeds"])) == 2
    assert [decode(d).shape for d in response.json()["data"]] == [(352, 176, 3)] * 2


def test_openai_sizes_map_to_the_table() -> None:
    assert resolve_size("1024x1024") == "1024x1024" and resolve_size("auto") is None  # the engine's default
    assert resolve_size("1792x1024") == "1344x768" and resolve_size("1024x1792") == "768x1344"
    assert resolve_size("1536x1024") == "1248x832" and resolve_size("1024x1536") == "832x1248"
    assert resolve_size("256x256") == "256x256" and resolve_size("1:1@512") == "512x512"


def test_models_health_and_unknown_routes(server: Server) -> None:
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["test-small"]
    assert models["data"][0]["object"] == "model"
    health = server.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert_error(server.get("/v1/nothing"), 404, match="Not Found")
    assert_error(server.get(IMAGES), 405, match="Method Not Allowed")


# ---- validation ---------------------------------------------------------------------------------------------
LONG_PROMPT = "x" * 300  # the test-small model's text encoder takes 128 tokens


@pytest.mark.parametrize("body, status, param, match, code", [
    (b'{"prompt": ', 400, None, "not valid JSON", "invalid_json"),
    (b"", 400, None, "not valid JSON", "invalid_json"),
    (b'["a cat"]', 400, None, "should be an object", None),
    ({}, 400, "prompt", "Field required", None),
    ({"prompt": ""}, 400, "prompt", "at least 1 character", None),
    ({"prompt": 5}, 400, "prompt", "valid string", None),
    ({"prompt": "a", "size": "100x100"}, 400, "size", r"unsupported size '100x100'; supported: .*256x256", None),
    ({"prompt": "a", "n": 0}, 400, "n", "greater than or equal to 1", None),
    ({"prompt": "a", "n": 9}, 400, "n", "less than or equal to 8", None),
    ({"prompt": "a", "n": "2"}, 400, "n", "valid integer", None),
    ({"prompt": "a", "n": 1.5}, 400, "n", "valid integer", None),
    ({"prompt": "a", "seed": -1}, 400, "seed", "greater than or equal to 0", None),
    ({"prompt": "a", "cfg": -1}, 400, "cfg", "greater than or equal to 0", None),
    ({"prompt": "a", "tau": 0}, 400, "tau", "greater than 0", None),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p", "less than or equal to 1", None),
    ({"prompt": "a", "response_format": "url"}, 400, "response_format", "'url' is not supported", None),
    ({"prompt": "a", "response_format": "png", "n": 2}, 400, None, "n must be 1", None),
    ({"prompt": "a", "kv_budget": 0.5}, 400, "kv_budget", "Extra inputs are not permitted", None),
    ({"prompt": "a", "model": "dall-e-3"}, 404, "model", "'dall-e-3' is not served here", "model_not_found"),
    ({"prompt": LONG_PROMPT, "size": SMALL}, 400, "prompt", "^prompt is 3\\d+ tokens long .*over the 128-token limit",
     None),
    ({"prompt": "a", "size": SMALL, "negative_prompt": LONG_PROMPT}, 400, "negative_prompt",
     "^negative_prompt is 3\\d+ tokens long .*over the 128-token limit", None),
])
def test_bad_requests_answer_openai_errors(server: Server, body: Any, status: int, param: str | None, match: str,
                                           code: str | None) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.url + IMAGES, timeout=TIMEOUT, **kwargs)
    assert_error(response, status, param, match, code)
    assert_clean(server.engine)


def test_every_problem_is_listed(server: Server) -> None:
    response = server.post({"prompt": "a", "n": 0, "cfg": "high"})
    assert_error(response, 400, "n", r"n: .*; cfg: Input should be a valid number")


# ---- disconnects, a full queue -----------------------------------------------------------------------------
def test_client_disconnect_aborts_its_images_and_frees_pages(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    aborted = spy_aborts(server.engine, monkeypatch)
    before = server.get("/metrics").text
    body = json.dumps({"prompt": "never read", "size": SLOW, "n": 3}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (IMAGES.encode(), len(body), body))
        wait_until(lambda: queued(server.engine) == 3, what="the images to be queued")
    assert_clean(server.engine)
    assert sorted(rid[-2:] for rid in aborted) == ["-0", "-1", "-2"]
    name = 'varserve_requests_total{status="499"}'
    wait_until(lambda: metric(server.get("/metrics").text, name) == metric(before, name) + 1, what="499 counted")
    images = "varserve_images_generated_total"
    assert metric(server.get("/metrics").text, images) == metric(before, images)


def test_client_gone_while_sending_its_body_counts_as_499(server: Server) -> None:
    before = server.get("/metrics").text
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": " % IMAGES.encode())
        time.sleep(0.2)
    name = 'varserve_requests_total{status="499"}'
    wait_until(lambda: metric(server.get("/metrics").text, name) == metric(before, name) + 1, what="499 counted")
    failed = 'varserve_requests_total{status="500"}'
    assert metric(server.get("/metrics").text, failed) == metric(before, failed)
    assert_clean(server.engine)


def test_full_queue_answers_503_with_retry_after() -> None:
    with serve(make_engine(), max_queue=3) as running:
        first = in_background(lambda: running.post({"prompt": "fills the queue", "size": SLOW, "n": 3}))
        wait_until(lambda: running.service.in_flight == 3, what="admission")
        response = running.post({"prompt": "one more", "size": SMALL})
        assert_error(response, 503, match=r"queue is full \(3 of 3 images", code="queue_full")
        assert int(response.headers["retry-after"]) >= 1
        assert_error(running.post({"prompt": "too many", "size": SMALL, "n": 4}), 400, "n", "queue of 3 images")
        assert running.get("/health").json() == {"status": "ok"}
        assert first.result(timeout=120).status_code == 200
        assert running.post({"prompt": "room again", "size": SMALL}).status_code == 200
        assert_clean(running.engine)


def test_engine_loop_death_fails_requests_and_health(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine()

    def broken() -> list:
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(engine, "step", broken)
    with serve(engine) as running:
        assert_error(running.post({"prompt": "doomed", "size": SMALL}), 500, match="engine loop died: scheduler bug")
        health = running.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "error", "error": "scheduler bug"}
        assert_error(running.post({"prompt": "after", "size": SMALL}), 500, match="engine loop died")


# ---- load ---------------------------------------------------------------------------------------------------
def test_load_200_requests_from_16_clients(server: Server) -> None:
    total, clients = 200, 16
    before = server.get("/metrics").text

    def client(k: int) -> list[tuple[int, int]]:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
            results = []
            for i in range(k, total, clients):
                r = c.post(IMAGES, json={"prompt": f"load test {i}", "size": SMALL, "seed": i})
                results.append((r.status_code, len(r.json()["data"]) if r.status_code == 200 else 0))
            return results

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for future in [pool.submit(client, k) for k in range(clients)]
                   for r in future.result(timeout=300)]
    elapsed = time.monotonic() - start
    assert results == [(200, 1)] * total
    assert_clean(server.engine)
    after = server.get("/metrics").text
    ok = 'varserve_requests_total{status="200"}'
    assert metric(after, ok) - metric(before, ok) == total
    assert metric(after, "varserve_images_generated_total") - metric(before, "varserve_images_generated_total") == total
    count = "varserve_request_latency_seconds_count"
    assert metric(after, count) - metric(before, count) == total
    assert metric(after, 'varserve_request_latency_seconds_bucket{le="+Inf"}') == metric(after, count)
    assert metric(after, "varserve_images_per_second") > 0
    assert metric(after, "varserve_kv_pages_used") == 0 and metric(after, "varserve_kv_pages_total") == 39999
    assert metric(after, "varserve_num_requests_waiting") == metric(after, "varserve_num_requests_running") == 0
    print(f"\n{total} requests from {clients} clients in {elapsed:.1f} s ({total / elapsed:.1f} images/s)")


# ---- shutdown -----------------------------------------------------------------------------------------------
def test_shutdown_refuses_new_requests_and_lets_running_ones_finish() -> None:
    with serve(make_engine(), shutdown_timeout=120) as running:
        first = in_background(lambda: running.post({"prompt": "finishes", "size": SLOW, "n": 4}))
        wait_until(lambda: running.engine.cache_stats()["used_pages"] > 0, what="the images to start")
        stopped = in_background(running.stop)
        wait_until(lambda: running.service.draining, what="the drain")
        assert_error(running.post({"prompt": "too late", "size": SMALL}), 503, match="shutting down",
                     code="shutting_down")
        assert running.get("/health").json() == {"status": "shutting_down"}
        response = first.result(timeout=120)
        assert response.status_code == 200 and len(response.json()["data"]) == 4
        stopped.result(timeout=120)
        assert_clean(running.engine)


def test_a_second_signal_during_the_drain_exits_at_once() -> None:
    with serve(make_engine(), shutdown_timeout=600) as running:
        first = in_background(lambda: running.post({"prompt": "cut short", "size": SLOW, "n": 8}))
        wait_until(lambda: running.engine.cache_stats()["used_pages"] > 0, what="the images to start")
        running.http.handle_exit(signal.SIGTERM, None)
        wait_until(lambda: running.service.draining, what="the drain")
        running.http.handle_exit(signal.SIGINT, None)
        running.thread.join(timeout=30)
        assert not running.thread.is_alive() and running.http.force_exit
        with contextlib.suppress(httpx.HTTPError):  # it did not wait for the images: the connection went with it
            assert first.result(timeout=60).status_code != 200


def test_shutdown_aborts_what_outlives_the_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(make_engine(), shutdown_timeout=0.2) as running:
        aborted = spy_aborts(running.engine, monkeypatch)
        first = in_background(lambda: running.post({"prompt": "aborted", "size": SLOW, "n": 4}))
        wait_until(lambda: queued(running.engine) == 4, what="the images to be queued")
        running.stop()
        assert_error(first.result(timeout=60), 503, match="shutting down: request aborted after the 0.2 s grace",
                     code="shutting_down")
        assert len(aborted) == 4
        assert_clean(running.engine)


def test_varserve_serve_drains_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "varserve.cli", "serve", "--model", "test-small", "--port", "0",
               "--num-pages", "40000", "--page-size", "16", "--shutdown-timeout", "60"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        wait_until(lambda: "Uvicorn running on" in log.read_text() or process.poll() is not None, what="startup")
        port = int(re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text())[1])
        url = f"http://127.0.0.1:{port}"
        first = in_background(lambda: httpx.post(url + IMAGES, json={"prompt": "in flight", "size": SLOW, "n": 2},
                                                 timeout=TIMEOUT))
        wait_until(lambda: images_in_engine(url) == 2, what="the images to be queued")
        process.send_signal(signal.SIGTERM)
        response = first.result(timeout=120)
        assert response.status_code == 200 and len(response.json()["data"]) == 2
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    text = log.read_text()
    assert "waiting up to 60 s for 1 request(s)" in text and "shut down: 0 KV pages in use" in text, text
    assert "Traceback" not in text, text



def images_in_engine(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    return metric(text, "varserve_num_requests_waiting") + metric(text, "varserve_num_requests_running")


def test_request_fields_left_out_come_from_the_engines_default_params() -> None:
    from varserve.server import parse_request

    defaults = SamplingParams(cfg=2.0, tau=0.5, top_p=0.9)
    given = parse_request(json.dumps({"prompt": "x", "n": 2, "seed": 7, "tau": 0.8, "size": "512x512"}).encode())
    params = given.sampling_params(defaults)
    assert [(p.cfg, p.tau, p.top_p, p.seed, p.size) for p in params] == [
        (2.0, 0.8, 0.9, 7, "512x512"), (2.0, 0.8, 0.9, 8, "512x512")]
    for size in ({}, {"size": "auto"}):  # no size: the engine's (the model's recommended one)
        request = parse_request(json.dumps({"prompt": "x", **size}).encode())
        assert request.sampling_params(SamplingParams(size="256x256"))[0].size == "256x256"
