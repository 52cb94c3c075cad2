"""The one contract between the coordinator and its workers.

Every message that crosses a process boundary is a msgspec struct defined here and
encoded as msgpack. Coordinator -> worker messages form ``CoordinatorMessage``;
worker -> coordinator messages form ``WorkerMessage``. Both are tagged unions so a
single decoder per direction handles every kind.

Times are ``time.monotonic()`` seconds: CLOCK_MONOTONIC is system-wide on Linux, so
the coordinator and the workers on one node share it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# Most logprob alternatives per token a request may ask for (vLLM's default --max-logprobs).
MAX_LOGPROBS = 20

# Closed vocabularies: the decoders reject any other value.
Role = Literal["mixed", "lp", "hp"]
FinishReason = Literal["stop", "length", "abort", "error"]
# A worker's answer to a Migrate* message (see MigrationUpdate).
MigrationStage = Literal[
    "snapshot", "moved", "precopied", "frozen", "committed", "released", "cancelled", "gone", "failed"
]


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_tokens: int = 0
    # vLLM's penalties, applied to the logits before temperature (greedy rows too):
    # repetition divides positive / multiplies negative logits of every token seen in the
    # prompt or output; frequency subtracts penalty x count and presence subtracts penalty
    # once, for each token of the output so far.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Report the sampled token's log-probability and this many top alternatives (None: off).
    # Taken from the raw model distribution, log_softmax of the logits before penalties,
    # temperature and top-k/top-p: vLLM's default (logprobs_mode "raw_logprobs").
    logprobs: int | None = None
    # Structured output: the output must match this regular expression (outlines-core syntax);
    # the worker masks each step to the tokens that keep it matchable (workers/guided.py).
    guided_regex: str | None = None

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


class KVSource(msgspec.Struct, frozen=True):
    """Where to copy an escalated request's KV blocks from (used by escalation)."""

    worker_id: int
    pool: "PoolHandle"
    block_ids: list[int]
    num_tokens: int  # tokens whose K/V those blocks hold


# ---------------------------------------------------------------- coordinator -> worker


