"""The worker process: one engine behind a ZeroMQ DEALER socket.

Registers with the coordinator (model facts, pool handle, block counts), then loops:
drain messages, run one iteration while there is work, send one StepOutput per iteration.
Blocks on the socket when idle. Exits when told to, or when its coordinator goes away.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time

import msgspec
import torch
import zmq

from ascendra.messages import (
    AbortRequests,
    AddRequest,
    MigrateCancel,
    MigrateCommit,
    MigrateFreeze,
    MigrateIn,
    MigrateOut,
    MigrateRelease,
    MigrationUpdate,
    PoolHandle,
    Register,
    RequestOutput,
    Shutdown,
    StepOutput,
    WorkerFailed,
    coordinator_decoder,
    encode,
)
from ascendra.config import add_flags
from ascendra.config import decode as decode_config
from ascendra.perf_model import BatchShape, PerfModel
from .device import is_fatal_device_error, keep_allocations_in_heap, set_device
from .engine import Engine, EngineConfig, StepResult
from .kv_pool import MAX_COPY_BYTES, PeerPool
from .migration import Migrations

log = logging.getLogger("ascendra.worker")

IDLE_POLL_MS = 500  # how often an idle worker checks that its coordinator still exists


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers", description="Ascendra worker: one per GPU (or CPU instance).")
    p.add_argument("--coordinator", required=True, help="ZeroMQ address of the coordinator's ROUTER socket")
    p.add_argument("--worker-id", type=int, required=True, help="this worker's id; also its ZeroMQ identity")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--role", default="mixed", choices=["mixed", "lp", "hp"], help="instance role")
    p.add_argument("--policy", default="sarathi", choices=["vllm", "sarathi", "lp", "hp"], help="local batch policy")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="the coordinator's ServingConfig (ascendra.config), encoded; it supplies the defaults "
                        "of the settings below, and flags given after it override them")
    p.add_argument("--model", default=None, help="local model directory (resolved by the coordinator)")
    p.add_argument("--model-name", default=None, help="name to report (default: the directory name)")
    p.add_argument("--kv-fraction", type=float, default=None,
                   help="CPU: size the pool as this fraction of RAM (default 0.05)")
    p.add_argument("--device-share", type=int, default=1,
                   help="CUDA: how many workers share this device (each gets 1/N of the utilization)")
    p.add_argument("--num-peers", type=int, default=0,
                   help="CUDA: other workers that may map this pool during migration (room is kept for "
                        "their CUDA contexts and copy buffers on this device)")
    p.add_argument("--block-size", default="auto",
                   help="tokens per KV block, or auto: 256 on CUDA with fp16/bf16 when flash-attn's paged "
                        "kernel is installed (it needs pages of a multiple of 256), else 16")
    add_flags(p, _SERVING_FLAGS, help={
        "num_blocks": "KV blocks in the pool (overrides --kv-fraction)",
        "gpu_memory_utilization": "CUDA: fraction of the device's total memory that the workers sharing it use "
                                  "together (weights, activations and KV pool), split evenly between them",
        "chunk_size": "token budget per iteration (sarathi, lp, hp)",
        "max_num_seqs": "most requests in one batch",
        "max_seats": "lp/hp with a step-time model: seats sized to the TBT objectives held, up to this many",
        "max_chunk": "lp/hp with a step-time model: a step's prefill budget sized to the decodes' pace, up to this",
        "max_model_len": "cap on prompt + output tokens",
        "fake_model": "emit tokens without running the model",
        "fake_step_time": "seconds each fake iteration sleeps",
        "seed": "torch seed for unseeded sampling",
    })
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone (default: parent)")
    p.add_argument("--profile", default="auto", choices=["auto", "off"],
                   help="fit the step-time model on this device at start (auto: reuse the cached fit if any)")
    p.add_argument("--scatter-blocks", type=int, default=None, help="shuffle the free block list with this seed")
    # Test-only fault injection: request ids, comma separated ("*": any). Environment defaults
    # let a test reach workers that a server starts.
    p.add_argument("--fail-sampling", default=os.environ.get("ASCENDRA_TEST_FAIL_SAMPLING", ""),
                   help=argparse.SUPPRESS)
    p.add_argument("--fail-fatal", default=os.environ.get("ASCENDRA_TEST_FAIL_FATAL", ""), help=argparse.SUPPRESS)
    first, _ = p.parse_known_args(argv)
    if first.config is not None:
        try:
            cfg = decode_config(first.config)
        except Exception as e:  # noqa: BLE001 - any decoding problem is a usage error
            p.error(f"--config: {e}")
        p.set_defaults(model=cfg.model_path or None, model_name=cfg.model_name or None,
                       block_size=str(cfg.block_size or "auto"),
                       **{name: getattr(cfg, name) for name in _SERVING_FLAGS})
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or --config with a model_path) is required")
    return args


# The settings a worker takes from the coordinator's ServingConfig.
_SERVING_FLAGS = ["num_blocks", "gpu_memory_utilization", "chunk_size", "max_num_seqs", "max_seats", "max_chunk",
                  "max_model_len", "fake_model", "fake_step_time", "seed", "dtype"]


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent dies; polling the parent pid backs this up."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_engine(args: argparse.Namespace) -> Engine:
    device = torch.device(args.device)
    set_device(device)  # before any CUDA allocation: kernels, events and IPC land on this GPU
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    if args.fake_model:
        from .fake_runner import FakeRunner

        runner = FakeRunner(args.model, name, args.max_model_len, args.fake_step_time)
    else:
        from .model_runner import ModelRunner

        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        runner = ModelRunner(args.model, name, device, dtype, args.max_model_len)
    block_size = resolve_block_size(args.block_size, runner, device)
    num_blocks = args.num_blocks or _blocks_from_fraction(runner, args, device, block_size)
    engine = Engine(
        runner,
        EngineConfig(
            num_blocks=num_blocks,
            block_size=block_size,
            policy=args.policy,
            chunk_size=args.chunk_size,
            max_num_seqs=args.max_num_seqs,
            max_seats=args.max_seats,
            max_chunk=args.max_chunk,
            max_model_len=args.max_model_len,
            scatter_seed=args.scatter_blocks,
            share_pool=not args.fake_model,
        ),
    )
    engine.sampler.fail_request_ids = {r for r in args.fail_sampling.split(",") if r}
    engine.fatal_request_ids = {r for r in args.fail_fatal.split(",") if r}
    return engine


def resolve_block_size(value: str | int, runner, device: torch.device) -> int:
    if str(value) != "auto":
        return int(value)
    from .attention import default_block_size

    return default_block_size(device.type, getattr(runner, "dtype", torch.float32))


# A process's CUDA context and allocator slack, which torch's counters do not see.
CUDA_CONTEXT_BYTES = 512 << 20


def gpu_pool_bytes(total: int, utilization: float, share: int, own_bytes: int, num_peers: int,
                   copy_bytes: int = MAX_COPY_BYTES, context_bytes: int = CUDA_CONTEXT_BYTES) -> int:
    """KV pool bytes for one of ``share`` workers on a device of ``total`` bytes.

    vLLM's convention: the workers on a device together use ``utilization`` of its total
    memory. Each worker's share is fixed up front, from totals and its own usage only, so
    workers starting at the same time cannot race for what another has not yet taken.
    From the share come off this process's own use (weights, activation peak, its CUDA
    context) and room for each peer that may map this pool during a migration: the peer's
    CUDA context on this device and its bounded copy buffer (a consumer gathers blocks on
    the producer's GPU).
    """
    budget = total * utilization / max(1, share)
    reserve = num_peers * (context_bytes + copy_bytes)
    return max(0, int(budget - own_bytes - context_bytes - reserve))


def _blocks_from_fraction(runner, args: argparse.Namespace, device: torch.device, block_size: int) -> int:
    if args.fake_model:
        return 4096
    per_block = runner.kv_bytes_per_token() * block_size
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        runner.warm_up(block_size, args.chunk_size)  # activation peak of the largest step, before the pool exists
        own = torch.cuda.max_memory_reserved(device)
        budget = gpu_pool_bytes(total, args.gpu_memory_utilization, args.device_share, own, args.num_peers)
        if budget < per_block:
            raise RuntimeError(
                f"no GPU memory left for the KV pool on {device}: {args.gpu_memory_utilization} of "
                f"{total / 2**30:.1f} GiB split between {args.device_share} worker(s) is "
                f"{total * args.gpu_memory_utilization / args.device_share / 2**30:.1f} GiB, and this worker "
                f"already uses {own / 2**30:.1f} GiB; raise --gpu-memory-utilization or start fewer instances")
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = total * (args.kv_fraction or 0.05)
    return max(1, int(budget // per_block))


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.worker_id = args.worker_id
        self.parent_pid = args.parent_pid or os.getppid()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, str(args.worker_id).encode())
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(args.coordinator)
        self.engine: Engine | None = None
        self.peers: dict[str, PeerPool] = {}
        self.pending: list[RequestOutput] = []  # rejections and abort acks for the next message
        self.pending_migrations: list[MigrationUpdate] = []
        self.migrations: Migrations | None = None
        self.step_id = 0
        self.running = True
        self.perf_coef: list[float] = []
        self.perf: PerfModel | None = None  # refined from this worker's own steps
        self.decode_context_mean = 0.0  # of the last step with decodes, for scheduler_step_time

    # ---- peer pools (escalation copies KV blocks straight out of another worker's pool)
    def peer_pool(self, handle: PoolHandle) -> PeerPool:
        ipc = handle.cuda
        key = f"{handle.kind}:{handle.name}:{ipc.storage_handle.hex() if ipc else ''}"
        peer = self.peers.get(key)
        if peer is None:
            peer = self.peers[key] = PeerPool(handle, torch.device(self.args.device))
        return peer


    # ---- main loop
    def run(self) -> int:
        try:
            self.engine = build_engine(self.args)
            self.migrations = Migrations(self.engine, self.worker_id)
            self.perf_coef = self._profile()
            self._use_perf_model()
        except Exception as exc:
            log.exception("worker %d failed to start", self.worker_id)
            self._send(WorkerFailed(self.worker_id, f"failed to start: {type(exc).__name__}: {exc}"))
            return 1
        self._send(self._registration())
        last_check = time.monotonic()
        try:
            while self.running:
                busy = self.engine.has_work()
                if self.sock.poll(0 if busy else IDLE_POLL_MS):
                    self._drain()
                now = time.monotonic()
                if now - last_check > IDLE_POLL_MS / 1000:
                    last_check = now
                    if not _alive(self.parent_pid):
                        log.warning("coordinator %d is gone; worker %d exits", self.parent_pid, self.worker_id)
                        return 0
                if not self.running:
                    break
                if self.pending_migrations:
                    self._send_step(None)  # answer migrations now: the request is waiting on them
                if self.engine.has_work():
                    self._send_step(self.engine.step())
                elif self.pending:
                    self._send_step(None)
        except Exception as exc:
            log.exception("worker %d crashed", self.worker_id)
            what = "fatal device error" if is_fatal_device_error(exc) else "worker crashed"
            self._send(WorkerFailed(self.worker_id, f"{what}: {exc}"))
            return 1
        finally:
            self.close()
        return 0

    def _drain(self) -> None:
        assert self.engine is not None
        while True:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = coordinator_decoder.decode(raw)
            except msgspec.DecodeError as exc:
                log.error("undecodable message dropped: %s", exc)
                continue
            if isinstance(msg, AddRequest):
                rejected = self.engine.add_request(msg)
                if rejected is not None:
                    self.pending.append(rejected)
            elif isinstance(msg, AbortRequests):
                for rid in msg.request_ids:
                    ack = self.engine.abort(rid)
                    if self.migrations.abort(rid) and ack is None:
                        ack = RequestOutput(rid, finish_reason="abort")
                    if ack is not None:
                        self.pending.append(ack)
            elif isinstance(msg, Shutdown):
                self.running = False
                return
            else:
                self.pending_migrations.append(self._migrate(msg))

    def _migrate(self, msg) -> MigrationUpdate:
        m = self.migrations
        assert m is not None
        try:
            if isinstance(msg, MigrateOut):
                return m.migrate_out(msg.request_id)
            if isinstance(msg, MigrateIn):
                return m.migrate_in(msg.request_id, msg.source, self.peer_pool(msg.source.pool).tensor)
            if isinstance(msg, MigrateFreeze):
                return m.freeze(msg.request_id)
            if isinstance(msg, MigrateCommit):
                return m.commit(msg.state, msg.source, self.peer_pool(msg.source.pool).tensor)
            if isinstance(msg, MigrateRelease):
                return m.release(msg.request_id)
            if isinstance(msg, MigrateCancel):
                m.cancel_out(msg.request_id)
                return m.cancel_in(msg.request_id)
        except Exception as exc:  # a broken peer mapping must not take the worker down
            log.exception("migration step %s failed", type(msg).__name__)
            m.abort(msg.request_id)
            return MigrationUpdate(msg.request_id, "failed", error=f"{type(msg).__name__} failed: {type(exc).__name__}: {exc}")
        raise TypeError(f"unexpected message {msg!r}")

    def _send_step(self, result: StepResult | None) -> None:
        assert self.engine is not None
        if result is not None and self.perf is not None and result.step_time > 0:
            self.perf.observe(BatchShape(result.num_prefill_tokens, result.prefill_attention_pairs,
                                         result.num_decode_tokens, result.decode_context_tokens), result.step_time)
        if result is not None and result.num_decode_tokens:
            self.decode_context_mean = result.decode_context_tokens / result.num_decode_tokens
        outputs, self.pending = self.pending, []
        migrations, self.pending_migrations = self.pending_migrations, []
        if result is not None:
            outputs.extend(result.outputs)
        blocks = self.engine.blocks
        self.step_id += 1
        self._send(
            StepOutput(
                worker_id=self.worker_id,
                step=self.step_id,
                outputs=outputs,
                num_seqs=len(result.sched.scheduled) if result else 0,
                num_prefill_tokens=result.num_prefill_tokens if result else 0,
                num_decode_tokens=result.num_decode_tokens if result else 0,
                prefill_context_tokens=result.prefill_context_tokens if result else 0,
                decode_context_tokens=result.decode_context_tokens if result else 0,
                step_time=result.step_time if result else 0.0,
                num_running=self.engine.num_running,
                num_waiting=self.engine.num_waiting,
                num_preempted=len(result.sched.preempted) if result else 0,
                free_blocks=blocks.num_free,
                total_blocks=blocks.num_blocks,
                time=time.monotonic(),
                prefill_attention_pairs=result.prefill_attention_pairs if result else 0,
                migrations=migrations,
                num_hopeless=self.engine.scheduler.num_hopeless,
            )
        )

    def _profile(self) -> list[float]:
        if self.args.profile == "off" or self.args.fake_model:
            return []
        from .profiler import fit_or_load

        e = self.engine
        assert e is not None
        model = fit_or_load(e.runner, e.pool, self.args.device, e.config.block_size, e.config.chunk_size,
                            log=log.info)
        return model.to_list()

    def _use_perf_model(self) -> None:
        """Give the local scheduler the fitted model: LP slack counts prefill time, HP gets a budget."""
        if not self.perf_coef:
            return
        self.perf = PerfModel.from_list(self.perf_coef)
        sched = self.engine.scheduler
        sched.prefill_time = self.perf.prefill_time
        sched.step_time = self.scheduler_step_time

    def scheduler_step_time(self, prefill: int, decodes: int) -> float:
        """The local scheduler's step-time guess: the fitted model with the decodes at the last step's
        mean context, as the simulator's instances guess it. Leaving the context out under-predicts
        decode steps of long contexts: 2,000-token contexts add ~3 ms per decode on the tiny fp32
        model, and its pacing then planned steps past a 37 ms TBT objective."""
        return self.perf.step_time(prefill, decodes, round(decodes * self.decode_context_mean))

    def _registration(self) -> Register:
        assert self.engine is not None
        e, a = self.engine, self.args
        return Register(
            worker_id=self.worker_id,
            pid=os.getpid(),
            role=a.role,
            policy=a.policy,
            device=a.device,
            model=e.runner.info,
            pool=e.pool.handle(),
            num_blocks=e.config.num_blocks,
            block_size=e.config.block_size,
            bytes_per_block=e.pool.bytes_per_block,
            max_num_seqs=e.config.max_num_seqs,
            chunk_size=e.scheduler.config.max_chunk or e.config.chunk_size,  # the most a step may prefill
            perf_model=self.perf_coef,
        )

    def _send(self, msg) -> None:
        self.sock.send(encode(msg), copy=False)

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.peers.clear()
        if self.migrations is not None:
            self.migrations.close()
        if self.engine is not None:
            self.engine.close()
        self.sock.close()
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("ASCENDRA_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s worker{args.worker_id} %(levelname)s %(message)s")
    _die_with_parent()
    keep_allocations_in_heap()
    # SIGTERM / SIGINT unwind through `finally`, so the shared-memory pool is unlinked. The
    # first one is enough: later ones (the parent-death signal arriving after the parent
    # poll already ended the loop, a second kill) are ignored, so they cannot interrupt the
    # clean-up or the interpreter's atexit handlers with a SystemExit traceback.
    def _stop(signum, frame):
        _ignore_stop_signals()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return Worker(args).run()
    finally:
        _ignore_stop_signals()


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
