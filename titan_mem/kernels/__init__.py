from titan_mem.kernels.value_lookup import value_lookup

__all__ = ["value_lookup"]
