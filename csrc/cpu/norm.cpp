// Fused residual-add + RMSNorm / LayerNorm on CPU: one pass over each row instead of ~6 ATen ops, which is
// most of the cost of a norm at decode shapes (8 rows of 384 features: the ATen chain spends ~25 us in
// dispatch, this loop ~2 us).
#include "common.h"

namespace hybrid_engine_cpu {
namespace {

constexpr int64_t kRowGrain = 16;  // rows per task: below ~16 rows of a few hundred features, threads cost more

// sum = round_T(x + residual) when a residual is given (the reference adds in the input dtype), else x.
template <typename T>
inline void load_row(const T* x, const T* residual, T* sum_out, float* row, int64_t n) {
  if (residual) {
    for (int64_t i = 0; i < n; ++i) {
      T s = from_float<T>(to_float(x[i]) + to_float(residual[i]));
      sum_out[i] = s;
      row[i] = to_float(s);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) row[i] = to_float(x[i]);
  }
}

template <typename T, typename W>
void rms_norm_rows(const T* x, const T* residual, const W* weight, T* sum_out, W* out, int64_t rows, int64_t n,
                   float eps) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * n;
      load_row<T>(x + off, residual ? residual + off : nullptr, sum_out ? sum_out + off : nullptr, row.data(), n);
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += row[i] * row[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
      // The reference rounds the normalised row to the input dtype before the weight multiply: so do we.
      for (int64_t i = 0; i < n; ++i)
        out[off + i] = from_float<W>(to_float(weight[i]) * to_float(from_float<T>(row[i] * inv)));
    }
  });
}

template <typename T>
void layer_norm_rows(const T* x, const T* residual, const T* weight, const T* bias, T* sum_out, T* out,
                     int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * n;
      load_row<T>(x + off, residual ? residual + off : nullptr, sum_out ? sum_out + off : nullptr, row.data(), n);
      float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
      for (int64_t i = 0; i < n; ++i) mean += row[i];
      mean /= static_cast<float>(n);
#pragma omp simd reduction(+ : var)
      for (int64_t i = 0; i < n; ++i) var += (row[i] - mean) * (row[i] - mean);
      const float inv = 1.f / std::sqrt(var / static_cast<float>(n) + eps);
      for (int64_t i = 0; i < n; ++i) {
        float y = (row[i] - mean) * inv;
        if (weight) y *= to_float(weight[i]);
        if (bias) y += to_float(bias[i]);
        out[off + i] = from_float<T>(y);
      }
    }
  });
}

void check_norm_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual) {
  HE_CHECK_CPU(x);
  HE_CHECK_CPU(weight);
  HE_CHECK_FLOAT(x);
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dim, got a scalar");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must have shape (", x.size(-1),
              ",), got ", weight.sizes());
  if (residual) {
    HE_CHECK_CPU(*residual);
    HE_CHECK_SAME_DTYPE(x, *residual);
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have the shape of x ", x.sizes(), ", got ",
                residual->sizes());
  }
}

std::vector<at::Tensor> rms_norm_impl(const at::Tensor& x_in, const at::Tensor& weight_in, double eps,
                                      const std::optional<at::Tensor>& residual_in) {
  check_norm_inputs(x_in, weight_in, residual_in);
  const bool same = weight_in.scalar_type() == x_in.scalar_type();
  TORCH_CHECK(same || weight_in.scalar_type() == at::kFloat, "weight must be float32 or the dtype of x (",
              x_in.scalar_type(), "), got ", weight_in.scalar_type());
  if (x_in.numel() == 0) {  // an empty batch: empty outputs, and no rows_view (-1 rows is ambiguous at N = 0)
    at::Tensor out = at::empty(x_in.sizes(), x_in.options().dtype(weight_in.scalar_type()));
    if (!residual_in) return {out};
    return {out, at::empty_like(x_in)};
  }
  const at::Tensor x = rows_view(x_in), weight = weight_in.contiguous();
  const at::Tensor residual = residual_in ? rows_view(*residual_in) : at::Tensor();
  at::Tensor sum = residual_in ? at::empty_like(x) : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(weight.scalar_type()));  // the reference's promotion
  const int64_t rows = x.size(0), n = x.size(1);
  HE_DISPATCH_FLOAT(x.scalar_type(), "rms_norm", [&] {
    const scalar_t* res = residual_in ? residual.data_ptr<scalar_t>() : nullptr;
    scalar_t* sum_ptr = residual_in ? sum.data_ptr<scalar_t>() : nullptr;
    if (same)
      rms_norm_rows<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), res, weight.data_ptr<scalar_t>(), sum_ptr,
                                        out.data_ptr<scalar_t>(), rows, n, static_cast<float>(eps));
    else
      rms_norm_rows<scalar_t, float>(x.data_ptr<scalar_t>(), res, weight.data_ptr<float>(), sum_ptr,
                                     out.data_ptr<float>(), rows, n, static_cast<float>(eps));
  });
  out = out.view(x_in.sizes());
  if (!residual_in) return {out};
  return {out, sum.view(x_in.sizes())};
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_impl(x, weight, eps, std::nullopt)[0];
}

std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                     const at::Tensor& residual) {
  auto outs = rms_norm_impl(x, weight, eps, residual);
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor> layer_norm_any(const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in,
                                                  const std::optional<at::Tensor>& bias_in, double eps,
                                                  const std::optional<at::Tensor>& residual_in) {
  HE_CHECK_CPU(x_in);
  HE_CHECK_FLOAT(x_in);
  TORCH_CHECK(x_in.dim() >= 1, "x must have at least 1 dim, got a scalar");
  for (const auto* p : {&weight_in, &bias_in}) {
    if (!*p) continue;
    HE_CHECK_CPU(**p);
    TORCH_CHECK((*p)->scalar_type() == x_in.scalar_type(), "layer_norm weight and bias must have the dtype of x (",
                x_in.scalar_type(), "), got ", (*p)->scalar_type());
    TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == x_in.size(-1), "layer_norm weight and bias must have shape (",
                x_in.size(-1), ",), got ", (*p)->sizes());
  }
  if (residual_in) {
    HE_CHECK_CPU(*residual_in);
    HE_CHECK_SAME_DTYPE(x_in, *residual_in);
    TORCH_CHECK(residual_in->sizes() == x_in.sizes(), "residual must have the shape of x ", x_in.sizes(),
                ", got ", residual_in->sizes());
  }
  if (x_in.numel() == 0)  // an empty batch: empty outputs, and no rows_view (-1 rows is ambiguous at N = 0)
    return {at::empty_like(x_in), residual_in ? at::empty_like(x_in) : at::Tensor()};
  const at::Tensor x = rows_view(x_in);
  const at::Tensor weight = weight_in ? weight_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();
  const at::Tensor residual = residual_in ? rows_view(*residual_in) : at::Tensor();
  at::Tensor sum = residual_in ? at::empty_like(x) : at::Tensor();
  at::Tensor out = at::empty_like(x);
  HE_DISPATCH_FLOAT(x.scalar_type(), "layer_norm", [&] {
    layer_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual_in ? residual.data_ptr<scalar_t>() : nullptr,
                              weight_in ? weight.data_ptr<scalar_t>() : nullptr,
                              bias_in ? bias.data_ptr<scalar_t>() : nullptr,
                              residual_in ? sum.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                              x.size(0), x.size(1), static_cast<float>(eps));
  });
  return {out.view(x_in.sizes()), residual_in ? sum.view(x_in.sizes()) : at::Tensor()};
}

}  // namespace hybrid_engine_cpu
