"""The GPU path's logic, checked on CPU: weight memory, kernel choice, bounded decode gathers,
the batched sampler, migration ordering on step events, CUDA IPC fields, GPU memory split."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from ascendra.messages import (
    AddRequest,
    ModelInfo,
    PoolHandle,
    Register,
    SamplingParams,
    encode,
    worker_decoder,
)
from tests.runtime_utils import greedy, make_engine, run_all, runner_for
from workers.attention import choose_kernel, decode_groups, default_block_size
from workers.device import FatalDeviceError, StepEvent, is_fatal_device_error
from workers.kv_pool import ipc_fields, rebuild_args
from workers.migration import Migrations
from workers.model_runner import ModelRunner
from workers.sampler import Sampler, SamplingError
from workers.worker import CUDA_CONTEXT_BYTES, gpu_pool_bytes


# ---------------------------------------------------------------- item 1: weights held once
def _param_bytes(model) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_runner_holds_each_weight_once(tiny_model):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model.path, dtype=torch.float32)
    runner = ModelRunner(tiny_model.path, tiny_model.name, torch.device("cpu"), torch.float32, pack_weights=False)
    # The fused q/k/v and gate/up tensors replace their originals: no autograd graph keeps
    # the originals alive, so the runner holds the model's parameter bytes, not twice them.
    assert runner.weight_bytes() == _param_bytes(reference)
    assert all(t.grad_fn is None and not t.requires_grad for t in runner.weight_tensors())
    # oneDNN-packed weights (the CPU default) replace the plain ones too; only a head tied to the
    # embedding is held twice (plain for the lookup, packed for the matmul).
    packed = ModelRunner(tiny_model.path, tiny_model.name, torch.device("cpu"), torch.float32, pack_weights=True)
    tied = reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()
    head = reference.lm_head.weight.numel() * 4
    assert packed.weight_bytes() == _param_bytes(reference) + (head if tied else 0)


# ---------------------------------------------------------------- item 3 and the paged kernel
@pytest.mark.parametrize("device,dtype,block,varlen,paged,want", [
    ("cpu", torch.float32, 16, True, True, "sdpa"),
    ("cpu", torch.bfloat16, 256, True, True, "sdpa"),
    ("cuda", torch.float32, 256, True, True, "sdpa"),  # flash-attn takes fp16/bf16 only
    ("cuda", torch.float16, 256, True, True, "flash_paged"),
    ("cuda", torch.bfloat16, 512, True, True, "flash_paged"),
    ("cuda", torch.bfloat16, 16, True, True, "flash_varlen"),  # pages not a multiple of 256
    ("cuda", torch.bfloat16, 16, False, False, "sdpa"),  # no flash-attn installed
    ("cuda", torch.bfloat16, 256, True, False, "flash_varlen"),
])
def test_kernel_by_device_dtype_and_block_size(device, dtype, block, varlen, paged, want):
    assert choose_kernel(device, dtype, block, have_varlen=varlen, have_paged=paged) == want


def test_default_block_size_on_cpu_and_fp32():
    assert default_block_size("cpu", torch.float32) == 16
    assert default_block_size("cuda", torch.float32) == 16


# ---------------------------------------------------------------- item 6: bounded decode gathers
def test_decode_groups_stay_under_the_gather_bound():
    lens = [20, 300, 17, 5000, 40, 41, 42]
    groups = decode_groups(lens, 16, limit=1024)
    assert sum(n for _, n, _ in groups) == len(lens)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    for first, n, width in groups:
        assert width == max(math.ceil(x / 16) for x in lens[first:first + n])
        assert n == 1 or n * width * 16 <= 1024
    # 128k contexts: one row each, never padded to the longest of the batch.
    assert [n for _, n, _ in decode_groups([131072, 100, 131072], 16, limit=1 << 16)] == [1, 1, 1]


def test_grouped_decodes_give_the_same_tokens(tiny_model):
    prompts = [list(range(10, 10 + n)) for n in (5, 40, 90, 23)]
    want, _ = run_all(make_engine(tiny_model), prompts, greedy(12, ignore_eos=True))
    runner = runner_for(tiny_model)
    runner.decode_gather_tokens = 32  # every decode in a group of its own
    try:
        got, _ = run_all(make_engine(tiny_model), prompts, greedy(12, ignore_eos=True))
    finally:
        runner.decode_gather_tokens = 1 << 16
    assert got == want


# ---------------------------------------------------------------- item 7: batched sampler
def _reference_row(row, p, generator):
    """The per-row sampler the batched one replaced (temperature, top-k, top-p, multinomial)."""
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


PARAMS = [
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.3, top_k=40, seed=2),
    SamplingParams(temperature=0.7, top_p=0.9, seed=3),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.5, seed=4),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.5, top_k=3, top_p=0.95, seed=6),
    SamplingParams(temperature=2.0, top_k=1, seed=7),  # top_k 1 is greedy
    SamplingParams(temperature=0.9, min_tokens=5, stop_token_ids=[3], seed=8),
]


def test_batched_sampler_gives_the_reference_tokens_for_the_same_seeds():
    torch.manual_seed(0)
    sampler = Sampler(eos_token_ids=[0])
    for step in range(30):
        logits = torch.randn(len(PARAMS), 500) * 4
        gens_ref = [torch.Generator().manual_seed(1000 * step + i) if p.seed is not None else None
                    for i, p in enumerate(PARAMS)]
        gens_new = [torch.Generator().manual_seed(1000 * step + i) if p.seed is not None else None
                    for i, p in enumerate(PARAMS)]
        ref_logits = logits.clone()
        ref_logits[7, [3, 0]] = float("-inf")  # below min_tokens: stop and eos banned
        want = [int(ref_logits[i].argmax()) if p.greedy else _reference_row(ref_logits[i].clone(), p, gens_ref[i])
                for i, p in enumerate(PARAMS)]
        got = sampler.sample(logits.clone(), PARAMS, [2] * len(PARAMS), gens_new)
        assert got == want, step
        # The generators advanced exactly as the reference's did.
        for a, b in zip(gens_ref, gens_new):
            if a is not None:
                assert torch.equal(a.get_state(), b.get_state())


def test_a_bad_row_fails_alone():
    logits = torch.randn(4, 300)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=float("nan"), seed=1),
              SamplingParams(temperature=0.8, seed=2), SamplingParams(temperature=0.0)]
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), None]
    sampler = Sampler(eos_token_ids=[])
    out = sampler.sample(logits.clone(), params, [0] * 4, gens, ["a", "b", "c", "d"])
    assert isinstance(out[1], SamplingError) and "temperature=nan" in str(out[1])
    solo = sampler.sample(logits[[0, 2, 3]].clone(), [params[i] for i in (0, 2, 3)], [0] * 3,
                          [None, torch.Generator().manual_seed(2), None])
    assert [out[0], out[2], out[3]] == solo
    sampler.fail_request_ids = {"c"}
    out = sampler.sample(logits[[0, 2, 3]].clone(), params[:1] + params[2:], [0] * 3,
                         [None, torch.Generator().manual_seed(2), None], ["a", "c", "d"])
    assert isinstance(out[1], SamplingError) and [out[0], out[2]] == [solo[0], solo[2]]


def test_engine_fails_only_the_bad_request(tiny_model):
    prompts = [list(range(10, 30)), list(range(40, 50)), list(range(60, 95))]
    good = greedy(8, ignore_eos=True)
    want, _ = run_all(make_engine(tiny_model), prompts, good)
    bad = SamplingParams(max_tokens=8, temperature=float("nan"), ignore_eos=True)
    got, reasons = run_all(make_engine(tiny_model), prompts, [good, bad, good])
    assert reasons == ["length", "error", "length"]
    assert got[0] == want[0] and got[2] == want[2] and got[1] == []


# ---------------------------------------------------------------- item 6: fatal errors
def test_fatal_device_errors_are_told_apart():
    assert is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_fatal_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_fatal_device_error(FatalDeviceError("x"))
    assert not is_fatal_device_error(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert not is_fatal_device_error(ValueError("bad shape"))
    assert not is_fatal_device_error(RuntimeError("shape mismatch"))


def test_engine_raises_a_fatal_error_instead_of_failing_the_batch(tiny_model):
    engine = make_engine(tiny_model)
    engine.fatal_request_ids = {"boom"}
    engine.add_request(AddRequest("boom", [5, 6, 7], greedy(3), time.monotonic()))
    with pytest.raises(FatalDeviceError):
        engine.step()
    engine.fatal_request_ids = set()
    engine.close()


# ---------------------------------------------------------------- item 5: migration ordering
class _LoggedEvent(StepEvent):
    """The CPU stand-in for a CUDA event, writing into one log shared by both workers."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(torch.device("cpu"))
        self.name, self.shared = name, log

    def record(self) -> None:
        super().record()
        self.shared.append(f"{self.name}:record")

    def synchronize(self) -> None:
        super().synchronize()
        self.shared.append(f"{self.name}:sync")


