"""A model that emits tokens without computing anything.

It lets the coordinator be measured on its own (``--fake-model``): the worker keeps its
real scheduler, blocks and messages, only the forward pass and sampling are skipped.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import torch

from ascendra.messages import ModelInfo
from ascendra.scheduler import ScheduledSeq
from .kv_pool import KVPool


class FakeRunner:
    def __init__(self, path: str, name: str, max_model_len: int | None = None, step_time: float = 0.0) -> None:
        cfg = json.loads((Path(path) / "config.json").read_text())
        self.device = torch.device("cpu")
        self.vocab_size = int(cfg["vocab_size"])
        limit = int(cfg.get("max_position_embeddings", 2048))
        self.max_model_len = min(max_model_len or limit, limit)
        eos = cfg.get("eos_token_id")
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.step_time = step_time
        self.packed = False  # no weights
        self.info = ModelInfo(
            name=name, path=path, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids, num_layers=1, num_kv_heads=1, head_dim=1, dtype="float32",
        )

    def make_pool(self, num_blocks: int, block_size: int, shareable: bool = True) -> KVPool:
        # Bookkeeping needs a pool; one float per slot is enough and nothing is shared.
        return KVPool(1, num_blocks, block_size, 1, 1, torch.float32, self.device, shareable=False)

    def next_tokens(self, batch: list[ScheduledSeq]) -> list[int]:
        if self.step_time:
            time.sleep(self.step_time)
        # Ordinary word-piece ids (not special tokens), varied but reproducible.
        return [
            1000 + zlib.crc32(f"{s.seq.request_id}:{s.seq.num_tokens}".encode()) % 20000
            for s in batch
        ]
