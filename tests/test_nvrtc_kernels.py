"""The NVRTC helper kernels (KeySet compaction, top-p search) build for sm_90a with nvcc under every define
set their launchers use, with no spills (CPU; nothing runs)."""

import subprocess

import pytest

from fgattn_gen.compaction import _CUDA_WARPS
from fgattn_gen.predictors.top_p_search import CUDA_RESIDENT_KEYS, _cuda_launch_shape
from fgattn_gen.environment import templates_dir
from nvcc_tools import find_nvcc, parse_ptxas

TOP_P_ROWS = sorted({_cuda_launch_shape(n) for n in (1, 200, 5000, 17550, 32760, CUDA_RESIDENT_KEYS)})
BUILDS = [("compact_keys.cu", {"FGATTN_COMPACT_WARPS": _CUDA_WARPS})] + [
    ("top_p_words.cu", {"FGATTN_TOPP_THREADS": threads, "FGATTN_TOPP_ELEMS": elems}) for threads, elems in TOP_P_ROWS]


@pytest.mark.parametrize("source, defines", BUILDS, ids=[f"{s}-{'-'.join(map(str, d.values()))}" for s, d in BUILDS])
def test_builds_without_spills(tmp_path, source, defines):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, /usr/local/cuda/bin)")
    cmd = [nvcc, "-cubin", "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17", "-Xptxas", "-v",
           *(f"-D{k}={v}" for k, v in defines.items()), "-o", str(tmp_path / "k.cubin"),
           str(templates_dir() / "cuda" / source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = parse_ptxas(done.stderr)
    assert report["spill_stores"] == report["spill_loads"] == report["stack"] == 0, report
