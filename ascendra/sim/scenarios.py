"""Named experiment setups (``--scenario``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadDef:
    name: str
    dataset: str  # bench.workloads dataset: sharegpt | trace | fixed | uniform
    ttft_slo: float
    tbt_slo: float
    arrivals: str = "poisson"
    start_rate: float = 8.0  # where the capacity search begins (req/s)


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
    block_size: int = 16
    max_num_seqs: int = 128
    chunk_size: int = 512
    max_model_len: int = 8192
    link: str = "pcie4"


SCENARIOS = {
    "paper-llama3-8b-a100": Scenario(
        name="paper-llama3-8b-a100",
        description=("The paper's setup: 3 x A100-80GB, one Llama-3.1-8B instance each (vidur operator "
                     "table + attention model); Ascendra 2 LP + 1 HP vs vLLM and Sarathi-Serve (chunk 512) "
                     "with 3 mixed instances dealt round robin; 2,000 requests per point, Poisson arrivals"),
        workloads=(
            # ShareGPT-like lengths (prompt + output < 2048).
            WorkloadDef("sharegpt", "sharegpt", ttft_slo=1.0, tbt_slo=0.15, start_rate=8.0),
            # Azure LLM 2023 conversation trace lengths.
            WorkloadDef("azure-conv", "trace", ttft_slo=0.5, tbt_slo=0.1, start_rate=4.0),
        ),
    ),
}
