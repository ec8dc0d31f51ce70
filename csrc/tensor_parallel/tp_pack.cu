// Tensor-parallel weight pack/unpack: every (outer row, segment) piece copied by one kernel launch, in the
// widest unit (16, 8, 4, 2 or 1 bytes) that all offsets, sizes and both base pointers are aligned to.
#include "tensor_parallel/tp_pack.h"

namespace hybrid_engine_cuda {
namespace {

template <typename U>
__global__ void tp_copy_kernel(TpCopyArgs a) {
  const int seg = blockIdx.z;
  const int64_t units = a.bytes[seg] / static_cast<int64_t>(sizeof(U));
  for (int64_t row = blockIdx.y; row < a.outer; row += gridDim.y) {  // grid-stride: outer may pass 65535
    const U* src = reinterpret_cast<const U*>(a.full_or_shard + row * a.src_row_bytes + a.src_offset[seg]);
    U* dst = reinterpret_cast<U*>(a.dst + row * a.dst_row_bytes + a.dst_offset[seg]);
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < units;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
      dst[i] = src[i];
  }
}

int64_t common_alignment(const TpCopyArgs& a) {
  uint64_t bits = reinterpret_cast<uintptr_t>(a.full_or_shard) | reinterpret_cast<uintptr_t>(a.dst) |
                  static_cast<uint64_t>(a.src_row_bytes) | static_cast<uint64_t>(a.dst_row_bytes);
  for (int i = 0; i < a.segments; ++i)
    bits |= static_cast<uint64_t>(a.src_offset[i]) | static_cast<uint64_t>(a.dst_offset[i]) |
            static_cast<uint64_t>(a.bytes[i]);
  for (int64_t unit = 16; unit > 1; unit /= 2)
    if ((bits & static_cast<uint64_t>(unit - 1)) == 0) return unit;
  return 1;
}

template <typename U>
cudaError_t launch(const TpCopyArgs& a, cudaStream_t stream) {
  int64_t most = 0;
  for (int i = 0; i < a.segments; ++i) most = a.bytes[i] > most ? a.bytes[i] : most;
  const int threads = 256;
  int64_t blocks = (most / static_cast<int64_t>(sizeof(U)) + threads - 1) / threads;
  blocks = blocks < 1 ? 1 : (blocks > 1024 ? 1024 : blocks);  // grid-stride loop beyond 1024 blocks
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(a.outer < 65535 ? a.outer : 65535), static_cast<unsigned>(a.segments));
  tp_copy_kernel<U><<<grid, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_tp_copy(const TpCopyArgs& a, cudaStream_t stream) {
  if (a.outer == 0 || a.segments == 0) return cudaSuccess;
  if (a.segments > kMaxSegments) return cudaErrorInvalidValue;
  switch (common_alignment(a)) {
    case 16: return launch<uint4>(a, stream);
    case 8: return launch<uint2>(a, stream);
    case 4: return launch<uint32_t>(a, stream);
    case 2: return launch<uint16_t>(a, stream);
    default: return launch<uint8_t>(a, stream);
  }
}

}  // namespace hybrid_engine_cuda
