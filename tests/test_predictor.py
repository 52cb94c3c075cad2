"""Ascendra's predictor and escalation decisions, as pure code with a known performance model."""

from ascendra.messages import MigrationUpdate, StepOutput, RequestState, SamplingParams, KVSource, PoolHandle
from ascendra.migrator import Migrator
from ascendra.predictor import AscendraPolicy
from ascendra.router import Escalation, RouteRequest, plan_instances

# 10 ms a step plus 1 ms per prefill token and 0.5 ms per decode.
COEF = [0.010, 0.001, 0.0, 0.0005, 0.0]


def make_policy(**kw):
    specs = plan_instances("ascendra", 2, 1)  # instance 0 LP, instance 1 HP
    pol = AscendraPolicy(specs, **kw)
    for s in specs:
        pol.set_alive(s.instance_id, True)
        pol.configure_instance(s.instance_id, COEF, chunk_size=256, max_num_seqs=8, block_size=16)
    return pol


def step(iid, now, running=0, waiting=0, free=900, total=1000, **kw):
    fields = dict(worker_id=iid, step=0, outputs=[], num_running=running, num_waiting=waiting, num_preempted=0,
                  free_blocks=free, total_blocks=total, time=now, step_time=0.0, num_seqs=0, num_prefill_tokens=0,
                  num_decode_tokens=0, prefill_context_tokens=0, decode_context_tokens=0, prefill_attention_pairs=0)
    fields.update(kw)
    return StepOutput(**fields)


def busy_hp(pol, now):
    """Give the HP enough running requests that it has no ticket for new ones."""
    for i in range(4):
        rr = RouteRequest(f"hp{i}", 10, 100, now)
        pol.on_dispatch(1, rr)
        pol.on_tokens(f"hp{i}", 1, now)
    pol.on_step(1, step(1, now, running=4))


def test_tight_ttft_is_escalated_loose_is_not():
    """A slow LP (250 decodes leave 6 prompt tokens a step): the tight request moves, the loose stays."""
    for ttft, expect in ((1.0, True), (30.0, False)):
        pol = make_policy()
        now = 100.0
        busy_hp(pol, now)
        req = RouteRequest("urgent", 100, 20, now, ttft_slo=ttft)
        assert pol.route(req) == 0  # HP holds no ticket: the request lands on the LP
        pol.on_dispatch(0, req)
        lp_step = step(0, now + 0.01, running=250, num_seqs=250, num_decode_tokens=250,
                       decode_context_tokens=250 * 300, step_time=0.14)
        esc = pol.on_step(0, lp_step)
        assert esc == ([Escalation("urgent", 0, 1, "ttft")] if expect else [])
        if not expect:  # ~17 LP steps of ~0.14 s before its first token (one ~0.11 s step on HP)
            assert pol.predicted_first_token(0, now + 0.01)["urgent"] > now + 2.0


def test_new_request_goes_to_idle_hp_with_ticket_when_the_lp_is_busier():
    pol = make_policy()
    pol.on_step(1, step(1, 0.0))
    pol.on_dispatch(0, RouteRequest("x", 100, 20, 0.0, ttft_slo=1.0))
    assert pol.route(RouteRequest("a", 100, 20, 0.0, ttft_slo=1.0)) == 1


def test_low_load_spreads_over_lp_and_hp():
    """Issue 11: at low load every request went to the HP, so its death failed them all. Now the
    HP with a ticket competes on load with the LP: traffic alternates over both."""
    pol = make_policy()
    for iid in (0, 1):
        pol.on_step(iid, step(iid, 0.0))
    placed = []
    for i in range(6):
        req = RouteRequest(f"r{i}", 100, 20, 0.1 * i, ttft_slo=1.0)
        iid = pol.route(req)
        pol.on_dispatch(iid, req)
        placed.append(iid)
    assert placed.count(0) == 3 and placed.count(1) == 3
    pol.set_alive(1, False)  # the HP dies: the LP still takes new work
    assert pol.route(RouteRequest("after", 100, 20, 1.0, ttft_slo=1.0)) == 0


def test_slow_decode_is_escalated_for_tbt():
    # 10 tokens over 1 s: 0.11 s a token, over the 0.05 s objective; 100 decodes: 60 ms steps.
    esc = _decode_on_lp(first_token_ago=1.0, decodes=100, step_time=0.06)
    assert [e.reason for e in esc if e.request_id == "d"] == ["tbt"]


