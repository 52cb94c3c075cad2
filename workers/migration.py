"""Both ends of a KV migration, on top of an engine (see the protocol in ascendra.messages).

The source keeps decoding while the destination copies the blocks filled so far; only
the last few blocks are copied while the request is frozen. Every path out (commit,
cancel, the request finishing or being aborted meanwhile) gives back every block.
"""

from __future__ import annotations

import torch

from ascendra.block_manager import blocks_for
from ascendra.messages import KVSource, MigrationUpdate, RequestState
from ascendra.sequence import SeqStatus, Sequence
from .device import StepEvent, synchronize, timed_clock
from .engine import Engine
from .kv_pool import copy_blocks


class Migrations:
    def __init__(self, engine: Engine, worker_id: int) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.snapshots: dict[str, list[int]] = {}  # source: blocks held by an extra reference
        self.frozen: dict[str, Sequence] = {}  # source: requests paused for the final copy
        self.incoming: dict[str, tuple[list[int], int]] = {}  # dest: (blocks, tokens) pre-copied
        # Destination: recorded after each copy and waited on before answering, so the
        # coordinator never hears "precopied"/"committed" while the copy may still be reading.
        self.copied = StepEvent(engine.device)

    # ---------------------------------------------------------------- source side
    def migrate_out(self, rid: str) -> MigrationUpdate:
        e = self.engine
        seq = e.requests.get(rid)
        if seq is None:
            return MigrationUpdate(rid, "gone")
        if not seq.has_started and seq.status is SeqStatus.WAITING:
            # Nothing computed yet: hand the request over as a request.
            state = self._state(seq)
            e.core.remove(rid)
            e.forget(rid)
            return MigrationUpdate(rid, "moved", state=state)
        full = seq.num_computed_tokens // e.blocks.block_size
        snap = seq.block_table[:full]
        e.blocks.incref(snap)
        self._drop_snapshot(rid)
        self.snapshots[rid] = snap
        e.kv_written.synchronize()  # the blocks named below are written before anyone reads them
        return MigrationUpdate(rid, "snapshot", source=self._source(snap, full * e.blocks.block_size))

    def freeze(self, rid: str) -> MigrationUpdate:
        e = self.engine
        seq = e.core.detach(rid)  # it stops running here but keeps its blocks
        if seq is None:
            self._drop_snapshot(rid)
            return MigrationUpdate(rid, "gone")
        self.frozen[rid] = seq
        n = seq.num_computed_tokens
        blocks = seq.block_table[: blocks_for(n, e.blocks.block_size)]
        e.kv_written.synchronize()
        return MigrationUpdate(rid, "frozen", state=self._state(seq), source=self._source(blocks, n))

    def release(self, rid: str) -> MigrationUpdate:
        """The destination has the request: free what the source still held for it."""
        self._drop_snapshot(rid)
        seq = self.frozen.pop(rid, None)
        if seq is not None:
            self.engine.blocks.release(seq)
            self.engine.forget(rid)
        return MigrationUpdate(rid, "released")

    def cancel_out(self, rid: str) -> MigrationUpdate:
        """The migration was abandoned: the source goes on serving the request."""
        self._drop_snapshot(rid)
        seq = self.frozen.pop(rid, None)
        if seq is not None:
            self.engine.core.attach(seq)
        return MigrationUpdate(rid, "cancelled")

    # ---------------------------------------------------------------- destination side
    def migrate_in(self, rid: str, source: KVSource, peer: torch.Tensor) -> MigrationUpdate:
        e = self.engine
        n = len(source.block_ids)
        # Room for the snapshot plus the blocks still to come, and a block to grow into.
        if n + 2 > e.blocks.num_free or rid in e.requests or rid in self.incoming:
            return MigrationUpdate(rid, "failed", error=f"no room: {e.blocks.num_free} blocks free, need {n + 2}")
        blocks = e.blocks.allocate(n)
        copy_time = self._copy(peer, source.block_ids, blocks)
        self.incoming[rid] = (blocks, source.num_tokens)
        return MigrationUpdate(rid, "precopied", blocks_copied=n, copy_time=copy_time)

    def commit(self, state: RequestState, source: KVSource, peer: torch.Tensor) -> MigrationUpdate:
        e = self.engine
        rid = state.request_id
        pre_blocks, pre_tokens = self.incoming.pop(rid, ([], 0))
        bs = e.blocks.block_size
        need = blocks_for(state.num_computed_tokens, bs)
        # Pre-copied blocks are reusable only while they lie inside the computed prefix (a
        # request preempted on the source meanwhile has fewer computed tokens).
        keep = pre_blocks[: min(len(pre_blocks), state.num_computed_tokens // bs)]
        e.blocks.free(pre_blocks[len(keep):])
        missing = need - len(keep)
        if missing + 1 > e.blocks.num_free:
            e.blocks.free(keep)
            return MigrationUpdate(rid, "failed", error="no room for the last blocks")
        rest = e.blocks.allocate(missing)
        copy_time = self._copy(peer, source.block_ids[len(keep):need], rest)
        seq = e.restore(state, keep + rest)
        seq.num_computed_tokens = state.num_computed_tokens
        return MigrationUpdate(rid, "committed", blocks_copied=missing, copy_time=copy_time)

    def cancel_in(self, rid: str) -> MigrationUpdate:
        blocks, _ = self.incoming.pop(rid, ([], 0))
        self.engine.blocks.free(blocks)
        return MigrationUpdate(rid, "cancelled")

    def _copy(self, peer: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> float:
        """Copy blocks out of a peer's pool; returns when the copy has finished (seconds taken)."""
        dev = self.engine.device
        start = timed_clock(dev)
        copy_blocks(self.engine.pool.tensor, peer, src_ids, dst_ids)
        self.copied.record()
        self.copied.synchronize()
        if peer.device != dev:  # the gather ran on the peer's device, in this process's stream there
            synchronize(peer.device)
        return timed_clock(dev) - start

    # ---------------------------------------------------------------- helpers
    def abort(self, rid: str) -> bool:
        """Drop whatever this side holds for rid (the request was aborted); True if anything."""
        held = rid in self.snapshots or rid in self.frozen or rid in self.incoming
        self._drop_snapshot(rid)
        seq = self.frozen.pop(rid, None)
        if seq is not None:
            self.engine.blocks.release(seq)
            self.engine.forget(rid)
        self.cancel_in(rid)
        return held

    def close(self) -> None:
        for rid in list(self.snapshots) + list(self.frozen) + list(self.incoming):
            self.abort(rid)

    def _drop_snapshot(self, rid: str) -> None:
        snap = self.snapshots.pop(rid, None)
        if snap:
            self.engine.blocks.free(snap)

    def _source(self, blocks: list[int], num_tokens: int) -> KVSource:
        return KVSource(self.worker_id, self.engine.pool.handle(), list(blocks), num_tokens)

    def _state(self, seq: Sequence) -> RequestState:
        gen = self.engine.generator(seq.request_id)
        return RequestState(
            request_id=seq.request_id,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            output_token_ids=seq.output_token_ids,
            num_computed_tokens=seq.num_computed_tokens,
            sampling=seq.sampling,
            arrival_time=seq.arrival_time,
            ttft_slo=seq.ttft_slo,
            tbt_slo=seq.tbt_slo,
            first_token_time=seq.first_token_time,
            rng_state=bytes(gen.get_state().numpy().tobytes()) if gen is not None else b"",
        )
