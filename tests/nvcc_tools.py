"""nvcc helpers of the CPU build tests: find the compiler, read ptxas's resource report."""

import os
import re
import shutil


def find_nvcc() -> str | None:
    """nvcc on PATH, else /usr/local/cuda/bin/nvcc, else None."""
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def parse_ptxas(log: str) -> dict[str, int]:
    """registers, spill stores/loads (bytes), stack frame (bytes) of the kernel from ``-Xptxas -v`` output."""
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if not (spill and regs):
        raise AssertionError(f"no ptxas report in:\n{log}")
    return {"registers": int(regs.group(1)), "stack": int(spill.group(1)), "spill_stores": int(spill.group(2)),
            "spill_loads": int(spill.group(3))}
