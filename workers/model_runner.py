"""One forward pass over a flattened batch of prefill chunks and decodes, K/V in the paged pool.

The weights, config and rotary tables come from transformers' own Llama / Qwen2 / Mistral
implementation; the forward is ours, because transformers' cache is not paged. Q/K/V and
gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ascendra.messages import ModelInfo
from ascendra.scheduler import ScheduledSeq
from workers.attention import AttentionMetadata, PrefillChunk, flash_attn_available, paged_attention
from workers.kv_pool import KVPool, dtype_name


@dataclass
class _Layer:
    input_norm: torch.nn.Module
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    post_norm: torch.nn.Module
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


def default_dtype(device: torch.device) -> torch.dtype:
    # fp32 on CPU: bf16 matmuls are slow on most CPUs and fp32 matches the reference exactly.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_hf_model(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


class ModelRunner:
    def __init__(
        self,
        path: str,
        name: str,
        device: torch.device,
        dtype: torch.dtype | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype or default_dtype(device)
        hf = load_hf_model(path, device, self.dtype)
        cfg = hf.config
        self.config = cfg
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.num_layers = cfg.num_hidden_layers
        self.vocab_size = cfg.vocab_size
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        eos = cfg.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        gen_eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            eos_ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        self.eos_token_ids = sorted(set(eos_ids))
        self.info = ModelInfo(
            name=name,
            path=path,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype_name(self.dtype),
        )

        inner = hf.model
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.lm_head = hf.lm_head.weight
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm,
                    qkv_weight=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    qkv_bias=torch.cat(biases) if biases[0] is not None else None,
                    o_weight=attn.o_proj.weight,
                    post_norm=layer.post_attention_layernorm,
                    gate_up_weight=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    down_weight=mlp.down_proj.weight,
                )
            )
        self.intermediate = self.layers[0].down_weight.shape[1]
        # Rotary tables for every position, from transformers' own rotary module (rope
        # scaling variants included), so positions match the reference exactly.
        with torch.inference_mode():
            pos = torch.arange(self.max_model_len, device=device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=device)
            cos, sin = inner.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        del inner.layers  # the fused copies above replace them
        self.use_flash = flash_attn_available(device)

    # ---- sizing
    def kv_bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    def make_pool(self, num_blocks: int, block_size: int, shareable: bool = True) -> KVPool:
        return KVPool(
            self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim,
            self.dtype, self.device, shareable=shareable,
        )

    # ---- forward
    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], pool: KVPool) -> torch.Tensor:
        """Run one iteration. Returns fp32 logits, one row per entry of ``batch`` that samples."""
        inputs = self._prepare(batch, pool.block_size)
        h = self.embed(inputs.token_ids)
        cos = self.cos[inputs.positions].unsqueeze(1)
        sin = self.sin[inputs.positions].unsqueeze(1)
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = pool.layer(i)
            x = layer.input_norm(h)
            qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias)
            q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
            q = _rope(q.view(-1, nq, d), cos, sin)
            k = _rope(k.view(-1, nkv, d), cos, sin)
            v = v.view(-1, nkv, d)
            k_cache.view(-1, nkv, d).index_copy_(0, inputs.slots, k)
            v_cache.view(-1, nkv, d).index_copy_(0, inputs.slots, v)
            a = paged_attention(q, k, v, k_cache, v_cache, inputs.attn, self.scale)
            h = h + F.linear(a.reshape(-1, nq * d), layer.o_weight)
            x = layer.post_norm(h)
            gate, up = F.linear(x, layer.gate_up_weight).split(self.intermediate, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer.down_weight)
        last = self.final_norm(h.index_select(0, inputs.logits_rows))
        return F.linear(last, self.lm_head).float()

    def _prepare(self, batch: list[ScheduledSeq], block_size: int) -> "_Inputs":
        # Prefill chunks first, then decodes: decodes then form one contiguous run of rows.
        # A one-token step with context is a decode as far as attention goes.
        prefills = [s for s in batch if s.num_tokens > 1 or s.context_len == 0]
        decodes = [s for s in batch if s.num_tokens == 1 and s.context_len > 0]
        order = prefills + decodes
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_row: dict[int, int] = {}
        chunks: list[PrefillChunk] = []
        for i, s in enumerate(order):
            start = len(token_ids)
            table = s.seq.block_table
            end = s.context_len + s.num_tokens
            token_ids.extend(s.seq.token_ids[s.context_len : end])
            for p in range(s.context_len, end):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            last_row[id(s)] = len(token_ids) - 1
            if i < len(prefills):
                chunks.append(
                    PrefillChunk(
                        start=start,
                        num_tokens=s.num_tokens,
                        context_len=s.context_len,
                        block_ids=_long(table[: -(-end // block_size)], self.device),
                    )
                )
        # Logits come back in the order of `batch`, one row per request that samples.
        logits_rows = [last_row[id(s)] for s in batch if s.samples]
        dev = self.device
        attn = AttentionMetadata(
            block_size=block_size,
            prefills=chunks,
            decode_start=len(token_ids) - len(decodes),
            num_decodes=len(decodes),
            decode_block_table=None,
            decode_mask=None,
        )
        if self.use_flash:
            self._flash_metadata(attn, order, block_size)
        elif decodes:
            lens = [s.context_len + 1 for s in decodes]
            width = -(-max(lens) // block_size)
            table = [s.seq.block_table[:width] + [0] * (width - len(s.seq.block_table[:width])) for s in decodes]
            attn.decode_block_table = _long(table, dev)
            cols = torch.arange(width * block_size, device=dev)
            attn.decode_mask = (cols[None, :] < _long(lens, dev)[:, None]).view(len(decodes), 1, 1, -1)
        inputs = _Inputs(
            token_ids=_long(token_ids, dev),
            positions=_long(positions, dev),
            slots=_long(slots, dev),
            logits_rows=_long(logits_rows, dev),
            attn=attn,
        )
        return inputs

    def _flash_metadata(self, attn: AttentionMetadata, order: list[ScheduledSeq], block_size: int) -> None:
        slots: list[int] = []
        cu_q, cu_k = [0], [0]
        for s in order:
            total = s.context_len + s.num_tokens
            table = s.seq.block_table
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(total))
            cu_q.append(cu_q[-1] + s.num_tokens)
            cu_k.append(cu_k[-1] + total)
        attn.gather_slots = _long(slots, self.device)
        attn.cu_seqlens_q = torch.tensor(cu_q, dtype=torch.int32, device=self.device)
        attn.cu_seqlens_k = torch.tensor(cu_k, dtype=torch.int32, device=self.device)
        attn.max_seqlen_q = max(s.num_tokens for s in order)
        attn.max_seqlen_k = max(s.context_len + s.num_tokens for s in order)


@dataclass
class _Inputs:
    token_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    logits_rows: torch.Tensor
    attn: AttentionMetadata


def _long(values, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
