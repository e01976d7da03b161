"""Data-parallel serving: `Engine(..., data_parallel_size=N)` runs N engine replicas, one per GPU.

Runtime: torch.distributed. The front end (the user's process, rank 0) spawns the replicas (ranks 1..N, replica
i on cuda:i, or N CPU replicas) with torch.multiprocessing; all join one gloo process group through a TCPStore
the front end hosts. Messages are pickled objects sent point to point with `send_object_list` /
`recv_object_list`; images travel as uint8 arrays.

Doorbells. A gloo receive cannot wait forever: once it outlasts the group's timeout it closes every connection
of its process. So each message first rings a doorbell (a key in the TCPStore) and its receiver posts the gloo
receive only after the doorbell rang; a gloo operation then never lasts longer than one transfer. An idle
replica blocks on the store for its next command (and exits when the store, i.e. its front end, is gone); the
front end, while replicas work, polls their doorbells and sleeps on their process sentinels in between, so a
replica's death wakes it at once, and gives up on a replica after a timeout.

Protocol, strict request/reply; the front end sends a command to one replica or to all of them, then collects
the replies:
    ("add", request_id, prompt, params, priority) -> seed     ("abort", request_id) -> bool
    ("step",) -> [(ImageOutput without image, uint8 pixels)]  ("call", fn, args) -> fn(engine, *args)
    ("stats",) -> None                                        ("shutdown",) -> None
A reply is ("ok", value, report), ("error", exception type, message, report) for a failed add or call, which
leaves the replica as it was, or ("fatal", message) for any other exception, after which the replica exits.
`report` is the replica's cache_stats() plus `queued_pages` (pages its waiting requests need at their peak):
the front end routes each new request to the replica with the most free pages net of queued ones.

A replica that dies, raises, loses its connection or misses a timeout is failed: its process is killed and each
of its requests ends with finish_reason 'failed' and an error naming the replica; the other replicas go on.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
import signal
import sys
import time
from collections import deque
from datetime import timedelta
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from varserve.config import EngineConfig
from varserve.engine import Engine, checked_request
from varserve.outputs import ImageMetrics, ImageOutput
from varserve.params import SamplingParams, default_params

logger = logging.getLogger("varserve")

HOST = "127.0.0.1"
START_TIMEOUT_S = 1800.0  # a replica loads its model (weights may be downloaded) within this
STEP_TIMEOUT_S = 600.0  # a replica answers any command (a step, torch.compile included) within this
SHUTDOWN_TIMEOUT_S = 30.0  # a replica exits within this after 'shutdown', else it is killed
DEATH_WAIT_S = 2.0  # after a lost connection, how long to wait for the process to report how it ended
TRANSFER_TIMEOUT_S = 300.0  # gloo and store timeout: one rendezvous or one transfer
POLL_MIN_S, POLL_MAX_S = 1e-4, 2e-3  # the front end polls doorbells at these intervals (doubling) while it waits
START_POLL_S = 0.05  # and replicas' start-up at this one
IDLE_WAIT_S = 3600.0  # an idle replica checks that its front end's process lives at least this often
STORE_PREFIX = "varserve"
_SUMMED = ("total_pages", "free_pages", "used_pages", "peak_used_pages", "kv_pool_bytes", "running", "decoding",
           "waiting", "queued_pages")


class DataParallelEngine(Engine):
    """N `Engine` replicas in their own processes behind the `Engine` API (`Engine(..., data_parallel_size=N)`).

    add_request routes to the replica with the most free KV pages (net of its queued requests), step steps every
    replica at once, abort goes to the request's replica, generate keeps input order, cache_stats sums the
    replicas and lists each (`replicas`). Also: `replica_of(request_id)`, `run_on_replicas(fn, *args)` and
    `shutdown()` (also a context manager, and run at exit). One per process: the front end joins the default
    torch.distributed process group, so torch.distributed must not be initialized in this process already.
    Scripts must guard their entry point with `if __name__ == "__main__":` (replicas are spawned).
    """

    def __init__(self, model: str = "tiny", *, data_parallel_size: int, **kwargs: Any):
        self.config = EngineConfig(model=model, data_parallel_size=data_parallel_size, **kwargs)
        self.default_params = default_params(self.config.model)
        if dist.is_initialized():
            raise RuntimeError("data_parallel_size > 1 needs a process where torch.distributed is not initialized: "
                               "the engine's front end joins its own gloo process group")
        devices = _replica_devices(self.config.device, self.config.data_parallel_size)
        self._outbox: deque[ImageOutput] = deque()
        self._routed: dict[str, _Routed] = {}
        self._closed = self._joined = False
        self._store = dist.TCPStore(HOST, 0, len(devices) + 1, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=TRANSFER_TIMEOUT_S))
        self._mailbox = dist.PrefixStore(STORE_PREFIX, self._store)
        self.replicas: list[_Replica] = []
        atexit.register(self.shutdown)
        try:
            for index, device in enumerate(devices):
                self.replicas.append(_Replica.spawn(index, device, self.config, self._mailbox, self._store.port))
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        _await_ready(self.replicas, self._mailbox)
        dist.init_process_group("gloo", store=self._store, rank=0, world_size=len(self.replicas) + 1,
                                timeout=timedelta(seconds=TRANSFER_TIMEOUT_S))
        self._joined = True
        self._exchange(self.replicas, ("stats",), STEP_TIMEOUT_S)
        if lost := [r for r in self.replicas if r.error is not None]:
            raise RuntimeError(f"{lost[0].error} at start-up")
        logger.info("data parallel: %d replicas on %s", len(self.replicas), ", ".join(r.device for r in self.replicas))

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(
        self, prompt: str, params: SamplingParams | None = None, *, request_id: str | None = None, priority: int = 0,
    ) -> str:
        """Queue one image on the least-loaded replica; returns its request id. ValueError for bad input,
        RuntimeError when no replica is left."""
        self._check_open()
        params, request_id = checked_request(prompt, params, request_id, priority, self.default_params)
        if request_id in self._routed:
            raise ValueError(f"request id {request_id!r} is already in use")
        while (replica := self._least_loaded()) is not None:  # a replica lost meanwhile: try the next
            reply = self._exchange([replica], ("add", request_id, prompt, params, priority), STEP_TIMEOUT_S)
            if replica.index in reply:
                seed = _value(replica, reply[replica.index])
                self._routed[request_id] = _Routed(replica, prompt, seed, params.schedule.name, time.monotonic())
                return request_id
        raise RuntimeError(f"no live replica left: {'; '.join(str(r.error) for r in self.replicas)}")

    def abort(self, request_id: str) -> bool:
        """Stop a request on its replica and free its pages. False if it is unknown, done or already failed."""
        self._check_open()
        routed = self._routed.get(request_id)
        if routed is None:
            return False
        reply = self._exchange([routed.replica], ("abort", request_id), STEP_TIMEOUT_S).get(routed.replica.index)
        if reply is None:  # the replica failed meanwhile, and its requests with it
            return False
        del self._routed[request_id]
        return bool(_value(routed.replica, reply))

    def has_unfinished_requests(self) -> bool:
        return bool(self._routed or self._outbox)

    def replica_of(self, request_id: str) -> int | None:
        """The index of the replica serving an unfinished request (None if unknown or done)."""
        routed = self._routed.get(request_id)
        return None if routed is None else routed.replica.index

    # ---- stepping -------------------------------------------------------------------------------------
    def step(self) -> list[ImageOutput]:
        """Run one step on every live replica at once; return the requests that ended (failed ones included:
        a lost replica's requests end with finish_reason 'failed' and an error naming it)."""
        self._check_open()
        replies = self._exchange(self._live(), ("step",), STEP_TIMEOUT_S)
        outputs = list(self._outbox) + [self._delivered(*wire) for _, reply in sorted(replies.items())
                                         for wire in reply[1]]
        self._outbox.clear()
        return outputs

    def _delivered(self, out: ImageOutput, pixels: np.ndarray | None) -> ImageOutput:
        self._routed.pop(out.request_id, None)
        return out if pixels is None else dataclasses.replace(out, image=Image.fromarray(pixels))

    # ---- replicas -------------------------------------------------------------------------------------
    def run_on_replicas(self, fn: Callable[..., Any], *args: Any) -> dict[int, Any]:
        """`fn(engine, *args)` in every live replica (fn and args picklable, fn importable); returns
        {replica index: result}. RuntimeError naming the replica if fn raised in one."""
        self._check_open()
        replies = self._exchange(self._live(), ("call", fn, args), STEP_TIMEOUT_S)
        return {i: _value(self.replicas[i], reply) for i, reply in sorted(replies.items())}

    def cache_stats(self) -> dict:
        """Sums over the live replicas (kv_pool_bytes, free_pages, running, ...; peak_used_pages is the sum of
        the replicas' peaks), plus `replicas`: one dict per replica (index, device, pid, alive, error, and its
        own cache_stats while alive)."""
        self._check_open()
        self._check_liveness(self._live())
        live = self._live()
        totals = {k: sum(r.report[k] for r in live) for k in _SUMMED}
        return {**self.replicas[0].report, **totals, "data_parallel_size": len(self.replicas),
                "live_replicas": len(live), "replicas": [r.stats() for r in self.replicas]}

    def shutdown(self) -> None:
        """Stop every replica (one that does not exit within SHUTDOWN_TIMEOUT_S of its 'shutdown', or never got
        one, is killed) and leave the process group. Idempotent; also run at exit. Unfinished requests are dropped."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        told = self._exchange(self._live(), ("shutdown",), SHUTDOWN_TIMEOUT_S) if self._joined else {}
        for replica in self.replicas:
            replica.stop(SHUTDOWN_TIMEOUT_S if replica.index in told else 0.0)
        if self._joined:
            dist.destroy_process_group()
        self._routed.clear()
        logger.info("data parallel: replicas stopped")

    def __enter__(self) -> "DataParallelEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ---- messaging ------------------------------------------------------------------------------------
    def _exchange(self, replicas: list[_Replica], command: tuple, timeout: float) -> dict[int, tuple]:
        """Send `command` to each replica, then collect the replies: {index: reply} of the replicas that
        answered 'ok' or 'error'. A replica that dies, raises, loses its connection or misses `timeout` is
        failed and left out. If the exchange is interrupted (a KeyboardInterrupt), a message to or from any of
        `replicas` may be half sent, so they are failed too before the exception goes on."""
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)  # a bad command fails here, unsent
        try:
            return self._send_and_collect(replicas, data, command[0], timeout)
        except BaseException as exc:
            for replica in replicas:
                self._fail(replica, f"interrupted while serving {command[0]!r} ({type(exc).__name__})")
            raise

    def _send_and_collect(self, replicas: list[_Replica], data: bytes, kind: str, timeout: float) -> dict[int, tuple]:
        pending = [r for r in replicas if self._post(r, data)]
        replies: dict[int, tuple] = {}
        deadline, delay = time.monotonic() + timeout, POLL_MIN_S
        while pending:
            if rung := [r for r in pending if r.link.rang()]:
                replies.update((r.index, reply) for r in rung if (reply := self._receive(r)) is not None)
                delay = POLL_MIN_S
            else:
                connection.wait([r.process.sentinel for r in pending], delay)  # wakes at once if one dies
                delay = min(2 * delay, POLL_MAX_S)
                self._check_liveness(pending)
                if time.monotonic() > deadline:
                    for replica in pending:
                        self._fail(replica, f"no reply to {kind!r} within {timeout:g} s")
            pending = [r for r in pending if r.error is None and r not in rung]
        return replies

    def _post(self, replica: _Replica, data: bytes) -> bool:
        try:
            replica.link.send(data)
        except Exception as exc:  # gloo: the connection closed (the process died)
            self._lost(replica, exc)
            return False
        return True

    def _receive(self, replica: _Replica) -> tuple | None:
        try:
            reply = replica.link.recv()
        except Exception as exc:
            self._lost(replica, exc)
            return None
        if reply[0] == "fatal":
            self._fail(replica, f"raised {reply[1]}")
            return None
        replica.report = reply[-1]
        return reply

    def _lost(self, replica: _Replica, exc: Exception) -> None:
        # A reset connection usually means the process died; give the OS a moment to report how.
        death = replica.death(wait=DEATH_WAIT_S)
        self._fail(replica, death or f"lost its connection: {_one_line(exc)}")

    def _check_liveness(self, replicas: list[_Replica]) -> None:
        for replica in replicas:
            if (death := replica.death()) is not None:
                self._fail(replica, death)

    def _fail(self, replica: _Replica, reason: str) -> None:
        """Mark a replica failed, kill its process and fail its requests (delivered by the next step)."""
        if replica.error is not None:
            return
        replica.error = f"{replica.name} failed: {reason}"
        lost = [rid for rid, routed in self._routed.items() if routed.replica is replica]
        logger.error("%s; failing its %d request(s); %d replica(s) left", replica.error, len(lost), len(self._live()))
        replica.kill()
        for rid in lost:
            self._outbox.append(_failed_output(rid, self._routed.pop(rid), replica.error, self.config.kv_budget))

    def _least_loaded(self) -> _Replica | None:
        live = self._live()
        return max(live, key=lambda r: (r.report["free_pages"] - r.report["queued_pages"], -r.index), default=None)

    def _live(self) -> list[_Replica]:
        return [r for r in self.replicas if r.error is None]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is shut down")


@dataclasses.dataclass(frozen=True)
class _Routed:
    """What the front end keeps of an unfinished request: enough to fail it if its replica is lost."""

    replica: _Replica
    prompt: str
    seed: int
    size: str
    arrival: float


class _Link:
    """Messages to and from one peer: ring a doorbell key in the store, then send the pickled object over gloo."""

    def __init__(self, store: dist.Store, peer: int, send_key: str, recv_key: str):
        self.store, self.peer, self.send_key, self.recv_key = store, peer, send_key, recv_key
        self.sent = self.received = 0

    def send(self, data: bytes) -> None:
        self.store.set(f"{self.send_key}/{self.sent}", "1")
        self.sent += 1
        dist.send_object_list([data], dst=self.peer)

    def rang(self) -> bool:
        return self.store.check([self._next()])

    def wait(self, seconds: float) -> bool:
        """Block up to `seconds` for the next message's doorbell; True once it rang. (A timed-out store wait
        logs a warning: the front end polls `rang` instead.)"""
        try:
            self.store.wait([self._next()], timedelta(seconds=seconds))
        except dist.DistStoreError:  # the wait timed out
            return False
        return True

    def recv(self) -> Any:
        box: list[Any] = [None]
        dist.recv_object_list(box, src=self.peer)
        self.store.delete_key(self._next())
        self.received += 1
        return pickle.loads(box[0])

    def _next(self) -> str:
        return f"{self.recv_key}/{self.received}"


@dataclasses.dataclass(eq=False)
class _Replica:
    """The front end's handle on one replica process."""

    index: int
    device: str
    process: BaseProcess
    link: _Link
    report: dict = dataclasses.field(default_factory=dict)  # its last cache_stats() + queued_pages
    error: str | None = None  # why it failed; None while it serves

    @classmethod
    def spawn(cls, index: int, device: str, config: EngineConfig, store: dist.Store, port: int) -> _Replica:
        replica_config = config.model_copy(update={"device": device, "data_parallel_size": 1}).model_dump()
        args = (index, config.data_parallel_size, port, replica_config, os.getpid(), logger.getEffectiveLevel())
        process = mp.get_context("spawn").Process(target=_replica_main, args=args, name=f"varserve-replica-{index}")
        process.start()
        return cls(index, device, process, _Link(store, index + 1, f"cmd{index}", f"reply{index}"))

    @property
    def name(self) -> str:
        return f"replica {self.index} ({self.device}, pid {self.process.pid})"

    def death(self, wait: float = 0.0) -> str | None:
        """How its process ended (waiting up to `wait` seconds for it to end), or None while it runs."""
        if wait > 0:
            self.process.join(wait)
        code = self.process.exitcode
        if code is None:
            return None
        if code < 0:
            return f"its process was killed by {signal.Signals(-code).name}"
        return f"its process exited with code {code}"

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(SHUTDOWN_TIMEOUT_S)

    def stop(self, timeout: float) -> None:
        self.process.join(timeout)
        self.kill()

    def stats(self) -> dict:
        own = self.report if self.error is None else {}
        return {"replica": self.index, "device": self.device, "pid": self.process.pid, "alive": self.error is None,
                "error": self.error, **own}


