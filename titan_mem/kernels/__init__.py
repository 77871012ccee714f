from titan_mem.kernels.value_lookup import LOOKUP_BACKENDS, coalesced, restrict_row_grads, value_lookup

# Imported on first use: triton (and torch._dynamo, for torch.compiler.disable) cost ~1.5 s per process.
_LAZY = ("HAVE_TRITON", "TritonValueLookup", "lookup_backward", "lookup_forward", "triton_value_lookup")


def __getattr__(name: str):
    if name in _LAZY:
        from titan_mem.kernels import triton_lookup

        return getattr(triton_lookup, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LOOKUP_BACKENDS", "coalesced", "restrict_row_grads", "value_lookup", *_LAZY]
