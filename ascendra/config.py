"""Every serving setting, once: its name, default, bounds and help text.

``ServingConfig`` is what the coordinator runs with and what it hands each worker (encoded,
as one ``--config`` argument); the server's, the simulator's and the workers' command-line
flags are derived from its fields by ``add_flags``, and ``from_args`` checks the bounds
(msgspec ``Meta``) with a message that names the flag.
"""

from __future__ import annotations

import argparse
import typing
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

PolicyName = Literal["vllm", "sarathi", "ascendra"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


class ServingConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # ---- the model and where it runs (model_path / model_name are resolved by the server)
    model_path: str = ""
    model_name: str = ""
    device: Annotated[str, Meta(description="cpu, cuda (one worker per visible GPU: cuda:0..N-1), or cuda:K")] = "cpu"
    num_instances: Annotated[int, Meta(ge=1, description=(
        "worker processes (default: 1 on cpu, the GPU count with --device cuda)"))] | None = None
    dtype: Annotated[DtypeName, Meta(description=(
        "weights, activations and KV cache: auto (bf16 on CUDA and on CPUs with native bf16 "
        "arithmetic, else float32), float32, bfloat16, float16"))] = "auto"
    # ---- the coordinator's policy
    policy: Annotated[PolicyName, Meta(description=(
        "vllm/sarathi: all instances mixed, round-robin routing; ascendra: low-priority (LP) + "
        "high-priority (HP) instances (default: ascendra with >= 2 instances, sarathi with one)"))] | None = None
    num_hp: Annotated[int, Meta(ge=0, description=(
        "HP instances under --policy ascendra (default N//3, at least 1 when N >= 2)"))] | None = None
    escalate_started: bool = True  # ascendra: move started requests with their KV (--paper-escalation: off)
    class_routing: bool = True  # ascendra: route by SLO class (--no-class-routing: off, for ablation)
    force_escalation_after: Annotated[int, Meta(ge=0, description=(
        "ascendra, for testing and measuring migration: escalate every LP request once it has produced TOKENS "
        "tokens (0: before its first), whatever the predictor says"))] | None = None
    ttft_slo: Annotated[float, Meta(gt=0, description=(
        "time-to-first-token objective in seconds for requests that set no ttft_slo_ms"))] = 1.0
    tbt_slo: Annotated[float, Meta(gt=0, description=(
        "mean time-between-tokens objective in seconds for requests that set no tbt_slo_ms"))] = 0.15
    max_waiting: Annotated[int, Meta(ge=1, description=(
        "admitted requests still waiting for their first token; beyond it the server answers 429 with "
        "Retry-After"))] = 1024
    admission: Annotated[bool, Meta(description=(
        "SLO-aware admission: answer 429 at arrival when the policy predicts that no instance can give the "
        "request its first token within its TTFT objective (ascendra; counted as rejected and missed)"))] = False
    # ---- each worker's batch
    chunk_size: Annotated[int, Meta(ge=1, description="token budget per step for chunked prefill")] = 512
    max_num_seqs: Annotated[int, Meta(ge=1, description="most requests in one worker's batch")] = 128
    max_seats: Annotated[int, Meta(ge=1, description=(
        "ascendra: let an instance hold more than --max-num-seqs requests, up to this many, while its "
        "step-time model says a step of that many decodes and a full chunk stays well inside the tightest "
        "TBT objective it holds (default: --max-num-seqs is a fixed cap)"))] | None = None
    max_chunk: Annotated[int, Meta(ge=1, description=(
        "ascendra: let a step prefill more than --chunk-size tokens, up to this many, while every decode it "
        "holds that can still meet its objective stays on pace (default: --chunk-size is a fixed cap)"))] | None = None
    num_blocks: Annotated[int, Meta(ge=1, description=(
        "KV cache blocks per worker (default: the worker sizes its pool itself)"))] | None = None
    block_size: Annotated[int, Meta(ge=1, description=(
        "tokens per KV block (default: 256 on CUDA with fp16/bf16 when flash-attn is installed, as its paged "
        "kernel reads the pool in place only with pages of a multiple of 256; else 16, and attention copies "
        "K/V out of the pool: the fallback path)"))] | None = None
    gpu_memory_utilization: Annotated[float, Meta(gt=0, le=1, description=(
        "CUDA: fraction of each GPU's total memory used by the workers on it together (weights, activations, "
        "KV pool), split evenly between them; room for migration peers is kept inside it"))] = 0.9
    max_model_len: Annotated[int, Meta(ge=1, description=(
        "longest prompt + output in tokens (default: the model's limit)"))] | None = None
    fake_model: Annotated[bool, Meta(description=(
        "workers emit tokens without running a model (for benchmarking the coordinator)"))] = False
    fake_step_time: Annotated[float, Meta(ge=0, description=(
        "with --fake-model: seconds each fake iteration sleeps (0: as fast as possible)"))] = 0.0
    worker_threads: Annotated[int, Meta(ge=1, description=(
        "torch threads per CPU worker (default: the cores split evenly between the workers, less one "
        "kept for the coordinator on machines with 4 cores or more)"))] | None = None
    seed: Annotated[int, Meta(ge=0, description="base random seed for the workers")] = 0
    # ---- process management
    startup_timeout: Annotated[float, Meta(gt=0, description="seconds to wait for every worker to register")] = 600.0
    shutdown_timeout: float = 10.0
    step_log: Annotated[str, Meta(description=(
        "append one JSON line per worker step (batch shape, step time, clocks) to PATH"))] | None = None
    worker_args: list[str] = []  # extra worker flags passed through (tests)


    def __post_init__(self) -> None:
        if self.max_seats is not None and self.max_seats < self.max_num_seqs:
            raise ValueError(f"--max-seats ({self.max_seats}) must be at least --max-num-seqs ({self.max_num_seqs})")
        if self.max_chunk is not None and self.max_chunk < self.chunk_size:
            raise ValueError(f"--max-chunk ({self.max_chunk}) must be at least --chunk-size ({self.chunk_size})")


DEFAULTS = ServingConfig()

_DEFAULTS_BY_NAME = {f: getattr(DEFAULTS, f) for f in ServingConfig.__struct_fields__}


def default(name: str) -> Any:
    """A setting's default, for modules (the simulator, benchmarks) that keep their own structs."""
    return _DEFAULTS_BY_NAME[name]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap(hint: Any) -> tuple[Any, Meta | None, bool]:
    """(base type, its Meta, optional?) of a field's annotation."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    meta = None
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        meta = next((e for e in extras if isinstance(e, Meta)), None)
        hint = base
    return hint, meta, optional


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: list[str],
              defaults: dict[str, Any] | None = None, help: dict[str, str] | None = None,
              required_default: bool = False) -> None:
    """Add a flag per named field: its type, choices and help from the struct, its default from
    the struct (or ``defaults``). ``required_default``: default every flag to None instead, so a
    caller can tell which were given (the simulator, where a scenario supplies defaults)."""
    hints = typing.get_type_hints(ServingConfig, include_extras=True)
    for name in names:
        base, meta, _ = _unwrap(hints[name])
        text = (help or {}).get(name) or (meta.description if meta is not None else None) or name
        dflt = None if required_default else (defaults or {}).get(name, _DEFAULTS_BY_NAME[name])
        if base is bool:
            parser.add_argument(flag(name), dest=name, action="store_true", default=None if required_default else dflt,
                                help=text)
        elif typing.get_origin(base) is Literal:
            parser.add_argument(flag(name), dest=name, choices=list(typing.get_args(base)), default=dflt, help=text)
        else:
            parser.add_argument(flag(name), dest=name, type=base, default=dflt, help=text)


def check(values: dict[str, Any], parser: argparse.ArgumentParser | None = None) -> ServingConfig:
    """A ServingConfig from settings; a bound violated is reported with the flag's name."""
    try:
        return msgspec.convert(values, ServingConfig)
    except msgspec.ValidationError as e:
        text = str(e)
        # msgspec says "... - at `$.chunk_size`": name the flag instead.
        msg, _, where = text.rpartition(" - at `$.")
        name = where.rstrip("`").split(".")[0].split("[")[0]
        if msg and name in _DEFAULTS_BY_NAME:
            text = f"{flag(name)}: {msg}"
        if parser is not None:
            parser.error(text)
        raise ValueError(text) from None


def from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None,
              names: list[str] | None = None, **extra: Any) -> ServingConfig:
    """The ServingConfig for parsed flags (fields without a flag keep their defaults, or ``extra``).
    ``names``: take only these fields from ``args`` (a CLI whose other flags share a name but not
    a meaning, as the simulator's comma-separated --policy)."""
    values = {k: v for k, v in vars(args).items()
              if k in _DEFAULTS_BY_NAME and v is not None and (names is None or k in names)}
    values.update(extra)
    return check(values, parser)


def encode(cfg: ServingConfig) -> str:
    return msgspec.json.encode(cfg).decode()


def decode(text: str) -> ServingConfig:
    return msgspec.json.decode(text, type=ServingConfig)


__all__ = ["DEFAULTS", "ServingConfig", "add_flags", "check", "decode", "default", "encode", "flag", "from_args"]
