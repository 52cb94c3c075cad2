"""KV blocks written in one process's pool are copied into another's through the shared handle."""

import subprocess
import sys
import textwrap

import msgspec
import pytest
import torch

from ascendra.messages import PoolHandle
from tests.helpers import our_shm_segments, wait_until
from workers.kv_pool import KVPool, PeerPool, copy_blocks

SHAPE = dict(num_layers=3, num_blocks=12, block_size=4, num_kv_heads=2, head_dim=8)
SRC_BLOCKS = [3, 9, 1]
DST_BLOCKS = [0, 5, 2]

OWNER = textwrap.dedent("""
    import sys, torch, msgspec
    from workers.kv_pool import KVPool
    device = torch.device(sys.argv[1])
    pool = KVPool(3, 12, 4, 2, 8, torch.float32, device)
    g = torch.Generator().manual_seed(0)
    for b in [3, 9, 1]:
        pool.tensor[:, :, b] = torch.randn(pool.tensor[:, :, b].shape, generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sys.stdout.write(msgspec.json.encode(pool.handle()).decode() + "\\n")
    sys.stdout.flush()
    sys.stdin.readline()  # stay alive (and mapped) until the reader is done
    pool.close()
""")


def expected_blocks() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randn((3, 2, 4, 2, 8), generator=g) for _ in SRC_BLOCKS], dim=2)


def _copy_across_processes(device: str) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, device], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        handle = msgspec.json.decode(owner.stdout.readline(), type=PoolHandle)
        mine = KVPool(**SHAPE, dtype=torch.float32, device=torch.device(device))
        peer = PeerPool(handle, torch.device(device))
        copy_blocks(mine.tensor, peer.tensor, SRC_BLOCKS, DST_BLOCKS)
        got = mine.tensor[:, :, DST_BLOCKS].cpu()
        assert torch.equal(got, expected_blocks())
        untouched = [b for b in range(12) if b not in DST_BLOCKS]
        assert mine.tensor[:, :, untouched].abs().sum().item() == 0
        peer.close()
        mine.close()
        owner.stdin.write("done\n")
        owner.stdin.flush()
        assert owner.wait(30) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
    return handle


@pytest.mark.e2e
def test_copy_blocks_between_two_processes_cpu():
    before = our_shm_segments()
    handle = _copy_across_processes("cpu")
    assert handle.kind == "shm" and handle.name.startswith("ascendra")
    # The owner unlinked its segment; the reader neither unlinked it early nor leaked one.
    assert wait_until(lambda: our_shm_segments() <= before, timeout=5)


@pytest.mark.e2e
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA IPC)")
def test_copy_blocks_between_two_processes_cuda_ipc():
    handle = _copy_across_processes("cuda:0")
    assert handle.kind == "cuda" and handle.cuda is not None and handle.cuda.storage_handle


def test_pool_close_unlinks_segment():
    pool = KVPool(**SHAPE, dtype=torch.float32, device=torch.device("cpu"))
    name = pool.handle().name
    assert name in our_shm_segments()
    pool.close()
    assert name not in our_shm_segments()
