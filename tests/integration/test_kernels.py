"""Triton value-lookup kernels against the torch path and a float64 naive sum (CPU: triton interpreter)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, losses, ok, run_trainer, sparse_finetune_args

from titan_mem.errors import ConfigError
from titan_mem.kernels import LOOKUP_BACKENDS, lookup_backward, lookup_forward, value_lookup
from titan_mem.kernels import triton_lookup as tlk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not tlk.HAVE_TRITON or not (torch.cuda.is_available() or tlk.INTERPRETED),
    reason="needs triton with a GPU or TRITON_INTERPRET=1",
)


def _case(m, n, k, d, dtype, seed, dup=False):
    """values [m, d], indices [n, k] (repeats within and across bags when dup), weights [n, k], grad_out."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(m, d, generator=g).to(dtype)
    idx = torch.randint(0, m, (n, k), generator=g)
    if dup and k > 1:
        idx[:, 1] = idx[:, 0]  # the same row twice in one bag
        idx[n // 2 :, 0] = idx[0, 0]  # and in many bags
    w = torch.rand(n, k, generator=g)
    grad = torch.randn(n, d, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (values, idx, w, grad)]


def _naive_grads(values, idx, w, grad):
    """Output, table gradient and weight gradient in float64 from the (possibly bf16-rounded) inputs."""
    v = values.double().requires_grad_()
    w64 = w.double().requires_grad_()
    out = (v[idx] * w64.unsqueeze(-1)).sum(1)
    out.backward(grad.double())
    return out.detach(), v.grad, w64.grad


def _run(values, idx, w, grad, sparse_grad, backend):
    v = values.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = value_lookup(v, idx, w, sparse_grad=sparse_grad, backend=backend)
    # autograd.grad, not .backward: accumulating into .grad clears a sparse gradient's coalesced flag.
    return out, *torch.autograd.grad(out, (v, w), grad)


# (m, n, k, d, block_d): duplicates within and across bags; D=40 over blocks of 16 (a partial last block);
# one token; K=1; K=6 over blocks of 4 (a partial K block in every kernel).
SHAPES = [(20, 12, 8, 40, 16), (9, 1, 5, 48, None), (30, 7, 1, 24, None), (16, 10, 6, 33, 32)]


@needs_triton
@pytest.mark.parametrize("m,n,k,d,block_d", SHAPES)
def test_kernels_match_float64_sum_fp32(m, n, k, d, block_d):
    values, idx, w, grad = _case(m, n, k, d, torch.float32, seed=m + n, dup=True)
    ref_out, ref_gv, ref_gw = _naive_grads(values, idx, w, grad)
    block_k = 4 if k == 6 else None
    out = lookup_forward(values, idx, w, block_d=block_d, block_k=block_k)
    rows, grad_rows, gw = lookup_backward(values, idx, w, grad, block_d=block_d, block_k=block_k)
    assert out.dtype == grad_rows.dtype == torch.float32 and gw.dtype == w.dtype
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, idx.flatten().unique())  # exactly the touched rows, sorted
    torch.testing.assert_close(grad_rows.double(), ref_gv[rows], rtol=1e-5, atol=1e-5)
    assert ref_gv[~torch.isin(torch.arange(m, device=DEVICE), rows)].abs().sum() == 0