def _decode_on_lp(first_token_ago: float, decodes: int, step_time: float) -> list[Escalation]:
    """A request with 10 tokens on the LP, the first `first_token_ago` s ago; one LP step."""
    pol = make_policy()
    now = 10.0
    busy_hp(pol, now)
    req = RouteRequest("d", 50, 200, now - 2, ttft_slo=5.0, tbt_slo=0.05)
    pol.on_dispatch(0, req)
    pol.on_tokens("d", 1, now - first_token_ago)
    pol.on_tokens("d", 9, now)
    return pol.on_step(0, step(0, now, running=decodes, num_seqs=decodes, num_decode_tokens=decodes,
                               decode_context_tokens=decodes * 50, step_time=step_time))


def test_paper_mode_never_moves_started_requests():
    pol = make_policy(escalate_started=False)
    now = 10.0
    busy_hp(pol, now)
    req = RouteRequest("d", 50, 200, now - 2, ttft_slo=5.0, tbt_slo=0.05)
    pol.on_dispatch(0, req)
    pol.on_tokens("d", 10, now)
    assert pol.on_step(0, step(0, now, running=1, num_seqs=1, num_decode_tokens=100, step_time=0.06)) == []


def test_migration_bookkeeping_moves_the_request():
    pol = make_policy()
    req = RouteRequest("x", 100, 20, 0.0, ttft_slo=1.0)
    pol.on_dispatch(0, req)
    pol.reqs["x"].migrating, pol.reqs["x"].dst = True, 1
    pol.state[1].incoming = 1
    pol.on_migrated("x", 1, 0.5)
    assert pol.instance_of("x") == 1 and pol.instances[0].num_assigned == 0 and pol.instances[1].num_assigned == 1
    assert pol.state[1].incoming == 0
    pol.on_finish("x")
    assert pol.instances[1].num_assigned == 0


def _source(n):
    return KVSource(0, PoolHandle("shm", "x", [1], "float32", "cpu"), list(range(n)), n * 16)


def _state():
    return RequestState("r", [1, 2, 3], [4, 5], 4, SamplingParams(), 0.0)


def test_migrator_happy_path_and_failures():
    sent = []
    mig = Migrator(lambda wid, msg: sent.append((wid, type(msg).__name__)) or True)
    mig.start(Escalation("r", 0, 1), 0.0)
    assert mig.on_update(0, MigrationUpdate("r", "snapshot", source=_source(3)), 0.1) is None
    assert mig.on_update(1, MigrationUpdate("r", "precopied", blocks_copied=3), 0.2) is None
    assert mig.on_update(0, MigrationUpdate("r", "frozen", source=_source(4), state=_state()), 0.3) is None
    res = mig.on_update(1, MigrationUpdate("r", "committed", blocks_copied=1), 0.35)
    assert res.migration.ok and res.migration.blocks_copied == 4 and res.migration.frozen_at == 0.3
    assert sent == [(0, "MigrateOut"), (1, "MigrateIn"), (0, "MigrateFreeze"), (1, "MigrateCommit"),
                    (0, "MigrateRelease")]
    assert not mig.active

    # destination full at pre-copy: the source is told to carry on
    sent.clear()
    mig.start(Escalation("r", 0, 1), 1.0)
    mig.on_update(0, MigrationUpdate("r", "snapshot", source=_source(3)), 1.1)
    res = mig.on_update(1, MigrationUpdate("r", "failed", error="no room"), 1.2)
    assert not res.migration.ok and sent[-1] == (0, "MigrateCancel")

    # the request finished on the source before the freeze
    sent.clear()
    mig.start(Escalation("r", 0, 1), 2.0)
    mig.on_update(0, MigrationUpdate("r", "snapshot", source=_source(3)), 2.1)
    mig.on_update(1, MigrationUpdate("r", "precopied", blocks_copied=3), 2.2)
    res = mig.on_update(0, MigrationUpdate("r", "gone"), 2.3)
    assert not res.migration.ok and sent[-1] == (1, "MigrateCancel")

    # the destination died mid-way
    sent.clear()
    mig.start(Escalation("r", 0, 1), 3.0)
    mig.on_update(0, MigrationUpdate("r", "snapshot", source=_source(3)), 3.1)
    (res,) = mig.on_worker_down(1)
    assert not res.migration.ok and sent[-1] == (0, "MigrateCancel") and not mig.active

    # a waiting request moves as a request
    mig.start(Escalation("r", 0, 1), 4.0)
    res = mig.on_update(0, MigrationUpdate("r", "moved", state=_state()), 4.1)
    assert res.migration.ok and res.migration.kind == "waiting" and res.moved_state.request_id == "r"


