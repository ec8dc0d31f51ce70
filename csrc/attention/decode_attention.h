// Launchers of the decode-path CUDA kernels: rotary + KV-cache append, and split-K decode attention.
// Raw pointers, sizes (elements) and strides (elements), and a stream: no torch types, so the .cu files
// compile with nvcc alone. Conventions are those of hybrid_engine/ops/reference.py.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace hybrid_engine_cuda {

struct RotaryAppendArgs {
  const void* q;        // (B, T, H, D), strides q_stride for dims 0..2, last dim contiguous
  const void* k;        // (B, T, Hkv, D)
  const void* v;        // (B, T, Hkv, D)
  const void* cos;      // (B, T, rot) contiguous, or null: no rotary (q_out is then not written)
  const void* sin;      // (B, T, rot) contiguous
  bool cos_is_float32;  // cos/sin in fp32 rather than the dtype of q
  void* q_out;          // (B, T, H, D) contiguous
  void* k_cache;        // (B_max, Hkv, S_max, D), strides cache_stride for dims 0..2
  void* v_cache;
  const int64_t* row_start;  // (B,) per-row offsets added to start (continued rows), or null; slots >= S skipped
  int64_t B, T, H, Hkv, D, rot, start, S;
  int64_t q_stride[3], k_stride[3], v_stride[3], cache_stride[3];
};

struct DecodeArgs {
  const void* q;          // (B, H, D), strides q_stride for dims 0..1
  const void* k_cache;    // (B_max, Hkv, S_max, D), strides k_stride for dims 0..2
  const void* v_cache;
  const bool* key_mask;   // (>= B, >= length), row stride mask_stride, True on real tokens
  void* out;              // (B, H, D) contiguous
  float* workspace;       // decode_workspace_floats(...) floats when splits > 1, else unused
  int64_t B, H, Hkv, D, length, mask_stride;
  int64_t q_stride[2], k_stride[3], v_stride[3];
  float scale;
  float softcap;          // > 0: scores = softcap * tanh(scores / softcap) before the softmax; 0: off
  int chunk;              // cache slots per split (decode_chunk)
  int splits;             // ceil(length / chunk)
};

// Slots per split: enough splits for ~2 waves of `sms` SMs over B * Hkv (row, kv head) pairs, >= 64 each.
int decode_chunk(int64_t length, int64_t batch_kv_heads, int sms);
size_t decode_workspace_floats(int64_t B, int64_t H, int64_t D, int splits);
// Largest head dim and query-group size the decode kernel takes (shared memory is sized from them).
constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroup = 16;

cudaError_t launch_rotary_kv_append(DType dtype, const RotaryAppendArgs& args, cudaStream_t stream);
cudaError_t launch_decode_attention(DType dtype, const DecodeArgs& args, cudaStream_t stream);

}  // namespace hybrid_engine_cuda
