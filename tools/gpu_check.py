"""One-command self-check of the GPU path: what works on this box, what was skipped and why.

    python -m tools.gpu_check [--model PATH] [--quick] [--skip-server]

Runs every check that the box can run (CPU-only boxes too: the CPU meaning of a check runs,
its CUDA variants are skipped with the reason), prints a table, and prints as its last line
one JSON object: {"ok": n, "failed": n, "skipped": n, "checks": [...]}. Exit status 1 if any
check failed.

Checks: device count; flash-attn and the attention kernel each device/dtype/block size gets;
the model runner against transformers' greedy output (prefill, chunked prefill, mixed decode)
per device and dtype, on `tiny` and on --model; memory after start = weight bytes + pool; a
pool -> pool migration (same device and device 0 -> 1) while the producer keeps writing, with
the source's blocks released and reused right after commit, read back equal; the server end
to end with escalation (--force-escalation-after 0 and 5) against the run without it; a
batch-64 decode's step time against the bandwidth roofline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from ascendra.messages import AddRequest, SamplingParams
from ascendra.models import resolve_model
from workers import attention
from workers.device import set_device, synchronize, timed_clock
from workers.engine import Engine, EngineConfig
from workers.migration import Migrations
from workers.model_runner import ModelRunner


@dataclass
class Check:
    name: str
    status: str  # "ok" | "failed" | "skipped"
    detail: str = ""
    values: dict = field(default_factory=dict)


def cuda_devices() -> list[str]:
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def targets(devices: list[str]) -> list[tuple[str, torch.dtype]]:
    """(device, dtype) pairs to run: fp32 on CPU, bf16 and fp16 on each GPU (at most two)."""
    out = [("cpu", torch.float32)]
    for d in devices[:2]:
        out += [(d, torch.bfloat16), (d, torch.float16)]
    return out


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run_engine(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        assert engine.add_request(AddRequest(f"r{i}", p, _greedy(n), time.monotonic())) is None
    while engine.has_work():
        for o in engine.step().outputs:
            out[o.request_id].extend(o.new_token_ids)
    return [out[f"r{i}"] for i in range(len(prompts))]


def hf_greedy(hf, prompts: list[list[int]], n: int, device: str) -> list[list[int]]:
    res = []
    with torch.inference_mode():
        for p in prompts:
            y = hf.generate(torch.tensor([p], device=device), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
            res.append(y[0, len(p):].tolist())
    return res


def check_kernels(devices: list[str]) -> Check:
    rows = {}
    for dev in ["cpu", *(devices[:1] or ["cuda"])]:
        kind = "cuda" if dev.startswith("cuda") else "cpu"
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for block in (16, 256):
                rows[f"{dev}/{str(dtype)[6:]}/b{block}"] = attention.choose_kernel(kind, dtype, block)
    have = attention.flash_attn_varlen_func is not None
    detail = "flash-attn " + ("importable" if have else "not installed (CUDA would use SDPA)")
    return Check("attention kernels", "ok", detail, rows)


def check_greedy(model, label: str, devices: list[str], quick: bool) -> list[Check]:
    from transformers import AutoModelForCausalLM

    out = []
    n = 6 if quick else 12
    prompts = [[(7 * i + 3 * j) % 1000 + 10 for j in range(L)] for i, L in enumerate((5, 40, 90, 130))]
    for dev, dtype in targets(devices):
        name = f"greedy vs transformers: {label} {dev} {str(dtype)[6:]}"
        device = torch.device(dev)
        set_device(device)
        runner = ModelRunner(model.path, model.name, device, dtype)
        hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=dtype).to(device).eval()
        want = hf_greedy(hf, prompts, n, dev)
        block = attention.default_block_size(device.type, dtype)
        modes = {"prefill": 4096, "chunked prefill + mixed decode": 32}
        res, ok = {}, True
        for mode, chunk in modes.items():
            eng = Engine(runner, EngineConfig(num_blocks=max(64, 4096 // block), block_size=block, chunk_size=chunk,
                                              share_pool=False))
            got = run_engine(eng, prompts, n)
            eng.close()
            same = [_common_prefix(a, b) for a, b in zip(got, want)]
            res[mode] = f"{sum(s == n for s in same)}/{len(prompts)} equal, prefix {min(same)}/{n}"
            # Low-precision runs may diverge late on near-ties; the first tokens must agree.
            ok &= all(s == n for s in same) if dtype == torch.float32 else min(same) >= 1
        res["kernel"] = runner.kernel(block)
        out.append(Check(name, "ok" if ok else "failed", "; ".join(f"{k}: {v}" for k, v in res.items()), res))
        del hf, runner
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def memory_accounting(runner: ModelRunner, pool) -> dict:
    """Weights the runner holds against the model's parameter count, and on CUDA what the
    allocator holds against weights + pool."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(runner.info.path)
    itemsize = torch.empty((), dtype=runner.dtype).element_size()
    params = _param_count(cfg) * itemsize
    if runner.packed and getattr(cfg, "tie_word_embeddings", False):
        params += runner.vocab_size * cfg.hidden_size * itemsize  # the tied head's packed copy
    res = {"weight_bytes": runner.weight_bytes(), "param_bytes": params, "pool_bytes": pool.tensor.numel() * itemsize}
    if runner.device.type == "cuda":
        synchronize(runner.device)
        res["allocated_bytes"] = torch.cuda.memory_allocated(runner.device)
    return res


