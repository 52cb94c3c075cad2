"""`python -m tools.gpu_check` on a CPU-only box: the CPU checks pass, the CUDA ones are skipped
with their reason, and the last line is one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tools.gpu_check import Check, render, summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
@pytest.mark.e2e
def test_gpu_check_runs_on_a_cpu_only_box():
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--quick", "--skip-server"],
                          capture_output=True, text=True, timeout=900, check=False)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    by_name = {c["name"]: c for c in result["checks"]}
    assert proc.returncode == 0 and result["failed"] == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # What has a CPU meaning ran and passed.
    for name in ("attention kernels", "greedy vs transformers: tiny cpu float32", "memory: cpu",
                 "migration cpu -> cpu", "decode vs roofline: cpu"):
        assert by_name[name]["status"] == "ok", by_name[name]
    assert "source_blocks_reused" in by_name["migration cpu -> cpu"]["detail"]
    # The CUDA parts say they were skipped, and why.
    skipped = {n: c["detail"] for n, c in by_name.items() if c["status"] == "skipped"}
    assert "no CUDA device" in skipped["CUDA devices"]
    assert "needs 2 GPUs" in skipped["migration cuda:0 -> cuda:1"]
    assert skipped["server with escalation"] == "--skip-server"
    # The table names every check before the JSON line.
    table = "\n".join(lines[:-1])
    assert all(name in table for name in by_name)


def test_report_counts_and_renders_every_status():
    checks = [Check("a", "ok", "fine"), Check("b", "failed", "broke"), Check("c", "skipped", "no GPU")]
    s = summary(checks)
    assert (s["ok"], s["failed"], s["skipped"]) == (1, 1, 1)
    assert [c["status"] for c in s["checks"]] == ["ok", "failed", "skipped"]
    text = render(checks)
    assert "no GPU" in text and text.splitlines()[0].startswith("check")
