"""A request as the local scheduler sees it. Pure Python: the simulator uses it too."""

from __future__ import annotations

import enum
import math

from ascendra.messages import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt then outputs), how many of them have K/V in the pool, and the blocks."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        arrival_time: float,
        ttft_slo: float | None = None,
        tbt_slo: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.arrival_time = arrival_time
        self.ttft_slo = ttft_slo
        self.tbt_slo = tbt_slo
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in this worker's pool
        self.block_table: list[int] = []
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_preemptions = 0
        # Judged unable to meet its objectives: served best-effort, never paced for (scheduler).
        self.hopeless = False
        self.finish_reason: str | None = None

    # ---- lengths
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is missing from the pool."""
        # Inlined lengths: the scheduler asks this of every running request every step.
        n = len(self.token_ids)
        return n - self.num_computed_tokens == 1 and n > self.num_prompt_tokens

    @property
    def has_started(self) -> bool:
        return self.num_computed_tokens > 0

    # ---- deadlines (seconds on the caller's clock; inf when the request has no SLO)
    @property
    def ttft_deadline(self) -> float:
        return math.inf if self.ttft_slo is None else self.arrival_time + self.ttft_slo

    @property
    def next_token_deadline(self) -> float:
        """When the next token is due for the mean TBT to stay within its SLO."""
        if self.first_token_time is None:
            return self.ttft_deadline
        if self.tbt_slo is None:
            return math.inf
        return self.first_token_time + self.tbt_slo * self.num_output_tokens

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
