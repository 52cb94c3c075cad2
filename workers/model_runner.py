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
from .attention import (
    DECODE_GATHER_TOKENS,
    AttentionMetadata,
    DecodeGroup,
    PrefillChunk,
    choose_kernel,
    decode_groups,
    paged_attention,
)
from .kv_pool import KVPool, dtype_name


@dataclass
class _Layer:
    input_norm: torch.nn.Module
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    post_norm: torch.nn.Module
    gate_up_weight: torch.Tensor | None  # None when packed: gate and up are held apart
    down_weight: torch.Tensor
    gate_weight: torch.Tensor | None = None  # packed only
    up_weight: torch.Tensor | None = None


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 matmuls natively (about 4x fp32's speed for
    SmolLM2's decode shapes on an AVX512-BF16 EPYC, bench.dtype); without them bf16 is emulated
    and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, private in 2.x
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def default_dtype(device: torch.device) -> torch.dtype:
    """``--dtype auto``: bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def can_pack_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can hold the linear weights pre-packed (its blocked layout) on this device."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout, for ``packed_linear``. ``F.linear`` on CPU reorders
    the plain [out, in] weight on every call: for SmolLM2's decode shapes (1-32 rows) the packed
    weight ran bf16 matmuls 1.3-2.7x faster with bit-identical results, and fp32 ones 2-3x faster
    (a different summation order: ~1e-6 relative). vLLM's CPU backend packs its weights the same way."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)


def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def packed_silu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) as two oneDNN ops, the SiLU and the product fused into the
    matmuls: no elementwise passes over the [tokens, intermediate] activations, which took a
    third of a bf16 prefill's MLP time (SmolLM2, 512 tokens: 3.7 ms a layer unfused, 1.6 fused)."""
    g = torch.ops.mkldnn._linear_pointwise(x, gate, None, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, g, up, None, "mul")


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
        pack_weights: bool | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype or default_dtype(device)
        # None: pack where oneDNN can (CPU, fp32/bf16); CUDA keeps plain weights for cuBLAS.
        self.packed = can_pack_weights(device, self.dtype) if pack_weights is None else pack_weights
        self.linear = packed_linear if self.packed else F.linear
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
        # Fuse without autograd: a fused tensor with a grad_fn would keep the q/k/v and
        # gate/up originals alive through its graph, and the weights would be held twice.
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
                self.layers.append(
                    _Layer(
                        input_norm=layer.input_layernorm,
                        qkv_weight=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                        qkv_bias=torch.cat(biases) if biases[0] is not None else None,
                        o_weight=attn.o_proj.weight.detach(),
                        post_norm=layer.post_attention_layernorm,
                        gate_up_weight=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                        down_weight=mlp.down_proj.weight.detach(),
                    )
                )
                # Drop the originals layer by layer, so peak memory is one layer above the model.
                del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
        self.intermediate = self.layers[0].down_weight.shape[1]
        # Rotary tables for every position, from transformers' own rotary module (rope
        # scaling variants included), so positions match the reference exactly.
        with torch.inference_mode():
            pos = torch.arange(self.max_model_len, device=device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=device)
            cos, sin = inner.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        del inner.layers  # the fused copies above replace them
        self.decode_gather_tokens = DECODE_GATHER_TOKENS  # bound on one padded SDPA decode call
        for module in (self.embed, self.final_norm,
                       *(m for layer in self.layers for m in (layer.input_norm, layer.post_norm))):
            module.requires_grad_(False)
        if self.packed:
            with torch.no_grad():
                for layer in self.layers:
                    for name in ("qkv_weight", "o_weight", "down_weight"):
                        setattr(layer, name, pack_weight(getattr(layer, name)))
                    gate, up = layer.gate_up_weight.split(self.intermediate)
                    layer.gate_weight, layer.up_weight = pack_weight(gate), pack_weight(up)
                    layer.gate_up_weight = None
                # A head tied to the embedding stays plain there (the lookup) and is packed here: the
                # one weight held twice, for the largest matmul of a decode step.
                self.lm_head = pack_weight(self.lm_head)

    def kernel(self, block_size: int) -> str:
        """The attention kernel this runner uses with pools of ``block_size``-token blocks."""
        return choose_kernel(self.device.type, self.dtype, block_size)

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every tensor the runner holds for the model, and any its autograd graph keeps alive."""
        roots = [self.lm_head]
        for m in (self.embed, self.final_norm):
            roots += list(m.parameters()) + list(m.buffers())
        for layer in self.layers:
            roots += [t for t in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.gate_weight,
                                  layer.up_weight, layer.down_weight) if t is not None]
            roots += [t for t in (layer.qkv_bias,) if t is not None]
            for m in (layer.input_norm, layer.post_norm):
                roots += list(m.parameters())
        out, seen, stack = [], set(), [t.grad_fn for t in roots if t.grad_fn is not None]
        out.extend(roots)
        while stack:  # walk grad_fn graphs: AccumulateGrad nodes hold the leaves they feed
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            if hasattr(fn, "variable"):
                out.append(fn.variable)
            stack.extend(f for f, _ in fn.next_functions)
        return out

    def weight_bytes(self) -> int:
        """Bytes of distinct storages behind ``weight_tensors`` (memory the weights really hold)."""
        storages = {}
        for t in self.weight_tensors():
            if t.is_mkldnn:  # an opaque packed copy: its own memory, about its plain size
                storages[("mkldnn", id(t))] = t.numel() * t.element_size()
                continue
            st = t.untyped_storage()
            storages[(st.device, st.data_ptr())] = st.nbytes()
        return sum(storages.values())

    # ---- sizing
    def kv_bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    def make_pool(self, num_blocks: int, block_size: int, shareable: bool = True) -> KVPool:
        return KVPool(
            self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim,
            self.dtype, self.device, shareable=shareable,
        )

    def warm_up(self, block_size: int, num_tokens: int) -> None:
        """Run one prefill of ``num_tokens`` on a scratch pool: the allocator's peak then holds a
        full step's activations, so the KV pool can be sized from what is left."""
        from ascendra.messages import SamplingParams
        from ascendra.sequence import Sequence

        num_tokens = max(1, min(num_tokens, self.max_model_len - 1))
        blocks = -(-num_tokens // block_size)
        pool = self.make_pool(blocks, block_size, shareable=False)
        seq = Sequence("warm-up", [1] * num_tokens, SamplingParams(max_tokens=1), 0.0)
        seq.block_table = list(range(blocks))
        self.execute([ScheduledSeq(seq, num_tokens, 0)], pool)
        pool.close()

    # ---- forward
    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], pool: KVPool) -> torch.Tensor:
        """Run one iteration. Returns fp32 logits, one row per entry of ``batch`` that samples."""
        inputs = self._prepare(batch, pool.block_size)
        h = self.embed(inputs.token_ids)
        cos = self.cos[inputs.positions].unsqueeze(1)
        sin = self.sin[inputs.positions].unsqueeze(1)
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        linear = self.linear
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = pool.layer(i)
            x = layer.input_norm(h)
            qkv = linear(x, layer.qkv_weight, layer.qkv_bias)
            q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
            q = _rope(q.view(-1, nq, d), cos, sin)
            k = _rope(k.view(-1, nkv, d), cos, sin)
            v = v.view(-1, nkv, d)
            k_cache.view(-1, nkv, d).index_copy_(0, inputs.slots, k)
            v_cache.view(-1, nkv, d).index_copy_(0, inputs.slots, v)
            a = paged_attention(q, k, v, k_cache, v_cache, inputs.attn, self.scale)
            h = h + linear(a.reshape(-1, nq * d), layer.o_weight)
            x = layer.post_norm(h)
            if layer.gate_up_weight is None:
                act = packed_silu_mlp(x, layer.gate_weight, layer.up_weight)
            else:
                gate, up = linear(x, layer.gate_up_weight).split(self.intermediate, dim=-1)
                act = F.silu(gate) * up
            h = h + linear(act, layer.down_weight)
        last = self.final_norm(h.index_select(0, inputs.logits_rows))
        return self.linear(last, self.lm_head).float()

    def _prepare(self, batch: list[ScheduledSeq], block_size: int) -> _Inputs:
        # Prefill chunks first, then decodes: decodes then form one contiguous run of rows.
        # A one-token step with context is a decode as far as attention goes.
        prefills = [s for s in batch if s.num_tokens > 1 or s.context_len == 0]
        decodes = [s for s in batch if s.num_tokens == 1 and s.context_len > 0]
        order = prefills + decodes
        kernel = self.kernel(block_size)
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_row: dict[int, int] = {}
        starts: list[int] = []
        for s in order:
            starts.append(len(token_ids))
            table = s.seq.block_table
            end = s.context_len + s.num_tokens
            token_ids.extend(s.seq.token_ids[s.context_len : end])
            for p in range(s.context_len, end):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            last_row[id(s)] = len(token_ids) - 1
        # Logits come back in the order of `batch`, one row per request that samples.
        logits_rows = [last_row[id(s)] for s in batch if s.samples]

        # Every integer the step needs goes to the device in one (pinned) transfer.
        pack = _Pack()
        h_tokens, h_positions, h_slots, h_rows = (pack.add(x) for x in (token_ids, positions, slots, logits_rows))
        h_chunk_blocks = [pack.add(s.seq.block_table[: -(-(s.context_len + s.num_tokens) // block_size)])
                          for s in prefills]
        attn = AttentionMetadata(block_size=block_size, prefills=[], decode_start=len(token_ids) - len(decodes),
                                 num_decodes=len(decodes), kernel=kernel)
        lens = [s.context_len + 1 for s in decodes]
        extra: dict[str, object] = {}
        if kernel == "flash_varlen":
            gather: list[int] = []
            cu_q, cu_k = [0], [0]
            for s in order:
                total = s.context_len + s.num_tokens
                table = s.seq.block_table
                gather.extend(table[p // block_size] * block_size + p % block_size for p in range(total))
                cu_q.append(cu_q[-1] + s.num_tokens)
                cu_k.append(cu_k[-1] + total)
            extra = {"gather": pack.add(gather), "cu_q": pack.add(cu_q), "cu_k": pack.add(cu_k)}
            attn.max_seqlen_q = max(s.num_tokens for s in order)
            attn.max_seqlen_k = max(s.context_len + s.num_tokens for s in order)
        elif kernel == "flash_paged":
            extra["pre_len"] = [pack.add([s.context_len + s.num_tokens]) for s in prefills]
            if decodes:
                width = max(-(-n // block_size) for n in lens)
                table = [x for s in decodes for x in _pad(s.seq.block_table[:width], width)]
                extra["dec_table"], extra["dec_len"], extra["width"] = pack.add(table), pack.add(lens), width
        else:
            groups = []
            for first, count, width in decode_groups(lens, block_size, self.decode_gather_tokens):
                rows = decodes[first : first + count]
                table = [x for s in rows for x in _pad(s.seq.block_table[:width], width)]
                groups.append((first, count, width, pack.add(table), pack.add(lens[first : first + count])))
            extra["groups"] = groups

        dev = pack.to(self.device)
        for s, start, h in zip(prefills, starts, h_chunk_blocks):
            attn.prefills.append(PrefillChunk(start=start, num_tokens=s.num_tokens, context_len=s.context_len,
                                              block_ids=dev(h)))
        if kernel == "flash_varlen":
            attn.gather_slots = dev(extra["gather"])
            attn.cu_seqlens_q = dev(extra["cu_q"]).to(torch.int32)
            attn.cu_seqlens_k = dev(extra["cu_k"]).to(torch.int32)
        elif kernel == "flash_paged":
            attn.prefill_tables = [c.block_ids.to(torch.int32)[None] for c in attn.prefills]
            attn.prefill_seqlens = [dev(h).to(torch.int32) for h in extra["pre_len"]]
            if decodes:
                attn.decode_table = dev(extra["dec_table"]).view(len(decodes), extra["width"]).to(torch.int32)
                attn.decode_seqlens = dev(extra["dec_len"]).to(torch.int32)
        else:
            for first, count, width, h_table, h_lens in extra["groups"]:
                cols = torch.arange(width * block_size, device=self.device)
                mask = (cols[None, :] < dev(h_lens)[:, None]).view(count, 1, 1, -1)
                attn.decode_groups.append(DecodeGroup(start=attn.decode_start + first, num=count,
                                                      block_table=dev(h_table).view(count, width), mask=mask))
        return _Inputs(
            token_ids=dev(h_tokens),
            positions=dev(h_positions),
            slots=dev(h_slots),
            logits_rows=dev(h_rows),
            attn=attn,
        )


@dataclass
class _Inputs:
    token_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    logits_rows: torch.Tensor
    attn: AttentionMetadata


class _Pack:
    """Collects int lists on the host and ships them to the device as one int64 tensor."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def add(self, values: list[int]) -> tuple[int, int]:
        start = len(self.values)
        self.values.extend(values)
        return start, len(self.values)

    def to(self, device: torch.device):
        pinned = device.type == "cuda"
        # A pinned source lets the copy run asynchronously; the caching host allocator keeps
        # the buffer alive until the copy stream has consumed it.
        host = torch.tensor(self.values, dtype=torch.long, pin_memory=pinned)
        flat = host.to(device, non_blocking=True) if pinned else host
        return lambda span: flat[span[0] : span[1]]


def _pad(table: list[int], width: int) -> list[int]:
    return table + [0] * (width - len(table))



def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
