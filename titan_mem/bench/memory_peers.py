"""The memory layer against product-key-memory's `PKM`, and a sparse-finetuning step against the papers'
recipe (a dense table gradient masked to the top-t rows, SGD over the whole table: Lin et al. 2025 as
described, product-key-memory's `mem_trainable_mask`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from titan_mem.bench.timing import ratio, timed_interleaved
from titan_mem.components.bench import allocations
from titan_mem.kernels import restrict_row_grads
from titan_mem.models.args import MemoryArgs
from titan_mem.models.memory import MemoryLayer
from titan_mem.sparse.select import rows_of_sparse_grad, select_slots
from titan_mem.sparse.update import RowSparseSGD

DIM, HEADS, TOPK, K_DIM = 512, 4, 32, 256
TOP_T, LR = 500, 1.0


def our_layer(n_keys: int, dim: int = DIM) -> MemoryLayer:
    args = MemoryArgs(layers=[0], n_keys=n_keys, heads=HEADS, topk=TOPK, k_dim=K_DIM, v_dim=dim, plus=False)
    torch.manual_seed(0)
    layer = MemoryLayer(dim, args, dim)
    layer.init_weights()
    return layer


def case_pkm(
    sizes: list[int], shape: tuple[int, int], repeat: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    from product_key_memory import PKM

    rows = []
    for n_keys in sizes:
        ours = our_layer(n_keys).to(device)
        torch.manual_seed(0)
        theirs = PKM(DIM, heads=HEADS, num_keys=n_keys, topk=TOPK, dim_head=K_DIM // 2).to(device)
        x = torch.randn(*shape, DIM, device=device)

        def forward(layer: torch.nn.Module, x: torch.Tensor = x) -> Callable[[], Any]:
            def run() -> None:
                with torch.no_grad():
                    layer(x)

            return run

        def train(layer: torch.nn.Module, sparse: bool = False, x: torch.Tensor = x) -> Callable[[], Any]:
            def run() -> None:
                layer.zero_grad(set_to_none=True)
                if isinstance(layer, MemoryLayer):
                    layer.sparse_grad = sparse
                layer(x).square().mean().backward()

            return run

        t = {
            **timed_interleaved(
                {"ours_forward": forward(ours), "peer_forward": forward(theirs)}, repeat, device
            ),
            **timed_interleaved(
                {
                    "ours_forward_backward": train(ours),
                    "peer_forward_backward": train(theirs),
                    "ours_forward_backward_row_sparse": train(ours, sparse=True),
                },
                repeat,
                device,
            ),
        }
        rows.append(
            {
                "slots": n_keys**2,
                **t,
                "ratio_forward": ratio(t["peer_forward"], t["ours_forward"]),
                "ratio_forward_backward": ratio(t["peer_forward_backward"], t["ours_forward_backward"]),
                "ratio_forward_backward_row_sparse": ratio(
                    t["peer_forward_backward"], t["ours_forward_backward_row_sparse"]
                ),
            }
        )
    return rows


# ------------------------------------------------------------------------------------- sparse update


def sparse_step(layer: MemoryLayer, x: torch.Tensor, upstream: torch.Tensor, how: str) -> Callable[[], None]:
    """One step of `how`: 'row_sparse' (ours), 'dense_grad' (our dense gradient, same row update) or 'masked'
    (the papers' recipe: dense gradient masked to the top-t rows, SGD over the whole table)."""
    table = layer.values.weight
    updater = RowSparseSGD(table.data, lr=LR)
    masked_sgd = torch.optim.SGD([table], lr=LR)

    def run() -> None:
        table.grad = None
        layer.sparse_grad = how == "row_sparse"
        out, slots = layer(x, return_slots=True)
        touched, counts = slots.reshape(-1).unique(return_counts=True)
        rows = select_slots(touched, counts, "tf", TOP_T)
        if how == "row_sparse":  # as the sparse finetune does: chosen after the forward, before the backward
            restrict_row_grads(table, rows)
        (out * upstream).sum().backward()
        restrict_row_grads(table, None)
        if how == "masked":
            mask = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)
            mask[rows] = 1.0
            table.grad.mul_(mask)
            masked_sgd.step()
            return
        grad = table.grad
        grad_rows = rows_of_sparse_grad(grad, rows) if grad.is_sparse else grad.index_select(0, rows)
        updater.step(rows, grad_rows)

    return run


def case_sparse_update(
    sizes: list[int], shape: tuple[int, int], repeat: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    rows = []
    for n_keys in sizes:
        layer = our_layer(n_keys).to(device)
        for name, p in layer.named_parameters():  # sparse finetuning trains the value rows only
            p.requires_grad_(name == "values.weight")
        x = torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(1)).to(device)
        upstream = torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(2)).to(device)
        row: dict[str, Any] = {"slots": n_keys**2, "top_t": TOP_T}
        steps = {how: sparse_step(layer, x, upstream, how) for how in ("row_sparse", "dense_grad", "masked")}
        for how, t in timed_interleaved(steps, repeat, device).items():
            row[how] = {**t, "alloc": allocations(steps[how])}
        row["ratio_vs_dense_grad"] = ratio(row["dense_grad"], row["row_sparse"])
        row["ratio_vs_masked"] = ratio(row["masked"], row["row_sparse"])
        rows.append(row)
    return rows
