// Attention on CPU: decode over the KV cache (one call per layer and step, the GQA group folded so each
// key/value row is read once for all G query heads) and causal prefill over a left-padded prompt block (or a
// block of rows continued at their own cache offsets, q_start).
// Scores, softmax and the weighted sum are accumulated in fp32 for every input dtype. softcap > 0 bounds each
// score to softcap * tanh(score / softcap) (Gemma 2's attention logit soft-capping) before the softmax.
#include "common.h"

#include <limits>

namespace hybrid_engine_cpu {
namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += q[i] * to_float(k[i]);
  return acc;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * to_float(x[i]);
}

// A score after the scale, soft-capped where softcap > 0 (as Hugging Face: divide, tanh, multiply).
inline float soft_cap(float s, float softcap) { return softcap > 0.f ? std::tanh(s / softcap) * softcap : s; }

// Softmax of scores[0, n) in place over the entries with keep[j]; the others become 0. Returns the sum.
inline float softmax_inplace(float* scores, const bool* keep, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j)
    if (keep[j]) mx = std::max(mx, scores[j]);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = keep[j] ? std::exp(scores[j] - mx) : 0.f;
    sum += scores[j];
  }
  return sum;
}

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const bool* key_mask, int64_t mask_stride, int64_t length, float scale, float softcap,
                   at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1), G = H / Hkv;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // One task per (row, kv head): G * length * D * 4 flops, ~65K at decode shapes (G 4, L 128, D 64):
  // a grain of 1 keeps both cores busy with B * Hkv = 16 tasks.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores(G * length);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, hk = bh % Hkv;
      const bool* keep = key_mask + b * mask_stride;
      for (int64_t g = 0; g < G; ++g) {
        const T* qrow = qp + b * q.stride(0) + (hk * G + g) * q.stride(1);
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(qrow[d]) * scale;
      }
      const T* kbase = kp + b * k_cache.stride(0) + hk * k_cache.stride(1);
      const T* vbase = vp + b * v_cache.stride(0) + hk * v_cache.stride(1);
      for (int64_t s = 0; s < length; ++s) {
        if (!keep[s]) continue;
        const T* krow = kbase + s * k_cache.stride(2);
        for (int64_t g = 0; g < G; ++g) scores[g * length + s] = soft_cap(dot<T>(&qf[g * D], krow, D), softcap);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::vector<float> sums(G);
      for (int64_t g = 0; g < G; ++g) sums[g] = softmax_inplace(&scores[g * length], keep, length);
      for (int64_t s = 0; s < length; ++s) {
        if (!keep[s]) continue;
        const T* vrow = vbase + s * v_cache.stride(2);
        for (int64_t g = 0; g < G; ++g) axpy<T>(scores[g * length + s], vrow, &acc[g * D], D);
      }
      for (int64_t g = 0; g < G; ++g) {
        // A row with no real key (never the case in decode: the new token is real) gives zeros, not NaN.
        const float inv = sums[g] > 0.f ? 1.f / sums[g] : 0.f;
        T* orow = op + (b * H + hk * G + g) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = from_float<T>(acc[g * D + d] * inv);
      }
    }
  });
}

template <typename T>
void prefill_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* key_mask,
                    int64_t mask_stride, float scale, int64_t window, float softcap, const int64_t* q_start,
                    at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), D = q.size(3), Hkv = k.size(1), G = H / Hkv;
  const int64_t Tk = k.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // One task per query row: i * D * 4 flops each; a grain of 16 rows keeps task overhead under ~5%.
  at::parallel_for(0, B * H * T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), scores(Tk);
    std::vector<char> keep(Tk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % T_, h = (r / T_) % H, b = r / (T_ * H), hk = h / G;
      const int64_t pos = (q_start ? q_start[b] : 0) + i;  // the query's key index (a continued row's offset)
      const bool* real = key_mask + b * mask_stride;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t hi = std::min<int64_t>(pos, Tk - 1);
      const T* qrow = qp + b * q.stride(0) + h * q.stride(1) + i * q.stride(2);
      for (int64_t d = 0; d < D; ++d) qf[d] = to_float(qrow[d]) * scale;
      const T* kbase = kp + b * k.stride(0) + hk * k.stride(1);
      const T* vbase = vp + b * v.stride(0) + hk * v.stride(1);
      const int64_t n = std::max<int64_t>(0, hi + 1 - lo);  // keys lo..hi; a pad query attends only to itself
      for (int64_t j = lo; j <= hi; ++j) {
        keep[j - lo] = real[j] || j == pos;
        if (keep[j - lo]) scores[j - lo] = soft_cap(dot<T>(qf.data(), kbase + j * k.stride(2), D), softcap);
      }
      const float sum = softmax_inplace(scores.data(), reinterpret_cast<const bool*>(keep.data()), n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = lo; j <= hi; ++j)
        if (keep[j - lo]) axpy<T>(scores[j - lo], vbase + j * v.stride(2), acc.data(), D);
      // no key at all (a right-padded block's pad past the keys given, whose output is never used): zeros
      T* orow = op + ((b * H + h) * T_ + i) * D;
      for (int64_t d = 0; d < D; ++d) orow[d] = from_float<T>(sum > 0.f ? acc[d] / sum : 0.f);
    }
  });
}