def _follows(log: list[str], sequence: list[str]) -> bool:
    it = iter(log)
    return all(any(x == want for x in it) for want in sequence)


def test_migration_waits_on_step_and_copy_events(tiny_model):
    log: list[str] = []
    src = make_engine(tiny_model, num_blocks=64, chunk_size=32, scatter_seed=11)
    dst = make_engine(tiny_model, num_blocks=64, chunk_size=32, scatter_seed=12)
    sm, dm = Migrations(src, 0), Migrations(dst, 1)
    src.kv_written = _LoggedEvent("src.kv", log)
    dm.copied = _LoggedEvent("dst.copy", log)
    src.add_request(AddRequest("r", list(range(10, 90)), greedy(20, ignore_eos=True), time.monotonic()))
    for _ in range(3):  # mid prefill: a step that samples nothing still records its event
        src.step()
        log.append("step")
    assert log[:2] == ["src.kv:record", "step"]
    snap = sm.migrate_out("r")
    log.append(f"answer:{snap.stage}")
    pre = dm.migrate_in("r", snap.source, src.pool.tensor)
    log.append(f"answer:{pre.stage}")
    src.step()
    log.append("step")
    frozen = sm.freeze("r")
    log.append(f"answer:{frozen.stage}")
    commit = dm.commit(frozen.state, frozen.source, src.pool.tensor)
    log.append(f"answer:{commit.stage}")
    sm.release("r")
    tail = log[log.index("step", 4):]
    assert _follows(tail, ["src.kv:sync", "answer:snapshot", "dst.copy:record", "dst.copy:sync",
                           "answer:precopied", "src.kv:record", "step", "src.kv:sync", "answer:frozen",
                           "dst.copy:record", "dst.copy:sync", "answer:committed"]), log
    # No answer is given between a copy and the wait on it.
    for i, x in enumerate(log):
        if x == "dst.copy:record":
            assert log[i + 1] == "dst.copy:sync"
    dst.abort("r")
    assert src.blocks.num_free == src.blocks.num_blocks and dst.blocks.num_free == dst.blocks.num_blocks


