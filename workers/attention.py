"""Attention over the paged KV pool for one flattened batch.

The batch mixes prefill chunks (several query tokens, maybe with earlier context in the
pool) and decodes (one query token each). K/V of the new tokens are already written into
the pool when these run.

- flash-attn, when importable and on CUDA: one varlen call over the whole batch, with
  K/V gathered by slot (upstream flash-attn's paged path wants pages of 256 tokens).
- otherwise PyTorch SDPA: all decodes in one padded call, each prefill chunk on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional: the `gpu` extra
    from flash_attn import flash_attn_varlen_func
except Exception:  # ImportError, or a wheel built for another torch
    flash_attn_varlen_func = None


def flash_attn_available(device: torch.device) -> bool:
    return flash_attn_varlen_func is not None and device.type == "cuda"


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the flattened batch
    num_tokens: int  # query tokens
    context_len: int  # tokens in the pool before this chunk
    block_ids: torch.Tensor  # blocks covering context_len + num_tokens tokens


@dataclass
class AttentionMetadata:
    block_size: int
    prefills: list[PrefillChunk]
    # Decodes occupy the rows after the prefills: decode_rows = slice(start, end).
    decode_start: int
    num_decodes: int
    decode_block_table: torch.Tensor | None  # [num_decodes, max_blocks], padded with 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size]
    # For the flash-attn path.
    gather_slots: torch.Tensor | None = None  # slots of every key, sequence after sequence
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_new: torch.Tensor,  # [T, kv_heads, head_dim]
    v_new: torch.Tensor,
    k_cache: torch.Tensor,  # [blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    if meta.gather_slots is not None:
        return _flash(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        qc = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if chunk.context_len == 0:
            # Nothing earlier in the pool: attend to the fresh K/V, plainly causal.
            kc = k_new[rows].transpose(0, 1).unsqueeze(0)
            vc = v_new[rows].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        else:
            total = chunk.context_len + chunk.num_tokens
            kc = k_cache.index_select(0, chunk.block_ids).view(-1, kv_heads, head_dim)[:total]
            vc = v_cache.index_select(0, chunk.block_ids).view(-1, kv_heads, head_dim)[:total]
            kc = kc.transpose(0, 1).unsqueeze(0)
            vc = vc.transpose(0, 1).unsqueeze(0)
            # Query i sits at position context_len + i and sees keys 0..context_len + i.
            qpos = torch.arange(chunk.context_len, total, device=q.device)
            mask = torch.arange(total, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = o.squeeze(0).transpose(0, 1)
    if meta.num_decodes:
        rows = slice(meta.decode_start, meta.decode_start + meta.num_decodes)
        flat = meta.decode_block_table.flatten()  # index_select is far cheaper than 2-D indexing on CPU
        b = meta.num_decodes
        kd = k_cache.index_select(0, flat).view(b, -1, kv_heads, head_dim).transpose(1, 2)  # [b, kvh, L, d]
        vd = v_cache.index_select(0, flat).view(b, -1, kv_heads, head_dim).transpose(1, 2)
        qd = q[rows].unsqueeze(2)  # [b, heads, 1, d]
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[rows] = o.squeeze(2)
    return out


def _flash(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.view(-1, kv_heads, head_dim).index_select(0, meta.gather_slots)
    v = v_cache.view(-1, kv_heads, head_dim).index_select(0, meta.gather_slots)
    # flash-attn aligns the causal mask to the bottom right, which is what a chunk with
    # earlier context needs.
    return flash_attn_varlen_func(
        q,
        k,
        v,
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        meta.max_seqlen_q,
        meta.max_seqlen_k,
        softmax_scale=scale,
        causal=True,
    )
