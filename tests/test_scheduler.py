"""The local batch scheduler and block manager, as pure code (no model, no clock)."""

import math
import random

import pytest

from ascendra.block_manager import BlockManager, OutOfBlocks
from ascendra.messages import SamplingParams
from ascendra.scheduler import END_MARGIN_SPREADS, PACE_BANK_SHARE, Scheduler, SchedulerConfig
from ascendra.sequence import Sequence

SP = SamplingParams(max_tokens=1000, temperature=0.0)


def seq(rid, n, arrival=0.0, ttft=None, tbt=None, max_tokens=None):
    sp = SP if max_tokens is None else SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Sequence(rid, list(range(n)), sp, arrival, ttft, tbt)


def make(policy, blocks=100, chunk=64, seqs=128, max_len=4096, **kw):
    bm = BlockManager(blocks, 16)
    return Scheduler(SchedulerConfig(policy, seqs, chunk, max_len), bm, **kw), bm


def advance(s: Scheduler, out, now=1.0):
    """Pretend the step ran: commit, append a token to whoever sampled."""
    s.commit(out)
    for x in out.scheduled:
        if x.samples:
            x.seq.token_ids.append(7)
            if x.seq.first_token_time is None:
                x.seq.first_token_time = now


def test_block_manager_refcounts_and_errors():
    bm = BlockManager(4, 16)
    a = bm.allocate(3)
    bm.incref(a[:1])
    bm.free(a)
    assert bm.num_free == 3
    bm.free(a[:1])
    assert bm.num_free == 4
    with pytest.raises(ValueError):
        bm.free(a[:1])
    with pytest.raises(OutOfBlocks):
        bm.allocate(5)


def test_block_manager_grow_is_all_or_nothing():
    bm = BlockManager(3, 16)
    s = seq("a", 10)
    assert bm.grow(s, 40) and len(s.block_table) == 3
    t = seq("b", 10)
    assert not bm.grow(t, 1) and t.block_table == []
    bm.release(s)
    assert bm.num_free == 3


def test_block_manager_reuses_the_most_recently_freed_blocks():
    # A worker's CPU pool is shared memory faulted in page by page: reusing hot blocks keeps its
    # resident set at its peak KV use instead of sweeping the whole pool as requests come and go.
    bm = BlockManager(100, 16)
    for _ in range(50):
        held = bm.allocate(3)
        bm.free(held)
    assert bm.allocate(3) == held[::-1]
    touched = set()
    for _ in range(200):
        held = bm.allocate(5)
        touched.update(held)
        bm.free(held)
    assert len(touched) <= 8  # FIFO reuse would have touched all 100


def test_sarathi_chunks_and_decodes_first():
    s, _ = make("sarathi", chunk=64)
    a, b = seq("a", 100), seq("b", 30, arrival=1.0)
    s.add(a), s.add(b)
    out = s.schedule(0.0)
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("a", 64)]
    advance(s, out)
    out = s.schedule(0.0)  # a's remaining 36, then b's first 28
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("a", 36), ("b", 28)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    advance(s, out)
    out = s.schedule(0.0)  # a decodes first, then b's last 2 prompt tokens
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("a", 1), ("b", 2)]
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 2


def test_vllm_prefill_first_whole_prompts_and_no_mixed_batches():
    s, _ = make("vllm")
    a = seq("a", 100)
    s.add(a)
    out = s.schedule(0.0)
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("a", 100)]
    advance(s, out)
    s.add(seq("b", 50, arrival=1.0))
    out = s.schedule(0.0)  # the new prompt goes alone: a's decode waits
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("b", 50)]
    advance(s, out)
    out = s.schedule(0.0)
    assert sorted(x.seq.request_id for x in out.scheduled) == ["a", "b"]
    assert all(x.num_tokens == 1 for x in out.scheduled)


def test_sarathi_does_not_skip_a_head_that_does_not_fit():
    s, bm = make("sarathi", blocks=8, chunk=512)
    s.add(seq("big", 200))  # 13 blocks: never fits 8 (the engine rejects these up front)
    s.add(seq("small", 10, arrival=1.0))
    assert s.schedule(0.0).is_empty


def test_lp_orders_by_least_slack_and_skips():
    s, _ = make("lp", blocks=8, chunk=512, prefill_time=lambda n: n * 0.001)
    s.add(seq("big", 200, arrival=0.0, ttft=10.0))  # cannot fit: skipped, not waited on
    s.add(seq("loose", 10, arrival=0.0, ttft=5.0))
    s.add(seq("tight", 10, arrival=1.0, ttft=1.5))
    s.add(seq("hopeless", 10, arrival=0.0, ttft=0.5))
    s.add(seq("no_slo", 10, arrival=0.0))
    out = s.schedule(1.0)
    assert [x.seq.request_id for x in out.scheduled] == ["tight", "loose", "no_slo", "hopeless"]