@needs_triton
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_autograd_matches_torch_backend_fp32(sparse_grad):
    values, idx, w, grad = _case(24, 11, 8, 40, torch.float32, seed=1, dup=True)
    out, gv, gw = _run(values, idx, w, grad, sparse_grad, "triton")
    ref_out, ref_gv, ref_gw = _run(values, idx, w, grad, sparse_grad, "torch")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-5)
    assert gv.is_sparse == sparse_grad
    if sparse_grad:
        assert gv.is_coalesced() and gv.dtype == values.dtype
        assert torch.equal(gv.indices()[0], idx.flatten().unique())
        torch.testing.assert_close(gv.to_dense(), ref_gv.to_dense(), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(gv, ref_gv, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_bf16_within_bf16_rounding_of_float64_reference(sparse_grad):
    values, idx, w, grad = _case(24, 9, 8, 40, torch.bfloat16, seed=2, dup=True)
    ref_out, ref_gv, ref_gw = _naive_grads(values, idx, w, grad)  # from the same bf16-rounded inputs
    out, gv, gw = _run(values, idx, w, grad, sparse_grad, "triton")
    assert out.dtype == gv.dtype == torch.bfloat16 and gw.dtype == torch.float32
    # fp32 accumulation, one bf16 rounding of the result (2^-8 relative) for outputs and table rows;
    # the weight gradient is stored in fp32 and only sees the inputs' rounding.
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-2, atol=1e-2)
    gv = gv.to_dense() if sparse_grad else gv
    torch.testing.assert_close(gv.double(), ref_gv, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-4)
    assert (out != 0).all()  # the interpreter's un-cast bf16 store would write zeros


@needs_triton
def test_backward_is_row_sparse_for_a_large_table():
    """Rows/grad_rows cover the unique touched rows only: nothing of size M = 100k is built."""
    values, idx, w, grad = _case(100_000, 6, 4, 8, torch.float32, seed=3, dup=True)
    rows, grad_rows, gw = lookup_backward(values, idx, w, grad)
    assert rows.numel() == grad_rows.shape[0] == idx.unique().numel() < 24
    _, _, ref_gw = _naive_grads(values, idx, w, grad)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
    rows, grad_rows, gw = lookup_backward(values, idx, w, grad, need_values=False)
    assert rows is None and grad_rows is None and gw is not None
    assert lookup_backward(values, idx, w, grad, need_weights=False)[2] is None


def test_backend_dispatch_and_errors(monkeypatch):
    assert LOOKUP_BACKENDS == ("auto", "torch", "triton")
    values, idx = torch.randn(10, 4, requires_grad=True), torch.randint(0, 10, (3, 2))
    w = torch.rand(3, 2)
    called = []
    monkeypatch.setattr(tlk, "triton_value_lookup", lambda *a: called.append(a) or a[0][a[1][:, 0]])
    value_lookup(values, idx, w).sum().backward()  # CPU: auto is torch, which gives a dense grad
    assert not called and values.grad is not None and not values.grad.is_sparse
    value_lookup(values, idx, w, backend="triton")
    assert len(called) == 1
    with pytest.raises(ValueError, match="backend"):
        value_lookup(values, idx, w, backend="cuda")
    with pytest.raises(ValueError):
        value_lookup(values, idx, w[:, :1], backend="triton")


def test_triton_backend_errors_say_why(monkeypatch):
    values, idx, w = torch.randn(10, 4), torch.randint(0, 10, (3, 2)), torch.rand(3, 2)
    monkeypatch.setattr(tlk, "HAVE_TRITON", False)
    with pytest.raises(ConfigError, match="training.memory_kernel: triton is not installed"):
        value_lookup(values, idx, w, backend="triton")
    monkeypatch.setattr(tlk, "HAVE_TRITON", True)
    monkeypatch.setattr(tlk, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        value_lookup(values, idx, w, backend="triton")


def test_cpu_import_pays_for_neither_triton_nor_dynamo():
    """Every CPU process (the suite's trainers) imports titan_mem; triton + torch._dynamo would add ~1.5 s."""
    code = "import sys, titan_mem.kernels; assert not {'triton', 'torch._dynamo'} & set(sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_triton
def test_trainer_steps_with_the_triton_kernels_match_the_torch_path(pretrained, tmp_path):
    """The Triton lookup inside real trainer steps (dense table gradient in pretraining, row-sparse in sparse
    finetuning), not only as a function: same losses and the same selected rows as the torch path."""
    runs = {}
    for kernel in ("torch", "triton"):
        pre = tmp_path / f"pre-{kernel}"
        ok(run_trainer([*TINY, f"--job.dump_folder={pre}", "--training.steps=3", "--checkpoint.enable=false",
                        f"--training.memory_kernel={kernel}"]))  # fmt: skip
        sft = tmp_path / f"sft-{kernel}"
        extra = ("--training.steps=2", "--checkpoint.enable=false", f"--training.memory_kernel={kernel}")
        ok(run_trainer(sparse_finetune_args(pretrained, sft, *extra)))
        records = (sft / "selected_slots.jsonl").read_text().splitlines()
        selected = [json.loads(line)["selected"] for line in records]
        runs[kernel] = (losses(pre), losses(sft), selected)
    (pre_t, sft_t, sel_t), (pre_k, sft_k, sel_k) = runs["torch"], runs["triton"]
    assert pre_t.keys() == pre_k.keys() == {1, 2, 3} and sft_t.keys() == sft_k.keys() == {1, 2}
    for a, b in ((pre_t, pre_k), (sft_t, sft_k)):
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    assert sel_k == sel_t
