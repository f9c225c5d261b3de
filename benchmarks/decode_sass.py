"""Compile a paged decode kernel for the H200 (sm_90a) on a machine without a GPU and count the
instructions of its main loop: where docs/kernels.md's instruction counts come from. `--kernel
warp_decode` compiles the Gluon kernel (warp_decode.py) that serves decode on Hopper.

Triton compiles for whatever target its driver names; a stand-in driver names sm_90 and nothing
runs. cuobjdump, shipped in Triton's wheel, prints the SASS and the resource usage; the loop is
the body of the longest backward branch. Needs Triton (not part of `make setup`).

    python -m benchmarks.decode_sass --format int4 --block-n 128 --num-warps 2
    python -m benchmarks.decode_sass --kernel warp_decode --format fp8_e4m3
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # read when the kernels are defined: compile, not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonJITFunction  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from benchmarks.triton_bench import GROUP, HQ, D, paged_cache  # noqa: E402
from longserve.ops.triton import paged_decode, warp_decode  # noqa: E402
from longserve.ops.triton.kv import (  # noqa: E402
    FP8,
    INT4,
    PLAIN,
    decode_config,
    warp_decode_config,
)

FORMATS = {"bf16": PLAIN, "fp8_e4m3": FP8, "int4": INT4}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class _H200Target:
    """Just enough of a driver for Triton to compile for sm_90 and launch nothing."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_decode(fmt: str, kernel: str = "decode", **launch) -> object:  # noqa: ANN003
    """The compiled decode kernel (decode.py's, or warp_decode.py's) for one launch configuration."""
    jit = GluonJITFunction if kernel == "warp_decode" else JITFunction
    kernels = {}
    run = jit.run

    def compile_only(self, *args, grid, warmup, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        kernels[self.__name__] = run(self, *args, grid=grid, warmup=True, **kw)
        return kernels[self.__name__]

    driver.set_active(_H200Target())
    jit.run = compile_only
    try:
        batch = 8
        table = torch.arange(batch * 4, dtype=torch.int32).view(batch, 4)
        seq = torch.full((batch,), 64, dtype=torch.int32)
        q = torch.zeros(batch, HQ, D, dtype=torch.bfloat16)
        kv, _ = paged_cache(fmt, batch * 4, torch.device("cpu"))  # Llama-3.3-70B's layer
        if kernel == "warp_decode":
            op = torch.empty(batch, HQ, 4, D)
            lp = torch.empty(batch, HQ, 4)
            warp_decode.warp_decode(
                q, kv, table, seq, D**-0.5, op, lp, launch["block_n"], launch["num_stages"]
            )
        else:
            paged_decode(q, kv, table, seq, D**-0.5, 131072, **launch)
    finally:
        jit.run = run
    return kernels["_warp_decode_kernel" if kernel == "warp_decode" else "_decode_kernel"]


def loop_ops(sass: str) -> collections.Counter:
    """Opcodes of the key loop over whole tiles: the first backward branch whose body holds
    tensor-core instructions (a second such loop runs a slice's last, partial tile)."""
    lines = [
        (int(m.group(1), 16), m.group(2))
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)
    ]
    for at, ins in lines:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < at:
            body = [i for a, i in lines if int(m.group(1), 16) <= a <= at]
            if any("MMA" in i for i in body):
                return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for i in body)
    raise ValueError("no loop with tensor-core instructions in the SASS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="int4", choices=list(FORMATS),
                    help="KV format (int4: groups of 64)")  # fmt: skip
    ap.add_argument("--kernel", default="decode", choices=["decode", "warp_decode"],
                    help="decode.py's Triton kernel, or warp_decode.py's Gluon one (one warp, so "
                    "--num-warps does not apply)")  # fmt: skip
    ap.add_argument("--block-n", type=int, help="keys per tile (default: decode_config's)")
    ap.add_argument("--num-warps", type=int, help="warps a program (default: decode_config's)")
    ap.add_argument(
        "--num-stages", type=int, help="software-pipeline stages (default: decode_config's)"
    )
    ap.add_argument("--top", type=int, default=20, help="opcodes to list")
    args = ap.parse_args()
    if args.kernel == "warp_decode":
        cfg = warp_decode_config(FORMATS[args.format], D // GROUP)
    else:
        cfg = decode_config(FORMATS[args.format])
    launch = {
        "block_n": args.block_n or cfg["block_n"],
        "num_warps": args.num_warps or cfg["num_warps"],
        "num_stages": args.num_stages or cfg["num_stages"],
    }
    kernel = compile_decode(args.format, args.kernel, **launch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "decode.cubin"
        cubin.write_bytes(kernel.asm["cubin"])

        def dump(flag: str) -> str:
            return subprocess.run(
                [str(BIN / "cuobjdump"), flag, str(cubin)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout

        usage = dict(re.findall(r"(REG|SHARED|LOCAL):(\d+)", dump("--dump-resource-usage")))
        ops = loop_ops(dump("--dump-sass"))
    out = {
        "format": args.format,
        "kernel": args.kernel,
        "launch": launch,
        "registers": int(usage["REG"]),
        "spill_bytes": int(usage["LOCAL"]),
        "shared_bytes": kernel.metadata.shared,
        "loop_instructions": sum(ops.values()),
        "loop_barriers": ops["BAR.SYNC.DEFER_BLOCKING"],
        "loop_top_ops": dict(ops.most_common(args.top)),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
