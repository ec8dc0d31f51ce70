// The one CPU extension: every C++ CPU twin in one module, so CI pays for one JIT build (~40 s on 2 cores).
// Plain pybind11 functions rather than torch.library ops: ~1 us per call instead of ~5-10 us through the
// dispatcher, which matters at decode shapes where each op's work is a few microseconds.
#include <torch/extension.h>

#include "common.h"

namespace hybrid_engine_cpu {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                     const at::Tensor& residual);
std::tuple<at::Tensor, at::Tensor> layer_norm_any(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                  const std::optional<at::Tensor>& bias, double eps,
                                                  const std::optional<at::Tensor>& residual);
at::Tensor rotary_kv_append(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                            at::Tensor k_cache, at::Tensor v_cache, int64_t start,
                            const std::optional<at::Tensor>& row_start);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& key_mask, int64_t length, double scale, double softcap);
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& key_mask, double scale, std::optional<int64_t> sliding_window,
                             double softcap, const std::optional<at::Tensor>& q_start);
at::Tensor tp_pack(const at::Tensor& full, at::Tensor shard, int64_t rank, int64_t world,
                   const std::vector<int64_t>& splits, int64_t dim);
at::Tensor tp_unpack(const at::Tensor& shard, at::Tensor full, int64_t rank, int64_t world,
                     const std::vector<int64_t>& splits, int64_t dim);
}  // namespace hybrid_engine_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace ops = hybrid_engine_cpu;
  using pybind11::arg;
  m.def("rms_norm", &ops::rms_norm, "RMSNorm", arg("x"), arg("weight"), arg("eps"));
  m.def("rms_norm_residual", &ops::rms_norm_residual, "residual add + RMSNorm -> (out, x + residual)", arg("x"),
        arg("weight"), arg("eps"), arg("residual"));
  m.def("layer_norm", &ops::layer_norm_any, "[residual add +] LayerNorm -> (out, x + residual or undefined)",
        arg("x"), arg("weight"), arg("bias"), arg("eps"), arg("residual"));
  m.def("rotary_kv_append", &ops::rotary_kv_append, "rotary on q, k and the KV-cache write", arg("q"), arg("k"),
        arg("v"), arg("cos"), arg("sin"), arg("k_cache"), arg("v_cache"), arg("start"),
        arg("row_start") = pybind11::none());
  m.def("decode_attention", &ops::decode_attention, "one query per row against the KV cache", arg("q"),
        arg("k_cache"), arg("v_cache"), arg("key_mask"), arg("length"), arg("scale"), arg("softcap") = 0.0);
  m.def("prefill_attention", &ops::prefill_attention, "causal attention over a left-padded block", arg("q"),
        arg("k"), arg("v"), arg("key_mask"), arg("scale"), arg("sliding_window"), arg("softcap") = 0.0,
        arg("q_start") = pybind11::none());
  m.def("tp_pack", &ops::tp_pack, "copy rank's slice of every segment of full into shard", arg("full"),
        arg("shard"), arg("rank"), arg("world"), arg("splits"), arg("dim") = 0);
  m.def("tp_unpack", &ops::tp_unpack, "copy shard back into rank's slice of every segment of full", arg("shard"),
        arg("full"), arg("rank"), arg("world"), arg("splits"), arg("dim") = 0);
}
