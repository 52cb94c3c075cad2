"""Discrete-event simulation of N serving instances driven by the real scheduler and policy.

Each simulated instance runs the worker's own ``ascendra.instance.Instance`` (admission, scheduling,
batch shape, commit, token append, finish rules), exactly as ``workers.engine.Engine`` does, with
the forward pass replaced by a step-time source (``ascendra.sim.costs``). The coordinator side is the real routing ``Policy``: it routes
arrivals, hears about tokens, finishes and every step, and returns escalations, which are carried
out with simulated migration:

- a request that has not started moves at once, as a request;
- a started one moves its KV Llumnix-style: the blocks filled so far are copied while the source
  keeps serving it (bulk pre-copy), then at the source's next step boundary it is frozen, the
  blocks written since are copied, and the destination continues it (attach with its computed
  tokens and blocks); the source frees its blocks. A destination short of blocks abandons the
  move and the policy hears ``on_migration_failed``.

Events: arrivals, step completions, bulk-copy completions and migration commits, in time order
(ties in the order they were scheduled). Time never goes backwards. An instance with work runs
iterations back to back, like the real worker's busy loop; an idle one waits to be kicked.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from ascendra.block_manager import OutOfBlocks, blocks_for
from ascendra.config import default
from ascendra.instance import Instance, Step
from ascendra.messages import SamplingParams, StepOutput
from ascendra.perf_model import PerfModel
from ascendra.policies import make_policy
from ascendra.router import InstanceSpec, Policy, RouteRequest, plan_instances
from ascendra.scheduler import SchedulerConfig
from ascendra.sequence import Sequence, SeqStatus
from ascendra.sim.costs import MigrationCost, linear_fns

# Event kinds (events at equal times run in the order they were scheduled).
_STEP, _BULK_DONE, _COMMIT, _ENQUEUE = 1, 2, 3, 4
_TOKEN = 1  # what every simulated sample returns; workloads run with ignore_eos


@dataclass
class SimConfig:
    policy: str = "sarathi"  # vllm | sarathi | ascendra
    num_instances: int = 3
    num_hp: int | None = None  # ascendra: HP instances (default: a third)
    num_blocks: int = 4096  # KV blocks per instance
    block_size: int = 16
    max_num_seqs: int = default("max_num_seqs")
    # ascendra: seats sized to the TBT objectives, up to this many (None: max_num_seqs, fixed).
    max_seats: int | None = None
    # ascendra: each step's prefill budget sized to the decodes' pace, up to this (None: chunk_size).
    max_chunk: int | None = None
    chunk_size: int = default("chunk_size")
    max_model_len: int = 8192
    ttft_slo: float | None = default("ttft_slo")
    tbt_slo: float | None = default("tbt_slo")
    # Ascendra: escalate started requests with their KV (ours) or only unstarted ones (the paper's code).
    escalate_started: bool = True
    # Ablation: the stages at which an escalation is carried out (others are refused as filtered):
    # "waiting" (never scheduled), "prefill" (mid-prefill, moves its KV), "decode" (moves its KV).
    escalate_stages: tuple[str, ...] = ("waiting", "prefill", "decode")
    # Give the LP/HP schedulers the fitted model (LP slack ordering with predicted prefill time,
    # HP latency budget). Off mirrors the real worker, whose Engine builds its Scheduler without it.
    scheduler_uses_model: bool = True  # as the real worker: LP slack and HP budget from the model
    record_token_times: bool = True  # per-token times (ITL and p99-TBT metrics need them)
    # Seconds from arrival at the server to the request reaching its worker (HTTP, routing,
    # ZeroMQ); 0 for GPU-scale simulations, measured on the real server for --fidelity.
    dispatch_latency_s: float = 0.0
    check_invariants: bool = False  # verify block accounting after every event (tests)
    # SLO-aware admission (ascendra): refuse at arrival a request the policy predicts no instance
    # can serve within its TTFT (a server answers 429); it counts as a miss.
    admission: bool = False
    # Ascendra: roles that follow the load (AscendraPolicy adaptive_roles).
    adaptive_roles: bool = False
    # Ascendra: the tight SLO class routed to the HP, the looser kept off it (AscendraPolicy
    # class_routing); off for the ablation.
    class_routing: bool = True
    # Where each instance starts replaying a cost's logged step residuals (SharedHostCost.residuals).
    noise_seed: int = 0


class SimSequence(Sequence):
    """A Sequence plus what the simulated client records."""

    def __init__(self, index: int, prompt_len: int, max_tokens: int, arrival: float,
                 ttft_slo: float | None, tbt_slo: float | None, sampling: SamplingParams) -> None:
        super().__init__(f"sim-{index}", [_TOKEN] * prompt_len, sampling, arrival, ttft_slo, tbt_slo)
        self.index = index
        self.max_tokens = max_tokens
        self.instance = -1
        self.token_times: list[float] = []
        self.error: str | None = None
        self.done = False
        self.enqueued = False  # reached its worker (see SimConfig.dispatch_latency_s)
        self.num_migrations = 0


@dataclass
class _Migration:
    seq: SimSequence
    src: int
    dst: int
    dst_blocks: list[int]
    snapshot_blocks: int
    preemptions: int  # the source's count when the bulk copy began (a preemption voids it)
    started_at: float
    frozen_at: float | None = None


@dataclass
class MigrationStats:
    moved_waiting: int = 0  # unstarted requests moved as requests
    moved_kv: int = 0  # started requests moved with their KV
    failed: int = 0  # destination short of blocks, request lost its KV, or stale
    cancelled: int = 0  # request finished while its blocks were being copied
    filtered: int = 0  # refused by the ablation (escalate_started off, or a stage left out)
    late: int = 0  # escalated for its TTFT, but its first token was out before the move began
    blocks_copied: int = 0
    frozen_s: float = 0.0  # total time requests sat frozen

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class SimInstance:
    """One simulated instance: the worker's own ``Instance`` core, with step times instead of a
    forward pass."""

    def __init__(self, spec: InstanceSpec, cfg: SimConfig, cost, model: PerfModel) -> None:
        self.iid = spec.instance_id
        self.spec = spec
        self.cost = cost
        prefill_time = step_time = None
        self._avg_context = [0.0]  # mean decode context of the last step, for the HP budget
        if cfg.scheduler_uses_model and model.fitted:
            prefill_time, make_step_time = linear_fns(model)
            step_time = make_step_time(self._avg_context)
        self.core = Instance(
            SchedulerConfig(policy=spec.policy, max_num_seqs=cfg.max_num_seqs, chunk_size=cfg.chunk_size,
                            max_model_len=cfg.max_model_len,
                            max_seats=cfg.max_seats if spec.policy in ("lp", "hp") else None,
                            max_chunk=cfg.max_chunk if spec.policy in ("lp", "hp") else None),
            cfg.num_blocks, cfg.block_size, prefill_time=prefill_time, step_time=step_time)
        self.blocks = self.core.blocks
        self.scheduler = self.core.scheduler
        self.inflight: Step | None = None
        self.inflight_time = 0.0  # the in-flight step's duration
        self.pending_freezes: list[_Migration] = []
        self.num_steps = 0
        self.busy_s = 0.0


@dataclass
class SimResult:
    requests: list[SimSequence]
    end_time: float
    migrations: MigrationStats
    instances: list[dict] = field(default_factory=list)
    num_events: int = 0


def build_policy(cfg: SimConfig, specs: list[InstanceSpec]):
    """The coordinator's policy object. Escalating only unstarted requests is also enforced by the
    simulator (the policy counts a request as started once it has a token; the paper's code, once
    it has been scheduled)."""
    opts: dict = {}
    if cfg.policy == "ascendra":
        if not cfg.escalate_started:
            opts["escalate_started"] = False
        if cfg.adaptive_roles:
            opts["adaptive_roles"] = True
        if not cfg.class_routing:
            opts["class_routing"] = False
    return make_policy(cfg.policy, specs, **opts)


class Simulator:
    """One run: a workload through N instances under one policy.

    ``cost``: the step-time truth (anything with ``predict(BatchShape)``). ``model``: the
    PerfModel the system believes (what the workers' profiler would have fitted); the policy and
    the LP/HP schedulers get it. ``migration``: how long KV copies take. ``policy``: a Policy to
    use instead of ``make_policy(cfg.policy)`` (tests).
    """

    def __init__(self, cfg: SimConfig, cost, model: PerfModel, migration: MigrationCost, policy=None) -> None:
        self.cfg = cfg
        self.cost = cost
        self.model = model
        self.link = migration
        self.specs = plan_instances(cfg.policy, cfg.num_instances, cfg.num_hp)
        self.instances = [SimInstance(s, cfg, cost, model) for s in self.specs]
        self.policy: Policy = build_policy(cfg, self.specs) if policy is None else policy
        for inst in self.instances:
            self.policy.set_alive(inst.iid, True)
            # The most a step may prefill there: what the policy's predictions start from.
            chunk = cfg.max_chunk if cfg.max_chunk and inst.spec.policy in ("lp", "hp") else cfg.chunk_size
            self.policy.configure_instance(inst.iid, model.to_list(), chunk, cfg.max_num_seqs,
                                           cfg.block_size)
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object]] = []
        self._counter = 0
        self.active: dict[str, SimSequence] = {}
        self.migrations: dict[str, _Migration] = {}
        self.mstats = MigrationStats()
        self.num_events = 0
        self.escalations_by_reason: dict[str, int] = {}
        self.escalations_by_stage: dict[str, int] = {}  # moves begun, by the request's stage
        self.num_rejected = 0  # refused at arrival (admission)
        self._shared_host = getattr(cost, "predict_shared", None)
        # Logged deviations from the fit, replayed in order from a seeded point per instance, so
        # slow and fast phases last as long as they did on the host.
        self._residuals: list[tuple[list[float], int]] = []
        series = getattr(cost, "residuals", None)
        if series:
            rng = random.Random(cfg.noise_seed)
            for inst in self.instances:
                r = series[inst.iid % len(series)]
                self._residuals.append((r, rng.randrange(len(r))))

    # ------------------------------------------------------------------ event queue
    def _push(self, t: float, kind: int, payload: object) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (t, self._counter, kind, payload))

    def run(self, workload) -> SimResult:
        """workload: RequestSpec-like items (index, arrival_s, prompt_len, output_len), any order."""
        cfg = self.cfg
        arrivals = sorted(workload, key=lambda s: (s.arrival_s, s.index))
        seqs: list[SimSequence] = []
        heap = self._heap
        # Report every instance's pool once, as a registering worker would.
        for inst in self.instances:
            self.policy.on_step(inst.iid, self._step_output(inst, None, 0.0, 0.0))
        i, n = 0, len(arrivals)
        while i < n or heap:
            if heap and (i >= n or heap[0][0] <= arrivals[i].arrival_s):
                t, _, kind, payload = heapq.heappop(heap)
                if t < self.now:
                    raise AssertionError(f"time went backwards: {t} < {self.now}")
                self.now = t
                if kind == _STEP:
                    self._step_done(payload, t)
                elif kind == _BULK_DONE:
                    self._bulk_done(payload, t)
                elif kind == _COMMIT:
                    self._commit(payload, t)
                else:
                    self._enqueue(payload, t)
            else:
                spec = arrivals[i]
                i += 1
                t = max(spec.arrival_s, self.now)
                self.now = t
                ttft = cfg.ttft_slo if getattr(spec, "ttft_slo_s", None) is None else spec.ttft_slo_s
                tbt = cfg.tbt_slo if getattr(spec, "tbt_slo_s", None) is None else spec.tbt_slo_s
                seq = SimSequence(spec.index, spec.prompt_len, spec.output_len, t, ttft, tbt,
                                  SamplingParams(max_tokens=spec.output_len, ignore_eos=True))
                seqs.append(seq)
                self._arrive(seq, t)
            self.num_events += 1
            if cfg.check_invariants:
                self.check_blocks()
        for inst in self.instances:
            if inst.scheduler.has_work() or inst.inflight is not None:
                raise RuntimeError(f"instance {inst.iid} stopped with work left: "
                                   f"{len(inst.scheduler.waiting)} waiting, {len(inst.scheduler.running)} running")
        if self.migrations:
            raise RuntimeError(f"{len(self.migrations)} migrations never finished")
        return SimResult(seqs, self.now, self.mstats, [
            {"instance": inst.iid, "role": inst.spec.role, "steps": inst.num_steps, "busy_s": inst.busy_s,
             "preemptions": inst.scheduler.num_preemptions} for inst in self.instances], self.num_events)

    # ------------------------------------------------------------------ arrivals
    def _arrive(self, seq: SimSequence, t: float) -> None:
        route = RouteRequest(seq.request_id, seq.num_prompt_tokens, seq.max_tokens, t, seq.ttft_slo, seq.tbt_slo)
        if self.cfg.admission and self.policy.would_miss(route):
            self.num_rejected += 1
            self._fail(seq, "rejected: 429, predicted to miss its TTFT objective")
            return
        iid = self.policy.route(route)
        if iid is None:
            self._fail(seq, "no instance could take the request")
            return
        self.policy.on_dispatch(iid, route)
        seq.instance = iid
        if self.cfg.dispatch_latency_s > 0:
            self.active[seq.request_id] = seq
            self._push(t + self.cfg.dispatch_latency_s, _ENQUEUE, seq)
        else:
            self._enqueue(seq, t)

    def _enqueue(self, seq: SimSequence, t: float) -> None:
        """The request reaches its worker: the worker's admission checks, then its queue."""
        inst = self.instances[seq.instance]
        err = inst.core.add(seq)
        if err is not None:
            self.active.pop(seq.request_id, None)
            self._fail(seq, err)
            self.policy.on_finish(seq.request_id)
            return
        self.active[seq.request_id] = seq
        seq.enqueued = True
        self._kick(inst, t)

    def _fail(self, seq: SimSequence, error: str) -> None:
        seq.error = error
        seq.finish_reason = "error"
        seq.done = True

    # ------------------------------------------------------------------ instance steps
    def _kick(self, inst: SimInstance, t: float) -> None:
        """Start an iteration if the instance is idle and has something to run."""
        if inst.inflight is not None or not inst.core.has_work():
            return
        step = inst.core.plan(t)
        if step.is_empty:
            return  # e.g. everything waits for blocks held by a migration; a later kick retries
        shape = step.shape
        if self._shared_host is None:
            dur = inst.cost.predict(shape)
        else:  # instances on one host slow each other down (see costs.SharedHostCost)
            others = sum(o.inflight is not None for o in self.instances)  # inst is idle here
            dur = self._shared_host(shape, others)
        if self._residuals:
            r, start = self._residuals[inst.iid]
            dur *= r[(start + inst.num_steps) % len(r)]
        if not dur > 0:
            dur = 1e-9  # time must move on for a non-empty batch
        if shape.decodes:
            inst._avg_context[0] = shape.decode_context / shape.decodes
        inst.inflight = step
        inst.inflight_time = dur
        self._push(t + dur, _STEP, inst)

    def _step_done(self, inst: SimInstance, t: float) -> None:
        step = inst.inflight
        inst.inflight = None
        # The worker's own commit: K/V in the pool, the sampled token appended, finish rules.
        emitted = inst.core.complete(step, [_TOKEN] * len(step.sampling), t)
        inst.num_steps += 1
        dur = inst.inflight_time
        inst.busy_s += dur
        # The coordinator's order (Coordinator.on_step): each request's tokens, then finishes, then
        # the step goes to the policy; escalations act at the workers' next boundary.
        policy = self.policy
        on_tokens = policy.on_tokens
        record = self.cfg.record_token_times
        for e in emitted:
            seq = e.seq
            if record:
                seq.token_times.append(t)
            if e.first:
                policy.on_first_token(seq.request_id)
            on_tokens(seq.request_id, 1, t)
        for e in emitted:
            if e.finish_reason is not None:
                seq = e.seq
                seq.done = True
                del self.active[seq.request_id]
                policy.on_finish(seq.request_id)
        for esc in policy.on_step(inst.iid, self._step_output(inst, step, t, dur)):
            self._escalate(esc, t)
        if inst.pending_freezes:
            pending, inst.pending_freezes = inst.pending_freezes, []
            for mig in pending:
                self._freeze(mig, t)
        self._kick(inst, t)

    def _step_output(self, inst: SimInstance, step: Step | None, t: float, dur: float) -> StepOutput:
        sched = inst.scheduler
        if step is None:
            pre = dec = pctx = dctx = pairs = nseq = npre = 0
        else:
            shape = step.shape
            pre, pairs, dec, dctx = (shape.prefill_tokens, shape.prefill_attention_pairs, shape.decodes,
                                     shape.decode_context)
            pctx = step.prefill_context_tokens
            nseq, npre = len(step.sched.scheduled), len(step.sched.preempted)
        # outputs stay empty: the simulator reports tokens through on_tokens/on_finish instead.
        return StepOutput(
            worker_id=inst.iid, step=inst.num_steps, outputs=[], num_seqs=nseq, num_prefill_tokens=pre,
            num_decode_tokens=dec, prefill_context_tokens=pctx, decode_context_tokens=dctx, step_time=dur,
            num_running=len(sched.running), num_waiting=len(sched.waiting), num_preempted=npre,
            free_blocks=inst.blocks.num_free, total_blocks=inst.blocks.num_blocks, time=t,
            prefill_attention_pairs=pairs)

    # ------------------------------------------------------------------ escalation
    def _refuse(self, rid: str, t: float) -> None:
        self.mstats.failed += 1
        self.policy.on_migration_failed(rid, t)

    def _escalate(self, esc, t: float) -> None:
        rid = esc.request_id
        self.escalations_by_reason[esc.reason] = self.escalations_by_reason.get(esc.reason, 0) + 1
        seq = self.active.get(rid)
        if seq is None:
            return  # finished already; the policy heard on_finish
        if rid in self.migrations:
            return  # already moving
        if (not seq.enqueued or seq.instance != esc.src or esc.dst == esc.src
                or not 0 <= esc.dst < len(self.instances)):
            self._refuse(rid, t)
            return
        src, dst = self.instances[esc.src], self.instances[esc.dst]
        stage = ("waiting" if not seq.block_table and seq.status is SeqStatus.WAITING
                 else "prefill" if seq.first_token_time is None else "decode")
        if stage not in self.cfg.escalate_stages:
            self.mstats.filtered += 1
            self.policy.on_migration_failed(rid, t)
            return
        if stage == "waiting":
            self._move_waiting(seq, src, dst, t)
            return
        if stage == "decode" and esc.reason == "ttft":
            # The migrator's rule: the prefill finished before the move began; nothing to save.
            self.mstats.late += 1
            self.policy.on_migration_failed(rid, t)
            return
        if not self.cfg.escalate_started:
            # The paper's code only offloads requests that were never scheduled.
            self.mstats.filtered += 1
            self.policy.on_migration_failed(rid, t)
            return
        self.escalations_by_stage[stage] = self.escalations_by_stage.get(stage, 0) + 1
        snap = seq.num_computed_tokens // self.link.block_size
        try:
            dst_blocks = dst.blocks.allocate(snap)
        except OutOfBlocks:
            self._refuse(rid, t)
            return
        mig = _Migration(seq, src.iid, dst.iid, dst_blocks, snap, seq.num_preemptions, t)
        self.migrations[rid] = mig
        self._push(t + self.link.blocks_time(snap), _BULK_DONE, mig)

    def _move_waiting(self, seq: SimSequence, src: SimInstance, dst: SimInstance, t: float) -> None:
        self.escalations_by_stage["waiting"] = self.escalations_by_stage.get("waiting", 0) + 1
        src.core.detach(seq.request_id)
        dst.core.attach(seq)  # no blocks yet: it queues as a new request there
        seq.instance = dst.iid
        seq.num_migrations += 1
        self.mstats.moved_waiting += 1
        self.policy.on_migrated(seq.request_id, dst.iid, t)
        self._kick(dst, t)

    def _bulk_done(self, mig: _Migration, t: float) -> None:
        src = self.instances[mig.src]
        if src.inflight is not None:
            src.pending_freezes.append(mig)  # the worker acts on messages between iterations
        else:
            self._freeze(mig, t)

    def _freeze(self, mig: _Migration, t: float) -> None:
        seq, src, dst = mig.seq, self.instances[mig.src], self.instances[mig.dst]
        rid = seq.request_id
        if seq.done:
            del self.migrations[rid]
            dst.blocks.free(mig.dst_blocks)
            self.mstats.cancelled += 1
            self._kick(dst, t)
            return
        if seq.num_preemptions != mig.preemptions or not seq.block_table:
            # The source dropped its KV meanwhile: the copy is void.
            del self.migrations[rid]
            dst.blocks.free(mig.dst_blocks)
            if not seq.block_table and seq.status is SeqStatus.WAITING:
                self._move_waiting(seq, src, dst, t)
            else:
                self._refuse(rid, t)
            self._kick(dst, t)
            return
        need = blocks_for(seq.num_computed_tokens, self.link.block_size) - mig.snapshot_blocks
        if need > dst.blocks.num_free:
            del self.migrations[rid]
            dst.blocks.free(mig.dst_blocks)
            self._refuse(rid, t)
            self._kick(dst, t)
            return
        if need > 0:
            mig.dst_blocks.extend(dst.blocks.allocate(need))
        src.core.detach(rid)
        mig.frozen_at = t
        self.mstats.blocks_copied += len(mig.dst_blocks)
        self._push(t + self.link.blocks_time(max(need, 1)), _COMMIT, mig)

    def _commit(self, mig: _Migration, t: float) -> None:
        seq, src, dst = mig.seq, self.instances[mig.src], self.instances[mig.dst]
        del self.migrations[seq.request_id]
        src.blocks.release(seq)
        seq.block_table = mig.dst_blocks
        seq.instance = dst.iid
        seq.num_migrations += 1
        dst.core.attach(seq)
        self.mstats.moved_kv += 1
        self.mstats.frozen_s += t - mig.frozen_at
        self.policy.on_migrated(seq.request_id, dst.iid, t)
        self._kick(dst, t)
        self._kick(src, t)

    # ------------------------------------------------------------------ invariants
    def check_blocks(self) -> None:
        """Every allocated block is held by exactly one request or one migration reservation."""
        held = [0] * len(self.instances)
        for seq in self.active.values():
            if seq.block_table:
                held[seq.instance] += len(seq.block_table)
        for mig in self.migrations.values():
            held[mig.dst] += len(mig.dst_blocks)
        for inst in self.instances:
            if inst.blocks.num_used != held[inst.iid]:
                raise AssertionError(f"instance {inst.iid}: {inst.blocks.num_used} blocks used, "
                                     f"{held[inst.iid]} accounted for at t={self.now}")
