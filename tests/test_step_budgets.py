"""Issue 14: step budgets sized to deadlines (seats and prefill tokens), on the pure scheduler, the
bound and the simulator's variants."""

from __future__ import annotations

import pytest

from ascendra.block_manager import BlockManager
from ascendra.messages import SamplingParams
from ascendra.perf_model import PerfModel
from ascendra.scheduler import SEAT_STEP_SHARE, Scheduler, SchedulerConfig
from ascendra.sequence import Sequence
from ascendra.sim.bound import throughput_bound
from ascendra.sim.sweep import VARIANTS, simulate
from bench.workloads import RequestSpec
from tests.test_sim import small_setup

SP = SamplingParams(max_tokens=1000, temperature=0.0)


def seq(rid, n, arrival=0.0, ttft=None, tbt=None, max_tokens=1000):
    return Sequence(rid, list(range(n)), SamplingParams(max_tokens=max_tokens), arrival, ttft, tbt)


def make(policy="lp", seqs=2, chunk=64, max_seats=None, max_chunk=None, blocks=1000,
         step_time=lambda p, d: 0.010 + 0.001 * p + 0.002 * d):
    cfg = SchedulerConfig(policy, seqs, chunk, 4096, max_seats=max_seats, max_chunk=max_chunk)
    return Scheduler(cfg, BlockManager(blocks, 16), step_time=step_time)


def test_config_refuses_caps_below_the_fixed_ones():
    with pytest.raises(ValueError, match="max_seats"):
        SchedulerConfig("lp", 8, 64, 4096, max_seats=4)
    with pytest.raises(ValueError, match="max_chunk"):
        SchedulerConfig("lp", 8, 64, 4096, max_chunk=32)


def test_seat_limit_fills_the_tightest_tbt_share():
    # A step of B decodes and a full 64-token chunk: 10 ms + 64 ms + 2 ms x B. Under 0.9 x 0.3 s
    # = 0.27 s that is B <= 98; the ceiling is 200.
    assert SEAT_STEP_SHARE == 0.9
    s = make(max_seats=200)
    s.add(seq("a", 10, tbt=0.3))
    s.add(seq("b", 10, tbt=1.0))
    assert s.seat_limit() == 98
    s.add(seq("tight", 10, tbt=0.15))  # 0.135 s: B <= 30
    assert s.seat_limit() == 30
    s.waiting[-1].hopeless = True  # a hopeless request's objective no longer sizes anything
    assert s.seat_limit() == 98


def test_seat_limit_keeps_the_fixed_cap_when_off_or_too_slow():
    s = make(max_seats=None)
    s.add(seq("a", 10, tbt=0.5))
    assert s.seat_limit() == 2  # no max_seats: max_num_seqs, as the baselines
    s = make(max_seats=200)
    s.add(seq("a", 10, tbt=0.05))  # even 2 seats take 0.078 s > 0.045 s: never fewer than the fixed cap
    assert s.seat_limit() == 2
    s = make(max_seats=200)
    s.add(seq("a", 10))  # no TBT objective held: the ceiling
    assert s.seat_limit() == 200
    s = Scheduler(SchedulerConfig("lp", 2, 64, 4096, max_seats=200), BlockManager(1000, 16))
    s.add(seq("a", 10, tbt=0.5))
    assert s.seat_limit() == 2  # no step-time model: nothing to size with


def test_lp_admits_past_max_num_seqs_while_steps_have_room_sarathi_does_not():
    lp = make(seqs=2, chunk=512, max_seats=6)
    for i in range(10):
        lp.add(seq(f"r{i}", 10, ttft=5.0, tbt=1.0))
    out = lp.schedule(0.0)
    assert len(out.scheduled) == 6 and len(lp.running) == 6  # 0.01 + 0.512 + 0.012 <= 0.9
    sarathi = Scheduler(SchedulerConfig("sarathi", 2, 512, 4096), BlockManager(1000, 16))
    for i in range(10):
        sarathi.add(seq(f"r{i}", 10, ttft=5.0, tbt=1.0))
    assert len(sarathi.schedule(0.0).scheduled) == 2


