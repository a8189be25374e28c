#!/usr/bin/env bash
# GPU check of the warp-specialized CUDA kernel (FGATTN_CUDA_MMA=ws, sm_90a: H100 / H200).
#
#   bash bench/cuda_ws_check.sh [smoke] [test] [memcheck] [bench]     (no argument: smoke test bench)
#
#   smoke     one small call per head dim on the ws path against the fp32 reference, under a 120 s
#             timeout: a pipeline deadlock (mbarrier / named barrier) shows as a timeout here, not as a hang
#   test      the GPU tests of tests/test_cuda_variant.py on the ws path (-k mma_ws), stopping at the first failure
#   memcheck  compute-sanitizer memcheck of the smoke calls
#   bench     bench/bench_attention.py: D=128 S=32760 H=24 and D=64 S=17550 H=48 at densities 1 / 0.3 / 0.1,
#             CUDA variants on the ws and wgmma paths, against sdpa-cudnn; bench/results/cuda_ws_check_<gpu>.*
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.

smoke() {
  FGATTN_CUDA_MMA=ws python3 - <<'EOF'
import torch
from fgattn_gen import KeySet, attention, reference_attention

gen = torch.Generator(device="cuda").manual_seed(0)
for d, sq, sk in [(128, 1000, 777), (64, 333, 1999)]:
    q, k, v = (torch.randn(1, 2, s, d, device="cuda", dtype=torch.bfloat16, generator=gen) for s in (sq, sk, sk))
    mask = torch.rand(1, 2, -(-sq // 128), sk, device="cuda", generator=gen) < 0.3
    mask[0, 1, 0] = False  # an empty query block
    keys = KeySet.from_mask(mask, block_m=128, block_n=1)
    out, lse = attention(q, k, v, keys, backend="cuda", return_lse=True)
    torch.cuda.synchronize()
    ref, ref_lse = reference_attention(q, k, v, keys, return_lse=True)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"ws smoke d={d}: rel L2 {err:.2e}, lse max abs err "
          f"{(lse - ref_lse).nan_to_num(posinf=0, neginf=0).abs().max().item():.2e}, "
          f"empty block -> lse -inf: {bool(torch.isneginf(lse[0, 1, :128]).all())}, zeros: {bool((out[0, 1, :128] == 0).all())}")
    assert err < 2e-2 and torch.isneginf(lse[0, 1, :128]).all() and (out[0, 1, :128] == 0).all()
EOF
}

run_stage() {
  case "$1" in
    smoke) timeout 120 bash -c "$(declare -f smoke); smoke" ;;
    test) timeout 540 python3 -m pytest -q -x -m gpu tests/test_cuda_variant.py -k mma_ws ;;
    # --report-api-errors no: cuda-python probes driver entry points (cuGetProcAddress fails by design);
    # only the kernels' memory errors count
    memcheck) timeout 300 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 bash -c "$(declare -f smoke); smoke" ;;
    bench)
      gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
      timeout 580 python3 bench/bench_attention.py --name "cuda_ws_check_${gpu}" \
        --shapes 1,24,32760,128 1,48,17550,64 --densities 1 0.3 0.1 \
        --variants cuda_bm128_bn128_w8_s2 cuda_bm128_bn128_w8_s3 --cuda-mma ws wgmma ;;
    *) echo "cuda_ws_check: unknown stage $1 (smoke, test, memcheck, bench)" >&2; return 2 ;;
  esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(smoke test bench)
for stage in "${stages[@]}"; do
  echo "== cuda_ws_check: $stage"
  run_stage "$stage"
done
