// Launcher of the tensor-parallel pack/unpack copy: rank's part of every segment of a fused weight, one kernel.
// Raw pointers and byte sizes: no torch types, so tp_pack.cu compiles with nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hybrid_engine_cuda {

constexpr int kMaxSegments = 8;  // q/k/v or gate/up: a handful of segments per fused weight

struct TpCopyArgs {
  const char* full_or_shard;  // source
  char* dst;                  // destination
  int64_t outer;              // rows before the split dim
  int64_t src_row_bytes;      // bytes of one outer row of the source (split dim * inner * elem)
  int64_t dst_row_bytes;
  int segments;
  int64_t src_offset[kMaxSegments];  // byte offset of each segment's piece inside a source row
  int64_t dst_offset[kMaxSegments];
  int64_t bytes[kMaxSegments];       // bytes of each segment's piece
};

// Copies, for every outer row r and segment i, bytes[i] bytes from src + r * src_row_bytes + src_offset[i]
// to dst + r * dst_row_bytes + dst_offset[i].
cudaError_t launch_tp_copy(const TpCopyArgs& args, cudaStream_t stream);

}  // namespace hybrid_engine_cuda