def test_prefill_budget_grows_past_the_chunk_when_decodes_have_room():
    # A decode on pace with a 0.5 s TBT, at its last token: a step may take 0.5 s, i.e. 10 ms + 1 ms
    # a prefill token + 2 ms for the decode: 488 tokens. The fixed chunk (64) caps it without
    # max_chunk; with max_chunk 300 the step prefills 300 - 1 (the decode's token counts).
    for max_chunk, expect in ((None, 63), (300, 299), (1000, 488)):
        s = make(seqs=8, chunk=64, max_chunk=max_chunk)
        d = seq("dec", 5, tbt=0.5, max_tokens=2)  # its next token is its last: no later slack
        s.add(d)
        out = s.schedule(0.0)
        s.commit(out)
        d.token_ids.append(7)
        d.first_token_time = 0.0
        s.add(seq("new", 2000, ttft=50.0))
        out = s.schedule(0.0)
        assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("dec", 1), ("new", expect)]


def test_prefill_budget_stays_at_the_chunk_without_decodes_or_when_overloaded():
    s = make(seqs=8, chunk=64, max_chunk=1000)
    s.add(seq("new", 2000, ttft=50.0))
    assert s.schedule(0.0).num_tokens == 64  # no decode to pace: no reason to stretch the step
    s = make(seqs=8, chunk=64, max_chunk=1000)
    s.add(seq("late", 2000, arrival=0.0, ttft=0.1))
    assert s.schedule(1.0).num_tokens == 64  # a prompt past its TTFT: full chunks, as Sarathi


def test_bound_memory_caps_the_decodes():
    # Linear steps as in test_sim_bound: 10 ms + 1 ms a prefill token + 0.5 ms a decode; prompts 100,
    # outputs 10: a request holds 105 tokens halfway. A 525-token pool holds B = 5.
    cost = PerfModel.from_list([0.01, 0.001, 0.0, 0.0005, 0.0])
    reqs = [RequestSpec(i, 0.0, 100, 10) for i in range(4)]
    b = throughput_bound(cost, reqs, None, 8, 2, kv_tokens=525)
    step = 0.01 + 0.001 * 50 + 0.0005 * 5
    assert b.binding == "memory" and b.decodes == 5 and b.rate == pytest.approx(2 * 5 / (10 * step))
    assert throughput_bound(cost, reqs, None, 8, 2).decodes == 8


def test_variants_set_the_caps_they_name():
    setup = small_setup(num_requests=40)
    seen = {}
    for name in ("sarathi-seats", "sarathi-wide", "ascendra-budget", "ascendra-budget-chunk", "ascendra-hp0",
                 "ascendra-hp2", "ascendra-adaptive"):
        res = simulate(setup, VARIANTS[name], 4.0)
        seen[name] = [i["role"] for i in res["sim"]["instances"]]
        assert res["summary"]["num_requests"] == 40
    assert seen["ascendra-hp0"] == ["lp", "lp", "lp"] and seen["ascendra-hp2"] == ["lp", "hp", "hp"]
    assert seen["sarathi-wide"] == ["mixed"] * 3


def test_deadline_seats_serve_a_seat_bound_load_the_fixed_cap_cannot():
    # Seats bind: 4 per instance, steps far under the 0.05 s TBT (at 40 req/s the fixed cap serves
    # ~68% in time, the sized seats all). Sized seats hold more requests at once, so more of them
    # meet their TTFT.
    setup = small_setup(num_requests=300, max_num_seqs=4)
    fixed = simulate(setup, VARIANTS["ascendra"], 40.0)
    sized = simulate(setup, VARIANTS["ascendra-budget"], 40.0)
    assert sized["summary"]["attainment"] >= fixed["summary"]["attainment"] + 0.2


