"""The worker's one KV pool tensor, and how another worker maps and copies from it.

Layout: [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]. Indexing the block
axis selects one block across every layer and both K and V in a single gather, which is
what a migration copies.

On CPU the pool lives in a named POSIX shared-memory segment; on CUDA it is an ordinary
device tensor exported with a CUDA IPC handle (torch's ``reduce_tensor``).
"""

from __future__ import annotations

import os
import pickle
import secrets
from multiprocessing import resource_tracker, shared_memory

import torch

from ascendra.messages import PoolHandle

SHM_PREFIX = "ascendra_"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        shareable: bool = True,
    ) -> None:
        self.shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.num_blocks = num_blocks
        self.block_size = block_size
        numel = num_layers * 2 * num_blocks * block_size * num_kv_heads * head_dim
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_block = numel // num_blocks * itemsize
        self._shm: shared_memory.SharedMemory | None = None
        self._ipc = b""
        self._handle: PoolHandle | None = None
        if device.type == "cpu" and shareable:
            name = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=numel * itemsize)
            # A fresh segment is zero-filled by the kernel; no need to clear it.
            self.tensor = torch.frombuffer(self._shm.buf, dtype=dtype, count=numel).view(self.shape)
        else:
            self.tensor = torch.zeros(self.shape, dtype=dtype, device=device)
            if device.type == "cuda" and shareable:
                from torch.multiprocessing.reductions import reduce_tensor

                self._ipc = pickle.dumps(reduce_tensor(self.tensor))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [blocks, block_size, kv_heads, head_dim]."""
        return self.tensor[i, 0], self.tensor[i, 1]

    def handle(self) -> PoolHandle:
        if self._handle is None:
            self._handle = self._make_handle()
        return self._handle

    def _make_handle(self) -> PoolHandle:
        if self._shm is not None:
            kind, name = "shm", self._shm.name
        elif self._ipc:
            kind, name = "cuda", ""
        else:
            kind, name = "none", ""
        return PoolHandle(
            kind=kind,
            name=name,
            shape=list(self.shape),
            dtype=dtype_name(self.dtype),
            device=str(self.device),
            ipc=self._ipc,
        )

    def close(self) -> None:
        """Release the pool; unlinks the shared-memory segment so nothing stays in /dev/shm."""
        self.tensor = None  # type: ignore[assignment]
        shm, self._shm = self._shm, None
        if shm is None:
            return
        try:
            shm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        try:
            shm.unlink()
        except FileNotFoundError:
            pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class PeerPool:
    """A read/write mapping of another worker's pool. Open once per peer and keep it."""

    def __init__(self, handle: PoolHandle, device: torch.device) -> None:
        self.handle = handle
        self._shm: shared_memory.SharedMemory | None = None
        dtype = dtype_from_name(handle.dtype)
        shape = tuple(handle.shape)
        if handle.kind == "shm":
            self._shm = shared_memory.SharedMemory(name=handle.name, create=False)
            # Python 3.11 registers attached segments too, and its tracker would unlink the
            # owner's segment when this process exits. The owner alone unlinks it.
            resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]
            numel = 1
            for d in shape:
                numel *= d
            self.tensor = torch.frombuffer(self._shm.buf, dtype=dtype, count=numel).view(shape)
        elif handle.kind == "cuda":
            rebuild, args = pickle.loads(handle.ipc)
            self.tensor = rebuild(*args)
        else:
            raise ValueError(f"pool of kind {handle.kind!r} cannot be shared")

    def close(self) -> None:
        self.tensor = None  # type: ignore[assignment]
        shm, self._shm = self._shm, None
        if shm is not None:
            try:
                shm.close()
            except BufferError:
                pass


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> None:
    """Copy whole blocks (every layer, K and V) from one pool tensor into another."""
    if len(src_ids) != len(dst_ids):
        raise ValueError("src_ids and dst_ids differ in length")
    if not src_ids:
        return
    src_index = torch.tensor(src_ids, dtype=torch.long, device=src.device)
    dst_index = torch.tensor(dst_ids, dtype=torch.long, device=dst.device)
    blocks = src.index_select(2, src_index)
    if blocks.device != dst.device:
        blocks = blocks.to(dst.device, non_blocking=True)
    dst.index_copy_(2, dst_index, blocks)
