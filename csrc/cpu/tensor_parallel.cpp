// Tensor-parallel weight pack/unpack on CPU: rank `rank`'s part of every segment of a fused weight copied in
// one pass (one call instead of one narrow+copy_ pair per segment).
#include "common.h"

#include <cstring>

namespace hybrid_engine_cpu {
namespace {

// Copies between `full` viewed as (outer, F, inner) and `shard` as (outer, S, inner), S = sum(splits) / world.
void tp_copy(const at::Tensor& full, const at::Tensor& shard, int64_t rank, int64_t world,
             const std::vector<int64_t>& splits, int64_t dim, bool to_shard) {
  for (const at::Tensor* t : {&full, &shard}) {
    HE_CHECK_CPU(*t);
    HE_CHECK_CONTIGUOUS(*t);
  }
  HE_CHECK_SAME_DTYPE(full, shard);
  TORCH_CHECK(full.dim() == shard.dim() && full.dim() >= 1, "full and shard must have the same number of dims");
  if (dim < 0) dim += full.dim();
  TORCH_CHECK(dim >= 0 && dim < full.dim(), "dim out of range for a ", full.dim(), "-dim tensor");
  TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "rank must be in [0, world = ", world, "), got ", rank);
  int64_t total = 0, shard_total = 0;
  for (int64_t size : splits) {
    TORCH_CHECK(size >= 0 && size % world == 0, "every split must be a multiple of world = ", world, ", got ",
                size);
    total += size;
    shard_total += size / world;
  }
  TORCH_CHECK(total == full.size(dim), "splits sum to ", total, " but full.size(", dim, ") = ", full.size(dim));
  for (int64_t d = 0; d < full.dim(); ++d) {
    const int64_t want = d == dim ? shard_total : full.size(d);
    TORCH_CHECK(shard.size(d) == want, "shard must have size ", want, " in dim ", d, ", got shape ", shard.sizes());
  }
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= full.size(d);
  for (int64_t d = dim + 1; d < full.dim(); ++d) inner *= full.size(d);
  const int64_t elem = full.element_size();
  char* fp = static_cast<char*>(full.data_ptr());
  char* sp = static_cast<char*>(shard.data_ptr());
  const int64_t fstride = total * inner * elem, sstride = shard_total * inner * elem;
  // Grain: ~64 KB of copies per task, so small weights stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, sstride));
  at::parallel_for(0, outer, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      int64_t off = 0, out = 0;
      for (int64_t size : splits) {
        const int64_t part = size / world;
        char* f = fp + o * fstride + (off + rank * part) * inner * elem;
        char* s = sp + o * sstride + out * inner * elem;
        const size_t bytes = static_cast<size_t>(part * inner * elem);
        if (to_shard) std::memcpy(s, f, bytes);
        else std::memcpy(f, s, bytes);
        out += part;
        off += size;
      }
    }
  });
}

}  // namespace

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

}  // namespace hybrid_engine_cpu
