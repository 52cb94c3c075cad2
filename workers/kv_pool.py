"""The worker's one KV pool tensor, and how another worker maps and copies from it.

Layout: [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]. Indexing the block
axis selects one block across every layer and both K and V in a single gather, which is
what a migration copies.

On CPU the pool lives in a named POSIX shared-memory segment; on CUDA it is an ordinary
device tensor exported with a CUDA IPC handle (torch's ``reduce_tensor``).
"""

from __future__ import annotations

import os
import secrets
from multiprocessing import resource_tracker, shared_memory

import torch

from ascendra.messages import CudaIpc, PoolHandle

SHM_PREFIX = "ascendra_"
# Largest gather one copy_blocks call stages at once: the consumer allocates it on the
# producer's device, so producers reserve room for it (see workers.worker.gpu_pool_bytes).
MAX_COPY_BYTES = 64 << 20


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
        self._ipc: CudaIpc | None = None
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

                _, args = reduce_tensor(self.tensor)
                self._ipc = ipc_fields(args)

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
        elif self._ipc is not None:
            kind, name = "cuda", ""
        else:
            kind, name = "none", ""
        return PoolHandle(
            kind=kind,
            name=name,
            shape=list(self.shape),
            dtype=dtype_name(self.dtype),
            device=str(self.device),
            cuda=self._ipc,
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
        elif handle.kind == "cuda" and handle.cuda is not None:
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            self.tensor = rebuild_cuda_tensor(*rebuild_args(handle.cuda, dtype))
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


def ipc_fields(args: tuple) -> CudaIpc:
    """Plain fields of ``reduce_tensor``'s argument tuple for a CUDA tensor (torch's order)."""
    (_tensor_cls, size, stride, offset, _storage_cls, _dtype, device, handle, storage_size_bytes,
     storage_offset_bytes, _requires_grad, ref_counter_handle, ref_counter_offset, event_handle,
     event_sync_required) = args
    return CudaIpc(
        size=list(size), stride=list(stride), offset=int(offset), device_index=int(device),
        storage_handle=bytes(handle), storage_size_bytes=int(storage_size_bytes),
        storage_offset_bytes=int(storage_offset_bytes), ref_counter_handle=bytes(ref_counter_handle),
        ref_counter_offset=int(ref_counter_offset), event_handle=bytes(event_handle or b""),
        event_sync_required=bool(event_sync_required),
    )


def rebuild_args(ipc: CudaIpc, dtype: torch.dtype) -> tuple:
    """``rebuild_cuda_tensor``'s arguments from the plain fields (the inverse of ``ipc_fields``)."""
    return (
        torch.Tensor, torch.Size(ipc.size), tuple(ipc.stride), ipc.offset, torch.storage.TypedStorage,
        dtype, ipc.device_index, ipc.storage_handle, ipc.storage_size_bytes, ipc.storage_offset_bytes,
        False, ipc.ref_counter_handle, ipc.ref_counter_offset, ipc.event_handle,
        ipc.event_sync_required,
    )


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> None:
    """Copy whole blocks (every layer, K and V) from one pool tensor into another."""
    if len(src_ids) != len(dst_ids):
        raise ValueError("src_ids and dst_ids differ in length")
    if not src_ids:
        return
    per_block = src[:, :, 0].numel() * src.element_size()
    step = max(1, MAX_COPY_BYTES // per_block)
    for i in range(0, len(src_ids), step):
        src_index = torch.tensor(src_ids[i : i + step], dtype=torch.long, device=src.device)
        dst_index = torch.tensor(dst_ids[i : i + step], dtype=torch.long, device=dst.device)
        blocks = src.index_select(2, src_index)
        if blocks.device != dst.device:
            # Peer-to-peer copy; it is ordered after the gather on the source device's stream,
            # and the caller waits on an event after the last index_copy_ (workers.migration).
            blocks = blocks.to(dst.device, non_blocking=True)
        dst.index_copy_(2, dst_index, blocks)
