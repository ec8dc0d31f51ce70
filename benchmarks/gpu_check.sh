#!/usr/bin/env bash
# The GPU checks of ../shared/GPU.md in one short call (well under 8 minutes on an H200):
#   1. nvidia-smi -L and the torch, triton, transformers versions;
#   2. the GPU-marked tests (pytest -m gpu: the cuda and compiled triton backends against the references);
#   3. benchmarks/kernels.py at the 1B model's decode shapes, bf16;
#   4. benchmarks/throughput.py: ~1B Llama-style model, bf16, batch 1/16/64, prompt 256, answer 256;
# full logs and JSON under $OUT (default: a fresh temp dir), the short table last.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # Hopper; the op builder reads it
export HYBRID_ENGINE_CACHE="${HYBRID_ENGINE_CACHE:-$OUT/build}"
unset TRITON_INTERPRET
status=0

{
    nvidia-smi -L
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('triton', triton.__version__); print('transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/versions.log"

echo "== pytest -m gpu" | tee "$OUT/pytest_gpu.log"
timeout 300 python -m pytest -q -m gpu tests 2>&1 | tee -a "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" -eq 0 ] || status=1

echo "== kernels.py (1B decode shapes, bf16)" | tee "$OUT/kernels.log"
timeout 120 python benchmarks/kernels.py --device cuda --dtype bf16 --batch 64 --heads 32 --kv-heads 8 \
    --head-dim 64 --hidden 2048 --cache-len 512 --prompt-len 256 2>&1 | tee -a "$OUT/kernels.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== throughput.py" | tee "$OUT/throughput.log"
timeout 300 python benchmarks/throughput.py --device cuda --dtype bf16 --model-size 1b --batch-sizes 1 16 64 \
    --prompt-len 256 --new-tokens 256 --json "$OUT/throughput.json" 2>&1 | tee -a "$OUT/throughput.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo
echo "== summary (logs in $OUT)"
echo "gpu tests: $(tail -n 1 "$OUT/pytest_gpu.log") (rc $tests_rc)"
grep -E "^(op |decode_attention|rotary_kv_append|rms_norm)" "$OUT/kernels.log" || true
grep -A 20 -E "^batch" "$OUT/throughput.log" | tail -n 8 || true
exit $status