def _param_count(cfg) -> int:
    """Parameters of the model as transformers builds it (on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter


def check_memory(model, devices: list[str]) -> list[Check]:
    out = []
    for dev in ["cpu", *devices[:2]]:
        device = torch.device(dev)
        set_device(device)
        runner = ModelRunner(model.path, model.name, device)
        pool = runner.make_pool(64, attention.default_block_size(device.type, runner.dtype), shareable=False)
        m = memory_accounting(runner, pool)
        ok = m["weight_bytes"] == m["param_bytes"]
        detail = f"weights {m['weight_bytes'] / 2**20:.1f} MiB, parameters {m['param_bytes'] / 2**20:.1f} MiB"
        if "allocated_bytes" in m:
            expected = m["weight_bytes"] + m["pool_bytes"]
            # Rotary tables and small buffers sit on top: allow 10%.
            ok &= expected <= m["allocated_bytes"] <= expected * 1.10 + (64 << 20)
            detail += f", allocated {m['allocated_bytes'] / 2**20:.1f} MiB vs weights + pool {expected / 2**20:.1f} MiB"
        out.append(Check(f"memory: {dev}", "ok" if ok else "failed", detail, m))
        pool.close()
        del runner
    return out


def migration_roundtrip(runner_src: ModelRunner, runner_dst: ModelRunner, block_size: int = 16) -> dict:
    """Migrate a decoding request while the source keeps stepping; release the source's blocks
    right after commit and let another request overwrite them; the destination's copy must
    still equal what the source held at freeze time, and its greedy output the unmigrated one."""
    prompt, n = [(5 * j) % 900 + 10 for j in range(70)], 24

    def engine(r, seed):
        return Engine(r, EngineConfig(num_blocks=24, block_size=block_size, chunk_size=32, scatter_seed=seed,
                                      share_pool=False))

    want = run_engine(engine(runner_src, 1), [prompt], n)[0]
    src, dst = engine(runner_src, 2), engine(runner_dst, 3)
    sm, dm = Migrations(src, 0), Migrations(dst, 1)
    tokens: list[int] = []

    def step_src(k):
        for _ in range(k):
            for o in src.step().outputs:
                if o.request_id == "m":
                    tokens.extend(o.new_token_ids)

    src.add_request(AddRequest("m", prompt, _greedy(n), time.monotonic()))
    step_src(4)
    snap = sm.migrate_out("m")
    pre = dm.migrate_in("m", snap.source, src.pool.tensor)
    step_src(3)  # the producer keeps writing while the pre-copied blocks sit on the destination
    frozen = sm.freeze("m")
    held = src.pool.tensor[:, :, frozen.source.block_ids].clone()
    commit = dm.commit(frozen.state, frozen.source, src.pool.tensor)
    sm.release("m")
    # Reuse: a new request on the source needs 22 of its 24 blocks, so it overwrites most
    # of the ones just released.
    src.add_request(AddRequest("other", [(11 * j) % 900 + 10 for j in range(22 * block_size - 2)], _greedy(2),
                               time.monotonic()))
    step_src(1)
    reused = len(set(src.requests["other"].block_table) & set(frozen.source.block_ids))
    step_src(30)
    blocks = dst.requests["m"].block_table[: len(frozen.source.block_ids)]
    copied = dst.pool.tensor[:, :, blocks].to(held.device)
    equal = bool(torch.equal(copied, held))
    while dst.has_work():
        for o in dst.step().outputs:
            tokens.extend(o.new_token_ids)
    src.close()
    dst.close()
    return {"stages": [snap.stage, pre.stage, frozen.stage, commit.stage], "blocks_equal": equal,
            "output_equal": tokens == want, "source_blocks_reused": reused}


def check_migration(model, devices: list[str]) -> list[Check]:
    pairs = [("cpu", "cpu")]
    if devices:
        pairs.append((devices[0], devices[0]))
    if len(devices) >= 2:
        pairs.append((devices[0], devices[1]))
    out = []
    runners: dict[str, ModelRunner] = {}
    for a, b in pairs:
        for d in (a, b):
            if d not in runners:
                runners[d] = ModelRunner(model.path, model.name, torch.device(d), torch.float32)
        r = migration_roundtrip(runners[a], runners[b])
        ok = r["blocks_equal"] and r["output_equal"] and r["source_blocks_reused"] > 0 and r["stages"] == ["snapshot", "precopied", "frozen", "committed"]
        out.append(Check(f"migration {a} -> {b}", "ok" if ok else "failed", json.dumps(r), r))
    if len(devices) < 2:
        out.append(Check("migration cuda:0 -> cuda:1", "skipped", f"needs 2 GPUs, found {len(devices)}"))
    if not devices:
        out.append(Check("migration cuda:0 -> cuda:0", "skipped", "no CUDA device"))
    return out


def check_server(model_arg: str, device: str, instances: int, timeout: float = 600.0) -> Check:
    """Greedy outputs of the server under --policy ascendra with forced escalation equal the
    outputs without escalation."""
    prompts = ["The river", "A short history of music is", "Energy markets", "One two three four"]
    runs = {}
    for label, extra in {"vllm": ["--policy", "vllm"],
                         "escalate@0": ["--policy", "ascendra", "--force-escalation-after", "0"],
                         "escalate@5": ["--policy", "ascendra", "--force-escalation-after", "5"]}.items():
        runs[label] = _server_outputs(model_arg, device, instances, extra, prompts, timeout)
    same = all(runs[k] == runs["vllm"] for k in runs)
    name = f"server {device} x{instances} with escalation"
    return Check(name, "ok" if same else "failed", "outputs equal" if same else json.dumps(runs), {"runs": runs})


def _server_outputs(model_arg, device, instances, extra, prompts, timeout) -> list[list[int]]:
    import re
    import urllib.request

    cmd = [sys.executable, "-m", "ascendra.server", "--host", "127.0.0.1", "--port", "0", "--model", model_arg,
           "--device", device, "--num-instances", str(instances), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            m = re.match(r"^Ascendra serving .* on (http://\S+) ", line)
            if m:
                url = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if url is None:
            raise RuntimeError("server did not start")
        outs = []
        for p in prompts:
            body = json.dumps({"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}).encode()
            req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                res = json.loads(r.read())
            outs.append(res["choices"][0]["text"])
        return outs
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Achieved device memory bandwidth (bytes/s) of a large copy (read + write)."""
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)  # warm-up
    reps = 5
    t = timed_clock(device)
    for _ in range(reps):
        b.copy_(a)
    dt = timed_clock(device) - t
    return 2 * nbytes * reps / dt


