"""Triton kernels for CUDA: paged decode, prefill/extend attention, and the quantizing KV store.

Every KV format of kv/quant.py is read and written here; the torch reference in ops/attention.py
is the oracle they are tested against. The kernels load on first use, so that kv.py (formats and
launch choices) imports where Triton is not installed.
"""

import importlib

_WHERE = {
    "PagedKV": "kv",
    "paged_kv": "kv",
    "paged_decode": "decode",
    "paged_extend": "extend",
    "causal_prefill": "warp_prefill",
    "reads_new_kv": "warp_prefill",
    "paged_prefill": "warp_prefill",
    "reads_pages": "warp_prefill",
    "store_kv": "store",
}
__all__ = list(_WHERE)


def __getattr__(name: str):  # noqa: ANN202
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
