"""The step-time profile cache: reused across restarts, refitted when the runtime changes."""

import json

import torch

from ascendra.messages import ModelInfo
from workers import profiler
from workers.kv_pool import KVPool


class CountingRunner:
    """Stands in for the model runner: the profiler only needs execute() and the model's facts."""

    max_model_len = 2048
    packed = False

    def __init__(self) -> None:
        self.calls = 0
        self.info = ModelInfo(name="stub/model", path="/nonexistent", vocab_size=100, max_model_len=2048,
                              eos_token_ids=[0], num_layers=1, num_kv_heads=1, head_dim=1, dtype="float32")

    def execute(self, batch, pool) -> None:
        self.calls += 1


def _pool() -> KVPool:
    return KVPool(1, 4096, 16, 1, 1, torch.float32, torch.device("cpu"), shareable=False)


def test_profile_is_cached_and_refitted_when_the_runtime_revision_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("ASCENDRA_CACHE", str(tmp_path))
    runner, pool = CountingRunner(), _pool()

    profiler.fit_or_load(runner, pool, "cpu", 16, 512)
    fitted = runner.calls
    assert fitted > 0
    path = profiler.profile_path(runner.info, "cpu", 16)
    assert path.is_file() and f"-r{profiler.RUNTIME_REVISION}" in path.name
    assert len(json.loads(path.read_text())["coef"]) > 0

    profiler.fit_or_load(runner, pool, "cpu", 16, 512)
    assert runner.calls == fitted  # a restart on the same runtime reads the cache

    monkeypatch.setattr(profiler, "RUNTIME_REVISION", profiler.RUNTIME_REVISION + 1)
    profiler.fit_or_load(runner, pool, "cpu", 16, 512)
    assert runner.calls == 2 * fitted  # newer kernels: the old profile is not trusted
    assert profiler.profile_path(runner.info, "cpu", 16) != path


def test_damaged_profile_is_refitted(tmp_path, monkeypatch):
    monkeypatch.setenv("ASCENDRA_CACHE", str(tmp_path))
    runner, pool = CountingRunner(), _pool()
    path = profiler.profile_path(runner.info, "cpu", 16)
    path.parent.mkdir(parents=True)
    path.write_text('{"points": 3}')  # no coefficients
    profiler.fit_or_load(runner, pool, "cpu", 16, 512)
    assert runner.calls > 0
    assert "coef" in json.loads(path.read_text())
