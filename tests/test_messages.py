"""The process contract's closed vocabularies: the decoders accept every defined value of a
request's finish reason, a worker's role and a migration stage, and reject anything else."""

from __future__ import annotations

import re
import typing

import msgspec
import pytest

from ascendra.messages import (
    FinishReason,
    MigrationStage,
    MigrationUpdate,
    ModelInfo,
    PoolHandle,
    Register,
    RequestOutput,
    Role,
    StepOutput,
    encode,
    worker_decoder,
)


def _step(outputs=(), migrations=()) -> StepOutput:
    return StepOutput(worker_id=0, step=1, outputs=list(outputs), num_seqs=0, num_prefill_tokens=0,
                      num_decode_tokens=0, prefill_context_tokens=0, decode_context_tokens=0, step_time=0.0,
                      num_running=0, num_waiting=0, num_preempted=0, free_blocks=1, total_blocks=1, time=0.0,
                      migrations=list(migrations))


def _register(role: str) -> Register:
    model = ModelInfo("m", "/m", 10, 64, [0], 1, 1, 8, "float32")
    pool = PoolHandle("none", "", [1, 2, 1, 16, 1, 8], "float32", "cpu")
    return Register(worker_id=0, pid=1, role=role, policy="sarathi", device="cpu", model=model, pool=pool,
                    num_blocks=1, block_size=16, bytes_per_block=1, max_num_seqs=1, chunk_size=16)


def test_every_defined_value_round_trips():
    for reason in typing.get_args(FinishReason):
        step = worker_decoder.decode(encode(_step([RequestOutput("r", finish_reason=reason)])))
        assert step.outputs[0].finish_reason == reason
    assert worker_decoder.decode(encode(_step([RequestOutput("r", [5])]))).outputs[0].finish_reason is None
    for stage in typing.get_args(MigrationStage):
        step = worker_decoder.decode(encode(_step(migrations=[MigrationUpdate("r", stage)])))
        assert step.migrations[0].stage == stage
    for role in typing.get_args(Role):
        assert worker_decoder.decode(encode(_register(role))).role == role


@pytest.mark.parametrize("msg,path", [
    (_step([RequestOutput("r", finish_reason="done")]), "$.outputs[0].finish_reason"),
    (_step(migrations=[MigrationUpdate("r", "precopy")]), "$.migrations[0].stage"),
    (_register("leader"), "$.role"),
])
def test_undefined_values_are_rejected_naming_the_field(msg, path):
    # Structs are not validated on construction, so a bad value reaches the wire; the
    # receiving side's decoder must refuse it.
    with pytest.raises(msgspec.ValidationError, match=re.escape(path)):
        worker_decoder.decode(encode(msg))
