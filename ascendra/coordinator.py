"""The coordinator: worker processes, the ZeroMQ link to them, and the request table.

One ROUTER socket talks to every worker (each a DEALER whose identity is its id). Worker
output arrives as one ``StepOutput`` per iteration; ``_on_step`` turns it into text and
SSE bytes for each request and wakes that request's HTTP handler once per batch of
messages, so the handler writes everything that accumulated in one go.

A request lives in ``self.requests`` from dispatch until its worker reports it finished
(including the acknowledgement of an abort), so the router's view of each instance's
load stays true. What the client sees can end earlier: a matched stop string or a
disconnect ends the client side at once and aborts the worker side.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from ascendra import messages as m
from ascendra.detokenizer import DetokenizerFactory, StopChecker
from ascendra.metrics import ServerMetrics
from ascendra.migrator import MigrationResult, Migrator
from ascendra.perf_model import BatchShape
from ascendra.protocol import DONE, APIError, ChunkWriter, sse_error
from ascendra.policies import make_policy
from ascendra.router import InstanceSpec, Policy, RouteRequest, plan_instances

log = logging.getLogger("ascendra.coordinator")


@dataclass
class CoordinatorConfig:
    model_path: str
    model_name: str
    device: str = "cpu"  # "cpu", "cuda" (one worker per GPU) or "cuda:N"
    num_instances: int = 1
    policy: str = "vllm"
    num_hp: int | None = None
    escalate_started: bool = True  # ascendra: move started requests with their KV
    force_escalation_after: int | None = None  # ascendra: escalate every LP request (testing)
    ttft_slo: float = 1.0
    tbt_slo: float = 0.15
    max_waiting: int = 1024
    chunk_size: int = 512
    max_num_seqs: int = 128
    num_blocks: int | None = None
    block_size: int | None = None  # None: each worker picks by device and attention kernel
    gpu_memory_utilization: float = 0.9  # CUDA: of each device's total memory, split between its workers
    max_model_len: int | None = None
    fake_model: bool = False
    fake_step_time: float = 0.0
    seed: int = 0
    startup_timeout: float = 600.0
    shutdown_timeout: float = 10.0
    worker_args: list[str] = field(default_factory=list)  # extra flags passed through
    step_log: str | None = None  # a JSON line per worker step (shape, step time, clocks), for diagnosis


class RequestState:
    """One request as the coordinator serves it: detokenizer, stop matcher, client buffer."""

    __slots__ = (
        "request_id", "prompt_ids", "sampling", "arrival", "ttft_slo", "tbt_slo", "route",
        "detok", "stop", "min_tokens", "chunks", "include_usage", "buf", "texts",
        "waiter", "done", "client_done", "finish_reason", "error", "instance_id",
        "num_tokens", "first_token_time", "last_token_time", "dispatch_time",
    )

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: m.SamplingParams,
        arrival: float,
        ttft_slo: float | None,
        tbt_slo: float | None,
        detok: Any,
        stops: list[str],
        chunks: ChunkWriter | None,
        include_usage: bool = False,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.arrival = arrival
        self.ttft_slo = ttft_slo
        self.tbt_slo = tbt_slo
        self.detok = detok
        self.stop = StopChecker(stops) if stops else None
        self.min_tokens = sampling.min_tokens
        self.chunks = chunks  # None: non-streaming, collect text instead of SSE bytes
        self.include_usage = include_usage
        self.buf: list[bytes] = []
        self.texts: list[str] = []
        self.waiter: asyncio.Future | None = None
        self.done = False  # the client side has its final event
        self.client_done = False  # no more output goes to the client
        self.finish_reason: str | None = None
        self.error: APIError | None = None
        self.instance_id = -1
        self.num_tokens = 0
        self.first_token_time: float | None = None
        self.last_token_time = 0.0
        self.dispatch_time = 0.0

    # ---- handler side

    async def next_chunk(self) -> tuple[bytes, bool]:
        """Everything buffered for the client since the last call, and whether it was the last."""
        while not self.buf and not self.done:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        data = b"".join(self.buf)
        self.buf.clear()
        return data, self.done

    async def wait_done(self) -> None:
        while not self.done:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    # ---- coordinator side

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _push(self, text: str) -> None:
        if self.chunks is not None:
            self.buf.append(self.chunks.text(text))
            self._wake()
        else:
            self.texts.append(text)

    def _finish(self, reason: str, text: str) -> None:
        self.client_done = True
        self.finish_reason = reason
        if self.chunks is not None:
            self.buf.append(self.chunks.final(text, reason))
            if self.include_usage:
                self.buf.append(self.chunks.usage(len(self.prompt_ids), self.num_tokens))
            self.buf.append(DONE)
        else:
            self.texts.append(text)
        self.done = True
        self._wake()

    def _fail(self, err: APIError) -> None:
        self.client_done = True
        self.finish_reason = "error"
        self.error = err
        if self.chunks is not None:
            self.buf.append(sse_error(err.message, err.type, err.code))
            self.buf.append(DONE)
        self.done = True
        self._wake()


@dataclass
class WorkerHandle:
    spec: InstanceSpec
    device: str
    proc: asyncio.subprocess.Process | None = None
    register: m.Register | None = None
    alive: bool = False
    exit_code: int | None = None
    failure: str | None = None
    requests: set[str] = field(default_factory=set)
    registered: asyncio.Future | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def worker_id(self) -> int:
        return self.spec.instance_id

    @property
    def identity(self) -> bytes:
        return str(self.spec.instance_id).encode()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class StartupError(RuntimeError):
    pass


def cuda_device_count() -> int:
    """GPUs visible on this node; torch is imported only here, at startup."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def expand_devices(device: str, num_instances: int | None) -> list[str]:
    """Device string per instance: cpu for all, cuda -> cuda:0..N-1, cuda:K for one GPU."""
    if device == "cpu":
        return ["cpu"] * (num_instances or 1)
    if device == "cuda":
        n_gpu = cuda_device_count()
        if n_gpu == 0:
            raise StartupError("--device cuda but no GPU is visible")
        n = num_instances or n_gpu
        return [f"cuda:{i % n_gpu}" for i in range(n)]
    if device.startswith("cuda:"):
        return [device] * (num_instances or 1)
    raise StartupError(f"--device must be cpu, cuda or cuda:N, got {device!r}")


