// Decode-path CUDA kernels: rotary embedding fused with the KV-cache append, and split-K ("flash-decoding")
// attention of one query token per row over the cache. fp32 accumulation for every dtype; scores soft-capped
// (softcap * tanh(score / softcap), Gemma 2) where softcap > 0.
#include <cfloat>

#include "attention/decode_attention.h"
#include "common_cuda.cuh"

namespace hybrid_engine_cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / 32;

// ---- rotary + KV-cache append: one block per token, threads over (head, feature) ----

template <typename T, typename C>
__device__ __forceinline__ float rotated(const T* row, const C* cos, const C* sin, int64_t d, int64_t rot) {
  const float x = to_float(row[d]);
  if (d >= rot) return x;
  const int64_t half = rot / 2;
  const float partner = d < half ? -to_float(row[d + half]) : to_float(row[d - half]);
  return x * to_float(cos[d]) + partner * to_float(sin[d]);
}

template <typename T, typename C>
__global__ void rotary_kv_append_kernel(RotaryAppendArgs a) {
  const int64_t bt = blockIdx.x, b = bt / a.T, t = bt % a.T;
  const C* cos = a.cos ? static_cast<const C*>(a.cos) + bt * a.rot : nullptr;
  const C* sin = a.cos ? static_cast<const C*>(a.sin) + bt * a.rot : nullptr;
  if (cos) {
    const T* q = static_cast<const T*>(a.q);
    T* q_out = static_cast<T*>(a.q_out);
    for (int64_t i = threadIdx.x; i < a.H * a.D; i += blockDim.x) {
      const int64_t h = i / a.D, d = i % a.D;
      const T* row = q + b * a.q_stride[0] + t * a.q_stride[1] + h * a.q_stride[2];
      q_out[(bt * a.H + h) * a.D + d] = from_float<T>(rotated<T, C>(row, cos, sin, d, a.rot));
    }
  }
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  // a continued row writes at its own offset; a slot past S_max (a right-padded block's pad) is not written
  const int64_t cache_slot = a.start + (a.row_start ? a.row_start[b] : 0) + t;
  if (cache_slot >= a.S) return;
  for (int64_t i = threadIdx.x; i < a.Hkv * a.D; i += blockDim.x) {
    const int64_t h = i / a.D, d = i % a.D;
    const T* krow = k + b * a.k_stride[0] + t * a.k_stride[1] + h * a.k_stride[2];
    const T* vrow = v + b * a.v_stride[0] + t * a.v_stride[1] + h * a.v_stride[2];
    const int64_t slot = b * a.cache_stride[0] + h * a.cache_stride[1] + cache_slot * a.cache_stride[2] + d;
    static_cast<T*>(a.k_cache)[slot] = cos ? from_float<T>(rotated<T, C>(krow, cos, sin, d, a.rot)) : krow[d];
    static_cast<T*>(a.v_cache)[slot] = vrow[d];
  }
}

// ---- decode attention: block (row b, kv head, split) handles the G query heads of that kv head ----
// Shared memory: q (G x D, pre-scaled) and the scores of the split (G x chunk), all fp32.

template <typename T>
__global__ void decode_kernel(DecodeArgs a) {
  extern __shared__ float smem[];
  const int64_t b = blockIdx.x / a.Hkv, hk = blockIdx.x % a.Hkv;
  const int split = blockIdx.y;
  const int G = static_cast<int>(a.H / a.Hkv), D = static_cast<int>(a.D);
  float* q_s = smem;               // (G, D)
  float* scores = smem + G * D;    // (G, chunk)
  const int64_t lo = static_cast<int64_t>(split) * a.chunk;
  const int n = static_cast<int>(min(static_cast<int64_t>(a.chunk), a.length - lo));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(a.q);
  const T* kc = static_cast<const T*>(a.k_cache) + b * a.k_stride[0] + hk * a.k_stride[1];
  const T* vc = static_cast<const T*>(a.v_cache) + b * a.v_stride[0] + hk * a.v_stride[1];
  const bool* real = a.key_mask + b * a.mask_stride + lo;

  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    q_s[i] = to_float(q[b * a.q_stride[0] + (hk * G + g) * a.q_stride[1] + d]) * a.scale;
  }
  __syncthreads();
  // Scores: one warp per key, lanes across D (coalesced reads of the key row).
  for (int j = warp; j < n; j += kWarps) {
    const T* krow = kc + (lo + j) * a.k_stride[2];
    float kv[kMaxHeadDim / 32];
#pragma unroll
    for (int r = 0; r < kMaxHeadDim / 32; ++r) {
      const int d = lane + r * 32;
      kv[r] = d < D ? to_float(krow[d]) : 0.f;
    }
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < kMaxHeadDim / 32; ++r) {
        const int d = lane + r * 32;
        if (d < D) s += q_s[g * D + d] * kv[r];
      }
      s = warp_sum(s);
      if (a.softcap > 0.f) s = tanhf(s / a.softcap) * a.softcap;
      if (lane == 0) scores[g * a.chunk + j] = real[j] ? s : -FLT_MAX;
    }
  }
  __syncthreads();
  // Softmax statistics per query head: one warp per head.
  __shared__ float m_s[kMaxGroup], l_s[kMaxGroup];
  for (int g = warp; g < G; g += kWarps) {
    float m = -FLT_MAX;
    for (int j = lane; j < n; j += 32)
      if (real[j]) m = fmaxf(m, scores[g * a.chunk + j]);
    m = warp_max(m);
    float l = 0.f;
    for (int j = lane; j < n; j += 32) {
      const float p = real[j] ? expf(scores[g * a.chunk + j] - m) : 0.f;
      scores[g * a.chunk + j] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      m_s[g] = m;
      l_s[g] = l;
    }
  }
  __syncthreads();
  // Weighted sum of values: threads over (g, d); consecutive threads read consecutive features.
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    float acc = 0.f;
    for (int j = 0; j < n; ++j) acc += scores[g * a.chunk + j] * to_float(vc[(lo + j) * a.v_stride[2] + d]);
    const int64_t row = b * a.H + hk * G + g;
    if (a.splits == 1) {
      static_cast<T*>(a.out)[row * D + d] = from_float<T>(l_s[g] > 0.f ? acc / l_s[g] : 0.f);
    } else {
      const int64_t part = row * a.splits + split;
      a.workspace[part * D + d] = acc;
      if (d == 0) {
        float* ml = a.workspace + a.B * a.H * a.splits * D;
        ml[part * 2] = l_s[g] > 0.f ? m_s[g] : -FLT_MAX;  // a split with no real key weighs nothing
        ml[part * 2 + 1] = l_s[g];
      }
    }
  }
}

