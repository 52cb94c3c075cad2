"""The pure per-instance core shared by the worker's engine and the simulator."""

from __future__ import annotations

from ascendra.instance import Instance, Step
from ascendra.messages import SamplingParams
from ascendra.perf_model import BatchShape
from ascendra.scheduler import SchedulerConfig
from ascendra.sequence import Sequence

EOS = 2


def make(num_blocks: int = 64, block_size: int = 4, chunk: int = 8, max_len: int = 64, policy: str = "sarathi"):
    return Instance(SchedulerConfig(policy=policy, chunk_size=chunk, max_model_len=max_len),
                    num_blocks, block_size, vocab_size=100, eos_token_ids=[EOS])


def seq(rid: str, n: int, **sampling) -> Sequence:
    return Sequence(rid, list(range(10, 10 + n)), SamplingParams(**sampling), 0.0)


def test_admission_errors_name_the_limit():
    inst = make(num_blocks=4, block_size=4)
    assert inst.add(seq("a", 0)) == "prompt is empty"
    assert "limit is 64" in inst.add(seq("b", 64))
    bad = Sequence("c", [5, 100], SamplingParams(), 0.0)
    assert inst.add(bad) == "prompt token id 100 is outside the vocabulary (0..99)"
    assert inst.add(seq("d", 3, max_tokens=0)) == "max_tokens must be at least 1"
    assert "needs up to 5 KV blocks (20 tokens)" in inst.add(seq("e", 4, max_tokens=16))
    assert inst.add(seq("f", 4, max_tokens=4)) is None
    assert "already running" in inst.add(seq("f", 4, max_tokens=4))
    assert list(inst.requests) == ["f"] and inst.num_waiting == 1


def test_step_shape_classifies_each_item_once():
    inst = make(chunk=8)
    inst.add(seq("long", 9, max_tokens=4))
    step = inst.plan(0.0)
    assert step.shape == BatchShape(8, 8 * 8, 0, 0) and not step.sampling
    inst.complete(step, [], 0.1)
    # The last prompt token alone after 8 cached ones has a decode's shape, and counts as one
    # everywhere: the step shape and the scheduler's own count agree.
    step = inst.plan(0.2)
    assert [(s.num_tokens, s.context_len, s.is_decode) for s in step.scheduled] == [(1, 8, True)]
    assert step.shape == BatchShape(0, 0, 1, 9) and step.sched.num_decode_tokens == 1
    assert step.prefill_context_tokens == 0 and len(step.sampling) == 1


def test_complete_appends_and_applies_finish_rules():
    inst = make()
    inst.add(seq("stop", 2, max_tokens=10, stop_token_ids=[7], min_tokens=2))
    inst.add(seq("eos", 2, max_tokens=10))
    inst.add(seq("ignore", 2, max_tokens=2, ignore_eos=True))
    step = inst.plan(0.0)
    out = inst.complete(step, [7, EOS, EOS], 1.0)
    # min_tokens holds the stop id back; eos ends "eos"; ignore_eos keeps going.
    assert [(e.seq.request_id, e.token, e.finish_reason) for e in out] == [
        ("stop", 7, None), ("eos", EOS, "stop"), ("ignore", EOS, None)]
    assert out[0].seq.first_token_time == 1.0
    step = inst.plan(1.0)
    out = inst.complete(step, [7, 5], 2.0)
    assert [(e.seq.request_id, e.finish_reason) for e in out] == [("stop", "stop"), ("ignore", "length")]
    assert not inst.requests and inst.blocks.num_free == inst.blocks.num_blocks
    assert out[1].seq.output_token_ids == [EOS, 5] and out[1].seq.last_token_time == 2.0


def test_model_length_ends_a_request():
    inst = make(max_len=6)
    inst.add(seq("a", 4, max_tokens=100))
    # Admission caps the blocks it checks at the model's length, so a large max_tokens is fine.
    out = inst.complete(inst.plan(0.0), [5], 0.0)
    assert out[0].finish_reason is None
    out = inst.complete(inst.plan(0.0), [5], 0.0)
    assert out[0].finish_reason == "length"


def test_a_failed_row_ends_alone():
    inst = make()
    for rid in "abc":
        inst.add(seq(rid, 2, max_tokens=3))
    step = inst.plan(0.0)
    out = inst.complete(step, [5, None, 6], 0.5, errors={1: "sampling failed"})
    assert [(e.seq.request_id, e.token, e.finish_reason, e.error) for e in out] == [
        ("a", 5, None, None), ("b", None, "error", "sampling failed"), ("c", 6, None, None)]
    assert sorted(inst.requests) == ["a", "c"]
    step = inst.plan(0.6)
    assert [s.seq.request_id for s in step.scheduled] == ["a", "c"]


def test_fail_ends_the_whole_step_and_frees_blocks():
    inst = make()
    inst.add(seq("a", 3))
    inst.add(seq("b", 3))
    step = inst.plan(0.0)
    assert sorted(s.request_id for s in inst.fail(step)) == ["a", "b"]
    assert not inst.requests and inst.blocks.num_free == inst.blocks.num_blocks and not inst.has_work()


def test_detach_keeps_blocks_and_attach_resumes():
    src, dst = make(), make()
    src.add(seq("m", 5, max_tokens=4))
    src.complete(src.plan(0.0), [5], 0.0)
    moved = src.detach("m")
    assert moved.block_table and src.blocks.num_used == len(moved.block_table) and not src.has_work()
    src.blocks.release(moved)  # a migration copies them, then the source frees its copy
    moved.block_table = dst.blocks.allocate(2)
    dst.attach(moved)
    step = dst.plan(1.0)
    assert isinstance(step, Step) and not step.is_empty and [(s.num_tokens, s.context_len) for s in step.scheduled] == [(1, 5)]
    assert dst.remove("m") is moved and dst.blocks.num_free == dst.blocks.num_blocks