def test_migrator_drops_a_ttft_move_whose_first_token_came_out_first():
    """The prefill finished between the escalation and the source's snapshot: the TTFT is
    settled, so the move is called off; a move for TBT goes on with the decode's KV."""
    sent = []
    mig = Migrator(lambda wid, msg: sent.append((wid, type(msg).__name__)) or True)
    mig.start(Escalation("r", 0, 1, "ttft"), 0.0)
    mig.on_first_token("r")
    res = mig.on_update(0, MigrationUpdate("r", "snapshot", source=_source(3)), 0.1)
    assert not res.migration.ok and res.migration.error == "first token already out"
    assert sent == [(0, "MigrateOut"), (0, "MigrateCancel")] and not mig.active

    sent.clear()
    mig.start(Escalation("r", 0, 1, "tbt"), 1.0)
    mig.on_first_token("r")
    assert mig.on_update(0, MigrationUpdate("r", "snapshot", source=_source(3)), 1.1) is None
    assert sent[-1] == (1, "MigrateIn")

    # still mid-prefill at the snapshot: the TTFT move carries its KV as before
    sent.clear()
    mig = Migrator(lambda wid, msg: sent.append((wid, type(msg).__name__)) or True)
    mig.start(Escalation("q", 0, 1, "ttft"), 2.0)
    assert mig.on_update(0, MigrationUpdate("q", "snapshot", source=_source(3)), 2.1) is None
    assert sent[-1] == (1, "MigrateIn")


def test_a_prompt_whose_first_token_arrived_is_not_escalated_for_ttft():
    """The coordinator hands the policy a step's tokens before the step: a request that got its
    first token in that step is no longer waiting for one, however slow the LP is."""
    pol = make_policy()
    now = 100.0
    busy_hp(pol, now)
    req = RouteRequest("urgent", 100, 20, now, ttft_slo=1.0)
    pol.on_dispatch(0, req)
    pol.on_tokens("urgent", 1, now + 0.01)
    lp_step = step(0, now + 0.01, running=250, num_seqs=250, num_decode_tokens=250,
                   decode_context_tokens=250 * 300, step_time=0.14)
    assert pol.on_step(0, lp_step) == []
    assert "urgent" not in pol.predicted_first_token(0, now + 0.01)


def test_decode_behind_pace_that_lp_can_catch_up_stays():
    """Slightly behind pace, but a decode-only LP step (10.5 ms) is far inside the 50 ms objective:
    the LP scheduler catches it up, so moving it would only spend HP capacity."""
    esc = _decode_on_lp(first_token_ago=0.52, decodes=1, step_time=0.0105)  # 58 ms a token so far
    assert esc == []


def test_first_token_prediction_uses_the_prefill_budget_the_lp_measured():
    """While prompts wait, the LP has been prefilling 32 tokens a step (its pacing trims the chunk):
    a 320-token prompt is 10 such steps away, not 2 full chunks."""
    pol = make_policy()
    busy_hp(pol, 0.0)
    pol.on_dispatch(0, RouteRequest("p", 320, 10, 0.0, ttft_slo=100.0))
    for i in range(40):
        pol.on_step(0, step(0, 0.01 * i, running=3, waiting=1, num_seqs=3, num_prefill_tokens=32,
                            num_decode_tokens=2, decode_context_tokens=100, step_time=0.043))
    t = pol.predicted_first_token(0, 1.0)["p"]
    assert abs(t - (1.0 + 10 * (0.010 + 0.032 + 0.001))) < 0.02


def _three(**kw):
    specs = plan_instances("ascendra", 3, 1)  # 0, 1 LP; 2 HP
    pol = AscendraPolicy(specs, **kw)
    for s in specs:
        pol.set_alive(s.instance_id, True)
        pol.configure_instance(s.instance_id, COEF, chunk_size=256, max_num_seqs=8, block_size=16)
    return pol


def _fill_hp(pol, iid, now):
    """Seats on HP ``iid`` all taken: it can take no escalation."""
    for i in range(8):
        rr = RouteRequest(f"full{iid}-{i}", 10, 100, now)
        pol.on_dispatch(iid, rr)
        pol.on_tokens(rr.request_id, 1, now)
    pol.on_step(iid, step(iid, now, running=8))