def _replica_devices(device: str | None, n: int) -> list[str]:
    """cuda:0 .. cuda:N-1 (device None or 'cuda' with CUDA), or N times 'cpu'. ValueError otherwise."""
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if device is not None and torch.device(device).index is not None:
        raise ValueError(f"device: give 'cuda' or 'cpu' with data_parallel_size {n} (replica i runs on cuda:i), "
                         f"not {device!r}")
    if kind == "cpu":
        return ["cpu"] * n
    if kind != "cuda":
        raise ValueError(f"device: data-parallel replicas run on 'cuda' or 'cpu', not {device!r}")
    if torch.cuda.device_count() < n:
        raise ValueError(f"data_parallel_size {n} needs {n} GPUs; {torch.cuda.device_count()} visible")
    return [f"cuda:{i}" for i in range(n)]


def _replica_threads(n: int) -> int:
    """CPU threads of each of n replicas: the cores this process may use, shared out. (float32 images on CPU
    differ by +-1 in a few pixels with the thread count and the batch; float64 ones do not.)"""
    return max(1, len(os.sched_getaffinity(0)) // n)


def _await_ready(replicas: list[_Replica], store: dist.Store) -> None:
    """Wait until every replica has built its engine. A replica that fails to start stops the whole start-up:
    ValueError (bad configuration, e.g. an unknown model) or RuntimeError, naming the replica."""
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = list(replicas)
    while waiting:
        for replica in list(waiting):
            if store.check([f"ready{replica.index}"]):
                waiting.remove(replica)
            elif store.check([f"error{replica.index}"]):
                bad_input, message = pickle.loads(store.get(f"error{replica.index}"))
                raise (ValueError if bad_input else RuntimeError)(f"{replica.name} failed to start: {message}")
            elif (death := replica.death()) is not None:
                raise RuntimeError(f"{replica.name} failed to start: {death} (see its stderr)")
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"{waiting[0].name} did not start within {START_TIMEOUT_S:g} s")
        connection.wait([r.process.sentinel for r in waiting], START_POLL_S)


