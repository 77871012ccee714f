"""RoPE under FSDP2 bf16 mixed precision: the table every block receives stays fp32 (complex64) and rotates
in fp32, for the training path (rope[:T]) and the decoding path (rope[positions]) near max_seq_len.

FSDP2 casts floating-point forward inputs of each block to param_dtype; a bf16 cos/sin table is off by up
to 2^-9, which at position ~2000 is a rotation 100x less accurate than the fp32 one.
"""

from __future__ import annotations

import torch
from conftest import run_one_rank
from torch.distributed.device_mesh import init_device_mesh

from titan_mem.models.args import MemoryArgs, ModelArgs
from titan_mem.models.transformer import Transformer, apply_rope
from titan_mem.parallel.fsdp import mixed_precision_policy, parallelize_and_init

MAX_SEQ, HEADS, HEAD_DIM, THETA = 2048, 2, 16, 10000.0
DECODE = 8  # decoded positions MAX_SEQ - 8 .. MAX_SEQ - 1


def _received_rope() -> dict:
    """Tiny bf16-FSDP2 model (memory layer at block 1): what each block's attention receives as `rope`."""
    args = ModelArgs(
        dim=HEADS * HEAD_DIM,
        n_layers=2,
        n_heads=HEADS,
        ffn_hidden_dim=64,
        vocab_size=64,
        max_seq_len=MAX_SEQ,
        rope_theta=THETA,
        memory=MemoryArgs(layers=[1], n_keys=4, heads=1, topk=2, k_dim=8, v_dim=32),
    )
    with torch.device("meta"):
        model = Transformer(args)
    cpu = torch.device("cpu")
    mp = mixed_precision_policy(cpu, "bfloat16", "float32", on_cpu=True)
    model = parallelize_and_init(model, init_device_mesh("cpu", (1,)), cpu, seed=0, mp_policy=mp)
    seen: dict[str, list] = {}

    def grab(name):
        return lambda mod, a: seen.setdefault(name, []).append((a[0].dtype, a[1].detach().clone()))

    for name, block in model.layers.items():
        block.attention.register_forward_pre_hook(grab(name))
    tokens = torch.randint(0, 64, (1, MAX_SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(MAX_SEQ - DECODE, MAX_SEQ).expand(2, DECODE)
    with torch.no_grad():
        model(tokens)
        model(tokens[:, :DECODE].expand(2, DECODE), positions=positions)
    return seen


def _reference(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated in fp64 by the fp32 angles m * theta^(-2j/D) (Su et al. 2021, eq. 34)."""
    inv_freq = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    angle = (positions.float()[..., None] * inv_freq).double()[..., None, :]  # [B, T, 1, D/2]
    x0, x1 = x.double()[..., 0::2], x.double()[..., 1::2]
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def test_rope_reaches_every_block_in_fp32_under_bf16_fsdp(tmp_path):
    seen = run_one_rank(_received_rope, tmp_path)
    assert sorted(seen) == ["0", "1"] and all(len(calls) == 2 for calls in seen.values())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, MAX_SEQ, HEADS, HEAD_DIM, generator=g)
    train_pos = torch.arange(MAX_SEQ).expand(1, MAX_SEQ)
    decode_pos = torch.arange(MAX_SEQ - DECODE, MAX_SEQ).expand(2, DECODE)
    for (h_dtype, train_rope), (_, decode_rope) in seen.values():
        assert h_dtype == torch.bfloat16  # the policy is on: hidden states are cast
        for rope in (train_rope, decode_rope):
            assert rope.dtype in (torch.float32, torch.complex64), rope.dtype
        # The block's own rotation, in fp32 on fp32 inputs, equals the fp64 one to fp32 rounding.
        got = apply_rope(x[:1], train_rope)[:, -64:]
        want = _reference(x[:1], train_pos)[:, -64:]
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
        xd = x[:, :DECODE]
        torch.testing.assert_close(
            apply_rope(xd, decode_rope).double(), _reference(xd, decode_pos), rtol=0, atol=2e-5
        )
