"""Backend choice: auto picks the fastest that loads and warns once when it falls back; an explicit backend
that cannot load raises naming the ops and why; backends() reports the truth; the builder names what is missing."""
import warnings

import pytest
import torch

from hybrid_engine import ops as ops_lib
from hybrid_engine.ops import builder


@pytest.fixture
def fresh(monkeypatch):
    """An empty selection cache and warn-once set, restored afterwards."""
    monkeypatch.setattr(ops_lib, "_CACHE", {})
    monkeypatch.setattr(ops_lib, "_WARNED", set())


def test_torch_backend_is_the_reference(fresh):
    chosen = ops_lib.select("torch", "cpu")
    assert chosen.rms_norm is ops_lib.reference.rms_norm
    assert set(ops_lib.backends("torch")) == set(ops_lib.OP_NAMES)
    assert {b for b, _ in ops_lib.backends("torch").values()} == {"torch"}


def test_auto_on_cpu_uses_the_cpp_twins(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back here: no warning
        choices = ops_lib.backends("auto", "cpu")
    # every op on the C++ twins except where a measurement says torch is faster (prefill: SDPA's flash kernel)
    assert {name: b for name, (b, _) in choices.items()} == {
        name: ("torch" if ("cpu", name) in ops_lib.AUTO_PREFER else "cpu") for name in ops_lib.OP_NAMES}


def test_environment_variable_picks_the_backend(fresh, monkeypatch):
    monkeypatch.setenv("HYBRID_ENGINE_KERNELS", "torch")
    assert {b for b, _ in ops_lib.backends(None, "cpu").values()} == {"torch"}
    monkeypatch.setenv("HYBRID_ENGINE_KERNELS", "fastest")
    with pytest.raises(ValueError, match="auto, cuda, triton, cpu, torch"):
        ops_lib.select(None, "cpu")


def test_auto_warns_once_and_falls_back_when_the_build_fails(fresh, monkeypatch):
    def broken(self, verbose=False):
        raise builder.BuildError(f"{self.name}: no C++ compiler: 'c++' not found on PATH")

    monkeypatch.setattr(builder.CpuOpsBuilder, "load", broken)
    with pytest.warns(RuntimeWarning, match="fell back.*no C\\+\\+ compiler"):
        choices = ops_lib.backends("auto", "cpu")
    assert {b for b, _ in choices.values()} == {"torch"}
    assert all("cpu unavailable" in why for _, why in choices.values())
    ops_lib._CACHE.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        ops_lib.select("auto", "cpu")
    with pytest.raises(ops_lib.BackendError, match="kernels='cpu' on cpu: ops rms_norm.*no C\\+\\+ compiler"):
        ops_lib.select("cpu", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_explicit_cuda_without_a_gpu_raises(fresh):
    with pytest.raises(ops_lib.BackendError, match="kernels='cuda' on cpu: ops rms_norm, .*CUDA tensors"):
        ops_lib.select("cuda", "cpu")
    with pytest.raises(ops_lib.BackendError, match="kernels='cpu' on cuda"):
        ops_lib.select("cpu", "cuda")


def test_builder_names_a_missing_ninja(monkeypatch):
    from torch.utils import cpp_extension

    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", no_ninja)
    with pytest.raises(builder.BuildError, match="ninja is required"):
        builder.CpuOpsBuilder()._check_toolchain()


def test_builder_names_a_missing_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(builder.BuildError, match="no C\\+\\+ compiler.*nonexistent"):
        builder.CpuOpsBuilder()._check_toolchain()


def test_builder_declares_its_sources_and_flags():
    cpu = builder.CpuOpsBuilder()
    assert all(p.exists() for p in cpu.sources()) and cpu.is_compatible() == (True, "ok")
    assert "-fopenmp" in cpu.cxx_flags() and "-O3" in cpu.cxx_flags()
    cuda = builder.CudaOpsBuilder()
    assert all(p.exists() for p in cuda.sources())
    ok, reason = cuda.is_compatible()
    assert ok == torch.cuda.is_available() or "nvcc" in reason


def test_arch_flags_follow_torch_cuda_arch_list(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert builder.cuda_arch_flags() == ["-gencode=arch=compute_80,code=sm_80",
                                         "-gencode=arch=compute_90,code=sm_90",
                                         "-gencode=arch=compute_90,code=compute_90"]
