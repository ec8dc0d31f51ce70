// Rotary embedding of q and k fused with the KV-cache write, on CPU: one call per layer and step instead of
// ~15 ATen ops (two rotaries of slice/cat/mul/add, two strided cache copies).
#include "common.h"

namespace hybrid_engine_cpu {
namespace {

// Rotate-half ("GPT-NeoX / Llama") rotary of one head row on its first `rot` features, in fp32; the rest
// are copied. cos and sin hold the two halves repeated, so feature i uses cos[i], sin[i].
template <typename T, typename C>
inline void rotate_row(const T* x, const C* cos, const C* sin, T* out, int64_t rot, int64_t dim) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i)
    out[i] = from_float<T>(to_float(x[i]) * to_float(cos[i]) - to_float(x[i + half]) * to_float(sin[i]));
  for (int64_t i = half; i < rot; ++i)
    out[i] = from_float<T>(to_float(x[i]) * to_float(cos[i]) + to_float(x[i - half]) * to_float(sin[i]));
  for (int64_t i = rot; i < dim; ++i) out[i] = x[i];
}

template <typename T, typename C>
void rotary_kv_append_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const C* cos,
                             const C* sin, int64_t rot, at::Tensor& q_out, at::Tensor& k_cache,
                             at::Tensor& v_cache, int64_t start, const int64_t* row_start) {
  const int64_t B = q.size(0), T_ = q.size(1), H = q.size(2), Hkv = k.size(2), D = q.size(3);
  const int64_t S = k_cache.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* qo = cos ? q_out.data_ptr<T>() : nullptr;
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  // Each token is (H + Hkv) * D ~ 512 elements at decode shapes (~0.3 us): a grain of 32 tokens keeps a
  // decode step (B tokens) on one thread, where a fork/join would cost more than the work.
  at::parallel_for(0, B * T_, 32, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T_, t = bt % T_;
      const C* c = cos ? cos + bt * rot : nullptr;
      const C* s = sin ? sin + bt * rot : nullptr;
      for (int64_t h = 0; c && h < H; ++h) {  // without rotary q is returned as given
        const T* src = qp + b * q.stride(0) + t * q.stride(1) + h * q.stride(2);
        rotate_row<T, C>(src, c, s, qo + ((bt * H) + h) * D, rot, D);
      }
      // a continued row writes at its own offset; a slot past S_max (a right-padded block's pad) is not written
      const int64_t slot = start + (row_start ? row_start[b] : 0) + t;
      for (int64_t h = 0; slot < S && h < Hkv; ++h) {
        const T* ksrc = kp + b * k.stride(0) + t * k.stride(1) + h * k.stride(2);
        const T* vsrc = vp + b * v.stride(0) + t * v.stride(1) + h * v.stride(2);
        T* kdst = kc + b * k_cache.stride(0) + h * k_cache.stride(1) + slot * k_cache.stride(2);
        T* vdst = vc + b * v_cache.stride(0) + h * v_cache.stride(1) + slot * v_cache.stride(2);
        if (c) rotate_row<T, C>(ksrc, c, s, kdst, rot, D);
        else std::copy(ksrc, ksrc + D, kdst);
        std::copy(vsrc, vsrc + D, vdst);
      }
    }
  });
}

}  // namespace

at::Tensor rotary_kv_append(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in,
                            at::Tensor k_cache, at::Tensor v_cache, int64_t start,
                            const std::optional<at::Tensor>& row_start_in) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &k_cache, &v_cache}) {
    HE_CHECK_CPU(*t);
    TORCH_CHECK(t->dim() == 4, "q, k, v, k_cache and v_cache must have 4 dims, got shape ", t->sizes());
    HE_CHECK_LAST_CONTIGUOUS(*t);
    HE_CHECK_SAME_DTYPE(q, *t);
  }
  HE_CHECK_FLOAT(q);
  const int64_t B = q.size(0), T_ = q.size(1), Hkv = k.size(2), D = q.size(3);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(1) == T_ && k.size(3) == D, "k must be (B, T, Hkv, D) = (", B, ", ", T_,
              ", Hkv, ", D, "), got ", k.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  TORCH_CHECK(k_cache.size(0) >= B && k_cache.size(1) == Hkv && k_cache.size(3) == D,
              "k_cache must be (B_max >= ", B, ", Hkv = ", Hkv, ", S_max, D = ", D, "), got ", k_cache.sizes());
  at::Tensor row_start;
  if (row_start_in) {  // per-row offsets: the rows' slots are bounded per token (see the kernel)
    row_start = row_start_in->contiguous();
    HE_CHECK_CPU(row_start);
    TORCH_CHECK(row_start.scalar_type() == at::kLong && row_start.dim() == 1 && row_start.size(0) == B,
                "row_start must be int64 (B = ", B, "), got ", row_start.scalar_type(), " ", row_start.sizes());
    const int64_t* rs = row_start.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(start + rs[b] >= 0, "row ", b, ": slot start + row_start = ", start + rs[b], " is negative");
  } else {
    TORCH_CHECK(start >= 0 && start + T_ <= k_cache.size(2), "cache slots [", start, ", ", start + T_,
                ") do not fit in S_max = ", k_cache.size(2));
  }
  const int64_t* rs = row_start_in ? row_start.data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(cos_in.has_value() == sin_in.has_value(), "cos and sin must be given together");
  at::Tensor cos, sin;
  int64_t rot = 0;
  if (cos_in) {
    cos = cos_in->contiguous();
    sin = sin_in->contiguous();
    HE_CHECK_CPU(cos);
    HE_CHECK_CPU(sin);
    rot = cos.size(-1);
    TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T_ && sin.sizes() == cos.sizes(),
                "cos and sin must be (B, T, rotary_dim) = (", B, ", ", T_, ", R), got ", cos.sizes(), " and ",
                sin.sizes());
    TORCH_CHECK(rot % 2 == 0 && rot <= D, "rotary_dim must be even and <= head dim ", D, ", got ", rot);
    TORCH_CHECK(cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat,
                "cos must be float32 or the dtype of q, got ", cos.scalar_type());
    HE_CHECK_SAME_DTYPE(cos, sin);
  }
  at::Tensor q_out = cos_in ? at::empty(q.sizes(), q.options()) : q;
  if (B == 0 || T_ == 0) return q_out;  // no token: nothing to rotate or write
  HE_DISPATCH_FLOAT(q.scalar_type(), "rotary_kv_append", [&] {
    if (!cos_in || cos.scalar_type() == at::kFloat) {
      const float* c = cos_in ? cos.data_ptr<float>() : nullptr;
      const float* s = cos_in ? sin.data_ptr<float>() : nullptr;
      rotary_kv_append_kernel<scalar_t, float>(q, k, v, c, s, rot, q_out, k_cache, v_cache, start, rs);
    } else {
      rotary_kv_append_kernel<scalar_t, scalar_t>(q, k, v, cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                                                  rot, q_out, k_cache, v_cache, start, rs);
    }
  });
  // Without rotary the reference returns q itself; so do we (no copy wanted then, but the cache is written).
  return cos_in ? q_out : q;
}

}  // namespace hybrid_engine_cpu