def test_hp_earliest_deadline_first():
    s, _ = make("hp", chunk=512)
    s.add(seq("late", 10, arrival=0.0, ttft=3.0))
    s.add(seq("soon", 10, arrival=0.5, ttft=1.0))
    out = s.schedule(0.6)
    assert [x.seq.request_id for x in out.scheduled] == ["soon", "late"]


@pytest.mark.parametrize("policy", ["lp", "hp"])
def test_latency_budget_trims_prefill_for_tight_tbt(policy):
    # 1 ms per prefill token plus 10 ms a step: a decode exactly on pace with a 50 ms TBT, at its
    # last token (no later tokens to bank slack), leaves room for 40 tokens.
    s, _ = make(policy, chunk=512, step_time=lambda p, d: 0.010 + 0.001 * p)
    d = seq("dec", 5, tbt=0.05, max_tokens=2)
    s.add(d)
    advance(s, s.schedule(0.0), now=0.0)
    s.add(seq("new", 300, arrival=0.0, ttft=5.0))
    out = s.schedule(0.0)
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("dec", 1), ("new", 40)]


def _decoding_after(s, first_token_at, n_tokens, max_tokens=None):
    """A request on `s` with its first token at first_token_at and n_tokens sampled since; by
    default the next token is its last, so no later token banks slack."""
    d = seq("dec", 5, tbt=0.05, max_tokens=n_tokens + 1 if max_tokens is None else max_tokens)
    s.add(d)
    advance(s, s.schedule(first_token_at), now=first_token_at)
    d.token_ids.extend([7] * (n_tokens - 1))
    d.num_computed_tokens = len(d.token_ids) - 1
    return d


@pytest.mark.parametrize("max_tokens,expect", [(2, 40), (3, 76), (6, 184), (1000, 300)])
def test_a_decode_spends_the_slack_its_later_tokens_will_bank(max_tokens, expect):
    # On pace (next token due in 0.05 s): each token after this one, at the 10 ms decode-only
    # step, banks 40 ms, of which pacing spends PACE_BANK_SHARE (36 ms), so with k of them this
    # step may take 0.05 + 0.036 k s (the prefill 1 ms a token past the 10 ms); a long request
    # lets the whole 300-token prompt in.
    assert PACE_BANK_SHARE == 0.9
    s, _ = make("lp", chunk=512, step_time=lambda p, d: 0.010 + 0.001 * p)
    d = Sequence("dec", list(range(5)), SamplingParams(max_tokens=max_tokens), 0.0, None, 0.05)
    s.add(d)
    advance(s, s.schedule(0.0), now=0.0)
    s.add(seq("new", 300, arrival=0.0, ttft=5.0))
    out = s.schedule(0.0)
    assert out.scheduled[0].seq is d
    assert abs(out.scheduled[1].num_tokens - expect) <= 1  # float rounding at the boundary


def test_no_pacing_while_prompts_wait_past_their_ttft():
    """Overloaded (a prompt already missed its TTFT): full prefill budget, decodes not paced."""
    s, _ = make("lp", chunk=512, step_time=lambda p, d: 0.010 + 0.001 * p)
    _decoding_after(s, 0.58, 1)  # its last token due at 0.63: alone, the step could prefill 20
    s.add(seq("late", 100, arrival=0.0, ttft=0.2))
    s.add(seq("new", 300, arrival=0.55, ttft=5.0))
    out = s.schedule(0.6)
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("dec", 1), ("new", 300), ("late", 100)]


@pytest.mark.parametrize("policy", ["lp", "hp"])
def test_decodes_ahead_of_pace_lend_their_banked_slack_to_prefill(policy):
    # 10 tokens 0.05 s apart are due by t=0.5; at t=0.4 a decode ahead of pace has 0.1 s to spare,
    # which the step fills with prefill (90 tokens) on either role: the objective is a mean TBT.
    s, _ = make(policy, chunk=512, step_time=lambda p, d: 0.010 + 0.001 * p)
    _decoding_after(s, 0.0, 10)
    s.add(seq("new", 300, arrival=0.3, ttft=5.0))
    out = s.schedule(0.4)
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled][0] == ("dec", 1)
    assert out.scheduled[1].seq.request_id == "new"
    assert abs(out.scheduled[1].num_tokens - 90) <= 1  # float rounding at the boundary


@pytest.mark.parametrize("policy", ["lp", "hp"])
def test_decode_behind_pace_gets_a_decode_only_step(policy):
    # 10 tokens were due by t=0.5, and its last (the 19th after the first) by 0.95. At t=0.8497
    # the 10 left at the 10 ms decode-only step end at 0.9497: it can still make it, with no
    # room for one prefill token.
    s, _ = make(policy, chunk=512, step_time=lambda p, d: 0.010 + 0.001 * p)
    _decoding_after(s, 0.0, 10, max_tokens=20)
    s.add(seq("new", 300, arrival=0.5, ttft=5.0))
    out = s.schedule(0.8497)
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("dec", 1)]


