"""Escalation with KV: requests moved mid-prefill and mid-decode keep their greedy output."""

import time

import pytest

from ascendra.messages import AddRequest, MigrationUpdate
from tests.runtime_utils import greedy, make_engine, run_all
from workers.migration import Migrations

# Runs the real model through two engines (seconds per test on CPU).
pytestmark = pytest.mark.e2e

PROMPTS = [list(range(100, 100 + n)) for n in (40, 150, 70, 9, 120)]
N_OUT = 30


@pytest.fixture
def pair(tiny_model):
    src = make_engine(tiny_model, num_blocks=64, chunk_size=32, scatter_seed=11)
    dst = make_engine(tiny_model, num_blocks=64, chunk_size=32, scatter_seed=12)
    yield src, dst, Migrations(src, 0), Migrations(dst, 1)
    for e in (src, dst):
        assert e.blocks.num_free == e.blocks.num_blocks, "blocks leaked"


def expected(tiny_model):
    out, _ = run_all(make_engine(tiny_model, num_blocks=256), PROMPTS, greedy(N_OUT, ignore_eos=True))
    return out


def add_all(engine):
    for i, p in enumerate(PROMPTS):
        assert engine.add_request(AddRequest(f"r{i}", p, greedy(N_OUT, ignore_eos=True), time.monotonic())) is None


def collect(engines, tokens, steps=None):
    n = 0
    while any(e.has_work() for e in engines) and (steps is None or n < steps):
        for e in engines:
            if e.has_work():
                for o in e.step().outputs:
                    tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        n += 1


def migrate(src_m: Migrations, dst_m: Migrations, rid: str, between=None) -> list[MigrationUpdate]:
    """Run the whole pre-copy protocol; `between` runs after the pre-copy (the source keeps going)."""
    snap = src_m.migrate_out(rid)
    if snap.stage == "moved":
        return [snap]
    assert snap.stage == "snapshot", snap
    pre = dst_m.migrate_in(rid, snap.source, src_m.engine.pool.tensor)
    if pre.stage != "precopied":
        src_m.cancel_out(rid)
        return [snap, pre]
    if between:
        between()
    frozen = src_m.freeze(rid)
    if frozen.stage != "frozen":
        dst_m.cancel_in(rid)
        src_m.release(rid)
        return [snap, pre, frozen]
    commit = dst_m.commit(frozen.state, frozen.source, src_m.engine.pool.tensor)
    if commit.stage == "committed":
        src_m.release(rid)
    else:
        src_m.cancel_out(rid)
    return [snap, pre, frozen, commit]


def test_migrate_mid_prefill_and_mid_decode_keeps_greedy_output(tiny_model, pair):
    src, dst, sm, dm = pair
    want = expected(tiny_model)
    add_all(src)
    tokens: dict[str, list[int]] = {}
    collect([src], tokens, steps=3)
    r1 = src.requests["r1"]
    assert 0 < r1.num_computed_tokens < r1.num_prompt_tokens, "r1 should be mid-prefill"
    ups = migrate(sm, dm, "r1", between=lambda: collect([src], tokens, steps=2))
    assert ups[-1].stage == "committed" and "r1" in dst.requests and "r1" not in src.requests
    collect([src], tokens, steps=6)
    r0 = src.requests["r0"]
    assert r0.num_output_tokens > 2 and r0.is_decoding, "r0 should be decoding"
    ups = migrate(sm, dm, "r0", between=lambda: collect([src], tokens, steps=3))
    assert [u.stage for u in ups] == ["snapshot", "precopied", "frozen", "committed"]
    assert ups[1].blocks_copied >= 3  # the pre-copy moved most of the context
    collect([src, dst], tokens)
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == want


def test_waiting_request_moves_as_a_request(tiny_model, pair):
    src, dst, sm, dm = pair
    want = expected(tiny_model)
    add_all(src)
    up = sm.migrate_out("r4")  # nothing has run yet
    assert up.stage == "moved" and up.state.num_computed_tokens == 0
    s = up.state
    dst.add_request(AddRequest(s.request_id, s.prompt_token_ids, s.sampling, s.arrival_time))
    tokens: dict[str, list[int]] = {}
    collect([src, dst], tokens)
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == want


def test_destination_full_abandons_migration(tiny_model, pair):
    src, dst, sm, dm = pair
    want = expected(tiny_model)
    filler = dst.blocks.allocate(dst.blocks.num_free - 1)  # leave the destination no room
    add_all(src)
    tokens: dict[str, list[int]] = {}
    collect([src], tokens, steps=8)
    ups = migrate(sm, dm, "r2")
    assert ups[-1].stage == "failed" and "no room" in ups[-1].error
    assert "r2" in src.requests and not dm.incoming
    collect([src], tokens)
    dst.blocks.free(filler)
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == want


def test_request_finishes_during_migration(tiny_model, pair):
    src, dst, sm, dm = pair
    add_all(src)
    tokens: dict[str, list[int]] = {}
    collect([src], tokens, steps=8)
    ups = migrate(sm, dm, "r0", between=lambda: collect([src], tokens))  # r0 runs to the end
    assert [u.stage for u in ups] == ["snapshot", "precopied", "gone"]
    assert len(tokens["r0"]) == N_OUT


def test_abort_during_migration_on_both_sides(tiny_model, pair):
    src, dst, sm, dm = pair
    add_all(src)
    tokens: dict[str, list[int]] = {}
    collect([src], tokens, steps=8)
    snap = sm.migrate_out("r0")
    dm.migrate_in("r0", snap.source, src.pool.tensor)
    sm.freeze("r0")
    # The client went away: the coordinator aborts on both sides.
    assert src.abort("r0") is None and sm.abort("r0")
    assert dst.abort("r0") is None and dm.abort("r0")
    collect([src], tokens)


def test_commit_without_room_gives_back_precopied_blocks(tiny_model, pair):
    src, dst, sm, dm = pair
    add_all(src)
    tokens: dict[str, list[int]] = {}
    collect([src], tokens, steps=10)
    snap = sm.migrate_out("r1")
    dm.migrate_in("r1", snap.source, src.pool.tensor)
    filler = dst.blocks.allocate(dst.blocks.num_free)
    collect([src], tokens, steps=20)  # r1 grows past the pre-copy
    frozen = sm.freeze("r1")
    up = dm.commit(frozen.state, frozen.source, src.pool.tensor)
    assert up.stage == "failed"
    sm.cancel_out("r1")  # the source resumes it
    dst.blocks.free(filler)
    collect([src], tokens)
    assert len(tokens["r1"]) == N_OUT
