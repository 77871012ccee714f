"""Parameter counts, FLOPs per token and a per-GPU memory estimate, from ModelArgs alone (no weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from titan_mem.models.args import ModelArgs


@dataclass
class ParamCounts:
    total: int
    embedding: int  # input embedding (+ untied output projection)
    dense: int  # every other non-value parameter: attention, FFNs, norms, memory query/keys/gate/proj
    memory_values: int  # value tables (the rows sparse finetuning updates)
    active_per_token: int  # parameters one token's forward touches: all but embedding/values + rows read

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _memory_layer_params(args: ModelArgs) -> tuple[int, int]:
    """(non-value params, value params) of one memory layer."""
    m = args.memory
    dense = args.dim * m.heads * m.k_dim + m.heads * m.n_keys * m.k_dim
    if m.query_norm == "rms":
        dense += m.k_dim
    elif m.query_norm == "batchnorm":
        dense += 2 * m.heads * m.k_dim
    if m.plus:
        dense += 2 * args.dim * args.v_dim
    if m.beside_ffn:  # the kept FFN and the output gate
        dense += 3 * args.dim * args.ffn_hidden_dim + args.dim
    return dense, m.n_slots * args.v_dim


def param_counts(args: ModelArgs) -> ParamCounts:
    d, m = args.dim, args.memory
    attn = (
        d * args.n_heads * args.head_dim
        + 2 * d * args.kv_heads * args.head_dim
        + args.n_heads * args.head_dim * d
        + (args.n_heads + 2 * args.kv_heads) * args.head_dim * args.qkv_bias
        + 2 * args.head_dim * args.qk_norm
    )
    ffn = 3 * d * args.ffn_hidden_dim
    mem_dense, mem_values = _memory_layer_params(args)
    n_mem = len(m.layers)
    dense = args.n_layers * (attn + 2 * d) + (args.n_layers - n_mem) * ffn + n_mem * mem_dense + d
    values = (1 if m.shared_values and n_mem else n_mem) * mem_values
    emb_in = args.vocab_size * d
    emb_out = 0 if args.tie_embeddings else args.vocab_size * d
    rows_read = n_mem * m.heads * m.topk * args.v_dim
    return ParamCounts(
        total=emb_in + emb_out + dense + values,
        embedding=emb_in + emb_out,
        dense=dense,
        memory_values=values,
        active_per_token=dense + args.vocab_size * d + rows_read,
    )


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul params touched per token) + attention (torchtitan/PaLM form).

    Memory layers are counted honestly: every half-key is scored (n_keys x k_dim per head, a dense matmul),
    and heads x topk value rows are read and weighted. Attention: 12 * layers * heads * head_dim * seq_len
    (PaLM appendix B; the causal half is not subtracted, as in torchtitan).
    """
    c = param_counts(args)
    matmul_params = c.active_per_token  # output projection counted, input embedding lookup not
    return 6 * matmul_params + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def estimate_memory_gib(
    args: ModelArgs,
    *,
    world_size: int,
    seq_len: int,
    micro_batch_size: int,
    activation_checkpoint: bool,
    optimizer_states: int = 2,
    param_bytes: int = 2,
    memory_parallel: bool = False,
    memory_parallel_degree: int | None = None,
) -> dict[str, float]:
    """Rough per-GPU peak of a pretraining step: sharded fp32 params + grads + optimizer states, gathered
    blocks, the value table's per-micro-batch gradient buffer, activations, and the logits.

    Value tables: with `memory_parallel` each rank holds a column shard [M, D / degree] (degree defaults to
    the world), never gathered; its dense fp32 gradient is made afresh by every micro-batch's backward and
    summed into `.grad`, so one more shard-sized fp32 buffer lives during backward. Without it FSDP
    all-gathers the whole table in `param_bytes` and produces its unsharded gradient (16-bit, then the
    fp32 reduce copy) before the reduce-scatter.

    Activations per block follow Korthikanti et al. 2022 (eq. 2) without the attention-score term (SDPA is
    fused): 34 * s * b * h bytes in 16-bit; with full recompute only the block input (2 * s * b * h) stays.
    Logits: the 16-bit output, its fp32 copy and fp32 log-probabilities in forward, then two fp32 gradients
    ([tokens, vocab] each) in the loss backward: 18 bytes a logit at the peak.
    """
    c = param_counts(args)
    gib = 1024**3
    _, table = _memory_layer_params(args)
    n_tables = (1 if args.memory.shared_values else len(args.memory.layers)) if args.memory.layers else 0
    values = c.memory_values
    if memory_parallel and n_tables:
        degree = memory_parallel_degree or world_size
        state = (c.total - values) * (4 + 4 + 4 * optimizer_states) / world_size
        state += values * (4 + 4 + 4 * optimizer_states) / degree
        table_buffers = table * 4 / degree  # one shard-sized fp32 gradient per micro-batch backward
    else:
        state = c.total * (4 + 4 + 4 * optimizer_states) / world_size
        table_buffers = table * (param_bytes + 4) if n_tables else 0  # unsharded gradient + fp32 reduce copy
    biggest_block = (
        max(
            sum(_memory_layer_params(args)[: 1 if memory_parallel else 2]) if args.memory.layers else 0,
            3 * args.dim * args.ffn_hidden_dim,
        )
        + 4 * args.dim * args.dim
    )
    gathered = 2 * biggest_block * param_bytes  # current + prefetched block
    tokens = seq_len * micro_batch_size
    per_block = (2 if activation_checkpoint else 34) * tokens * args.dim
    acts = args.n_layers * per_block + 34 * tokens * args.dim
    logits = tokens * args.vocab_size * (2 + 4 + 4 + 4 + 4)
    total = state + gathered + table_buffers + acts + logits
    return {
        "sharded_states_gib": state / gib,
        "gathered_params_gib": gathered / gib,
        "value_table_buffers_gib": table_buffers / gib,
        "activations_gib": acts / gib,
        "logits_gib": logits / gib,
        "total_gib": total / gib,
    }
