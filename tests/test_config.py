"""One serving configuration: flags derived from ServingConfig, bounds that name the flag, the
encoded struct handed to workers."""

import subprocess
import sys

import pytest

from ascendra import config
from ascendra.config import DEFAULTS, ServingConfig
from ascendra.server import build_parser
from workers.worker import parse_args as worker_args


def test_server_flags_keep_their_documented_defaults():
    a = build_parser().parse_args([])
    assert (a.chunk_size, a.max_num_seqs, a.ttft_slo, a.tbt_slo, a.max_waiting) == (512, 128, 1.0, 0.15, 1024)
    assert (a.policy, a.device, a.num_instances, a.num_hp, a.block_size, a.admission) == (
        None, "cpu", None, None, None, False)
    cfg = config.from_args(a)
    assert cfg == DEFAULTS


def test_server_flags_become_the_struct():
    a = build_parser().parse_args(["--policy", "ascendra", "--chunk-size", "64", "--admission", "--num-hp", "1",
                                   "--fake-model", "--step-log", "/tmp/x"])
    cfg = config.from_args(a, model_path="/m", escalate_started=False)
    assert (cfg.policy, cfg.chunk_size, cfg.admission, cfg.num_hp, cfg.fake_model, cfg.step_log) == (
        "ascendra", 64, True, 1, True, "/tmp/x")
    assert cfg.model_path == "/m" and cfg.escalate_started is False


@pytest.mark.parametrize("argv,flag", [(["--chunk-size", "0"], "--chunk-size"),
                                       (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
                                       (["--ttft-slo", "-1"], "--ttft-slo")])
def test_a_bound_violated_names_the_flag(argv, flag):
    with pytest.raises(ValueError, match=f"^{flag}: "):
        config.from_args(build_parser().parse_args(argv))


def test_server_exits_2_naming_the_flag_before_loading_anything():
    p = subprocess.run([sys.executable, "-m", "ascendra.server", "--chunk-size", "0"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "--chunk-size: Expected `int` >= 1" in p.stderr


def test_the_worker_takes_its_settings_from_the_encoded_struct():
    cfg = ServingConfig(model_path="/models/x", model_name="x", chunk_size=64, max_num_seqs=8, block_size=32,
                        fake_model=True, seed=7)
    assert config.decode(config.encode(cfg)) == cfg
    a = worker_args(["--coordinator", "ipc://s", "--worker-id", "1", "--config", config.encode(cfg)])
    assert (a.model, a.model_name, a.chunk_size, a.max_num_seqs, a.block_size, a.fake_model, a.seed) == (
        "/models/x", "x", 64, 8, "32", True, 7)
    # A flag after the struct overrides it (a test's worker_args).
    a = worker_args(["--coordinator", "ipc://s", "--worker-id", "1", "--config", config.encode(cfg),
                     "--chunk-size", "16"])
    assert a.chunk_size == 16
    # Without a struct, the worker's defaults are the same declaration's.
    a = worker_args(["--coordinator", "ipc://s", "--worker-id", "1", "--model", "/m"])
    assert (a.chunk_size, a.max_num_seqs, a.block_size) == (DEFAULTS.chunk_size, DEFAULTS.max_num_seqs, "auto")


def test_the_simulator_defaults_are_the_servers():
    from ascendra.sim.engine import SimConfig
    from ascendra.sim.scenarios import Scenario

    sim = SimConfig()
    assert (sim.chunk_size, sim.max_num_seqs, sim.ttft_slo, sim.tbt_slo) == (
        DEFAULTS.chunk_size, DEFAULTS.max_num_seqs, DEFAULTS.ttft_slo, DEFAULTS.tbt_slo)
    fields = Scenario.__dataclass_fields__
    assert fields["chunk_size"].default == DEFAULTS.chunk_size


def test_the_coordinator_hands_each_worker_the_encoded_struct(tiny_model):
    """The worker's argv carries the one struct (no rebuilt setting flags), and parses back to it."""
    import asyncio

    from ascendra.coordinator import Coordinator
    from ascendra.server import load_tokenizer

    cfg = ServingConfig(model_path=tiny_model.path, model_name="tiny", num_instances=2, policy="ascendra",
                        chunk_size=64, max_num_seqs=8, num_blocks=100, fake_model=True, seed=3)
    coord = Coordinator(cfg, load_tokenizer(tiny_model.path))
    try:
        argv = coord.worker_command(coord.workers[1])
        assert argv[1:3] == ["-m", "workers"]
        assert "--config" in argv and "--chunk-size" not in argv and "--model" not in argv
        assert config.decode(argv[argv.index("--config") + 1]) == cfg
        a = worker_args(argv[3:])
        assert (a.worker_id, a.role, a.policy, a.model, a.chunk_size, a.max_num_seqs, a.num_blocks, a.seed) == (
            1, "hp", "hp", tiny_model.path, 64, 8, 100, 3)
    finally:
        asyncio.run(coord.shutdown())


def test_the_simulator_checks_the_shared_settings_bounds_only():
    from ascendra.sim.__main__ import SHARED_FLAGS
    from ascendra.sim.__main__ import build_parser as sim_parser

    p = sim_parser()
    a = p.parse_args(["--policy", "vllm,ascendra-admission", "--chunk-size", "64"])  # a list, not a server policy
    assert a.max_num_seqs is None  # unset: the scenario's value applies
    assert config.from_args(a, names=SHARED_FLAGS).chunk_size == 64
    with pytest.raises(ValueError, match="^--chunk-size: "):
        config.from_args(p.parse_args(["--chunk-size", "0"]), names=SHARED_FLAGS)
