"""Instance roles and request routing.

Pure logic: no I/O, no clock reads, no torch. The coordinator feeds it events (request
dispatched, first token, finished, step statistics, instance up/down) with the times it
measured; the simulator can drive the very same objects with simulated times.

A ``Policy`` owns the routing decision (``route``) and a per-step hook (``on_step``)
that may return ``Escalation`` actions. ``Policy`` declares every hook the coordinator and
the simulator call, each with a no-op default, so callers never probe for optional methods.
Ascendra's policy, which predicts and escalates, lives in ``ascendra.predictor``;
``ascendra.policies.make_policy`` builds one by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ascendra.perf_model import PerfModel

POLICIES = ("vllm", "sarathi", "ascendra")


@dataclass(frozen=True)
class InstanceSpec:
    """What one worker process runs as."""

    instance_id: int
    role: str  # "mixed" | "lp" | "hp"
    policy: str  # the worker's local batch policy: "vllm" | "sarathi" | "lp" | "hp"


def default_num_hp(num_instances: int) -> int:
    """Ascendra's default split: a third of the instances are HP, at least one when N >= 2."""
    if num_instances < 2:
        return 0
    return max(1, num_instances // 3)


def plan_instances(policy: str, num_instances: int, num_hp: int | None = None) -> list[InstanceSpec]:
    """Roles per instance: all mixed for vllm/sarathi; first N-K LP and last K HP for ascendra."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if num_instances < 1:
        raise ValueError("need at least one instance")
    if policy in ("vllm", "sarathi"):
        return [InstanceSpec(i, "mixed", policy) for i in range(num_instances)]
    k = default_num_hp(num_instances) if num_hp is None else num_hp
    if not 0 <= k < num_instances:
        raise ValueError(f"num_hp must be in [0, {num_instances - 1}] so at least one LP instance remains, got {k}")
    n_lp = num_instances - k
    return [InstanceSpec(i, "lp" if i < n_lp else "hp", "lp" if i < n_lp else "hp") for i in range(num_instances)]


@dataclass
class RouteRequest:
    """What routing may look at for one request."""

    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    arrival_time: float
    ttft_slo: float | None = None
    tbt_slo: float | None = None


class StepStats(Protocol):
    """Every field of a worker's step report that a policy reads (messages.StepOutput fits)."""

    num_running: int
    num_waiting: int
    free_blocks: int
    total_blocks: int
    time: float  # when the step finished
    # The batch's shape and its measured time, for the step-time model.
    num_seqs: int
    num_prefill_tokens: int
    prefill_attention_pairs: int
    num_decode_tokens: int
    decode_context_tokens: int
    step_time: float


@dataclass
class InstanceState:
    """The router's view of one instance, kept current by the coordinator's events."""

    spec: InstanceSpec
    alive: bool = False
    # Requests routed here and not yet finished, and those still waiting for a first token.
    num_assigned: int = 0
    num_unstarted: int = 0
    unstarted_prompt_tokens: int = 0
    # Last statistics the worker reported.
    num_running: int = 0
    num_waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    last_step_time: float = 0.0

    @property
    def instance_id(self) -> int:
        return self.spec.instance_id

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def kv_usage(self) -> float:
        if self.total_blocks <= 0:
            return 0.0
        return 1.0 - self.free_blocks / self.total_blocks

    def load_key(self) -> tuple[int, int, float, int]:
        # Fewest requests in flight first; then least queued prefill work; then KV use.
        return (self.num_assigned, self.unstarted_prompt_tokens, self.kv_usage, self.instance_id)


def least_loaded(instances: list[InstanceState]) -> InstanceState | None:
    best: InstanceState | None = None
    best_key = None
    for inst in instances:
        if not inst.alive:
            continue
        key = inst.load_key()
        if best_key is None or key < best_key:
            best, best_key = inst, key
    return best


class RoundRobin:
    """Cycles through live instances, skipping dead ones."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, instances: list[InstanceState]) -> InstanceState | None:
        n = len(instances)
        for k in range(n):
            inst = instances[(self._next + k) % n]
            if inst.alive:
                self._next = (self._next + k + 1) % n
                return inst
        return None


@dataclass(frozen=True)
class Escalation:
    """Move a request (and its KV blocks) from an LP instance to an HP instance."""

    request_id: str
    src: int
    dst: int
    reason: str = ""


@dataclass
class _Tracked:
    instance_id: int
    num_prompt_tokens: int
    started: bool = False


class Policy:
    """Base policy: bookkeeping shared by all; subclasses decide ``route``.

    Every hook a caller may use is declared here; the ones a simple policy does not need are
    no-ops, so the coordinator and the simulator call them unconditionally."""

    name = "base"
    # Requests judged unable to meet their objectives (served best-effort); a metric.
    num_hopeless = 0
    # Instance roles changed at run time, as (time, instance, new role); only a policy whose
    # roles follow the load appends to it.
    role_changes: Sequence[tuple[float, int, str]] = ()

    def __init__(self, specs: list[InstanceSpec]) -> None:
        self.instances = [InstanceState(s) for s in specs]
        self._requests: dict[str, _Tracked] = {}

    # ---- decisions

    def route(self, req: RouteRequest) -> int | None:
        """Instance id for a new request, or None when no instance can take it."""
        raise NotImplementedError

    def on_step(self, instance_id: int, step: StepStats) -> list[Escalation]:
        """Called for every worker step, after the step's tokens and finishes (on_tokens,
        on_finish); returns escalations to perform (none by default)."""
        self._record_step(instance_id, step)
        return []

    def would_miss(self, req: RouteRequest) -> bool:
        """Admission: True when the request is predicted to miss its objectives wherever it goes.
        A policy without predictions never refuses."""
        return False

    def step_time_model(self, instance_id: int) -> PerfModel | None:
        """The step-time model the policy believes for an instance (None: it keeps none)."""
        return None

    # ---- bookkeeping the coordinator reports

    def configure_instance(self, instance_id: int, perf_coef: list[float], chunk_size: int, max_num_seqs: int,
                           block_size: int) -> None:
        """An instance registered: its profiled step-time coefficients and batch limits."""

    def on_tokens(self, request_id: str, n_new: int, now: float) -> None:
        """A request received ``n_new`` tokens at ``now`` (the first one is also ``on_first_token``)."""

    def on_migrated(self, request_id: str, dst: int, now: float) -> None:
        """An escalation the policy asked for completed: the request now lives on ``dst``."""

    def on_migration_failed(self, request_id: str, now: float) -> None:
        """An escalation the policy asked for did not happen; the request stays where it was."""

    def set_alive(self, instance_id: int, alive: bool) -> None:
        self.instances[instance_id].alive = alive

    def on_dispatch(self, instance_id: int, req: RouteRequest) -> None:
        inst = self.instances[instance_id]
        inst.num_assigned += 1
        inst.num_unstarted += 1
        inst.unstarted_prompt_tokens += req.num_prompt_tokens
        self._requests[req.request_id] = _Tracked(instance_id, req.num_prompt_tokens)

    def on_first_token(self, request_id: str) -> None:
        t = self._requests.get(request_id)
        if t is None or t.started:
            return
        t.started = True
        inst = self.instances[t.instance_id]
        inst.num_unstarted -= 1
        inst.unstarted_prompt_tokens -= t.num_prompt_tokens

    def on_finish(self, request_id: str) -> None:
        t = self._requests.pop(request_id, None)
        if t is None:
            return
        inst = self.instances[t.instance_id]
        inst.num_assigned -= 1
        if not t.started:
            inst.num_unstarted -= 1
            inst.unstarted_prompt_tokens -= t.num_prompt_tokens

    def instance_of(self, request_id: str) -> int | None:
        t = self._requests.get(request_id)
        return t.instance_id if t is not None else None

    def _record_step(self, instance_id: int, step: StepStats) -> None:
        inst = self.instances[instance_id]
        inst.num_running = step.num_running
        inst.num_waiting = step.num_waiting
        inst.free_blocks = step.free_blocks
        inst.total_blocks = step.total_blocks
        inst.last_step_time = step.time


class RoundRobinPolicy(Policy):
    """vLLM / Sarathi-Serve baselines: every instance mixed, requests dealt round robin."""

    def __init__(self, specs: list[InstanceSpec], name: str = "vllm") -> None:
        super().__init__(specs)
        self.name = name
        self._rr = RoundRobin()

    def route(self, req: RouteRequest) -> int | None:
        inst = self._rr.pick(self.instances)
        return inst.instance_id if inst is not None else None


__all__ = [
    "POLICIES",
    "Escalation",
    "InstanceSpec",
    "InstanceState",
    "Policy",
    "RoundRobin",
    "RoundRobinPolicy",
    "RouteRequest",
    "StepStats",
    "default_num_hp",
    "least_loaded",
    "plan_instances",
]
