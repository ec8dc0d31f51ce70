// Torch-facing side of the CUDA kernels: input checks, device guard, current stream, then the raw launchers
// of attention/decode_attention.cu and tensor_parallel/tp_pack.cu. Built only on GPU machines (it needs the
// c10/cuda headers a CUDA build of torch ships); the .cu files themselves compile with nvcc alone.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "attention/decode_attention.h"
#include "tensor_parallel/tp_pack.h"

namespace hybrid_engine_cuda {
namespace {

#define HE_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got ", (t).device())
#define HE_CHECK_LAST(t) TORCH_CHECK((t).stride(-1) == 1, #t " must be contiguous in its last dim")
#define HE_CHECK_CALL(call)                                                              \
  do {                                                                                   \
    cudaError_t err_ = (call);                                                           \
    TORCH_CHECK(err_ == cudaSuccess, #call " failed: ", cudaGetErrorString(err_));       \
  } while (0)

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": dtypes differ (", a.scalar_type(), " vs ",
              b.scalar_type(), ")");
  TORCH_CHECK(a.device() == b.device(), what, ": devices differ (", a.device(), " vs ", b.device(), ")");
}

at::Tensor rotary_kv_append(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in,
                            at::Tensor k_cache, at::Tensor v_cache, int64_t start,
                            const std::optional<at::Tensor>& row_start_in) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &k_cache, &v_cache}) {
    HE_CHECK_CUDA(*t);
    HE_CHECK_LAST(*t);
    TORCH_CHECK(t->dim() == 4, "q, k, v and the caches must have 4 dims, got ", t->sizes());
    check_same(q, *t, "rotary_kv_append");
  }
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == T && k.size(3) == D,
              "k, v must be (B, T, Hkv, D) = (", B, ", ", T, ", Hkv, ", D, "), got ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) >= B && k_cache.size(1) == Hkv &&
                  k_cache.size(3) == D, "k_cache must be (>= ", B, ", ", Hkv, ", S_max, ", D, "), got ",
              k_cache.sizes());
  at::Tensor row_start;
  if (row_start_in) {  // per-row offsets (continued rows): the kernel skips slots past S_max; no host read here
    row_start = row_start_in->contiguous();
    HE_CHECK_CUDA(row_start);
    TORCH_CHECK(row_start.scalar_type() == at::kLong && row_start.dim() == 1 && row_start.size(0) == B,
                "row_start must be int64 (B = ", B, "), got ", row_start.scalar_type(), " ", row_start.sizes());
    TORCH_CHECK(start >= 0, "start must be >= 0, got ", start);
  } else {
    TORCH_CHECK(start >= 0 && start + T <= k_cache.size(2), "slots [", start, ", ", start + T, ") exceed S_max ",
                k_cache.size(2));
  }
  TORCH_CHECK(cos_in.has_value() == sin_in.has_value(), "cos and sin must be given together");
  at::Tensor cos, sin;
  if (cos_in) {
    cos = cos_in->contiguous();
    sin = sin_in->contiguous();
    HE_CHECK_CUDA(cos);
    TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T && sin.sizes() == cos.sizes() &&
                    cos.size(2) % 2 == 0 && cos.size(2) <= D, "cos, sin must be (", B, ", ", T, ", R <= ", D,
                ", even), got ", cos.sizes(), ", ", sin.sizes());
    TORCH_CHECK(cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat,
                "cos must be float32 or the dtype of q, got ", cos.scalar_type());
    TORCH_CHECK(sin.scalar_type() == cos.scalar_type(), "cos and sin must have one dtype");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = cos_in ? at::empty(q.sizes(), q.options()) : q;
  RotaryAppendArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.cos = cos_in ? cos.data_ptr() : nullptr;
  a.sin = cos_in ? sin.data_ptr() : nullptr;
  a.cos_is_float32 = cos_in && cos.scalar_type() == at::kFloat;
  a.q_out = q_out.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.row_start = row_start_in ? row_start.data_ptr<int64_t>() : nullptr;
  a.B = B, a.T = T, a.H = H, a.Hkv = Hkv, a.D = D, a.rot = cos_in ? cos.size(2) : 0, a.start = start;
  a.S = k_cache.size(2);
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
    a.v_stride[i] = v.stride(i);
    a.cache_stride[i] = k_cache.stride(i);
  }
  TORCH_CHECK(k_cache.strides() == v_cache.strides(), "k_cache and v_cache must have the same strides");
  if (B == 0 || T == 0) return q_out;  // no token: a grid of B * T = 0 blocks is not a valid launch
  HE_CHECK_CALL(launch_rotary_kv_append(dtype_of(q), a, c10::cuda::getCurrentCUDAStream()));
  return q_out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& key_mask_in, int64_t length, double scale, double softcap) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k_cache, &v_cache}) {
    HE_CHECK_CUDA(*t);
    HE_CHECK_LAST(*t);
    check_same(q, *t, "decode_attention");
  }
  HE_CHECK_CUDA(key_mask_in);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be (B, H, D) and the caches (B_max, Hkv, S_max, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) >= B && k_cache.size(3) == D,
              "k_cache must be (>= ", B, ", Hkv, S_max, ", D, "), got ", k_cache.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && H / Hkv <= kMaxGroup, "query heads ", H, " must be a multiple of kv heads ",
              Hkv, " with at most ", kMaxGroup, " per group");
  TORCH_CHECK(D <= kMaxHeadDim, "head dim ", D, " exceeds ", kMaxHeadDim);
  TORCH_CHECK(length >= 1 && length <= k_cache.size(2), "length ", length, " not in [1, ", k_cache.size(2), "]");
  TORCH_CHECK(key_mask_in.scalar_type() == at::kBool && key_mask_in.dim() == 2 && key_mask_in.size(0) >= B &&
                  key_mask_in.size(1) >= length, "key_mask must be bool (>= ", B, ", >= ", length, "), got ",
              key_mask_in.scalar_type(), " ", key_mask_in.sizes());
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: off), got ", softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor key_mask = key_mask_in.stride(1) == 1 ? key_mask_in : key_mask_in.contiguous();
  at::Tensor out = at::empty({B, H, D}, q.options());
  if (B == 0) return out;  // before decode_chunk, which divides by B * Hkv
  DecodeArgs a{};
  int sms = 0;
  HE_CHECK_CALL(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  a.chunk = decode_chunk(length, B * Hkv, sms);
  a.splits = static_cast<int>((length + a.chunk - 1) / a.chunk);
  at::Tensor workspace = at::empty({static_cast<int64_t>(decode_workspace_floats(B, H, D, a.splits))},
                                   q.options().dtype(at::kFloat));
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.key_mask = key_mask.data_ptr<bool>();
  a.out = out.data_ptr();
  a.workspace = workspace.numel() ? workspace.data_ptr<float>() : nullptr;
  a.B = B, a.H = H, a.Hkv = Hkv, a.D = D, a.length = length, a.mask_stride = key_mask.stride(0);
  a.q_stride[0] = q.stride(0), a.q_stride[1] = q.stride(1);
  for (int i = 0; i < 3; ++i) a.k_stride[i] = k_cache.stride(i), a.v_stride[i] = v_cache.stride(i);
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  HE_CHECK_CALL(launch_decode_attention(dtype_of(q), a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

void tp_copy(const at::Tensor& full, const at::Tensor& shard, int64_t rank, int64_t world,
             const std::vector<int64_t>& splits, int64_t dim, bool to_shard) {
  HE_CHECK_CUDA(full);
  HE_CHECK_CUDA(shard);
  check_same(full, shard, "tp_pack");
  TORCH_CHECK(full.is_contiguous() && shard.is_contiguous(), "full and shard must be contiguous");
  TORCH_CHECK(full.dim() == shard.dim() && full.dim() >= 1, "full and shard must have the same number of dims");
  if (dim < 0) dim += full.dim();
  TORCH_CHECK(dim >= 0 && dim < full.dim(), "dim out of range");
  TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "rank must be in [0, ", world, "), got ", rank);
  TORCH_CHECK(static_cast<int>(splits.size()) <= kMaxSegments, "at most ", kMaxSegments, " splits");
  int64_t total = 0, shard_total = 0;
  for (int64_t s : splits) {
    TORCH_CHECK(s >= 0 && s % world == 0, "every split must be a multiple of world = ", world, ", got ", s);
    total += s;
    shard_total += s / world;
  }
  TORCH_CHECK(total == full.size(dim), "splits sum to ", total, " but full.size(", dim, ") = ", full.size(dim));
  for (int64_t d = 0; d < full.dim(); ++d)
    TORCH_CHECK(shard.size(d) == (d == dim ? shard_total : full.size(d)), "shard has shape ", shard.sizes(),
                "; expected ", shard_total, " in dim ", dim, " and full's sizes elsewhere");
  if (full.numel() == 0) return;  // an empty batch of rows (or an empty weight): nothing to copy, no launch
  int64_t outer = 1, inner = full.element_size();
  for (int64_t d = 0; d < dim; ++d) outer *= full.size(d);
  for (int64_t d = dim + 1; d < full.dim(); ++d) inner *= full.size(d);
  TpCopyArgs a{};
  a.outer = outer;
  a.segments = static_cast<int>(splits.size());
  const int64_t full_row = total * inner, shard_row = shard_total * inner;
  int64_t off = 0, out = 0;
  for (size_t i = 0; i < splits.size(); ++i) {
    const int64_t part = splits[i] / world;
    const int64_t f = (off + rank * part) * inner, s = out * inner;
    a.src_offset[i] = to_shard ? f : s;
    a.dst_offset[i] = to_shard ? s : f;
    a.bytes[i] = part * inner;
    off += splits[i];
    out += part;
  }
  a.full_or_shard = static_cast<const char*>(to_shard ? full.data_ptr() : shard.data_ptr());
  a.dst = static_cast<char*>(to_shard ? shard.data_ptr() : full.data_ptr());
  a.src_row_bytes = to_shard ? full_row : shard_row;
  a.dst_row_bytes = to_shard ? shard_row : full_row;
  const c10::cuda::CUDAGuard guard(full.device());
  HE_CHECK_CALL(launch_tp_copy(a, c10::cuda::getCurrentCUDAStream()));
}

at::Tensor tp_pack(const at::Tensor& full, at::Tensor shard, int64_t rank, int64_t world,
                   const std::vector<int64_t>& splits, int64_t dim) {
  tp_copy(full, shard, rank, world, splits, dim, true);
  return shard;
}

at::Tensor tp_unpack(const at::Tensor& shard, at::Tensor full, int64_t rank, int64_t world,
                     const std::vector<int64_t>& splits, int64_t dim) {
  tp_copy(full, shard, rank, world, splits, dim, false);
  return full;
}

}  // namespace
}  // namespace hybrid_engine_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace ops = hybrid_engine_cuda;
  using pybind11::arg;
  m.def("rotary_kv_append", &ops::rotary_kv_append, "rotary on q, k and the KV-cache write", arg("q"), arg("k"),
        arg("v"), arg("cos"), arg("sin"), arg("k_cache"), arg("v_cache"), arg("start"),
        arg("row_start") = pybind11::none());
  m.def("decode_attention", &ops::decode_attention, "one query per row against the KV cache (split-K)", arg("q"),
        arg("k_cache"), arg("v_cache"), arg("key_mask"), arg("length"), arg("scale"), arg("softcap") = 0.0);
  m.def("tp_pack", &ops::tp_pack, "copy rank's slice of every segment of full into shard", arg("full"),
        arg("shard"), arg("rank"), arg("world"), arg("splits"), arg("dim") = 0);
  m.def("tp_unpack", &ops::tp_unpack, "copy shard back into rank's slice of every segment of full", arg("shard"),
        arg("full"), arg("rank"), arg("world"), arg("splits"), arg("dim") = 0);
}
