"""Resource report of Triton variants for sm_90a, built on this machine without a GPU (CPU is enough).

    PYTHONPATH=. python bench/triton_resources.py --name triton_resources_sm90a \
        triton_bf16_d128_qb128_kg1_bm128_bn64_w4_s4 triton_bf16_d64_qb128_kg1_bm64_bn64_w4_s3

Each variant is compiled by Triton for ``cuda:90`` the way a launch on 16-byte-aligned tensors specialises
it (pointers and strides divisible by 16, WRITE_LSE off); its PTX is assembled by the ptxas Triton ships
(``ptxas -arch=sm_90a -v``). Reports registers, spills, stack, shared memory and
the count of gather copies (``cp.async``) and tensor-core instructions (``wgmma.mma_async``) in the PTX.
Writes ``bench/results/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchlib import write_results
from fgattn_gen.backends.triton import launch as triton_launch
from fgattn_gen.variant import Variant

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "IDX": "*i32", "NKEYS": "*i32"}
ALIGNED = set(POINTERS) | {"idx_row_stride"} | {f"stride_{t}{a}" for t in "qkvo" for a in ("b", "h", "m", "n")}


def _ptxas() -> str:
    """The ptxas Triton ships and launches use."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise SystemExit(f"triton_resources: Triton's ptxas not found at {path}")
    return path


def report(key: str, ptxas: str) -> dict:
    """Compile variant ``key`` for sm_90a; its ptxas resource line and PTX instruction counts."""
    variant = Variant.from_key(key)
    kernel = triton_launch.load(variant, interpret=False).kernel
    pointers = POINTERS if variant.dtype == "bf16" else {n: t.replace("bf16", "fp16") for n, t in POINTERS.items()}
    signature = {p.name: pointers.get(p.name, "i32") for p in kernel.params}
    signature.update(qk_scale="fp32", WRITE_LSE="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if p.name in ALIGNED}
    source = ASTSource(fn=kernel, signature=signature, constexprs={"WRITE_LSE": False}, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(variant=key, registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                stack=int(spill.group(1)), spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
                shared_bytes=compiled.metadata.shared, cp_async=len(re.findall(r"cp\.async\.", ptx)),
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("variants", nargs="+", help="variant keys")
    args = parser.parse_args(argv)
    ptxas = _ptxas()
    rows = [report(key, ptxas) for key in args.variants]
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    result = dict(name=args.name, device="none (compiled for sm_90a on the CPU)", date=datetime.date.today().isoformat(),
                  versions=dict(triton=triton.__version__, ptxas=version), rows=rows)
    lines = [f"# {args.name}", "", f"Compiled for sm_90a without a GPU. Date: {result['date']}. "
             f"Versions: triton {triton.__version__}, {version}.", "",
             "| variant | registers | spill stores / loads (B) | stack (B) | shared (B) | cp.async | wgmma |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['stack']} | "
              f"{r['shared_bytes']} | {r['cp_async']} | {r['wgmma']} |" for r in rows]
    write_results(args.name, result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
