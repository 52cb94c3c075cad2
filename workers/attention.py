"""Attention over the paged KV pool for one flattened batch.

The batch mixes prefill chunks (several query tokens, maybe with earlier context in the
pool) and decodes (one query token each). K/V of the new tokens are already written into
the pool when these run. Three kernels, chosen per device, dtype and block size by
``choose_kernel``:

- ``flash_paged`` (CUDA, fp16/bf16, flash-attn importable, block size a multiple of 256):
  flash-attn's ``flash_attn_with_kvcache`` reads K/V straight out of the pool through a
  block table; nothing is copied.
- ``flash_varlen`` (CUDA, fp16/bf16, flash-attn, any block size): K/V gathered by slot
  into contiguous tensors, then one ``flash_attn_varlen_func`` over the whole batch.
- ``sdpa`` (everything else, the CPU path and fp32): PyTorch SDPA; decodes in padded
  groups whose size is bounded, each prefill chunk on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # optional: the `gpu` extra
    from flash_attn import flash_attn_varlen_func
except Exception:  # ImportError, or a wheel built for another torch
    flash_attn_varlen_func = None
try:
    from flash_attn import flash_attn_with_kvcache
except Exception:
    flash_attn_with_kvcache = None

# flash-attn 2 accepts a paged cache only with pages of a multiple of 256 tokens.
FLASH_PAGE_MULTIPLE = 256
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # flash-attn rejects fp32 inputs
# Upper bound on keys gathered per padded SDPA decode call (rows x longest row): a 128k
# context no longer makes every decode of the batch pad to 128k.
DECODE_GATHER_TOKENS = 1 << 16


def flash_attn_available(device: torch.device) -> bool:
    return flash_attn_varlen_func is not None and device.type == "cuda"


def choose_kernel(device_type: str, dtype: torch.dtype, block_size: int,
                  have_varlen: bool | None = None, have_paged: bool | None = None) -> str:
    """Which attention kernel a worker with this device, dtype and block size uses."""
    have_varlen = flash_attn_varlen_func is not None if have_varlen is None else have_varlen
    have_paged = flash_attn_with_kvcache is not None if have_paged is None else have_paged
    if device_type != "cuda" or dtype not in FLASH_DTYPES:
        return "sdpa"
    if have_paged and block_size % FLASH_PAGE_MULTIPLE == 0:
        return "flash_paged"
    if have_varlen:
        return "flash_varlen"
    return "sdpa"


def default_block_size(device_type: str, dtype: torch.dtype) -> int:
    """Block size for ``--block-size auto``: 256 where the paged flash kernel can run, else 16."""
    if choose_kernel(device_type, dtype, FLASH_PAGE_MULTIPLE) == "flash_paged":
        return FLASH_PAGE_MULTIPLE
    return 16


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the flattened batch
    num_tokens: int  # query tokens
    context_len: int  # tokens in the pool before this chunk
    block_ids: torch.Tensor  # blocks covering context_len + num_tokens tokens


@dataclass
class DecodeGroup:
    """Consecutive decode rows attended in one padded SDPA call."""
    start: int  # first row in the flattened batch
    num: int
    block_table: torch.Tensor  # [num, width], padded with block 0
    mask: torch.Tensor  # [num, 1, 1, width * block_size]


@dataclass
class AttentionMetadata:
    block_size: int
    prefills: list[PrefillChunk]
    # Decodes occupy the rows after the prefills: decode_rows = slice(start, end).
    decode_start: int
    num_decodes: int
    kernel: str = "sdpa"
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # sdpa
    # flash_varlen: slots of every key, sequence after sequence, and cumulative lengths.
    gather_slots: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # flash_paged: one block-table row and one cache length per prefill chunk / decode.
    prefill_tables: list[torch.Tensor] = field(default_factory=list)  # [1, blocks] int32 each
    prefill_seqlens: list[torch.Tensor] = field(default_factory=list)  # [1] int32 each
    decode_table: torch.Tensor | None = None  # [num_decodes, width] int32
    decode_seqlens: torch.Tensor | None = None  # [num_decodes] int32


def decode_groups(lens: list[int], block_size: int, limit: int = DECODE_GATHER_TOKENS) -> list[tuple[int, int, int]]:
    """Split decodes (in row order) into (first, count, width in blocks) groups whose padded
    key count stays under ``limit`` (a single longer decode forms its own group)."""
    out: list[tuple[int, int, int]] = []
    first, width = 0, 0
    for i, n in enumerate(lens):
        w = -(-n // block_size)
        if i > first and (i - first + 1) * max(width, w) * block_size > limit:
            out.append((first, i - first, width))
            first, width = i, 0
        width = max(width, w)
    if lens:
        out.append((first, len(lens) - first, width))
    return out


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_new: torch.Tensor,  # [T, kv_heads, head_dim]
    v_new: torch.Tensor,
    k_cache: torch.Tensor,  # [blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    if meta.kernel == "flash_paged":
        return _flash_paged(q, k_cache, v_cache, meta, scale)
    if meta.kernel == "flash_varlen":
        return _flash_varlen(q, k_cache, v_cache, meta, scale)
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
    heads = q.shape[1]
    for g in meta.decode_groups:
        rows = slice(g.start, g.start + g.num)
        out[rows] = _decode_group(q[rows], k_cache, v_cache, g, scale).reshape(g.num, heads, head_dim)
    return out


def _decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: DecodeGroup,
                  scale: float) -> torch.Tensor:
    """One query token per row against its gathered keys, as two batched matmuls.

    The query heads sharing a KV head form the rows of one matmul ([b, kvh, group, d] against
    [b, kvh, L, d]), so K/V are never repeated per head: SDPA with enable_gqa on CPU does, and
    with one query row its bf16 kernel is ~10x slower than this. Scores and softmax are fp32 and
    the probabilities are cast back to the activation dtype before the PV product, as
    transformers' eager attention does."""
    num, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    flat = g.block_table.flatten()  # index_select is far cheaper than 2-D indexing on CPU
    kd = k_cache.index_select(0, flat).view(num, -1, kv_heads, head_dim).transpose(1, 2).contiguous()
    vd = v_cache.index_select(0, flat).view(num, -1, kv_heads, head_dim).transpose(1, 2).contiguous()
    qg = q.view(num, kv_heads, heads // kv_heads, head_dim)  # head h reads KV head h // group
    scores = torch.matmul(qg, kd.transpose(-1, -2)).float().mul_(scale)  # [b, kvh, group, L]
    scores.masked_fill_(~g.mask, float("-inf"))  # padding past each row's length
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, vd)  # [b, kvh, group, d]


