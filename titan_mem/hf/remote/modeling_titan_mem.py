"""A titan_mem memory model as a `transformers` `PreTrainedModel`: the base decoder (Llama, Qwen2 or Qwen3,
from `transformers` itself) with product-key memory layers in some blocks' FFN slot.

Self-contained on purpose (torch and transformers only): titan_mem copies this file beside an exported model
so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, `generate`, lm-eval's `hf`
backend and serving stacks run it without titan_mem. Attention, RoPE, GQA, the KV cache and generation are
the base architecture's own `transformers` code; only the memory layer is ours:

* Product-key lookup (Lample et al. 2019, "Large Memory Layers with Product Keys", eq. 4-5): per head the
  query's two halves score `n_keys` half-keys each, the top-k of each half give k*k candidates, the top-k of
  those (exact over all n_keys**2 slots) are softmax-weighted (fp32) and their value rows summed over heads.
* Memory+ (Berges et al. 2024, "Memory Layers at Scale", sec. 3): out = value_proj(lookup * silu(gate_proj)).
* Retrofit placement (Goyal et al. 2026): `replace` puts the memory in the FFN's place; `add`
  (`beside_ffn`) keeps the block's SwiGLU and adds the memory's output times a per-channel `out_gate`.

Tensor names follow titan_mem's export: a memory layer under `model.layers.N.memory.`, a kept FFN as the
block's usual `mlp.`. Knowledge patches (the value rows a sparse finetune changed, titan_mem's
`checkpoint/patches.py` format) apply with `apply_knowledge_patch`, checked against the base they were
trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from .configuration_titan_mem import TitanMemConfig, check_titan_mem_block

PATCH_FORMAT = "titan_mem.sparse_delta"
PATCH_VERSION = "2"
# config.json keys that describe the file, not the base decoder
_NOT_BASE_KEYS = {
    "titan_mem",
    "architectures",
    "model_type",
    "auto_map",
    "transformers_version",
    "_name_or_path",
}


def _base_classes(arch: str) -> tuple[type, type]:
    """(config class, decoder class) of the base architecture, imported only when used."""
    if arch == "LlamaForCausalLM":
        from transformers.models.llama.modeling_llama import LlamaConfig, LlamaModel

        return LlamaConfig, LlamaModel
    if arch == "Qwen2ForCausalLM":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Config, Qwen2Model

        return Qwen2Config, Qwen2Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Config, Qwen3Model

    return Qwen3Config, Qwen3Model


class ValueTable(nn.Module):
    """The value rows [n_slots, v_dim] (its own module: titan_mem names it `memory.values.weight`)."""

    def __init__(self, n_slots: int, v_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_slots, v_dim))


class ProductKeyMemory(nn.Module):
    """One memory layer: [..., hidden] -> [..., hidden] (see the module docstring)."""

    def __init__(self, hidden_size: int, memory: dict[str, Any], shared: ValueTable | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.heads, self.topk, self.k_dim = memory["heads"], memory["topk"], memory["k_dim"]
        self.n_keys, self.plus, self.beside_ffn = memory["n_keys"], memory["plus"], memory["beside_ffn"]
        self.norm_kind = memory["query_norm"]
        v_dim = hidden_size if memory["v_dim"] == -1 else memory["v_dim"]
        self.query_proj = nn.Linear(hidden_size, self.heads * self.k_dim, bias=False)
        if self.norm_kind == "rms":  # each head's query (titan_mem: RMSNorm(k_dim, eps=1e-6))
            self.query_norm: nn.Module | None = nn.RMSNorm(self.k_dim, eps=1e-6)
        elif self.norm_kind == "batchnorm":  # all heads' queries together (Lample et al. 2019, sec. 3.2)
            self.query_norm = nn.BatchNorm1d(self.heads * self.k_dim)
        else:
            self.query_norm = None
        self.keys = nn.Parameter(torch.zeros(self.heads, 2, self.n_keys, self.k_dim // 2))
        if shared is None:
            self.values = ValueTable(self.n_keys * self.n_keys, v_dim)
            self._shared: list[ValueTable] = []
        else:  # one pool read by every memory layer, registered once by the decoder (`shared_memory_values`)
            self._shared = [shared]
        if self.plus:
            self.gate_proj = nn.Linear(hidden_size, v_dim, bias=False)
            self.value_proj = nn.Linear(v_dim, hidden_size, bias=False)
        if self.beside_ffn:
            self.out_gate = nn.Parameter(torch.ones(hidden_size))

    def lookup_slots(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax weights [N, H, k] (fp32) and slot ids [N, H, k] for tokens x [N, hidden]."""
        q = self.query_proj(x)
        if self.norm_kind == "batchnorm":
            q = self.query_norm(q)
        q = q.view(-1, self.heads, self.k_dim)
        if self.norm_kind == "rms":
            q = self.query_norm(q)
        q, keys, half = q.float(), self.keys.float(), self.k_dim // 2
        s1 = torch.einsum("nhd,hkd->nhk", q[..., :half], keys[:, 0])
        s2 = torch.einsum("nhd,hkd->nhk", q[..., half:], keys[:, 1])
        top1, idx1 = s1.topk(self.topk, dim=-1)
        top2, idx2 = s2.topk(self.topk, dim=-1)
        cand = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)
        cand_idx = (idx1.unsqueeze(-1) * self.n_keys + idx2.unsqueeze(-2)).flatten(-2)
        scores, pos = cand.topk(self.topk, dim=-1)
        return F.softmax(scores, dim=-1), cand_idx.gather(-1, pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.hidden_size)
        weights, slots = self.lookup_slots(flat)
        n, table = flat.shape[0], (self._shared[0] if self._shared else self.values).weight
        bag = F.embedding_bag(
            slots.view(n, -1), table, per_sample_weights=weights.view(n, -1).to(table.dtype), mode="sum"
        ).to(x.dtype)
        out = self.value_proj(bag * F.silu(self.gate_proj(flat))) if self.plus else bag
        if self.beside_ffn:
            out = out * self.out_gate
        return out.view(shape)