def test_decode_behind_pace_with_many_tokens_left_lets_prefill_in():
    # Behind by 0.1 s at t=0.6, but its 989 later tokens at the decode-only step bank 40 ms each:
    # holding the prompt back would save nothing the mean TBT needs (Sarathi's full chunk).
    s, _ = make("lp", chunk=512, step_time=lambda p, d: 0.010 + 0.001 * p)
    _decoding_after(s, 0.0, 10, max_tokens=1000)
    s.add(seq("new", 300, arrival=0.5, ttft=5.0))
    out = s.schedule(0.6)
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("dec", 1), ("new", 300)]


def test_hopeless_decode_does_not_hold_prefills_back():
    # Far behind (due by 0.5, now 60 s) with 990 tokens left: even decode-only steps cannot
    # save its mean TBT, so it no longer trims the budget.
    s, _ = make("lp", chunk=512, step_time=lambda p, d: 0.010 + 0.001 * p)
    _decoding_after(s, 0.0, 10)
    s.add(seq("new", 300, arrival=59.0, ttft=5.0))
    out = s.schedule(60.0)
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("dec", 1), ("new", 300)]


def test_preemption_by_recompute_frees_lowest_priority():
    s, bm = make("sarathi", blocks=4, chunk=512)
    a, b = seq("a", 32, arrival=0.0), seq("b", 32, arrival=1.0)  # 2 blocks each: pool full
    s.add(a), s.add(b)
    advance(s, s.schedule(0.0))
    out = s.schedule(0.0)  # both need a third block; b (later) is preempted for a
    assert [x.seq.request_id for x in out.scheduled] == ["a"]
    assert out.preempted == [b] and b.num_computed_tokens == 0 and b.block_table == []
    assert s.waiting == [b] and b.num_preemptions == 1
    assert bm.num_free == 1


def test_random_workload_never_leaks_blocks():
    """Many random requests through every policy: all finish, every block comes back."""
    rng = random.Random(0)
    for policy in ("vllm", "sarathi", "lp", "hp"):
        s, bm = make(policy, blocks=40, chunk=48, seqs=6, max_len=4096, prefill_time=lambda n: n * 1e-4)
        pending = [seq(f"r{i}", rng.randint(1, 120), arrival=i * 0.01, ttft=rng.choice([None, 0.5, 2.0]),
                       tbt=rng.choice([None, 0.1])) for i in range(40)]
        budgets = {x.request_id: rng.randint(1, 40) for x in pending}
        now, done = 0.0, 0
        while pending or s.has_work():
            while pending and rng.random() < 0.5:
                s.add(pending.pop(0))
            out = s.schedule(now)
            now += 0.01
            assert sum(x.num_tokens for x in out.scheduled) <= max(48, 6) or policy == "vllm"
            advance(s, out, now)
            for x in out.scheduled:
                if x.samples and x.seq.num_output_tokens >= budgets[x.seq.request_id]:
                    s.remove(x.seq)
                    done += 1
            used = sum(len(x.block_table) for x in s.running + s.waiting)
            assert used == bm.num_used
        assert done == 40 and bm.num_free == bm.num_blocks


def test_sequence_deadlines():
    x = seq("a", 4, arrival=10.0, ttft=1.0, tbt=0.1)
    assert x.ttft_deadline == 11.0 and x.next_token_deadline == 11.0
    x.token_ids.append(1)
    x.first_token_time = 10.5
    assert x.next_token_deadline == pytest.approx(10.6)
    assert math.isinf(seq("b", 4).ttft_deadline)


@pytest.mark.parametrize("max_tokens,expect", [(2, 24), (1000, 300)])
def test_a_decode_near_its_end_keeps_a_step_spread_in_reserve(max_tokens, expect):
    # Steps have run 0.9x and 1.1x of the prediction in turn: a mean of 1 (no bias) and a spread
    # of about 10%. A decode on pace at its last token has nothing later to absorb a step that
    # runs long, so pacing keeps END_MARGIN_SPREADS (3) spreads of its 0.05 s back, 15 ms:
    # 24 prefill tokens, not 40. One with 998 tokens still to come holds a reserve of seconds
    # and lets the whole prompt in.
    assert END_MARGIN_SPREADS == 3.0
    s, _ = make("lp", chunk=512, step_time=lambda p, d: 0.010 + 0.001 * p)
    for i in range(64):
        s.bias.observe(0.02, 0.02 * (0.9 if i % 2 else 1.1))
    assert s.bias.factor == pytest.approx(1.0) and s.bias.spread == pytest.approx(0.1008, abs=1e-4)
    d = Sequence("dec", list(range(5)), SamplingParams(max_tokens=max_tokens), 0.0, None, 0.05)
    s.add(d)
    advance(s, s.schedule(0.0), now=0.0)
    s.add(seq("new", 300, arrival=0.0, ttft=5.0))
    out = s.schedule(0.0)
    assert out.scheduled[0].seq is d and out.scheduled[1].num_tokens == expect
