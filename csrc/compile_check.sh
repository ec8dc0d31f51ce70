#!/usr/bin/env bash
# Compile every CUDA kernel file with nvcc for sm_80 and sm_90 (compile only: no GPU needed), so a CUDA build
# break fails CI. The .cu files include only CUDA headers; the torch binding (cuda_bindings.cpp) needs a CUDA
# build of torch and is compiled by the op builder on GPU machines.
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
if [ ! -x "$NVCC" ]; then
    echo "compile_check: nvcc not found (set NVCC or CUDA_HOME)" >&2
    exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
for src in $(find . -name '*.cu' | sort); do
    obj="$tmp/$(echo "$src" | tr '/.' '__').o"
    if "$NVCC" -c -std=c++17 -O3 -I. -Xcompiler -Wall \
        -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 "$src" -o "$obj"; then
        echo "compile_check: ok   $src"
    else
        echo "compile_check: FAIL $src" >&2
        status=1
    fi
done
exit $status
