"""Triton kernels for CUDA: paged decode, prefill/extend attention, and the quantizing KV store.

Every KV format of kv/quant.py is read and written here; the torch reference in ops/attention.py
is the oracle they are tested against.
"""

from longserve.ops.triton.decode import paged_decode
from longserve.ops.triton.extend import paged_extend
from longserve.ops.triton.kv import PagedKV, paged_kv
from longserve.ops.triton.store import store_kv

__all__ = ["PagedKV", "paged_decode", "paged_extend", "paged_kv", "store_kv"]
