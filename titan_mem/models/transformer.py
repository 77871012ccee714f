"""Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with memory layers in place of FFNs.

Built on the meta device and materialised with `to_empty` + `init_weights()` after sharding, so a 1.3B model
never exists unsharded on one rank. `Transformer.forward(tokens)` is the training path (causal attention,
positions 0..T-1); its keyword arguments add what decoding needs (titan_mem.eval.greedy): a KV cache,
per-row positions and a padding mask for left-padded batches.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titan_mem.models.args import ModelArgs
from titan_mem.models.kv_cache import KVCache
from titan_mem.models.memory import MemoryLayer, MemoryValues, recompute_context


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """[head_dim // 2] angular frequencies theta^(-2j/d) (Su et al. 2021, eq. 15), with Llama 3's scaling
    when `rope_scaling_factor` != 1 (Meta's Llama 3.1 reference, `apply_scaling`): wavelengths longer than
    L / low_freq_factor are divided by the factor, shorter than L / high_freq_factor kept, and the band
    between blended linearly in L / wavelength (L = rope_original_max_seq_len)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    factor = args.rope_scaling_factor
    if factor == 1.0:
        return inv_freq
    low, high, context = args.rope_low_freq_factor, args.rope_high_freq_factor, args.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    smooth = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: long wavelength, 1: short
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cache(args: ModelArgs, device=None) -> torch.Tensor:
    """[max_seq_len, head_dim // 2] complex64 table e^(i m theta_j) (Su et al. 2021, eq. 34).

    Complex, as torchtitan's `freqs_cis`: FSDP2 mixed precision casts floating-point forward inputs of each
    block to bf16, and bf16 cos/sin are off by up to 2^-9, i.e. a wrong angle; a complex tensor is not
    floating point, so the table reaches every block in fp32 whatever wraps the blocks.
    """
    inv_freq = rope_frequencies(args, device)
    t = torch.arange(args.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.complex(freqs.cos(), freqs.sin())


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x: [B, T, H, D] by position; cache: rows of `rope_cache`, either [T, D/2]
    (every row at positions 0..T-1) or [B, T, D/2] (each row at its own positions, e.g. `rope[positions]`).

    The rotation runs in fp32 (x upcast, rotated, cast back), on the real and imaginary parts of the table
    (real arithmetic: inductor fuses it, complex ops it would not; eager CPU multiplies complex numbers).
    """
    if cache.dtype != torch.complex64:
        raise TypeError(f"apply_rope: expected a complex64 rope_cache table, got {cache.dtype}")
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _rope_complex(x, cache)
    return _rope_real(x, cache)


def _rope_complex(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Eager CPU: one complex multiply, the same products and sums as `_rope_real` (bit for bit on B's AVX2
    kernels) in a third of the dispatches (31 us vs 88 a call at one decoded token, where dispatch is the
    cost)."""
    c = cache.view(1, x.shape[1], 1, -1) if cache.dim() == 2 else cache.unsqueeze(2)
    xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * c).flatten(-2).type_as(x)


def _rope_real(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    cs = torch.view_as_real(cache)  # [..., D/2, 2]: cos, sin
    if cache.dim() == 2:
        cs = cs.view(1, x.shape[1], 1, -1, 2)
    else:
        cs = cs.unsqueeze(2)
    cos, sin = cs[..., 0], cs[..., 1]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        bias = args.qkv_bias
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # Qwen3: each query and key head RMS-normalised before RoPE, one weight over head_dim shared by heads
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None

    def init_weights(self, init_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.wo.weight, std=init_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_id: int = 0,
    ) -> torch.Tensor:
        """Causal self-attention; with `mask` ([B, 1, T, S]: bool, True = may attend, or additive 0 / -inf)
        instead of the causal rule, and with `cache` over the cached keys/values of earlier positions too
        (S = cached + T)."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer_id, k, v)
        # GQA: on CPU, SDPA's flash kernel reads each key/value head for its query heads itself (the same
        # forward bit for bit, 2.7x faster per decode step at SmolLM2's shapes: no [B, H, S, D] copies);
        # elsewhere k and v are repeated, as not every CUDA kernel takes enable_gqa.
        gqa = self.n_kv_heads != self.n_heads and q.device.type == "cpu"
        if self.n_kv_heads != self.n_heads and not gqa:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=0.02)
        nn.init.trunc_normal_(self.w3.weight, std=init_std)
        nn.init.trunc_normal_(self.w2.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# training.activation_checkpoint: none | full (recompute the whole block in backward) | selective (op-level
# SAC as in torchtitan: keep the outputs of `_SAC_SAVE`, recompute everything else in the block).
ACMode = Literal["none", "full", "selective"]  # training.activation_checkpoint
AC_MODES: tuple[str, ...] = get_args(ACMode)
_aten = torch.ops.aten
# The expensive ops (matmuls, attention, the memory value lookup on the PyTorch backend); norms, RoPE,
# SwiGLU's pointwise ops and the memory scores' top-k/softmax are cheap to redo.
_SAC_SAVE = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._embedding_bag.default,
}


def sac_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective activation checkpointing policy (`create_selective_checkpoint_contexts`)."""
    return CheckpointPolicy.MUST_SAVE if func in _SAC_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


# context_fn per (mode, compiled). Eager: `recompute_context`, which also marks the recompute for batch norm.
# Compiled, checkpoint takes only TorchDispatchMode contexts (torch 2.13 fails on recompute_context's:
# "context_fn ... must generate a tuple of two TorchDispatchModes"): SAC's, or none for full AC (torch then
# applies its own recompute-everything SAC policy; dynamo would keep even an explicit noop_context_fn, and
# fail). The recompute is then AOTAutograd's, from the traced graph, where the running-statistics update is
# a forward-only buffer mutation, so it still happens once.
_CONTEXT_FNS = {
    ("full", False): recompute_context,
    ("selective", False): functools.partial(recompute_context, sac_policy),
    ("full", True): None,
    ("selective", True): functools.partial(create_selective_checkpoint_contexts, sac_policy),
}


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, shared_values: MemoryValues | None):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.is_memory = layer_id in args.memory.layers
        if self.is_memory:
            self.feed_forward: nn.Module = MemoryLayer(args.dim, args.memory, args.v_dim, shared_values)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        # retrofit `add`: the base model's FFN stays beside the memory layer (MemoryArgs.beside_ffn)
        self.dense_ffn = (
            FeedForward(args.dim, args.ffn_hidden_dim) if self.is_memory and args.memory.beside_ffn else None
        )
        # Depth-scaled init of output projections (as in torchtitan/Llama: 0.02 / sqrt(2 * (layer + 1))).
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5
        self.activation_checkpoint = "none"  # AC_MODES; set by parallel.fsdp

    def init_weights(self) -> None:
        self.attention.init_weights(self.init_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.feed_forward.init_weights(self.init_std)
        if self.dense_ffn is not None:
            self.dense_ffn.init_weights(self.init_std)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_slots: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """`mask` and `cache` as in `Attention.forward` (keyword arguments pass FSDP2's hooks unchanged: a
        bool mask is not cast, a KVCache is not traversed). `return_slots`: (h, the memory layer's slots, or
        None in a block without one)."""
        # Checkpointing inside the block keeps FSDP's hooks outside it, so recompute never re-gathers.
        if self.activation_checkpoint != "none" and torch.is_grad_enabled():
            context_fn = _CONTEXT_FNS[self.activation_checkpoint, torch.compiler.is_compiling()]
            kwargs = {} if context_fn is None else {"context_fn": context_fn}
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, rope, mask, cache, return_slots, use_reentrant=False, **kwargs
            )
        return self._forward(x, rope, mask, cache, return_slots)

    def _forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        return_slots: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, self.layer_id)
        x = self.ffn_norm(h)
        if not (return_slots and self.is_memory):
            out, slots = self.feed_forward(x), None
        else:
            out, slots = self.feed_forward(x, return_slots=True)
        if self.dense_ffn is not None:  # the base FFN's output + the memory's (exact while values == 0)
            out = self.dense_ffn(x) + out
        return (h + out, slots) if return_slots else h + out


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        mem = args.memory
        self.shared_memory_values = (
            MemoryValues(mem.n_slots, args.v_dim, zero_init=mem.beside_ffn)
            if mem.shared_values and mem.layers
            else None
        )
        # ModuleDict keyed by str(index), as torchtitan does, so FSDP/AC wrap blocks by name.
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args, self.shared_memory_values) for i in range(args.n_layers)}
        )
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent (checkpoints hold no RoPE); passed to every block as a forward input (complex64,
        # so FSDP2's cast of floating-point inputs to param_dtype leaves it fp32: see `rope_cache`).
        self.register_buffer("rope", rope_cache(args), persistent=False)

    def memory_layers(self) -> dict[str, MemoryLayer]:
        """Memory layers by their parameter-path prefix, e.g. {'layers.12.feed_forward': layer}."""
        return {memory_layer_name(k): b.feed_forward for k, b in self.layers.items() if b.is_memory}

    def memory_slots(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """{memory layer name: slots [B, T, heads, topk]} that tokens [B, T] read on the training path
        (causal, positions 0..T-1), as `forward(tokens, return_slots=True)` gives them, running the blocks
        only up to the last memory layer: background counting (Lin et al. 2025, sec. 3: df over N batches)
        needs neither the later blocks nor the output layer, on a 49K vocabulary the largest matmul of a small
        model. A sharded model runs it as a forward (`parallel.fsdp` registers it with FSDP)."""
        self._check_len(tokens.shape[1])
        slots: dict[str, torch.Tensor] = {}
        last = max((int(k) for k, b in self.layers.items() if b.is_memory), default=-1)
        rope = self.rope[: tokens.shape[1]]
        self._blocks(self.tok_embeddings(tokens), rope, {}, slots, n_blocks=last + 1)
        return slots

    def set_sparse_value_grad(self, enabled: bool) -> None:
        """Whether value tables get a row-sparse gradient holding only the rows read (sparse finetuning, lazy
        row AdamW) instead of a dense one; the lookup kernels honour it (kernels/value_lookup.py)."""
        for layer in self.memory_layers().values():
            layer.sparse_grad = enabled

    def value_tables(self) -> dict[str, nn.Parameter]:
        """The value table each memory layer reads, by layer name (a shared pool appears under each)."""
        return {name: layer.value_table.weight for name, layer in self.memory_layers().items()}

    def layer_outputs(self, tokens: torch.Tensor, n_blocks: int) -> list[torch.Tensor]:
        """The residual stream after each of the first `n_blocks` blocks of the training path (causal,
        positions 0..T-1), each block fed its predecessor's output *detached*: for objectives local to a layer
        (hf/distill.py: a retrofitted memory layer learns the FFN it replaced), whose gradient must stay in
        the block it comes from, with no later block and no output layer run. A sharded model runs it as a
        forward (`parallel.fsdp` registers it with FSDP), so each block's output is where FSDP's backward
        hooks sit."""
        t = tokens.shape[1]
        if t > self.args.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model max_seq_len {self.args.max_seq_len}")
        h, rope, outs = self.tok_embeddings(tokens), self.rope[:t], []
        for block in list(self.layers.values())[:n_blocks]:
            h = block(h.detach(), rope)
            outs.append(h)
        return outs

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Blocks in order, then the root's own weights: `parallel.fsdp` materialises in the same order, so a
        model sharded over any number of ranks starts from the same numbers as an unsharded one."""
        for block in self.layers.values():
            block.init_weights()
        self.init_root_weights(buffer_device)

    def root_modules(self) -> list[nn.Module]:
        """Everything the root owns outside the blocks (materialised after the blocks by parallel.fsdp)."""
        mods = [self.tok_embeddings, self.norm, self.output]
        return mods + ([self.shared_memory_values] if self.shared_memory_values is not None else [])

    def init_root_weights(self, buffer_device: torch.device | None = None) -> None:
        device = buffer_device or self.tok_embeddings.weight.device
        if self.args.tie_embeddings:  # to_empty replaces each module's parameter separately: re-tie
            self.output.weight = self.tok_embeddings.weight
        self.rope = rope_cache(self.args, device)
        nn.init.normal_(self.tok_embeddings.weight, std=1.0 if not self.args.tie_embeddings else 0.02)
        if self.shared_memory_values is not None:
            self.shared_memory_values.init_weights()
        self.norm.reset_parameters()
        if not self.args.tie_embeddings:
            std = self.args.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        last_only: bool = False,
        return_slots: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits [B, T, vocab] of tokens [B, T] ([B, 1, vocab] with `last_only`); with `return_slots`,
        (logits, {memory layer name: slots [B, T, heads, topk]}): the slots each token read, which the slot
        selector and the background counter count (Lin et al. 2025, sec. 3).

        With no keyword arguments: the training path, causal attention at positions 0..T-1. For decoding:
        - `pad_mask` [B, T] bool, True = padding: padded positions are masked out of every other position's
          attention (each still attends to itself, so its hidden state stays finite); their logits are junk.
        - `positions` [B, T]: each row's RoPE positions. Default with `pad_mask` or `cache`: the row's count
          of earlier real tokens (left padding: a row's first real token is at position 0).
        - `cache`: the T tokens continue the cached ones (their keys/values are appended to it).
        """
        if cache is None and positions is None and pad_mask is None:
            t = tokens.shape[1]
            self._check_len(t)
            slots: dict[str, torch.Tensor] | None = {} if return_slots else None
            h = self._blocks(self.tok_embeddings(tokens), self.rope[:t], {}, slots)
        else:
            h, slots = self._decode_forward(tokens, cache, positions, pad_mask, return_slots)
        if last_only:
            h = h[:, -1:]
        logits = self.output(self.norm(h))
        return (logits, slots) if slots is not None else logits

    def _check_len(self, t: int) -> None:
        if t > self.args.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model max_seq_len {self.args.max_seq_len}")

    def _blocks(
        self,
        h: torch.Tensor,
        rope: torch.Tensor,
        kwargs: dict,
        slots: dict[str, torch.Tensor] | None,
        n_blocks: int | None = None,
    ) -> torch.Tensor:
        """Run the first `n_blocks` blocks (default all); `slots` (when not None) receives each memory layer's
        slots by layer name."""
        for k, block in itertools.islice(self.layers.items(), n_blocks):
            if slots is None:
                h = block(h, rope, **kwargs)
                continue
            h, read = block(h, rope, **kwargs, return_slots=True)
            if read is not None:
                slots[memory_layer_name(k)] = read
        return h

    def _decode_forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None,
        positions: torch.Tensor | None,
        pad_mask: torch.Tensor | None,
        return_slots: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Hidden states (and slots) for the keyword-argument form of `forward`: per-row RoPE, padding/cache
        mask."""
        t = tokens.shape[1]
        real = ~pad_mask if pad_mask is not None else torch.ones_like(tokens, dtype=torch.bool)
        offset = cache.length if cache is not None else 0
        key_valid = cache.append(real) if cache is not None else real  # checks the cache's size first
        if positions is None:
            start = cache.seen[:, None] if cache is not None else 0
            positions = (start + real.cumsum(1) - 1).clamp_min(0)
        elif int(positions.min()) < 0:
            raise ValueError(f"negative position {int(positions.min())}")
        if int(positions.max()) >= self.args.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} exceeds model max_seq_len {self.args.max_seq_len}"
            )
        rope = self.rope[positions]
        mask = None
        if cache is not None or pad_mask is not None:
            allowed = attention_mask(key_valid, offset, t)
            # additive, once per forward: SDPA would turn a bool mask into this in every layer (every query
            # sees itself, so no row is all -inf: the same result on every backend)
            dtype = self.tok_embeddings.weight.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            mask.masked_fill_(~allowed, float("-inf"))
        slots: dict[str, torch.Tensor] | None = {} if return_slots else None
        h = self._blocks(self.tok_embeddings(tokens), rope, {"mask": mask, "cache": cache}, slots)
        if cache is not None:
            cache.advance(real)
        return h, slots


def memory_layer_name(block: str) -> str:
    """A memory layer's name: its parameter-path prefix (`layers.12.feed_forward`), the key of its slots,
    background counts and selections."""
    return f"layers.{block}.feed_forward"


def attention_mask(key_valid: torch.Tensor, offset: int, t: int) -> torch.Tensor:
    """[B, 1, t, S] bool: query i (at key index offset + i) may attend to key j iff j <= offset + i and key j
    is a real token (key_valid [B, S]); every query also attends to itself, so a pad query has at least one
    key (an all-masked row would give NaN, and NaN values leak through 0-weighted attention)."""
    s = key_valid.shape[1]
    q_idx = torch.arange(offset, offset + t, device=key_valid.device)[:, None]
    k_idx = torch.arange(s, device=key_valid.device)[None, :]
    mask = (k_idx <= q_idx) & key_valid[:, None, :]
    return (mask | (k_idx == q_idx))[:, None]
