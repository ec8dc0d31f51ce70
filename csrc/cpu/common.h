// Shared helpers of the C++ CPU twins: input checks and fp32 loads/stores of fp32, bf16 and fp16 values.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace hybrid_engine_cpu {

#define HE_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor, got ", (t).device())
#define HE_CHECK_DIM(t, n) TORCH_CHECK((t).dim() == (n), #t " must have ", (n), " dims, got shape ", (t).sizes())
#define HE_CHECK_LAST_CONTIGUOUS(t) \
  TORCH_CHECK((t).stride(-1) == 1, #t " must be contiguous in its last dim, got strides ", (t).strides())
#define HE_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define HE_CHECK_FLOAT(t)                                                                             \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kBFloat16 ||               \
                  (t).scalar_type() == at::kHalf,                                                     \
              #t " must be float32, bfloat16 or float16, got ", (t).scalar_type())
#define HE_CHECK_SAME_DTYPE(a, b) \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " and " #b " must have the same dtype, got ", \
              (a).scalar_type(), " and ", (b).scalar_type())

// Dispatch over the three float types every twin supports.
#define HE_DISPATCH_FLOAT(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

// A (N, C) view of `t` over its last dim; copies only when `t` is not contiguous.
inline at::Tensor rows_view(const at::Tensor& t) {
  return t.is_contiguous() ? t.view({-1, t.size(-1)}) : t.contiguous().view({-1, t.size(-1)});
}

}  // namespace hybrid_engine_cpu
