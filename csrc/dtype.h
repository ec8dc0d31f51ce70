// The dtype tag shared by the CUDA launchers and their torch binding (plain C++, no CUDA or torch types).
#pragma once

namespace hybrid_engine_cuda {
enum class DType { kFloat32, kFloat16, kBFloat16 };
}  // namespace hybrid_engine_cuda