def _failed_output(request_id: str, routed: _Routed, error: str, kv_budget: float) -> ImageOutput:
    """A request lost with its replica: no image; its metrics are unknown (zeros) but the front end's latency."""
    metrics = ImageMetrics(latency_s=time.monotonic() - routed.arrival, queue_s=0.0, scales=0, peak_kv_pages=0,
                           mean_kv_pages=0.0, peak_kv_bytes=0, nominal_kv_bytes=0, kv_budget=kv_budget)
    return ImageOutput(request_id, routed.prompt, routed.seed, routed.size, None, metrics, finish_reason="failed",
                       error=error)


def _value(replica: _Replica, reply: tuple) -> Any:
    """The value of an 'ok' reply; an 'error' reply raises (ValueError stays ValueError)."""
    if reply[0] == "ok":
        return reply[1]
    _, kind, message, _ = reply
    raise (ValueError if kind == "ValueError" else RuntimeError)(
        message if kind == "ValueError" else f"{replica.name}: {kind}: {message}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


# ---- the replica process ----------------------------------------------------------------------------------
def _replica_main(index: int, n: int, port: int, config: dict, parent: int, log_level: int) -> None:
    """Entry point of replica `index` of `n`: build the engine, join the process group, serve commands."""
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s replica {index}: %(message)s")
    logger.setLevel(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front end's: it then stops the replicas
    torch.set_num_threads(_replica_threads(n))
    if config["device"].startswith("cuda"):
        torch.cuda.set_device(config["device"])
    store = dist.TCPStore(HOST, port, n + 1, is_master=False, timeout=timedelta(seconds=TRANSFER_TIMEOUT_S))
    mailbox = dist.PrefixStore(STORE_PREFIX, store)
    try:
        engine = Engine(**config)
    except Exception as exc:
        logger.exception("failed to start")
        mailbox.set(f"error{index}", pickle.dumps((isinstance(exc, ValueError), _one_line(exc))))
        sys.exit(1)
    mailbox.set(f"ready{index}", "1")
    dist.init_process_group("gloo", store=store, rank=index + 1, world_size=n + 1,
                            timeout=timedelta(seconds=TRANSFER_TIMEOUT_S))
    try:
        clean = _serve(engine, _Link(mailbox, 0, f"reply{index}", f"cmd{index}"), parent)
    except RuntimeError as exc:  # the store or a gloo connection closed: the front end is gone
        logger.warning("lost the front end (%s); exiting", _one_line(exc))
        clean = False
    if clean:
        dist.destroy_process_group()
    sys.exit(0 if clean else 1)


def _serve(engine: Engine, link: _Link, parent: int) -> bool:
    """Answer commands until 'shutdown' (True), a fatal error or the front end's exit (False)."""
    while True:
        while not link.wait(IDLE_WAIT_S):
            if os.getppid() != parent:
                logger.warning("the front end exited; exiting")
                return False
        command = link.recv()
        reply = _reply(engine, command)
        link.send(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        if reply[0] == "fatal" or command[0] == "shutdown":
            return reply[0] != "fatal"


def _reply(engine: Engine, command: tuple) -> tuple:
    try:
        value = _execute(engine, command)
    except Exception as exc:
        if command[0] in ("add", "call"):  # leaves the engine as it was: the caller gets the error
            return ("error", type(exc).__name__, str(exc), _load_report(engine))
        logger.exception("%r failed; this replica stops", command[0])
        return ("fatal", f"{type(exc).__name__}: {_one_line(exc)}")
    return ("ok", value, _load_report(engine))


def _execute(engine: Engine, command: tuple) -> Any:
    kind, *args = command
    if kind == "add":
        request_id, prompt, params, priority = args
        engine.add_request(prompt, params, request_id=request_id, priority=priority)
        return engine.scheduler.find(request_id).seed
    if kind == "step":
        return [_wire(out) for out in engine.step()]
    if kind == "abort":
        return engine.abort(args[0])
    if kind == "call":
        fn, fn_args = args
        return fn(engine, *fn_args)
    if kind in ("stats", "shutdown"):
        return None
    raise ValueError(f"unknown command {kind!r}")


def _wire(out: ImageOutput) -> tuple[ImageOutput, np.ndarray | None]:
    """An output as it crosses the process boundary: the image as a uint8 array."""
    pixels = None if out.image is None else np.asarray(out.image, dtype=np.uint8)
    return dataclasses.replace(out, image=None), pixels


def _load_report(engine: Engine) -> dict:
    queued = sum(int(r.held.max()) for r in engine.scheduler.waiting)
    return {**engine.cache_stats(), "queued_pages": queued}