def decode_roofline(runner: ModelRunner, batch: int = 64, context: int = 512, block_size: int = 16,
                    reps: int = 5, bandwidth: float | None = None) -> dict:
    """Step time of a batch-``batch`` decode at ``context`` tokens against the time to read the
    weights and the batch's KV once at the device's bandwidth."""
    from workers.profiler import time_shapes

    blocks = batch * (-(-(context + 1) // block_size)) + 1
    pool = runner.make_pool(blocks, block_size, shareable=False)
    (_, step), = list(time_shapes(runner, pool, block_size, [([], [context] * batch)], reps=reps))
    pool.close()
    bw = bandwidth or measure_bandwidth(runner.device, 256 << 20 if runner.device.type == "cpu" else 1 << 30)
    kv = batch * (context + 1) * runner.kv_bytes_per_token()
    ideal = (runner.weight_bytes() + kv) / bw
    return {"step_s": step, "roofline_s": ideal, "ratio": ideal / step, "bandwidth_gb_s": bw / 1e9,
            "batch": batch, "context": context}


def check_roofline(model, devices: list[str], quick: bool) -> list[Check]:
    out = []
    for dev in (devices[:1] or ["cpu"]):
        device = torch.device(dev)
        runner = ModelRunner(model.path, model.name, device)
        block = attention.default_block_size(device.type, runner.dtype)
        r = decode_roofline(runner, batch=8 if (quick and dev == "cpu") else 64, block_size=block)
        detail = (f"batch {r['batch']} decode at {r['context']} tokens: {r['step_s'] * 1e3:.2f} ms, roofline "
                  f"{r['roofline_s'] * 1e3:.2f} ms at {r['bandwidth_gb_s']:.0f} GB/s -> {r['ratio']:.2f} of roofline")
        out.append(Check(f"decode vs roofline: {dev}", "ok", detail, r))
    return out


def run_checks(args) -> list[Check]:
    devices = cuda_devices()
    checks = [Check("CUDA devices", "ok" if devices else "skipped",
                    f"{len(devices)} visible" if devices else "no CUDA device: every cuda:N variant below is skipped",
                    {"count": len(devices)})]
    checks.append(check_kernels(devices))
    if not devices:
        checks.append(Check("greedy on cuda:0/cuda:1 (bf16, fp16)", "skipped", "no CUDA device"))
    tiny = resolve_model("tiny")
    guarded = [("greedy", lambda: check_greedy(tiny, "tiny", devices, args.quick))]
    if args.model:
        real = resolve_model(args.model)
        guarded.append(("greedy", lambda: check_greedy(real, real.name, devices, args.quick)))
    else:
        checks.append(Check("greedy vs transformers: real model", "skipped", "no --model PATH given"))
    guarded += [("memory", lambda: check_memory(tiny if not args.model else resolve_model(args.model), devices)),
                ("migration", lambda: check_migration(tiny, devices)),
                ("roofline", lambda: check_roofline(resolve_model(args.model) if args.model else tiny, devices,
                                                    args.quick))]
    for label, fn in guarded:
        try:
            checks.extend(fn())
        except Exception as exc:  # a check that crashes is a failed check, the others still run
            checks.append(Check(label, "failed", f"{type(exc).__name__}: {exc}"))
    if args.skip_server:
        checks.append(Check("server with escalation", "skipped", "--skip-server"))
    else:
        model_arg = args.model or "tiny"
        setups = [(d, n) for d, n in (("cuda:0", 2), ("cuda", 2)) if devices and (d != "cuda" or len(devices) >= 2)]
        if not devices:
            setups = [("cpu", 2)]
            checks.append(Check("server on 1 and 2 GPUs", "skipped", "no CUDA device: ran on CPU instead"))
        elif len(devices) < 2:
            checks.append(Check("server on 2 GPUs", "skipped", f"needs 2 GPUs, found {len(devices)}"))
        for dev, n in setups:
            try:
                checks.append(check_server(model_arg, dev, n))
            except Exception as exc:
                checks.append(Check(f"server {dev} x{n}", "failed", f"{type(exc).__name__}: {exc}"))
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(width)}  {'status':8}  detail", "-" * (width + 40)]
    lines += [f"{c.name.ljust(width)}  {c.status:8}  {c.detail}" for c in checks]
    return "\n".join(lines)


def summary(checks: list[Check]) -> dict:
    count = {s: sum(c.status == s for c in checks) for s in ("ok", "failed", "skipped")}
    return {**count, "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in checks]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a local HF model directory to check besides tiny")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and a smaller CPU decode batch")
    ap.add_argument("--skip-server", action="store_true", help="skip the end-to-end server runs")
    args = ap.parse_args(argv)
    checks = run_checks(args)
    print(render(checks))
    print(json.dumps(summary(checks)))
    return 1 if any(c.status == "failed" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