def test_scenario_reports_again_from_saved_points(tmp_path):
    """--from-points rebuilds the tables (splits, step budgets) and the overview figure from what
    an --out run saved, without simulating: the README's table is reproducible from the files."""
    from ascendra.sim.__main__ import main

    common = ["--dataset", "sharegpt", "--num-requests", "60", "--num-instances", "3", "--rates", "2,200",
              "--refine", "0", "--jobs", "1", "--no-token-times", "--cost", "coef:[4e-3,4e-5,2e-9,1e-4,2e-7]",
              "--num-blocks", "1024", "--max-num-seqs", "4", "--ttft-slo", "0.5", "--tbt-slo", "0.05"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(common + ["--policy", "sarathi,ascendra", "--out", str(first)]) == 0
    assert main(common + ["--policy", "ascendra-hp0,sarathi-seats,ascendra-budget", "--out", str(second)]) == 0
    again = tmp_path / "c"
    names = "sarathi,ascendra,ascendra-hp0,sarathi-seats,ascendra-budget"
    assert main(common + ["--policy", names, "--from-points", f"{first},{second}", "--out", str(again)]) == 0
    import json

    merged = json.loads((again / "summary.json").read_text())["workloads"]["sharegpt"]["capacity_rps"]
    for d, pols in ((first, ("sarathi", "ascendra")), (second, ("ascendra-hp0", "sarathi-seats", "ascendra-budget"))):
        caps = json.loads((d / "summary.json").read_text())["workloads"]["sharegpt"]["capacity_rps"]
        assert {p: merged[p] for p in pols} == {p: caps[p] for p in pols}
    md = (again / "summary.md").read_text()
    assert "Splits (" in md and "Step budgets (" in md
    with pytest.raises(SystemExit, match="no points for sharegpt/vllm"):
        main(common + ["--policy", "vllm", "--from-points", str(first), "--out", str(tmp_path / "d")])


def test_worker_engine_holds_deadline_sized_seats_and_outputs_stay_the_same(tiny_model):
    """The real worker's engine with --max-seats / --max-chunk (lp): more requests run at once
    than --max-num-seqs, steps prefill past the chunk, and greedy outputs equal the fixed caps'."""
    import time

    from ascendra.messages import AddRequest
    from tests.runtime_utils import greedy, make_engine, run_all

    prompts = [[(7 * i + j) % 200 + 3 for j in range(20 + i)] for i in range(6)]
    want, _ = run_all(make_engine(tiny_model, policy="lp", max_num_seqs=2), prompts, greedy(6, ignore_eos=True))
    engine = make_engine(tiny_model, policy="lp", max_num_seqs=2, chunk_size=32, max_seats=6, max_chunk=128)
    engine.scheduler.step_time = lambda prefill, decodes: 0.001 + 0.0001 * prefill + 0.0002 * decodes
    engine.scheduler.prefill_time = lambda n: 0.001 + 0.0001 * n
    now = time.monotonic()
    for i, p in enumerate(prompts):
        assert engine.add_request(AddRequest(f"r{i}", p, greedy(6, ignore_eos=True), now, 10.0, 1.0)) is None
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    most_running = most_prefill = 0
    while engine.has_work():
        result = engine.step()
        most_running = max(most_running, len(engine.scheduler.running))
        most_prefill = max(most_prefill, result.num_prefill_tokens)
        for out in result.outputs:
            tokens[out.request_id].extend(out.new_token_ids)
    assert most_running > 2 and most_prefill > 32
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == want
    # The baselines keep their fixed caps whatever the flags say.
    assert make_engine(tiny_model, policy="sarathi", max_seats=256).scheduler.config.max_seats is None


def test_server_flags_refuse_caps_below_the_fixed_ones():
    from ascendra.config import check

    assert check({"max_seats": 256, "max_chunk": 2048}).max_seats == 256
    with pytest.raises(ValueError, match="--max-seats"):
        check({"max_seats": 4})
    with pytest.raises(ValueError, match="--max-chunk"):
        check({"max_chunk": 4})


def test_worker_scheduler_guesses_decode_steps_at_their_context():
    """The worker's scheduler prices a step's decodes at the last step's mean context, as the
    simulator's instances do: long contexts make decode steps slower, and pacing that left them
    out planned prefills into steps past the TBT objective."""
    from types import SimpleNamespace

    from workers.worker import Worker

    model = PerfModel([0.006, 3e-5, 5e-8, 1.8e-4, 1.6e-6])
    w = SimpleNamespace(perf=model, decode_context_mean=0.0)
    short = Worker.scheduler_step_time(w, 256, 10)
    w.decode_context_mean = 2000.0
    long = Worker.scheduler_step_time(w, 256, 10)
    assert long == pytest.approx(model.step_time(256, 10, 20_000))
    assert long - short == pytest.approx(10 * 2000 * 1.6e-6)  # 32 ms the guess used to leave out


def _paced_mean_tbt(slowdown: float, with_bias: bool) -> tuple[float, float]:
    """One decode paced against a stream of prompts on an lp instance whose steps run ``slowdown``
    times longer than its model says: (the decode's mean TBT, the bias factor learned)."""
    from ascendra.instance import Instance

    model = lambda p, d: 0.004 + 0.0001 * p + 0.001 * d  # noqa: E731
    inst = Instance(SchedulerConfig("lp", 8, 512, 4096), 4000, 16, step_time=model)
    if not with_bias:
        inst.scheduler.bias.observe = lambda predicted, actual: None  # the model taken as it is
    dec = Sequence("dec", list(range(8)), SamplingParams(max_tokens=120), 0.0, 50.0, 0.02)
    inst.add(dec)
    for i in range(200):  # prompts enough to fill every step the decode's pace leaves room for
        inst.add(Sequence(f"p{i}", list(range(300)), SamplingParams(max_tokens=1), 0.0, 100.0, None))
    now = 0.0
    while "dec" in inst.requests:
        step = inst.plan(now)
        now += model(step.sched.num_prefill_tokens, step.sched.num_decode_tokens) * slowdown
        inst.complete(step, [1] * len(step.sampling), now)
    mean_tbt = (dec.last_token_time - dec.first_token_time) / (dec.sampling.max_tokens - 1)
    return mean_tbt, inst.scheduler.bias.factor


def test_pacing_learns_how_far_the_model_under_predicts_and_keeps_the_decode_inside_its_tbt():
    # Steps 15% slower than predicted: pacing to the model alone spends the decode's slack on
    # prefills priced too cheap and lands it over its 20 ms objective; pacing with the measured
    # bias keeps it inside. An exact model learns no bias (a factor of 1, the old pacing).
    tbt_alone, _ = _paced_mean_tbt(1.15, with_bias=False)
    tbt_biased, factor = _paced_mean_tbt(1.15, with_bias=True)
    assert tbt_alone > 0.02
    assert factor == pytest.approx(1.15)
    assert tbt_biased <= 0.02 and tbt_biased > 0.018  # still spends its slack, just not more
    tbt_exact, factor = _paced_mean_tbt(1.0, with_bias=True)
    assert factor == pytest.approx(1.0) and tbt_exact <= 0.02


def test_step_time_bias_is_a_clipped_mean_never_below_one():
    from ascendra.scheduler import BIAS_MIN_STEPS, StepTimeBias

    b = StepTimeBias(window=32)
    for _ in range(BIAS_MIN_STEPS - 1):
        b.observe(0.01, 0.02)
    assert b.factor == 1.0  # too few steps seen: the model as it is
    b.observe(0.01, 0.02)
    assert b.factor == pytest.approx(2.0)
    for _ in range(32):
        b.observe(0.01, 0.008)  # faster than predicted: no discount, the window forgot the slow ones
    assert b.factor == 1.0
    b.observe(0.01, 5.0)  # one stall counts at most 2x
    assert b.factor == 1.0
    b.observe(0.0, 0.01)  # nothing to compare
    assert len(b._ratios) == 32