class Coordinator:
    def __init__(self, config: CoordinatorConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.detok_factory = DetokenizerFactory(tokenizer)
        self.metrics = ServerMetrics()
        devices = expand_devices(config.device, config.num_instances)
        self.specs = plan_instances(config.policy, len(devices), config.num_hp)
        self.policy: Policy = make_policy(config.policy, self.specs, escalate_started=config.escalate_started,
                                          force_escalation_after=config.force_escalation_after)
        self.workers = [WorkerHandle(spec, dev) for spec, dev in zip(self.specs, devices)]
        self.requests: dict[str, RequestState] = {}
        self.migrator = Migrator(self._send, allow_kv=config.escalate_started)
        self._frozen_since: dict[str, float] = {}  # escalated while decoding: frozen at, until its next token
        self.num_unstarted = 0  # admitted requests without a first token (the bounded queue)
        self.model_info: m.ModelInfo | None = None
        self.accepting = False
        self.shutting_down = False
        self.startup_done = False
        self._step_log = None
        if config.step_log:
            try:  # unbuffered: a line per step is cheap next to the step, and readers see it at once
                self._step_log = open(config.step_log, "ab", buffering=0)
            except OSError as e:
                raise StartupError(f"cannot open --step-log {config.step_log}: {e.strerror}") from e
        _remove_stale_dirs()
        self._tmpdir = tempfile.mkdtemp(prefix=f"ascendra-coord-{os.getpid()}-")
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a dead worker raises
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        ipc_path = os.path.join(self._tmpdir, "coordinator.sock")
        if len(ipc_path) < 100:  # Unix socket paths are limited to ~107 bytes
            self.address = f"ipc://{ipc_path}"
            self._sock.bind(self.address)
        else:
            port = self._sock.bind_to_random_port("tcp://127.0.0.1")
            self.address = f"tcp://127.0.0.1:{port}"
        self._bound: dict[bytes, int] = {}  # ZeroMQ identity -> the worker that registered with it
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ startup

    def _worker_cmd(self, w: WorkerHandle) -> list[str]:
        c = self.config
        cmd = [
            sys.executable, "-m", "workers",
            "--coordinator", self.address,
            "--worker-id", str(w.worker_id),
            "--device", w.device,
            "--role", w.spec.role,
            "--policy", w.spec.policy,
            "--model", c.model_path,
            "--model-name", c.model_name,
            "--block-size", str(c.block_size or "auto"),
            "--chunk-size", str(c.chunk_size),
            "--max-num-seqs", str(c.max_num_seqs),
            "--parent-pid", str(os.getpid()),
            "--seed", str(c.seed),
        ]
        if w.device == "cpu" and not c.fake_model:
            # Split the cores between CPU workers instead of letting each torch take all of them.
            cmd += ["--threads", str(max(1, (os.cpu_count() or 1) // len(self.workers)))]
        if w.device.startswith("cuda"):
            share = sum(o.device == w.device for o in self.workers)
            cmd += ["--gpu-memory-utilization", str(c.gpu_memory_utilization), "--device-share", str(share),
                    "--num-peers", str(len(self.workers) - 1)]
        if c.num_blocks is not None:
            cmd += ["--num-blocks", str(c.num_blocks)]
        if c.max_model_len is not None:
            cmd += ["--max-model-len", str(c.max_model_len)]
        if c.fake_model:
            cmd.append("--fake-model")
            if c.fake_step_time:
                cmd += ["--fake-step-time", str(c.fake_step_time)]
        return cmd + list(c.worker_args)

    async def start(self) -> None:
        """Spawn the workers and wait until every one has registered."""
        loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._recv_loop(), name="zmq-recv"))
        for w in self.workers:
            w.registered = loop.create_future()
            # Own session: a terminal's Ctrl-C reaches only us, and we shut workers down in order.
            w.proc = await asyncio.create_subprocess_exec(*self._worker_cmd(w), start_new_session=True)
            log.info("started worker %d (pid %d, %s, role %s, policy %s)", w.worker_id, w.proc.pid,
                     w.device, w.spec.role, w.spec.policy)
            self._tasks.append(asyncio.create_task(self._watch(w), name=f"watch-{w.worker_id}"))
        pending = [w.registered for w in self.workers if w.registered is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*pending), timeout=self.config.startup_timeout)
        except asyncio.TimeoutError:
            missing = [w.worker_id for w in self.workers if not w.alive]
            raise StartupError(f"workers {missing} did not register within {self.config.startup_timeout:.0f}s") from None
        finally:
            self.startup_done = True
            for f in pending:  # mark failures seen, so asyncio does not warn about them later
                if f.done() and not f.cancelled():
                    f.exception()
        self.accepting = True
        self._close_listener()
        info = self.model_info
        assert info is not None
        log.info("all %d workers registered; model %s, max_model_len %d", len(self.workers), info.name,
                 info.max_model_len)

    def _close_listener(self) -> None:
        """Every worker is connected: remove the socket's path so nothing else can connect,
        and so that even a SIGKILLed coordinator leaves nothing in the temp directory.
        (Established connections do not need the path.)"""
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _watch(self, w: WorkerHandle) -> None:
        assert w.proc is not None
        code = await w.proc.wait()
        w.exit_code = code
        w.exited.set()
        self._cleanup_shm(w)
        if w.registered is not None and not w.registered.done() and not self.startup_done:
            w.registered.set_exception(StartupError(f"worker {w.worker_id} exited with code {code} before registering"))
        if not self.shutting_down or w.requests:
            self._worker_down(w, f"worker {w.worker_id} (pid {w.pid}) exited with code {code}")

    def _cleanup_shm(self, w: WorkerHandle) -> None:
        """Workers unlink their own segments; this catches ones a crash or SIGKILL left behind."""
        if w.pid is None:
            return
        for path in glob.glob(f"/dev/shm/ascendra_{w.pid}_*"):
            try:
                os.unlink(path)
                log.warning("removed shared-memory segment %s left by worker %d", path, w.worker_id)
            except OSError:
                pass

    # ------------------------------------------------------------ worker messages

    async def _recv_loop(self) -> None:
        sock = self._sock
        decode = m.worker_decoder.decode
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except zmq.ZMQError as e:
                if e.errno == zmq.ENOTSOCK:
                    return
                raise
            now = time.monotonic()
            batch = [frames]
            # Drain whatever else is queued so that handlers wake once per batch.
            while len(batch) < 512:
                try:
                    batch.append(sock.recv_multipart(flags=zmq.NOBLOCK, copy=False).result())
                except zmq.Again:
                    break
            bound = self._bound
            dropped = self.metrics.worker_messages_dropped
            for frames in batch:
                identity = frames[0].bytes
                try:
                    msg = decode(frames[-1].buffer)
                except msgspec.DecodeError as e:
                    dropped.inc(1, "undecodable")
                    log.warning("dropped an undecodable message from identity %r: %s", identity[:32], e)
                    continue
                # Trust the socket, not the message: an identity is bound to one worker at its
                # registration, and a message naming any other worker is dropped.
                wid = bound.get(identity)
                if wid is None and type(msg) is not m.Register:
                    dropped.inc(1, "unknown_identity")
                    log.warning("dropped %s from unregistered identity %r", type(msg).__name__, identity[:32])
                    continue
                if wid is not None and msg.worker_id != wid:
                    dropped.inc(1, "wrong_worker")
                    log.warning("dropped %s claiming worker %r from worker %d", type(msg).__name__, msg.worker_id, wid)
                    continue
                try:
                    if type(msg) is m.StepOutput:
                        self._on_step(msg, now)
                    elif type(msg) is m.Register:
                        self._on_register(msg, identity)
                    elif type(msg) is m.WorkerFailed:
                        self._on_failed(msg)
                except Exception:
                    log.exception("error handling %s", type(msg).__name__)

    def _on_register(self, msg: m.Register, identity: bytes) -> None:
        """Bind the sender's identity to the worker we spawned, once; refuse anything else."""
        w = self.workers[msg.worker_id] if 0 <= msg.worker_id < len(self.workers) else None
        if (w is None or w.register is not None or identity != w.identity or msg.pid != w.pid
                or identity in self._bound):
            self.metrics.worker_messages_dropped.inc(1, "unknown_identity" if w is None else "wrong_worker")
            log.warning("dropped a registration for worker %r (pid %r) from identity %r", msg.worker_id, msg.pid,
                        identity[:32])
            return
        self._bound[identity] = w.worker_id
        w.register = msg
        w.alive = True
        self.policy.set_alive(w.worker_id, True)
        self.metrics.worker_up.set(1, str(w.worker_id), w.spec.role)
        self.metrics.kv_usage.set(0.0, str(w.worker_id))
        self.metrics.running.set(0, str(w.worker_id))
        self.metrics.waiting.set(0, str(w.worker_id))
        if self.model_info is None:
            self.model_info = msg.model
        self.policy.configure_instance(w.worker_id, list(msg.perf_model), msg.chunk_size, msg.max_num_seqs,
                                       msg.block_size)
        log.info("worker %d registered: pid %d, %d blocks of %d tokens, pool %s", w.worker_id, msg.pid,
                 msg.num_blocks, msg.block_size, msg.pool.kind)
        if w.registered is not None and not w.registered.done():
            w.registered.set_result(None)

    def _on_failed(self, msg: m.WorkerFailed) -> None:
        if 0 <= msg.worker_id < len(self.workers):
            w = self.workers[msg.worker_id]
            w.failure = msg.message
            log.error("worker %d failed: %s", msg.worker_id, msg.message)
            self._worker_down(w, f"worker {msg.worker_id} failed: {msg.message}")

    def _worker_down(self, w: WorkerHandle, reason: str) -> None:
        """Fail the worker's requests and stop routing to it; the others keep serving."""
        if w.alive:
            log.error("%s; failing %d in-flight request(s)", reason, len(w.requests))
        w.alive = False
        self.policy.set_alive(w.worker_id, False)
        label = str(w.worker_id)
        mt = self.metrics
        mt.worker_up.set(0, label, w.spec.role)
        # A dead worker holds nothing: its last step's gauges must not linger.
        for gauge in (mt.kv_usage, mt.running, mt.waiting, mt.preempted):
            gauge.set(0, label)
        err = APIError(reason, status=503, type="service_unavailable_error", code=503)
        for rid in list(w.requests):
            st = self.requests.pop(rid, None)
            if st is None:
                continue
            self._release(st)
            if not st.client_done:
                self._record_end(st, "error", time.monotonic())
                st._fail(err)
        w.requests.clear()
        for res in self.migrator.on_worker_down(w.worker_id):
            self._migration_ended(res, time.monotonic())

    def _log_step(self, step: m.StepOutput, now: float) -> None:
        try:
            self._step_log.write(_STEP_LOG_ENCODER.encode(
                {"worker": step.worker_id, "prefill": step.num_prefill_tokens, "pairs": step.prefill_attention_pairs,
                 "decode": step.num_decode_tokens, "decode_context": step.decode_context_tokens,
                 "step_time": step.step_time, "end": step.time, "received": now,
                 "running": step.num_running, "waiting": step.num_waiting}) + b"\n")
        except OSError as e:  # a full disk must not stop tokens reaching clients
            log.error("step log disabled: %s", e)
            self._step_log.close()
            self._step_log = None

    def _on_step(self, step: m.StepOutput, now: float) -> None:
        wid = step.worker_id
        if self._step_log is not None and step.num_seqs:
            self._log_step(step, now)
        label = str(wid)
        mt = self.metrics
        mt.running.values[(label,)] = step.num_running
        mt.waiting.values[(label,)] = step.num_waiting
        mt.preempted.values[(label,)] = step.num_preempted
        mt.kv_usage.values[(label,)] = (1.0 - step.free_blocks / step.total_blocks) if step.total_blocks else 0.0
        perf = self.policy.step_time_model(wid)
        if perf is not None and step.num_seqs and step.step_time > 0 and perf.fitted:
            shape = BatchShape(step.num_prefill_tokens, step.prefill_attention_pairs, step.num_decode_tokens,
                               step.decode_context_tokens)
            mt.step_time_error.observe(abs(perf.predict(shape) - step.step_time) / step.step_time)
        for esc in self.policy.on_step(wid, step):
            if esc.request_id in self.requests and self.migrator.start(esc, now) is not None:
                log.info("escalating %s from instance %d to %d (%s)", esc.request_id, esc.src, esc.dst, esc.reason)
            else:
                self.policy.on_migration_failed(esc.request_id, now)
        on_tokens = self.policy.on_tokens
        frozen = self._frozen_since
        requests = self.requests
        itl = mt.itl
        gen_tokens = 0
        for out in step.outputs:
            st = requests.get(out.request_id)
            if st is None:
                continue
            ids = out.new_token_ids
            if ids:
                n = len(ids)
                gen_tokens += n
                st.num_tokens += n
                if st.first_token_time is None:
                    st.first_token_time = now
                    self.num_unstarted -= 1
                    self.policy.on_first_token(st.request_id)
                    mt.ttft.observe(now - st.arrival)
                    mt.prompt_tokens.inc(len(st.prompt_ids))
                    if n > 1:
                        itl.observe_many(0.0, n - 1)
                else:
                    itl.observe(now - st.last_token_time)
                    if n > 1:
                        itl.observe_many(0.0, n - 1)
                st.last_token_time = now
                on_tokens(st.request_id, n, now)
                if frozen and st.request_id in frozen:
                    mt.migration_downtime.observe(now - frozen.pop(st.request_id))
                text = st.detok.feed(ids) if not st.client_done else ""
            else:
                text = ""
            if out.finish_reason is None:
                if text:
                    self._emit(st, text, now)
            else:
                requests.pop(out.request_id, None)
                self._release(st)
                if not st.client_done:
                    self._end_from_worker(st, out, text, now)
        if gen_tokens:
            mt.generation_tokens.values[()] = mt.generation_tokens.values.get((), 0.0) + gen_tokens
        for up in step.migrations:
            res = self.migrator.on_update(wid, up, now)
            if res is not None:
                self._migration_ended(res, now)

    # ------------------------------------------------------------ escalation

    def _migration_ended(self, res: MigrationResult, now: float) -> None:
        mig = res.migration
        rid = mig.request_id
        st = self.requests.get(rid)
        if not mig.ok:
            self.policy.on_migration_failed(rid, now)
            self.metrics.escalations_failed.inc(1, mig.error.split(":")[0][:40] or "failed")
            log.info("escalation of %s abandoned: %s", rid, mig.error)
            return
        if st is None:  # ended meanwhile: make sure the destination holds nothing for it
            if mig.kind == "kv":
                self._send(mig.dst, m.AbortRequests([rid]))
            return
        if res.moved_state is not None:
            s0 = res.moved_state
            add = m.AddRequest(rid, s0.prompt_token_ids, s0.sampling, s0.arrival_time, s0.ttft_slo, s0.tbt_slo,
                               output_token_ids=s0.output_token_ids, first_token_time=s0.first_token_time)
            if not self._send(mig.dst, add):
                self.policy.on_migration_failed(rid, now)
                self._worker_down_request(st, f"instance {mig.dst} is gone")
                return
            stage = "waiting"
        else:
            stage = "decode" if mig.tokens_at_freeze > 0 else "prefill"
        self.workers[mig.src].requests.discard(rid)
        self.workers[mig.dst].requests.add(rid)
        st.instance_id = mig.dst
        self.policy.on_migrated(rid, mig.dst, now)
        mt = self.metrics
        mt.escalations.inc(1, stage)
        if mig.blocks_copied:
            mt.migrated_blocks.inc(mig.blocks_copied)
            src = self.workers[mig.src].register
            mt.migrated_bytes.inc(mig.blocks_copied * (src.bytes_per_block if src else 0))
        if mig.frozen_at is not None:
            if stage == "decode":
                self._frozen_since[rid] = mig.frozen_at
            else:
                mt.migration_downtime.observe(now - mig.frozen_at)
        log.info("escalated %s (%s) to instance %d: %d blocks, frozen %.1f ms", rid, stage, mig.dst,
                 mig.blocks_copied, (now - mig.frozen_at) * 1e3 if mig.frozen_at else 0.0)

    def _worker_down_request(self, st: RequestState, reason: str) -> None:
        self.requests.pop(st.request_id, None)
        self._release(st)
        if not st.client_done:
            self._record_end(st, "error", time.monotonic())
            st._fail(APIError(reason, status=503, type="service_unavailable_error", code=503))

    def _abort_on_workers(self, st: RequestState) -> None:
        """Abort on the request's worker, and on both ends of a migration in flight."""
        targets = {st.instance_id}
        mig = self.migrator.drop(st.request_id)
        if mig is not None:
            targets |= {mig.src, mig.dst}
            self.policy.on_migration_failed(st.request_id, time.monotonic())
        self._frozen_since.pop(st.request_id, None)
        for wid in targets:
            self._send(wid, m.AbortRequests([st.request_id]))

    def _emit(self, st: RequestState, text: str, now: float) -> None:
        """Pass new text through the stop matcher to the client; a match ends the request."""
        if st.stop is not None and st.num_tokens >= st.min_tokens:
            text, matched = st.stop.feed(text)
            if matched:
                self._record_end(st, "stop", now)
                st._finish("stop", text)
                self._abort_on_workers(st)
                return
        if text:
            st._push(text)

    def _end_from_worker(self, st: RequestState, out: m.RequestOutput, text: str, now: float) -> None:
        reason = out.finish_reason
        if reason in ("stop", "length"):
            text += st.detok.flush()
            if st.stop is not None and st.num_tokens >= st.min_tokens:
                text, matched = st.stop.feed(text)
                if matched:
                    reason = "stop"
                else:
                    text += st.stop.flush()
            self._record_end(st, reason, now)
            st._finish(reason, text)
        elif reason == "abort":
            self._record_end(st, "abort", now)
            st._finish("abort", text)
        else:
            # The worker's text may carry an exception repr: it goes to the log, not to the client.
            log.warning("worker %d failed request %s: %s", st.instance_id, st.request_id, out.error)
            self._record_end(st, "error", now)
            st._fail(APIError(f"The worker failed while serving request {st.request_id}; the server log has the "
                              "details.", status=500, type="internal_server_error", code=500))

    def _release(self, st: RequestState) -> None:
        """Forget a request on the worker side (it holds no blocks any more)."""
        if st.first_token_time is None:
            self.num_unstarted -= 1
        self.policy.on_finish(st.request_id)
        if 0 <= st.instance_id < len(self.workers):
            self.workers[st.instance_id].requests.discard(st.request_id)

    def _record_end(self, st: RequestState, reason: str, now: float) -> None:
        mt = self.metrics
        mt.success.inc(1, reason)
        if reason == "abort":
            return
        if reason == "error":
            mt.slo.inc(1, "failed")
            return
        mt.e2e.observe(now - st.arrival)
        ttft = (st.first_token_time if st.first_token_time is not None else now) - st.arrival
        tbt = 0.0
        if st.num_tokens > 1 and st.first_token_time is not None:
            tbt = (st.last_token_time - st.first_token_time) / (st.num_tokens - 1)
            mt.mean_tbt.observe(tbt)
        if st.ttft_slo is not None and ttft > st.ttft_slo:
            mt.slo.inc(1, "missed_ttft")
        elif st.tbt_slo is not None and tbt > st.tbt_slo:
            mt.slo.inc(1, "missed_tbt")
        else:
            mt.slo.inc(1, "met")

    # ------------------------------------------------------------ requests

    def new_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: m.SamplingParams,
        arrival: float,
        stops: list[str],
        chunks: ChunkWriter | None,
        include_usage: bool = False,
        ttft_slo: float | None = None,
        tbt_slo: float | None = None,
    ) -> RequestState:
        return RequestState(
            request_id, prompt_ids, sampling, arrival,
            ttft_slo if ttft_slo is not None else self.config.ttft_slo,
            tbt_slo if tbt_slo is not None else self.config.tbt_slo,
            self.detok_factory.new(prompt_ids), stops, chunks, include_usage,
        )

    def submit(self, st: RequestState) -> None:
        """Route and dispatch, or raise APIError (429 queue full, 503 no worker / shutting down)."""
        if not self.accepting:
            self.metrics.rejected.inc(1, "no_worker")
            raise APIError("The server is shutting down.", status=503, type="service_unavailable_error", code=503)
        if self.num_unstarted >= self.config.max_waiting:
            self.metrics.rejected.inc(1, "queue_full")
            raise APIError(
                f"Too many requests waiting ({self.num_unstarted} >= --max-waiting {self.config.max_waiting}); retry later.",
                status=429, type="rate_limit_error", code=429,
            )
        route = RouteRequest(st.request_id, len(st.prompt_ids), st.sampling.max_tokens, st.arrival, st.ttft_slo, st.tbt_slo)
        wid = self.policy.route(route)
        if wid is None:
            self.metrics.rejected.inc(1, "no_worker")
            raise APIError("No live worker can take the request.", status=503, type="service_unavailable_error", code=503)
        msg = m.AddRequest(
            request_id=st.request_id,
            prompt_token_ids=st.prompt_ids,
            sampling=st.sampling,
            arrival_time=st.arrival,
            ttft_slo=st.ttft_slo,
            tbt_slo=st.tbt_slo,
        )
        if not self._send(wid, msg):
            raise APIError("The chosen worker is gone; retry.", status=503, type="service_unavailable_error", code=503)
        st.instance_id = wid
        st.dispatch_time = time.monotonic()
        self.metrics.queue.observe(st.dispatch_time - st.arrival)
        self.requests[st.request_id] = st
        self.workers[wid].requests.add(st.request_id)
        self.policy.on_dispatch(wid, route)
        self.num_unstarted += 1

    def abort(self, st: RequestState, reason: str = "client disconnected") -> None:
        """The client went away: end its side and free the request's blocks on the worker."""
        if st.client_done:
            return
        self._record_end(st, "abort", time.monotonic())
        st.client_done = True
        st.finish_reason = "abort"
        st.done = True
        if st.request_id in self.requests:
            self._abort_on_workers(st)
        log.debug("aborted %s: %s", st.request_id, reason)

    def _send(self, wid: int, msg: msgspec.Struct) -> bool:
        w = self.workers[wid]
        if not w.alive and not isinstance(msg, m.Shutdown):
            return False
        try:
            self._sock.send_multipart([w.identity, m.encode(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            log.warning("cannot send %s to worker %d: %s", type(msg).__name__, wid, e)
            return False

    # ------------------------------------------------------------ status

    @property
    def kv_capacity_tokens(self) -> int | None:
        """Tokens the smallest live worker's KV pool can hold (None before registration)."""
        caps = [w.register.num_blocks * w.register.block_size for w in self.workers
                if w.register is not None and w.alive]
        return min(caps) if caps else None

    @property
    def healthy(self) -> bool:
        return all(w.alive for w in self.workers)

    def health(self) -> dict[str, Any]:
        """What a client or load balancer needs; pids and failure texts stay in the log and /metrics."""
        return {
            "status": "ok" if self.healthy else "degraded",
            "requests_inflight": len(self.requests),
            "requests_waiting": self.num_unstarted,
            "workers": [
                {"id": w.worker_id, "role": w.spec.role, "alive": w.alive, "num_requests": len(w.requests)}
                for w in self.workers
            ],
        }

    def render_metrics(self) -> str:
        mt = self.metrics
        mt.inflight.set(len(self.requests))
        mt.unstarted.set(self.num_unstarted)
        mt.process_cpu.values[()] = time.process_time()
        return mt.render()

    # ------------------------------------------------------------ shutdown

    async def drain(self, timeout: float) -> None:
        """Stop admitting; give in-flight requests up to ``timeout`` seconds, then end them."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while any(not st.client_done for st in self.requests.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        err = APIError("The server is shutting down.", status=503, type="service_unavailable_error", code=503)
        for st in list(self.requests.values()):
            if not st.client_done:
                self._record_end(st, "abort", time.monotonic())
                st._fail(err)
            self._abort_on_workers(st)

    async def shutdown(self) -> None:
        """Send Shutdown, wait for the workers, kill stragglers, remove what we created."""
        self.shutting_down = True
        self.accepting = False
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                self._send(w.worker_id, m.Shutdown())
        procs = [w for w in self.workers if w.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(w.exited.wait() for w in procs)), self.config.shutdown_timeout)
        except asyncio.TimeoutError:
            pass
        for w in procs:
            if w.proc is not None and w.proc.returncode is None:
                log.warning("worker %d did not exit; terminating", w.worker_id)
                _signal(w.proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(w.exited.wait() for w in procs)), 3.0)
        except asyncio.TimeoutError:
            for w in procs:
                if w.proc is not None and w.proc.returncode is None:
                    log.warning("worker %d still alive; killing", w.worker_id)
                    _signal(w.proc, signal.SIGKILL)
            await asyncio.gather(*(w.exited.wait() for w in procs))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in procs:
            self._cleanup_shm(w)
        self._sock.close(linger=0)
        self._ctx.term()
        if self._step_log is not None:
            self._step_log.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)


_STEP_LOG_ENCODER = msgspec.json.Encoder()


def _remove_stale_dirs() -> None:
    """Remove socket directories of coordinators that died during startup (SIGKILL)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "ascendra-coord-*-*")):
        try:
            pid = int(os.path.basename(path).split("-")[2])
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, OSError):
            continue


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
