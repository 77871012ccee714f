"""Apply activation checkpointing, torch.compile and FSDP2 to a meta-device Transformer, then materialise it.

Materialisation is block by block (to_empty -> init_weights on full tensors -> fully_shard), so initial
weights do not depend on the number of ranks (DTensor random ops on CPU would), while no rank ever holds
more than one unsharded block.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from titan_mem.errors import ConfigError
from titan_mem.models.lora import LoRALinear
from titan_mem.models.memory import is_value_table
from titan_mem.models.transformer import AC_MODES, Transformer
from titan_mem.parallel.memory_parallel import shard_columns
from titan_mem.parallel.sync_batchnorm import sync_query_batchnorm

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def mixed_precision_policy(
    device: torch.device, param_dtype: str, reduce_dtype: str, on_cpu: bool = False
) -> MixedPrecisionPolicy:
    """bf16 compute / fp32 reduce on GPU; plain fp32 on CPU (CPU bf16 matmuls are slow) unless `on_cpu`."""
    if device.type != "cuda" and not on_cpu:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])


def parallelize_and_init(
    model: Transformer,
    mesh: DeviceMesh,
    device: torch.device,
    *,
    seed: int,
    mp_policy: MixedPrecisionPolicy,
    activation_checkpoint: str = "none",
    compile_blocks: bool = False,
    compile_backend: str = "inductor",
    ignored_param_names: set[str] | None = None,
    memory_mesh: DeviceMesh | None = None,
    memory_dtype: torch.dtype | None = None,
) -> Transformer:
    """Shard `model` (built on meta) with FSDP2 over `mesh` and fill it with seeded initial weights.

    `ignored_param_names` stay plain tensors, whole on every rank (to_empty makes new Parameter objects,
    so they are named, not passed). With a `memory_mesh`, value tables are split by columns over it
    (parallel.memory_parallel) and FSDP leaves them alone; `memory_dtype` is their lookup dtype.
    `activation_checkpoint` is one of models.transformer.AC_MODES; `compile_backend` is torch.compile's
    (the trainer: inductor; tests also aot_eager, the same dynamo/AOTAutograd path without codegen).
    """
    if activation_checkpoint not in AC_MODES:
        raise ConfigError(f"activation_checkpoint {activation_checkpoint!r}: expected one of {AC_MODES}")
    sync_query_batchnorm(model)  # query statistics over every data-parallel rank's tokens
    names = set(ignored_param_names or ())
    if memory_mesh is not None:
        names |= {n for n, _ in model.named_parameters(remove_duplicate=False) if is_value_table(n)}

    def split_tables(module: torch.nn.Module) -> None:
        if memory_mesh is not None:
            shard_columns(module, memory_mesh, memory_dtype)

    def ignored() -> set[torch.nn.Parameter] | None:
        found = {p for n, p in model.named_parameters(remove_duplicate=False) if n in names}
        return found or None

    torch.manual_seed(seed)
    for block in model.layers.values():
        block.activation_checkpoint = activation_checkpoint
        block.to_empty(device=device)
        with torch.no_grad():
            block.init_weights()
            for mod in block.modules():
                if isinstance(mod, LoRALinear):
                    mod.init_lora()
        split_tables(block)
        if compile_blocks:
            block.compile(backend=compile_backend)
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=True,
            ignored_params=ignored(),
        )
    for mod in model.root_modules():
        mod.to_empty(device=device)
    with torch.no_grad():
        model.init_root_weights(device)
    split_tables(model)  # the blocks' tables are split already: what is left is a shared pool
    # The root stays gathered after forward: its output layer is used again at once in backward.
    fully_shard(
        model,
        mesh=mesh,
        mp_policy=mp_policy,
        reshard_after_forward=False,
        ignored_params=ignored(),
    )
    # Background counting's forward (blocks up to the last memory layer): the root's parameters are gathered
    # around it as around forward; the blocks it skips stay sharded on every rank alike.
    register_fsdp_forward_method(model, "memory_slots")
    register_fsdp_forward_method(model, "layer_outputs")  # layer-local objectives (hf/distill.py)
    # The loss is already divided by the global token count, so gradients must be summed, not averaged.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if device.type != "cuda":
                # gloo has no PREMUL_SUM: reduce with plain SUM (the post-divide by 1 is a no-op).
                module.set_force_sum_reduction_for_comms(True)
    return model