class MemoryFeedForward(nn.Module):
    """A memory block's FFN slot: the memory's output, plus the kept SwiGLU's (`add`) in titan_mem's order.

    The memory module is registered on the decoder layer (`model.layers.N.memory`), the kept FFN's
    projections here (`mlp.gate_proj`, ...), so both keep the names titan_mem exports; the memory is held
    in a list so it is not registered twice.
    """

    def __init__(self, memory: ProductKeyMemory, kept_mlp: nn.Module | None) -> None:
        super().__init__()
        self._memory = [memory]
        if kept_mlp is not None:
            self.gate_proj, self.up_proj, self.down_proj = (
                kept_mlp.gate_proj,
                kept_mlp.up_proj,
                kept_mlp.down_proj,
            )
            self.act_fn = kept_mlp.act_fn
        self.keeps_ffn = kept_mlp is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._memory[0](x)
        if self.keeps_ffn:
            out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) + out
        return out


class TitanMemPreTrainedModel(PreTrainedModel):
    config_class = TitanMemConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


def _init_with_memory(base_init: Any, beside_ffn: bool, module: nn.Module) -> None:
    if isinstance(module, (ProductKeyMemory, ValueTable)):
        _init_memory_part(module, beside_ffn)
    else:
        base_init(module)


@torch.no_grad()
def _init_memory_part(module: nn.Module, beside_ffn: bool) -> None:
    """XLM PKM's init: half-keys ~ U(+-1/sqrt(half)), values ~ N(0, v_dim^-1/2); beside a kept FFN (`add`) the
    values start at 0 and the gate at 1, so the model starts as its base."""
    if isinstance(module, ValueTable):
        if beside_ffn:
            module.weight.zero_()
        else:
            module.weight.normal_(0.0, module.weight.shape[1] ** -0.5)
        return
    bound = (module.k_dim // 2) ** -0.5
    module.keys.uniform_(-bound, bound)
    if module.beside_ffn:
        module.out_gate.fill_(1.0)


class TitanMemForCausalLM(TitanMemPreTrainedModel, GenerationMixin):
    # the installed transformers' own way of naming the tied output layer (a dict in 5.x, a list in 4.x)
    _tied_weights_keys = LlamaForCausalLM._tied_weights_keys

    def __init__(self, config: TitanMemConfig) -> None:
        problems = check_titan_mem_block(config.titan_mem)
        if problems:
            raise ValueError(f"config.json: {problems[0]}")
        super().__init__(config)
        base_config_class, base_model_class = _base_classes(config.base_architecture)
        base_config = base_config_class(
            **{k: v for k, v in config.to_dict().items() if k not in _NOT_BASE_KEYS}
        )
        base_config._attn_implementation = config._attn_implementation
        self.model = base_model_class(base_config)
        # what the installed transformers calls the decoder's cache argument (`past_key_values` until 5.x)
        params = inspect.signature(base_model_class.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        memory = config.memory
        shared = None
        if memory["shared_values"]:
            v_dim = config.hidden_size if memory["v_dim"] == -1 else memory["v_dim"]
            shared = self.model.shared_memory_values = ValueTable(memory["n_keys"] ** 2, v_dim)
        for i in memory["layers"]:
            layer = self.model.layers[i]
            layer.memory = ProductKeyMemory(config.hidden_size, memory, shared)
            layer.mlp = MemoryFeedForward(layer.memory, layer.mlp if memory["beside_ffn"] else None)
        self._no_split_modules = [type(self.model.layers[0]).__name__]
        # The memory layers sit inside the base decoder, a PreTrainedModel of its own: transformers
        # initialises its modules with the decoder's `_init_weights` (skipping what was loaded), which does
        # not know them (a model from `from_config` had all-zero keys).
        self.model._init_weights = functools.partial(
            _init_with_memory, self.model._init_weights, memory["beside_ffn"]
        )
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new: nn.Module) -> None:
        self.lm_head = new

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The base decoder's causal-LM forward (its cache keyword, `past_key_values` or `cache` by
        transformers version, passes through `kwargs` under the name the decoder takes)."""
        for name in ("past_key_values", "cache"):
            if name in kwargs and name != self._cache_kwarg:
                kwargs[self._cache_kwarg] = kwargs.pop(name)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        # the cache, hidden states and attentions, under the field names this transformers version uses
        shared = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} & {
            f.name for f in dataclasses.fields(outputs)
        }
        extra = {k: getattr(outputs, k) for k in shared - {"loss", "logits", "last_hidden_state"}}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **extra)

    # ------------------------------------------------------------------------------------ knowledge patches

    def apply_knowledge_patch(self, path: str, remove: bool = False) -> int:
        """Write (or, with `remove`, take back) the value rows of a titan_mem knowledge patch; returns the
        rows changed. Refused, with nothing changed: a patch trained on another base (its recorded base
        lineage differs from this model's `titan_mem.lineage`), one applied twice or not applied, and rows
        that do not hold the values the patch starts from (bit for bit, in this model's dtype)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != PATCH_FORMAT or meta.get("version") != PATCH_VERSION:
            raise ValueError(f"{path}: not a titan_mem knowledge patch (version {PATCH_VERSION})")
        base = json.loads(meta["base_lineage"])
        lineage = self.config.titan_mem.get("lineage")
        if lineage is None:
            raise ValueError(f"{path}: this model records no lineage (export it with titan_mem 0.1 or later)")
        if _root_digest(base["root"]) != lineage["root"]:
            raise ValueError(
                f"{path}: a patch for another base model (its base's tensors differ from this one's)"
            )
        applied = list(lineage["applied"])
        if remove and meta["id"] not in applied:
            raise ValueError(f"{path}: this patch is not applied to this model")
        if not remove and meta["id"] in applied:
            raise ValueError(f"{path}: this patch is already applied to this model")
        if not remove and any(a not in applied for a in base["applied"]):
            raise ValueError(f"{path}: trained on patches this model does not have applied")
        if json.loads(meta.get("dense") or "{}"):
            raise ValueError(f"{path}: changes whole tensors, not only value rows (apply it with titan_mem)")
        have, want = ("finetuned", "base") if remove else ("base", "finetuned")
        params = dict(self.named_parameters())
        updates = []
        for name in json.loads(meta["tables"]):
            table = params.get(_hf_table_name(name))
            if table is None:
                raise ValueError(f"{path}: value table {name} is not in this model")
            rows = tensors[f"rows/{name}"].to(table.device)
            start = tensors[f"{have}/{name}"].to(table.device, table.dtype)
            if not torch.equal(_bits(table.detach().index_select(0, rows)), _bits(start)):
                raise ValueError(f"{path}: rows of {name} do not hold the patch's {have} values; refusing")
            updates.append((table, rows, tensors[f"{want}/{name}"].to(table.device, table.dtype)))
        with torch.no_grad():
            for table, rows, new in updates:
                table.index_copy_(0, rows, new)
        applied = [a for a in applied if a != meta["id"]] if remove else [*applied, meta["id"]]
        self.config.titan_mem = {**self.config.titan_mem, "lineage": {**lineage, "applied": applied}}
        return sum(int(rows.numel()) for _, rows, _ in updates)


def _hf_table_name(ours: str) -> str:
    """titan_mem's `layers.N.feed_forward.values.weight` -> `model.layers.N.memory.values.weight` here (a
    shared pool, `shared_memory_values.weight`, -> `model.shared_memory_values.weight`)."""
    return "model." + ours.replace(".feed_forward.", ".memory.", 1)


def _root_digest(root: dict[str, Any]) -> str:
    """One id of a root checkpoint's tensor hashes (titan_mem writes the same into `titan_mem.lineage`)."""
    return hashlib.sha256(json.dumps(root, sort_keys=True).encode()).hexdigest()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view, so comparisons are bitwise (NaN and -0.0 included)."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(as_int)
