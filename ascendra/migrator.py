"""Drives escalations through the migration protocol (see ascendra.messages), step by step.

The coordinator hands it Escalations and the workers' MigrationUpdates; it sends the next
message of each migration through the ``send`` callback it was given and reports how each
one ended. No I/O of its own and no clock reads: callers pass ``now``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ascendra.messages import (
    MigrateCancel,
    MigrateCommit,
    MigrateFreeze,
    MigrateIn,
    MigrateOut,
    MigrateRelease,
    MigrationUpdate,
    RequestState,
)
from ascendra.router import Escalation


@dataclass
class Migration:
    request_id: str
    src: int
    dst: int
    reason: str
    started: float
    stage: str = "out"  # out -> precopy -> freeze -> commit -> done
    kind: str = ""  # "waiting" (moved as a request) or "kv"
    frozen_at: float | None = None
    blocks_copied: int = 0  # in all
    frozen_blocks: int = 0  # of which copied while the request was frozen
    copy_time: float = 0.0
    tokens_at_freeze: int = 0
    # The request's first token reached the coordinator: a move for its TTFT has nothing left to save.
    first_token_out: bool = False
    # Set when it ends.
    ok: bool | None = None
    error: str = ""
    state: RequestState | None = field(default=None, repr=False)


@dataclass
class MigrationResult:
    migration: Migration
    # For a request moved before it started: the coordinator re-adds it on dst from this.
    moved_state: RequestState | None = None


class Migrator:
    def __init__(self, send: Callable[[int, msgspec.Struct], bool], allow_kv: bool = True) -> None:
        self.send = send
        # False reproduces the paper's code: only requests that have not started may move.
        self.allow_kv = allow_kv
        self.active: dict[str, Migration] = {}

    def start(self, esc: Escalation, now: float) -> Migration | None:
        if esc.request_id in self.active:
            return None
        m = Migration(esc.request_id, esc.src, esc.dst, esc.reason, started=now)
        self.active[esc.request_id] = m
        if not self.send(esc.src, MigrateOut(esc.request_id)):
            self._end(m, False, "source unreachable")
            return None
        return m

    def on_first_token(self, request_id: str) -> None:
        m = self.active.get(request_id)
        if m is not None:
            m.first_token_out = True

    def on_update(self, worker_id: int, up: MigrationUpdate, now: float) -> MigrationResult | None:
        """Advance the migration this update belongs to; returns a result when it ends."""
        m = self.active.get(up.request_id)
        if m is None:
            return None
        rid = up.request_id
        if up.stage == "moved":
            m.kind = "waiting"
            return MigrationResult(self._end(m, True), moved_state=up.state)
        if up.stage == "snapshot" and not self.allow_kv:
            self.send(m.src, MigrateCancel(rid))
            return MigrationResult(self._end(m, False, "already started"))
        if up.stage == "snapshot" and m.reason == "ttft" and m.first_token_out:
            # Escalated while its prefill ran, and the prefill finished first: its TTFT is what it
            # is, and moving the decode would only freeze it.
            self.send(m.src, MigrateCancel(rid))
            return MigrationResult(self._end(m, False, "first token already out"))
        if up.stage == "snapshot":
            m.kind = "kv"
            m.stage = "precopy"
            if not self.send(m.dst, MigrateIn(rid, up.source)):
                self.send(m.src, MigrateCancel(rid))
                return MigrationResult(self._end(m, False, "destination unreachable"))
            return None
        if up.stage == "precopied":
            m.blocks_copied += up.blocks_copied
            m.copy_time += up.copy_time
            m.stage = "freeze"
            self.send(m.src, MigrateFreeze(rid))
            return None
        if up.stage == "frozen":
            m.stage = "commit"
            m.frozen_at = now
            m.state = up.state
            m.tokens_at_freeze = len(up.state.output_token_ids) if up.state else 0
            if not self.send(m.dst, MigrateCommit(rid, up.state, up.source)):
                self.send(m.src, MigrateCancel(rid))
                return MigrationResult(self._end(m, False, "destination unreachable"))
            return None
        if up.stage == "committed":
            m.blocks_copied += up.blocks_copied
            m.frozen_blocks = up.blocks_copied
            m.copy_time += up.copy_time
            self.send(m.src, MigrateRelease(rid))
            return MigrationResult(self._end(m, True))
        if up.stage == "gone":
            # Finished or aborted on the source meanwhile: the destination gives back its copy.
            if m.stage != "out":
                self.send(m.dst, MigrateCancel(rid))
            return MigrationResult(self._end(m, False, "request left the source"))
        if up.stage == "failed":
            # Whichever side failed, the other resumes or gives back what it holds.
            other = m.src if worker_id == m.dst else m.dst
            self.send(other, MigrateCancel(rid))
            return MigrationResult(self._end(m, False, up.error or "failed"))
        return None

    def on_worker_down(self, worker_id: int) -> list[MigrationResult]:
        """A worker died: every migration touching it ends; the survivor gives back its part."""
        out = []
        for m in list(self.active.values()):
            if worker_id not in (m.src, m.dst):
                continue
            other = m.dst if worker_id == m.src else m.src
            self.send(other, MigrateCancel(m.request_id))
            out.append(MigrationResult(self._end(m, False, f"worker {worker_id} died")))
        return out

    def drop(self, request_id: str) -> Migration | None:
        """The request ended (aborted by its client): forget its migration; the caller aborts both sides."""
        return self.active.pop(request_id, None)

    def _end(self, m: Migration, ok: bool, error: str = "") -> Migration:
        m.ok, m.error, m.stage = ok, error, "done"
        self.active.pop(m.request_id, None)
        return m