def test_adaptive_roles_promote_an_lp_when_no_hp_can_take_a_request_at_risk():
    for adaptive in (False, True):
        pol = _three(adaptive_roles=adaptive)
        now = 100.0
        _fill_hp(pol, 2, now)
        pol.on_step(1, step(1, now))
        req = RouteRequest("urgent", 100, 20, now, ttft_slo=1.0)
        pol.on_dispatch(0, req)
        esc = pol.on_step(0, step(0, now + 0.01, running=250, num_seqs=250, num_decode_tokens=250,
                                  decode_context_tokens=250 * 300, step_time=0.14))
        if not adaptive:
            assert esc == [] and [i.role for i in pol.instances] == ["lp", "lp", "hp"]
        else:  # instance 1 (the other LP, idle) becomes HP and takes the request at once
            assert esc == [Escalation("urgent", 0, 1, "ttft")]
            assert [i.role for i in pol.instances] == ["lp", "hp", "hp"]
            assert pol.role_changes == [(now + 0.01, 1, "hp")]


def test_adaptive_roles_keep_the_last_lp():
    pol = _three(adaptive_roles=True)
    pol.set_alive(1, False)  # the only other LP is gone: nobody to promote
    _fill_hp(pol, 2, 100.0)
    pol.on_dispatch(0, RouteRequest("urgent", 100, 20, 100.0, ttft_slo=1.0))
    pol.on_step(0, step(0, 100.01, running=250, num_seqs=250, num_decode_tokens=250,
                        decode_context_tokens=250 * 300, step_time=0.14))
    assert [i.role for i in pol.instances] == ["lp", "lp", "hp"] and pol.role_changes == []


def test_adaptive_roles_demote_an_hp_nobody_escalated_to_for_the_window():
    # Longest TTFT objective seen: 1 s, so the window is ROLE_IDLE_TTFTS (4) x 1 s.
    pol = _three(adaptive_roles=True)
    pol.on_dispatch(0, RouteRequest("a", 10, 10, 0.0, ttft_slo=1.0))
    pol._last_escalated_to[2] = 10.0  # an escalation reached the HP at t=10
    pol._last_role_change = 10.0
    pol.on_step(2, step(2, 13.9, running=1, num_seqs=1, num_decode_tokens=1, step_time=0.01))
    assert pol.instances[2].role == "hp"  # 3.9 s idle: within the window
    pol.on_step(2, step(2, 14.0, running=1, num_seqs=1, num_decode_tokens=1, step_time=0.01))
    assert pol.instances[2].role == "lp" and pol.role_changes == [(14.0, 2, "lp")]
    # Without any objective seen there is no window to size, so no role changes.
    quiet = _three(adaptive_roles=True)
    quiet.on_step(2, step(2, 1000.0))
    assert quiet.instances[2].role == "hp"
    # Off (the default): roles never change.
    fixed = _three()
    fixed.on_dispatch(0, RouteRequest("a", 10, 10, 0.0, ttft_slo=1.0))
    fixed.on_step(2, step(2, 1000.0))
    assert fixed.instances[2].role == "hp"


def _route_mixed(pol, n):
    """Alternate an interactive and a relaxed request, n of each, dispatching each where routed."""
    placed = {"tight": [], "loose": []}
    for i in range(n):
        for kind, ttft, tbt in (("tight", 1.0, 0.05), ("loose", 5.0, 0.5)):
            req = RouteRequest(f"{kind}{i}", 20, 20, 0.01 * i, ttft_slo=ttft, tbt_slo=tbt)
            iid = pol.route(req)
            pol.on_dispatch(iid, req)
            placed[kind].append(iid)
    return placed


def test_mixed_slo_classes_are_routed_apart():
    """The tight class goes to the HP while its steps stay inside that class's TBT; the looser
    class is kept off an HP serving tighter requests, whose steps its decodes would lengthen."""
    pol = make_policy()
    for iid in (0, 1):
        pol.on_step(iid, step(iid, 0.0))
    placed = _route_mixed(pol, 3)
    # The first pair comes before the classes are known apart: routed on load.
    assert placed["tight"][1:] == [1, 1]
    assert placed["loose"][1:] == [0, 0]