# ---------------------------------------------------------------- CUDA IPC handle, no pickle
def test_cuda_ipc_fields_round_trip_through_msgpack():
    # reduce_tensor's argument tuple for a CUDA tensor, in torch's order, with plain values.
    args = (torch.Tensor, torch.Size([2, 2, 8, 16, 4, 64]), (65536, 32768, 4096, 256, 64, 1), 0,
            torch.storage.TypedStorage, torch.bfloat16, 1, b"\x01" * 64, 262144, 0, False,
            b"ref-counter-file", 4, b"\x02" * 64, True)
    handle = PoolHandle("cuda", "", list(args[1]), "bfloat16", "cuda:1", cuda=ipc_fields(args))
    info = ModelInfo(name="m", path="p", vocab_size=10, max_model_len=8, eos_token_ids=[0], num_layers=2,
                     num_kv_heads=4, head_dim=64, dtype="bfloat16")
    reg = Register(worker_id=0, pid=1, role="mixed", policy="sarathi", device="cuda:1", model=info, pool=handle,
                   num_blocks=8, block_size=16, bytes_per_block=1, max_num_seqs=1, chunk_size=1)
    back = worker_decoder.decode(encode(reg)).pool
    assert back == handle
    assert rebuild_args(back.cuda, torch.bfloat16) == args


def test_pool_handle_carries_no_pickled_bytes():
    assert "ipc" not in PoolHandle.__struct_fields__
    import workers.kv_pool as kv

    assert "pickle" not in Path(kv.__file__).read_text()


# ---------------------------------------------------------------- item 2: GPU memory split
def test_gpu_memory_split_between_workers_sharing_a_device():
    gib = 1 << 30
    one = gpu_pool_bytes(80 * gib, 0.9, 1, own_bytes=16 * gib, num_peers=0)
    assert one == int(72 * gib - 16 * gib - CUDA_CONTEXT_BYTES)
    # Two workers on the device: each gets half of the 72 GiB, minus its own use.
    two = gpu_pool_bytes(80 * gib, 0.9, 2, own_bytes=16 * gib, num_peers=0)
    assert two == int(36 * gib - 16 * gib - CUDA_CONTEXT_BYTES)
    assert 2 * (two + 16 * gib + CUDA_CONTEXT_BYTES) <= 0.9 * 80 * gib
    # Peers that may map this pool leave room for their contexts and copy buffers.
    with_peers = gpu_pool_bytes(80 * gib, 0.9, 2, own_bytes=16 * gib, num_peers=3)
    assert two - with_peers == 3 * (CUDA_CONTEXT_BYTES + (64 << 20))
    # Too little: zero, never negative (the worker then refuses to start with a message).
    assert gpu_pool_bytes(8 * gib, 0.5, 4, own_bytes=16 * gib, num_peers=1) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runner_matches_cpu_greedy(tiny_model):
    prompts = [list(range(10, 10 + n)) for n in (5, 40, 90)]
    want, _ = run_all(make_engine(tiny_model), prompts, greedy(8, ignore_eos=True))
    from workers.engine import Engine, EngineConfig

    runner = ModelRunner(tiny_model.path, tiny_model.name, torch.device("cuda:0"), torch.float32)
    got, _ = run_all(Engine(runner, EngineConfig(num_blocks=64, chunk_size=64)), prompts, greedy(8, ignore_eos=True))
    assert got == want