void check_attention_dtypes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& key_mask) {
  for (const at::Tensor* t : {&q, &k, &v, &key_mask}) HE_CHECK_CPU(*t);
  HE_CHECK_FLOAT(q);
  HE_CHECK_SAME_DTYPE(q, k);
  HE_CHECK_SAME_DTYPE(q, v);
  for (const at::Tensor* t : {&q, &k, &v}) HE_CHECK_LAST_CONTIGUOUS(*t);
  TORCH_CHECK(key_mask.scalar_type() == at::kBool, "key_mask must be bool, got ", key_mask.scalar_type());
  TORCH_CHECK(key_mask.dim() == 2, "key_mask must be (B, S), got shape ", key_mask.sizes());
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& key_mask_in, int64_t length, double scale, double softcap) {
  check_attention_dtypes(q, k_cache, v_cache, key_mask_in);
  HE_CHECK_DIM(q, 3);
  HE_CHECK_DIM(k_cache, 4);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(0) >= B && k_cache.size(3) == D, "k_cache must be (B_max >= ", B, ", Hkv, S_max, D = ",
              D, "), got ", k_cache.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads ", H, " must be a multiple of kv heads ", Hkv);
  TORCH_CHECK(length >= 1 && length <= k_cache.size(2), "length must be in [1, S_max = ", k_cache.size(2),
              "], got ", length);
  TORCH_CHECK(key_mask_in.size(0) >= B && key_mask_in.size(1) >= length, "key_mask must be (>= ", B, ", >= ",
              length, "), got ", key_mask_in.sizes());
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: off), got ", softcap);
  const at::Tensor key_mask = key_mask_in.stride(1) == 1 ? key_mask_in : key_mask_in.contiguous();
  at::Tensor out = at::empty({B, H, D}, q.options());
  if (B == 0) return out;  // an empty batch: no (row, kv head) task to run
  HE_DISPATCH_FLOAT(q.scalar_type(), "decode_attention", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, key_mask.data_ptr<bool>(), key_mask.stride(0), length,
                            static_cast<float>(scale), static_cast<float>(softcap), out);
  });
  return out;
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& key_mask_in, double scale, std::optional<int64_t> sliding_window,
                             double softcap, const std::optional<at::Tensor>& q_start_in) {
  check_attention_dtypes(q, k, v, key_mask_in);
  HE_CHECK_DIM(q, 4);
  HE_CHECK_DIM(k, 4);
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == B && (q_start_in ? Tk >= 1 : Tk == T_) && k.size(3) == D, "k must be (B, Hkv, ",
              q_start_in ? "Tk" : "T", ", D) = (", B, ", Hkv, ", T_, ", ", D, "), got ", k.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads ", H, " must be a multiple of kv heads ", Hkv);
  TORCH_CHECK(key_mask_in.size(0) == B && key_mask_in.size(1) == Tk, "key_mask must be (", B, ", ", Tk,
              "), got ", key_mask_in.sizes());
  TORCH_CHECK(!sliding_window || *sliding_window > 0, "sliding_window must be positive, got ", *sliding_window);
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: off), got ", softcap);
  at::Tensor q_start;
  if (q_start_in) {
    q_start = q_start_in->contiguous();
    HE_CHECK_CPU(q_start);
    TORCH_CHECK(q_start.scalar_type() == at::kLong && q_start.dim() == 1 && q_start.size(0) == B,
                "q_start must be int64 (B = ", B, "), got ", q_start.scalar_type(), " ", q_start.sizes());
  }
  const at::Tensor key_mask = key_mask_in.stride(1) == 1 ? key_mask_in : key_mask_in.contiguous();
  at::Tensor out = at::empty({B, H, T_, D}, q.options());
  if (out.numel() == 0) return out;  // an empty batch (or prompt): no query row to run
  const int64_t* qs = q_start_in ? q_start.data_ptr<int64_t>() : nullptr;
  HE_DISPATCH_FLOAT(q.scalar_type(), "prefill_attention", [&] {
    prefill_kernel<scalar_t>(q, k, v, key_mask.data_ptr<bool>(), key_mask.stride(0), static_cast<float>(scale),
                             sliding_window ? *sliding_window : 0, static_cast<float>(softcap), qs, out);
  });
  return out;
}

}  // namespace hybrid_engine_cpu