def test_looser_class_shares_the_hp_once_the_lp_is_busy_and_the_hp_keeps_pace():
    """With the LP's steps past BALANCE_LP_SHARE of the looser class's TBT (0.2 x 0.5 s) and the
    HP's well inside the tight class's, a looser request may go to the HP, which then competes on
    load (the LP holds more). Once the HP's steps near the tight objective, it is kept off again."""
    pol = make_policy()
    for i in range(12):  # the LP holds 12 looser requests, decoding in steps of 0.15 s
        pol.on_dispatch(0, RouteRequest(f"held{i}", 20, 200, 0.0, ttft_slo=5.0, tbt_slo=0.5))
    for k in range(20):
        pol.on_step(0, step(0, 0.15 * k, running=12, num_seqs=12, num_decode_tokens=12,
                            decode_context_tokens=240, step_time=0.15))
    pol.on_step(1, step(1, 0.0))
    placed = _route_mixed(pol, 3)
    assert placed["tight"][1:] == [1, 1]
    assert 1 in placed["loose"][1:]  # shares the HP: the busy LP was the heavier
    # The HP's steps now average 48 ms against the tight class's 50 ms: paced at the edge.
    for k in range(20):
        pol.on_step(1, step(1, 3.0 + 0.05 * k, running=2, num_seqs=2, num_decode_tokens=2,
                            decode_context_tokens=40, step_time=0.048))
    req = RouteRequest("loose-later", 20, 20, 4.0, ttft_slo=5.0, tbt_slo=0.5)
    assert pol.route(req) == 0
    # And with the LP idle (steps averaging 0), the looser class stays off an HP serving the
    # tight one however fast the HP runs (test_mixed_slo_classes_are_routed_apart).


def test_without_class_routing_the_classes_share_the_hp_ticket():
    pol = make_policy(class_routing=False)
    for iid in (0, 1):
        pol.on_step(iid, step(iid, 0.0))
    placed = _route_mixed(pol, 3)
    assert 0 in placed["tight"] and 1 in placed["loose"]


def test_tight_class_overflows_to_the_lp_when_the_hp_steps_would_break_its_tbt():
    pol = make_policy()
    pol.on_step(0, step(0, 0.0))
    # 80 decodes on the HP: 10 ms + 40 ms > the 50 ms objective with one more.
    pol.on_step(1, step(1, 0.0, running=80, num_seqs=80, num_decode_tokens=80, decode_context_tokens=800))
    placed = _route_mixed(pol, 2)
    assert placed["tight"] == [0, 0]


def test_tight_class_goes_to_the_lp_while_the_hp_steps_run_at_its_pace():
    """An HP whose recent steps average near the tight class's TBT objective (paced at the edge)
    takes no more of that class, not even through the ticket; the LP serves it, least slack first.
    Once the HP reports itself idle, it takes the class again."""
    pol = make_policy()
    pol.on_step(0, step(0, 0.0))
    # Two decodes on the HP (a one-more-decode step is 11.5 ms, well inside 50 ms), but its steps
    # have run 48 ms each: pacing spends the decodes' slack on prefills up to the objective.
    for k in range(20):
        pol.on_step(1, step(1, 0.05 * k, running=2, num_seqs=2, num_decode_tokens=2, decode_context_tokens=40,
                            step_time=0.048))
    placed = _route_mixed(pol, 3)
    assert placed["tight"][1:] == [0, 0]
    assert placed["loose"][1:] == [1, 1]  # the ticket still lets the looser class in: it holds no tighter one
    pol.on_step(1, step(1, 2.0, running=0, waiting=0))  # drained
    req = RouteRequest("later", 20, 20, 2.0, ttft_slo=1.0, tbt_slo=0.05)
    assert pol.route(req) == 1


def test_a_tight_prompt_passes_the_looser_queue_on_an_lp():
    """An LP holding 2,000 tokens of relaxed prompts (5 s TTFT) is hopeless for a tight prompt only
    if it served them first; it serves least slack first, so the tight one is not, and stays on
    the LP rather than spilling to the least-loaded instance of all."""
    pol = make_policy()
    for iid in (0, 1):
        pol.on_step(iid, step(iid, 0.0))
    for i in range(8):  # 256-token steps at 10 ms + 1 ms per token: ~2.7 s to clear them all
        req = RouteRequest(f"loose{i}", 250, 20, 0.0, ttft_slo=5.0, tbt_slo=0.5)
        pol.on_dispatch(0, req)
    tight = RouteRequest("tight", 20, 20, 0.0, ttft_slo=1.0, tbt_slo=0.05)
    assert not pol._hopeless_on(pol.instances[0], tight)
    # Behind a long prompt due before it, a request is hopeless there (2,020 tokens: ~2.1 s > 1 s).
    late = RouteRequest("late", 20, 20, 0.0, ttft_slo=1.0, tbt_slo=0.5)
    pol.on_dispatch(0, RouteRequest("due-first", 2000, 20, 0.0, ttft_slo=0.5, tbt_slo=0.5))
    assert pol._hopeless_on(pol.instances[0], late)