def _flash_varlen(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.view(-1, kv_heads, head_dim).index_select(0, meta.gather_slots)
    v = v_cache.view(-1, kv_heads, head_dim).index_select(0, meta.gather_slots)
    # flash-attn aligns the causal mask to the bottom right, which is what a chunk with
    # earlier context needs.
    return flash_attn_varlen_func(
        q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k,
        softmax_scale=scale, causal=True,
    )


def _flash_paged(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    # The pool's per-layer K and V are (num_blocks, page_block_size, kv_heads, head_dim), the
    # layout flash_attn_with_kvcache takes with a block_table; cache_seqlens counts the keys
    # already in the pool, this step's included (they were written before attention runs).
    out = torch.empty_like(q)
    for chunk, table, seqlen in zip(meta.prefills, meta.prefill_tables, meta.prefill_seqlens):
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        # causal is aligned bottom right: query i sees keys up to context_len + i.
        out[rows] = flash_attn_with_kvcache(
            q[rows].unsqueeze(0), k_cache, v_cache, cache_seqlens=seqlen, block_table=table,
            softmax_scale=scale, causal=True,
        ).squeeze(0)
    if meta.num_decodes:
        rows = slice(meta.decode_start, meta.decode_start + meta.num_decodes)
        out[rows] = flash_attn_with_kvcache(
            q[rows].unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.decode_seqlens,
            block_table=meta.decode_table, softmax_scale=scale, causal=True,
        ).squeeze(1)
    return out
