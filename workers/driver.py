"""Drive real worker processes over ZeroMQ the way the coordinator does (tests and benchmarks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import zmq

from ascendra.messages import (
    Register,
    StepOutput,
    WorkerMessage,
    encode,
    worker_decoder,
)


class WorkerDriver:
    def __init__(self, model_path: str, *extra: str, worker_ids=(0,), parent_pid: int | None = None,
                 stderr_to_file: bool = False, tmp_dir: str | None = None) -> None:
        # The socket (and stderr files) live in a folder close() removes; a caller that may be
        # killed before close() passes a folder it cleans up itself (pytest's tmp_path).
        self._owns_tmp = tmp_dir is None
        self.tmp = tempfile.mkdtemp(prefix="ascendra-test-") if tmp_dir is None else str(tmp_dir)
        self.addr = f"ipc://{self.tmp}/coord.sock"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.addr)
        self.procs: dict[int, subprocess.Popen] = {}
        self.registrations: dict[int, Register] = {}
        for wid in worker_ids:
            cmd = [sys.executable, "-m", "workers", "--coordinator", self.addr, "--worker-id", str(wid),
                   "--model", model_path, *extra]
            if parent_pid is not None:
                cmd += ["--parent-pid", str(parent_pid)]
            err = open(self.stderr_path(wid), "wb") if stderr_to_file else None
            self.procs[wid] = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=err)
            if err is not None:
                err.close()

    def stderr_path(self, worker_id: int) -> str:
        return os.path.join(self.tmp, f"worker{worker_id}.stderr")

    def wait_registered(self, timeout: float = 120.0) -> dict[int, Register]:
        deadline = time.monotonic() + timeout
        while len(self.registrations) < len(self.procs):
            msg = self.recv(deadline - time.monotonic())
            assert isinstance(msg, Register), f"expected registration, got {msg!r}"
            self.registrations[msg.worker_id] = msg
        return self.registrations

    def send(self, worker_id: int, msg) -> bool:
        self.sock.send_multipart([str(worker_id).encode(), encode(msg)])
        return True

    def recv(self, timeout: float = 60.0) -> WorkerMessage:
        if not self.sock.poll(max(0, int(timeout * 1000))):
            raise TimeoutError("no message from the worker")
        _, payload = self.sock.recv_multipart()
        return worker_decoder.decode(payload)

    def steps(self, timeout: float = 60.0):
        while True:
            msg = self.recv(timeout)
            assert isinstance(msg, StepOutput), msg
            yield msg

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        self.sock.close()
        self.ctx.term()
        if self._owns_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