class AddRequest(msgspec.Struct, tag="add", frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float  # monotonic seconds at which the server received it
    ttft_slo: float | None = None  # seconds
    tbt_slo: float | None = None  # seconds
    # Tokens already generated elsewhere (an escalated request resumes after them).
    output_token_ids: list[int] = []
    first_token_time: float | None = None
    kv_source: KVSource | None = None


class AbortRequests(msgspec.Struct, tag="abort", frozen=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


class RequestState(msgspec.Struct, frozen=True):
    """Everything a worker needs to continue a request another worker started."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int  # tokens whose K/V the source holds
    sampling: SamplingParams
    arrival_time: float
    ttft_slo: float | None = None
    tbt_slo: float | None = None
    first_token_time: float | None = None
    rng_state: bytes = b""  # the per-request generator of seeded sampling


# Escalation with KV (Llumnix-style pre-copy), every step driven by the coordinator:
#   source  <- MigrateOut     : snapshot the full blocks (held by an extra reference), keep running
#   dest    <- MigrateIn      : reserve blocks and copy the snapshot from the source's pool
#   source  <- MigrateFreeze  : stop scheduling the request, report its final state
#   dest    <- MigrateCommit  : copy the remaining blocks, continue the request
#   source  <- MigrateRelease : free everything the request held
# MigrateCancel undoes whatever the receiving side holds (the source resumes the request).
# A request that has not started moves without KV: MigrateOut answers stage "moved".
#
# Ordering on an asynchronous device (CUDA), so no block is read before it is written or
# reused before it is read:
# - The source records an event after each step's KV writes. Before it answers "snapshot" or
#   "frozen" it waits on that event: every block it names is fully written on its device.
# - The destination's copy is queued on its own stream; it waits for the copy to finish
#   (an event recorded after the copy, then synchronised) before it answers "precopied" or
#   "committed". Only then may the coordinator send MigrateRelease, so the source never frees
#   (and reuses) a block that a copy may still be reading.
# On CPU every copy and write has finished when its call returns; the same calls run there,
# on a host-side stand-in for the event.


class MigrateOut(msgspec.Struct, tag="migrate_out", frozen=True):
    request_id: str


class MigrateIn(msgspec.Struct, tag="migrate_in", frozen=True):
    request_id: str
    source: KVSource


class MigrateFreeze(msgspec.Struct, tag="migrate_freeze", frozen=True):
    request_id: str


class MigrateCommit(msgspec.Struct, tag="migrate_commit", frozen=True):
    request_id: str
    state: RequestState
    source: KVSource  # every block holding the state's computed tokens


class MigrateRelease(msgspec.Struct, tag="migrate_release", frozen=True):
    request_id: str


class MigrateCancel(msgspec.Struct, tag="migrate_cancel", frozen=True):
    request_id: str


CoordinatorMessage = (
    AddRequest | AbortRequests | Shutdown
    | MigrateOut | MigrateIn | MigrateFreeze | MigrateCommit | MigrateRelease | MigrateCancel
)


# ---------------------------------------------------------------- worker -> coordinator


class CudaIpc(msgspec.Struct, frozen=True):
    """The values torch's ``reduce_tensor`` exports for a CUDA tensor, as plain fields, so the
    receiver rebuilds the tensor with ``rebuild_cuda_tensor`` and never unpickles relayed bytes."""

    size: list[int]
    stride: list[int]
    offset: int  # tensor offset in its storage, in elements
    device_index: int
    storage_handle: bytes  # cudaIpcMemHandle of the allocation holding the storage
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class PoolHandle(msgspec.Struct, frozen=True):
    """How another process on this node can map a worker's KV pool.

    kind "shm": a named POSIX shared-memory segment holding the pool (CPU).
    kind "cuda": ``cuda`` holds the CUDA IPC fields of the pool tensor.
    kind "none": the pool cannot be shared (e.g. the fake model).
    """

    kind: str
    name: str
    shape: list[int]  # layers, 2 (K/V), blocks, block_size, kv_heads, head_dim
    dtype: str  # torch dtype name without the "torch." prefix
    device: str
    cuda: CudaIpc | None = None


class ModelInfo(msgspec.Struct, frozen=True):
    name: str
    path: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str


class Register(msgspec.Struct, tag="register", frozen=True):
    worker_id: int
    pid: int
    role: Role
    policy: str  # local batch policy: "vllm" | "sarathi" | "lp" | "hp"
    device: str
    model: ModelInfo
    pool: PoolHandle
    num_blocks: int
    block_size: int
    bytes_per_block: int
    max_num_seqs: int
    chunk_size: int
    # Step-time model fitted on this device (see ascendra.perf_model); empty if not profiled.
    perf_model: list[float] = []


class RequestOutput(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int] = []
    finish_reason: FinishReason | None = None  # None while running
    error: str | None = None  # human-readable reason when finish_reason == "error"
    num_prompt_tokens: int = 0
    # Only for requests whose sampling sets ``logprobs`` (k): per new token its log-probability,
    # and k (id, log-probability) alternatives, best first, flattened token after token.
    logprobs: list[float] = []
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


class MigrationUpdate(msgspec.Struct, frozen=True, omit_defaults=True):
    """A worker's answer to a Migrate* message.

    stage: "snapshot" | "moved" | "precopied" | "frozen" | "committed" | "released"
    | "cancelled" | "gone" (the request is no longer here) | "failed" (see error).
    """

    request_id: str
    stage: MigrationStage
    source: KVSource | None = None  # snapshot / frozen: the blocks to copy
    state: RequestState | None = None  # moved / frozen
    error: str | None = None
    blocks_copied: int = 0
    copy_time: float = 0.0  # seconds spent copying blocks on the destination


class StepOutput(msgspec.Struct, tag="step", frozen=True):
    """One per iteration (or one carrying only rejections/aborts when nothing ran)."""

    worker_id: int
    step: int
    outputs: list[RequestOutput]
    num_seqs: int  # requests in the batch
    num_prefill_tokens: int
    num_decode_tokens: int
    prefill_context_tokens: int  # sum of attention context over prefill chunks
    decode_context_tokens: int  # sum of context lengths over decodes
    step_time: float  # measured seconds for forward + sample
    num_running: int
    num_waiting: int
    num_preempted: int
    free_blocks: int
    total_blocks: int
    time: float  # monotonic time at which the step finished
    # sum over prefill chunks of new tokens x attended tokens: the quadratic attention term
    prefill_attention_pairs: int = 0
    migrations: list[MigrationUpdate] = []
    num_hopeless: int = 0  # requests the scheduler has judged unable to meet their objectives, so far


class WorkerFailed(msgspec.Struct, tag="failed", frozen=True):
    """Sent when the worker hits an error it cannot recover from, just before exiting."""

    worker_id: int
    message: str


WorkerMessage = Register | StepOutput | WorkerFailed


# ---------------------------------------------------------------- codecs

_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


coordinator_decoder = msgspec.msgpack.Decoder(CoordinatorMessage)
worker_decoder = msgspec.msgpack.Decoder(WorkerMessage)