template <typename T>
__global__ void decode_reduce_kernel(DecodeArgs a) {
  const int64_t row = blockIdx.x;
  const int D = static_cast<int>(a.D);
  const float* ml = a.workspace + a.B * a.H * a.splits * D + row * a.splits * 2;
  float m = -FLT_MAX;
  for (int s = 0; s < a.splits; ++s) m = fmaxf(m, ml[2 * s]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < a.splits; ++s) {
      const float w = ml[2 * s + 1] > 0.f ? expf(ml[2 * s] - m) : 0.f;
      num += w * a.workspace[(row * a.splits + s) * D + d];
      den += w * ml[2 * s + 1];
    }
    static_cast<T*>(a.out)[row * D + d] = from_float<T>(den > 0.f ? num / den : 0.f);
  }
}

}  // namespace

int decode_chunk(int64_t length, int64_t batch_kv_heads, int sms) {
  batch_kv_heads = batch_kv_heads < 1 ? 1 : batch_kv_heads;  // an empty batch must not divide by zero
  int64_t splits = (2 * static_cast<int64_t>(sms) + batch_kv_heads - 1) / batch_kv_heads;
  splits = splits < 1 ? 1 : splits;
  int64_t chunk = (length + splits - 1) / splits;
  chunk = chunk < 64 ? 64 : chunk;
  // The split's scores live in shared memory: cap a split at 2048 slots (8 KB per query head).
  chunk = chunk > 2048 ? 2048 : chunk;
  return static_cast<int>(chunk);
}

size_t decode_workspace_floats(int64_t B, int64_t H, int64_t D, int splits) {
  return splits > 1 ? static_cast<size_t>(B * H * splits * (D + 2)) : 0;
}

cudaError_t launch_rotary_kv_append(DType dtype, const RotaryAppendArgs& args, cudaStream_t stream) {
  if (args.B * args.T == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (args.cos && args.cos_is_float32)
      rotary_kv_append_kernel<T, float><<<args.B * args.T, kThreads, 0, stream>>>(args);
    else
      rotary_kv_append_kernel<T, T><<<args.B * args.T, kThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

cudaError_t launch_decode_attention(DType dtype, const DecodeArgs& args, cudaStream_t stream) {
  if (args.B == 0) return cudaSuccess;  // an empty batch: no block to run (a 0-size grid is not a valid launch)
  if (args.Hkv < 1 || args.H % args.Hkv != 0 || args.chunk < 1 || args.splits < 1) return cudaErrorInvalidValue;
  const int64_t G = args.H / args.Hkv;
  if (args.D > kMaxHeadDim || G > kMaxGroup) return cudaErrorInvalidValue;
  const size_t smem = sizeof(float) * static_cast<size_t>(G * args.D + G * args.chunk);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (smem > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    const dim3 grid(static_cast<unsigned>(args.B * args.Hkv), static_cast<unsigned>(args.splits));
    decode_kernel<T><<<grid, kThreads, smem, stream>>>(args);
    if (args.splits > 1) decode_reduce_kernel<T><<<args.B * args.H, kThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace hybrid_engine_cuda
