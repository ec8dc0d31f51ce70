#!/usr/bin/env bash
# The GPU checks of ../shared/GPU.md in one call that ends within 9 minutes on an H200 (stage timeouts
# 10 + 20 + 235 + 90 + 180 = 535 s, under a device call's 600 s with room for start-up):
#   1. nvidia-smi -L and the torch, triton, transformers versions;
#   2. the GPU-marked tests (pytest -m gpu: the cuda and compiled triton backends against the references),
#      4 workers when pytest-xdist is installed;
#   3. benchmarks/kernel_speed.py at the 1B model's decode shapes, bf16;
#   4. benchmarks/throughput.py: ~1B Llama-style model, bf16, batch 1/16/64, prompt 256, answer 256;
#   5. only when named in $STAGES, as a second device call (it does not fit in the first one's 600 s):
#      benchmarks/rlhf_step.py, a PPO and a GRPO round of the ~1B model, hybrid engine against HF generate, phase
#      by phase (timeout 300 s; needs DeepSpeed, which the reference machine installs from wheels: GPU.md);
#   6. only when named in $STAGES, as a device call of its own (issue 11): benchmarks/throughput.py --compile
#      --hf-static on the ~1B model, bf16, batch 1/16/64: plain HF generate, HF generate with a static cache
#      (transformers compiles its decoding forward, CUDA graphs), the eager engine and the engine with
#      compile=True (the static step compiled by inductor and captured as one CUDA graph per batch bucket), with
#      each one's decode step time and achieved bandwidth against the floor, and the compile + capture seconds
#      (timeout 480 s: inductor compiles the 16-layer step once per bucket, HF its forward once per batch size);
#      the compile-marked GPU test (capture once per bucket, replay after an optimizer step) runs in stage 2;
# full logs and JSON under $OUT (default: a fresh temp dir), the short table last.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh          # stages 1-4
#        OUT=/some/dir STAGES=rlhf_step bash benchmarks/gpu_check.sh   # stages 1 and 5
#        OUT=/some/dir STAGES=compile bash benchmarks/gpu_check.sh     # stages 1 and 6
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # Hopper; the op builder reads it
# JIT builds outside $OUT: a rerun on a still-warm machine reuses them (the CUDA extension takes ~1 minute),
# and $OUT keeps only logs, small enough to come back.
export HYBRID_ENGINE_CACHE="${HYBRID_ENGINE_CACHE:-$HOME/.cache/hybrid_engine}"
export PYTHONUNBUFFERED=1  # logs stay current through tee, and a stage killed by its timeout keeps its output
unset TRITON_INTERPRET
STAGES="${STAGES:-tests kernels throughput}"
want() { [[ " $STAGES " == *" $1 "* ]]; }
status=0
tests_rc="-"

{
    timeout 10 nvidia-smi -L
    timeout 20 python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/versions.log"

if want tests; then
    workers=""
    if python3 -c "import xdist" 2>/dev/null; then
        workers="-n 4"  # the ~350 GPU cases are small: 4 processes share the GPU
    fi
    echo "== pytest -m gpu $workers" | tee "$OUT/pytest_gpu.log"
    # shellcheck disable=SC2086  # $workers is empty or two words
    timeout 235 python3 -m pytest -q -m gpu $workers tests 2>&1 | tee -a "$OUT/pytest_gpu.log"
    tests_rc=${PIPESTATUS[0]}
    [ "$tests_rc" -eq 0 ] || status=1
fi

if want kernels; then
    echo "== kernel_speed.py (1B decode shapes, bf16)" | tee "$OUT/kernels.log"
    timeout 90 python3 benchmarks/kernel_speed.py --device cuda --dtype bf16 --batch 64 --heads 32 --kv-heads 8 \
        --head-dim 64 --hidden 2048 --cache-len 512 --prompt-len 256 2>&1 | tee -a "$OUT/kernels.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want throughput; then
    echo "== throughput.py" | tee "$OUT/throughput.log"
    timeout 180 python3 benchmarks/throughput.py --device cuda --dtype bf16 --model-size 1b --batch-sizes 1 16 64 \
        --prompt-len 256 --new-tokens 256 --repeats 2 --json "$OUT/throughput.json" 2>&1 | tee -a "$OUT/throughput.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want compile; then
    echo "== throughput.py --compile --hf-static (1B, bf16, batch 1/16/64)" | tee "$OUT/compile.log"
    # targets (issue 11): engine compiled >= 15x HF generate at batch 64, decode bw frac >= 0.80, ahead of HF static
    timeout 480 python3 benchmarks/throughput.py --device cuda --dtype bf16 --model-size 1b --batch-sizes 1 16 64 \
        --prompt-len 256 --new-tokens 256 --repeats 2 --compile --hf-static --json "$OUT/compile.json" 2>&1 \
        | tee -a "$OUT/compile.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want rlhf_step; then
    echo "== rlhf_step.py (1B, bf16, 16 rows, prompt 64, answer 128)" | tee "$OUT/rlhf_step.log"
    if python3 -c "import deepspeed" 2>/dev/null; then
        timeout 300 python3 benchmarks/rlhf_step.py --device cuda --dtype bf16 --model-size 1b --repeats 3 \
            --json "$OUT/rlhf_step.json" 2>&1 | tee -a "$OUT/rlhf_step.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    else
        echo "skipped: DeepSpeed is not installed (GPU.md: pip install --no-index from local wheels)" \
            | tee -a "$OUT/rlhf_step.log"
        status=1
    fi
fi

echo
echo "== summary (logs in $OUT)"
want tests && echo "gpu tests: $(tail -n 1 "$OUT/pytest_gpu.log") (rc $tests_rc)"
want kernels && { grep -E "^(op |decode_attention|rotary_kv_append|rms_norm)" "$OUT/kernels.log" || true; }
want throughput && { grep -A 20 -E "^model " "$OUT/throughput.log" | tail -n 7 || true; }
want compile && { grep -A 20 -E "^model " "$OUT/compile.log" | tail -n 13 || tail -n 3 "$OUT/compile.log"; }
want rlhf_step && { grep -A 6 -E "^algorithm" "$OUT/rlhf_step.log" || tail -n 3 "$OUT/rlhf_step.log"; }
exit $status
