"""Worker supervision: spawn one worker process per instance, the ZeroMQ socket to them,
identity binding, exit watching, shared-memory cleanup and shutdown.

One ROUTER socket talks to every worker (each a DEALER whose identity is its id). The
supervisor decodes what arrives, trusts the socket rather than the message (an identity is
bound to one worker at its registration), and hands each message to the coordinator's
``WorkerEvents``. It knows nothing about requests.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio

from ascendra import messages as m
from ascendra.metrics import Counter
from ascendra.router import InstanceSpec

log = logging.getLogger("ascendra.supervisor")


class StartupError(RuntimeError):
    pass


@dataclass
class WorkerHandle:
    spec: InstanceSpec
    device: str
    proc: asyncio.subprocess.Process | None = None
    register: m.Register | None = None
    alive: bool = False
    exit_code: int | None = None
    failure: str | None = None
    requests: set[str] = field(default_factory=set)  # request ids the coordinator has on this worker
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


class WorkerEvents(Protocol):
    """What the supervisor tells its owner (the coordinator)."""

    def on_registered(self, w: WorkerHandle, msg: m.Register) -> None: ...

    def on_step(self, step: m.StepOutput, now: float) -> None: ...

    def on_worker_down(self, w: WorkerHandle, reason: str) -> None: ...


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


class WorkerSupervisor:
    def __init__(self, specs: list[InstanceSpec], devices: list[str], events: WorkerEvents,
                 dropped: Counter) -> None:
        self.workers = [WorkerHandle(spec, dev) for spec, dev in zip(specs, devices)]
        self.events = events
        self.dropped = dropped  # messages refused on the socket, by reason
        self.shutting_down = False
        self.startup_done = False
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

    async def start(self, command_for, timeout: float) -> None:
        """Spawn a worker per handle (``command_for(handle)`` is its argv) and wait until every one
        has registered; raise StartupError when one exits first or ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._recv_loop(), name="zmq-recv"))
        for w in self.workers:
            w.registered = loop.create_future()
            # Own session: a terminal's Ctrl-C reaches only us, and we shut workers down in order.
            w.proc = await asyncio.create_subprocess_exec(*command_for(w), start_new_session=True)
            log.info("started worker %d (pid %d, %s, role %s, policy %s)", w.worker_id, w.proc.pid,
                     w.device, w.spec.role, w.spec.policy)
            self._tasks.append(asyncio.create_task(self._watch(w), name=f"watch-{w.worker_id}"))
        pending = [w.registered for w in self.workers if w.registered is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*pending), timeout=timeout)
        except asyncio.TimeoutError:
            missing = [w.worker_id for w in self.workers if not w.alive]
            raise StartupError(f"workers {missing} did not register within {timeout:.0f}s") from None
        finally:
            self.startup_done = True
            for f in pending:  # mark failures seen, so asyncio does not warn about them later
                if f.done() and not f.cancelled():
                    f.exception()
        self._close_listener()

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
            self._down(w, f"worker {w.worker_id} (pid {w.pid}) exited with code {code}")

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

    def _down(self, w: WorkerHandle, reason: str) -> None:
        """Tell the owner, which marks the worker down and fails its requests."""
        self.events.on_worker_down(w, reason)

    # ------------------------------------------------------------ messages

    async def _recv_loop(self) -> None:
        sock = self._sock
        decode = m.worker_decoder.decode
        events = self.events
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
            dropped = self.dropped
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
                        events.on_step(msg, now)
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
            self.dropped.inc(1, "unknown_identity" if w is None else "wrong_worker")
            log.warning("dropped a registration for worker %r (pid %r) from identity %r", msg.worker_id, msg.pid,
                        identity[:32])
            return
        self._bound[identity] = w.worker_id
        w.register = msg
        w.alive = True
        self.events.on_registered(w, msg)
        log.info("worker %d registered: pid %d, %d blocks of %d tokens, pool %s", w.worker_id, msg.pid,
                 msg.num_blocks, msg.block_size, msg.pool.kind)
        if w.registered is not None and not w.registered.done():
            w.registered.set_result(None)

    def _on_failed(self, msg: m.WorkerFailed) -> None:
        if 0 <= msg.worker_id < len(self.workers):
            w = self.workers[msg.worker_id]
            w.failure = msg.message
            log.error("worker %d failed: %s", msg.worker_id, msg.message)
            self._down(w, f"worker {msg.worker_id} failed: {msg.message}")

    def send(self, wid: int, msg: msgspec.Struct) -> bool:
        """Send to a live worker (Shutdown goes to any); False when it cannot be delivered."""
        w = self.workers[wid]
        if not w.alive and not isinstance(msg, m.Shutdown):
            return False
        try:
            self._sock.send_multipart([w.identity, m.encode(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            log.warning("cannot send %s to worker %d: %s", type(msg).__name__, wid, e)
            return False

    # ------------------------------------------------------------ shutdown

    async def shutdown(self, timeout: float) -> None:
        """Send Shutdown, wait for the workers, kill stragglers, remove what we created."""
        self.shutting_down = True
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                self.send(w.worker_id, m.Shutdown())
        procs = [w for w in self.workers if w.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(w.exited.wait() for w in procs)), timeout)
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
        shutil.rmtree(self._tmpdir, ignore_errors=True)


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


__all__ = ["StartupError", "WorkerEvents", "WorkerHandle", "WorkerSupervisor", "cuda_device_count", "expand_devices"]
