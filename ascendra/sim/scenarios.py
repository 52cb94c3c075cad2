"""Named experiment setups (``--scenario``)."""

from __future__ import annotations

from dataclasses import dataclass

from ascendra.config import default


# Step time of SmolLM2-135M on this project's 2-core CPU, as PerfModel coefficients (constant,
# per prefill token, per attention pair, per decode, per decode context token): a 16-decode step
# with 300-token contexts ~0.14 s, a 512-token prefill ~0.65 s (../shared/DESIGN.md's figures).
CPU_SMOLLM2_COEF = (0.03, 1.15e-3, 1e-7, 6e-3, 2e-6)


@dataclass(frozen=True)
class WorkloadDef:
    name: str
    dataset: str  # bench.workloads dataset: sharegpt | trace | fixed | uniform
    ttft_slo: float
    tbt_slo: float
    arrivals: str = "poisson"  # poisson (gamma with burstiness) | trace (the trace's timing, rescaled)
    start_rate: float = 8.0  # where the capacity search begins (req/s)
    burstiness: float = 1.0  # gamma shape of the gaps: 1 = Poisson, 1 / CV^2 for bursts
    # Per-request objectives (share, ttft_s, tbt_s) per class; empty: ttft_slo / tbt_slo for all.
    slo_classes: tuple[tuple[float, float, float], ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    workloads: tuple[WorkloadDef, ...]
    cost: str = "a100"
    num_instances: int = 3
    num_hp: int = 1
    num_requests: int = 2000
    variants: tuple[str, ...] = ("vllm", "sarathi", "ascendra", "ascendra-unstarted")
    # (ablations per escalation stage: add --ablation, or list them with --policy; the step-budget
    # variants with --seats, the static splits and adaptive roles with --splits)
    block_size: int = 16
    max_num_seqs: int = default("max_num_seqs")
    chunk_size: int = default("chunk_size")
    max_model_len: int = 8192
    link: str = "pcie4"


SCENARIOS = {
    "paper-llama3-8b-a100": Scenario(
        variants=("vllm", "sarathi", "ascendra", "ascendra-unstarted", "ascendra-no-decode", "ascendra-no-prefill",
                  "ascendra-hp0", "ascendra-hp2", "ascendra-adaptive", "sarathi-seats", "ascendra-budget"),
        name="paper-llama3-8b-a100",
        description=("The paper's setup: 3 x A100-80GB, one Llama-3.1-8B instance each (vidur operator "
                     "table + attention model); Ascendra 2 LP + 1 HP vs vLLM and Sarathi-Serve (chunk 512) "
                     "with 3 mixed instances dealt round robin; 2,000 requests per point, Poisson arrivals"),
        workloads=(
            # ShareGPT-like lengths (prompt + output < 2048).
            WorkloadDef("sharegpt", "sharegpt", ttft_slo=1.0, tbt_slo=0.15, start_rate=8.0),
            # Azure LLM 2023 conversation trace lengths.
            WorkloadDef("azure-conv", "trace", ttft_slo=0.5, tbt_slo=0.1, start_rate=4.0),
            # LongBench-like long documents (bench.workloads.longbench_lengths), up to 8,192 tokens.
            WorkloadDef("longbench", "longbench", ttft_slo=2.5, tbt_slo=0.15, start_rate=1.0),
            # Code completion: long prompts, a few output tokens (bench.workloads.code_lengths).
            WorkloadDef("code", "code", ttft_slo=1.5, tbt_slo=0.3, start_rate=4.0),
            # Mixed SLO classes on ShareGPT-like lengths: 30% interactive, 70% relaxed.
            WorkloadDef("mixed-slo", "sharegpt", ttft_slo=0.25, tbt_slo=0.1, start_rate=8.0,
                        slo_classes=((0.3, 0.25, 0.1), (0.7, 5.0, 0.25))),
            # Bursts: ShareGPT-like lengths, gamma arrivals with CV 3.
            WorkloadDef("sharegpt-burst-cv3", "sharegpt", ttft_slo=1.0, tbt_slo=0.15, start_rate=8.0,
                        burstiness=1.0 / 9.0),
            # The conversation trace's own arrival pattern (bursty), rescaled to each rate.
            WorkloadDef("azure-conv-timing", "trace", ttft_slo=0.5, tbt_slo=0.1, start_rate=4.0,
                        arrivals="trace"),
        ),
    ),
    # Issue 14's first case: objectives out of reach. SmolLM2 on a 2-core CPU (a 16-decode step
    # ~0.14 s, 512 prefill tokens ~0.65 s) cannot hold TTFT 1 s / TBT 0.15 s much past 1 req/s;
    # beyond that Ascendra must degrade to the baselines' throughput, not pace for lost causes.
    "cpu-smollm2-out-of-reach": Scenario(
        name="cpu-smollm2-out-of-reach",
        description=("Objectives out of reach: 2 CPU instances of SmolLM2-135M (step-time model "
                     f"coef {list(CPU_SMOLLM2_COEF)}), 256-token prompts, 64-token outputs, "
                     "TTFT 1.0 s / TBT 0.15 s; Ascendra 1 LP + 1 HP"),
        workloads=(WorkloadDef("fixed-256-64", "fixed", ttft_slo=1.0, tbt_slo=0.15, start_rate=0.5),),
        cost="coef:[" + ",".join(f"{c:g}" for c in CPU_SMOLLM2_COEF) + "]",
        num_instances=2, num_hp=1, num_requests=200, max_model_len=2048, link="pcie4",
    ),
}
