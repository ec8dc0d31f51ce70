"""Backend choice: auto picks the fastest that loads and warns once when it falls back; an explicit backend
that cannot load raises naming the ops and why; backends() reports the truth; the builder names what is missing."""
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hybrid_engine import ops as ops_lib
from hybrid_engine.ops import builder

# What kernels="auto" takes per op, written out (not derived from ops/specs.py): on CPU the C++ twins except
# prefill (torch's SDPA measured faster); on CUDA the CUDA kernels where there is one, except decode (Triton's
# until a benchmark shows the CUDA one faster), and Triton for the norms and prefill. The grouped experts of a
# mixture-of-experts layer are torch ops on every device.
AUTO_ON_CPU = {"rms_norm": "cpu", "layer_norm": "cpu", "rotary_kv_append": "cpu", "prefill_attention": "torch",
               "decode_attention": "cpu", "tp_pack": "cpu", "tp_unpack": "cpu", "moe_experts": "torch"}
AUTO_ON_CUDA = {"rms_norm": "triton", "layer_norm": "triton", "rotary_kv_append": "cuda",
                "prefill_attention": "triton", "decode_attention": "triton", "tp_pack": "cuda", "tp_unpack": "cuda",
                "moe_experts": "torch"}
AUTO_ON_CUDA_WITHOUT_TRITON = {"rms_norm": "torch", "layer_norm": "torch", "rotary_kv_append": "cuda",
                               "prefill_attention": "torch", "decode_attention": "cuda", "tp_pack": "cuda",
                               "tp_unpack": "cuda", "moe_experts": "torch"}


@pytest.fixture
def fresh(monkeypatch):
    """An empty selection cache and warn-once set, restored afterwards."""
    monkeypatch.setattr(ops_lib, "_CACHE", {})
    monkeypatch.setattr(ops_lib, "_WARNED", set())


@pytest.fixture
def fresh_builds(monkeypatch, tmp_path):
    """No extension loaded or failed yet in this process, builds under tmp_path, the toolchain taken as present."""
    monkeypatch.setattr(builder, "_LOADED", {})
    monkeypatch.setattr(builder, "_FAILED", {})
    monkeypatch.setenv("HYBRID_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(builder.OpBuilder, "_check_toolchain", lambda self: None)


def chosen(choices: dict) -> dict:
    return {name: backend for name, (backend, _) in choices.items()}


def backend_of(fn) -> str:
    """The backend a stand-in of fake_gpu_backends names; the torch backend's functions are the references."""
    return getattr(fn, "backend", "torch")


def fake_gpu_backends(monkeypatch, triton_loads: bool = True) -> None:
    """Loaders that serve device "cuda" on this CPU machine: the CUDA extension's four functions and every
    Triton op, each a stand-in named after its backend (nothing is called)."""
    cuda_ops = ("rotary_kv_append", "decode_attention", "tp_pack", "tp_unpack")  # csrc/cuda_bindings.cpp's
    ext = SimpleNamespace(**{name: SimpleNamespace(backend="cuda") for name in cuda_ops})
    monkeypatch.setattr(builder.CudaOpsBuilder, "load", lambda self, verbose=False: ext)

    def load_triton(device):
        if not triton_loads:
            raise builder.BuildError("triton: cannot import the Triton kernels (no module named 'triton')")
        return {name: SimpleNamespace(backend="triton") for name in ops_lib.OP_NAMES}

    monkeypatch.setattr(ops_lib, "_load_triton", load_triton)


def test_torch_backend_is_the_reference(fresh):
    chosen = ops_lib.select("torch", "cpu")
    assert chosen.rms_norm is ops_lib.reference.rms_norm
    assert set(ops_lib.backends("torch")) == set(ops_lib.OP_NAMES)
    assert {b for b, _ in ops_lib.backends("torch").values()} == {"torch"}


def test_auto_on_cpu_uses_the_cpp_twins(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back here: no warning
        choices = ops_lib.backends("auto", "cpu")
    assert chosen(choices) == AUTO_ON_CPU
    assert "measured faster" in choices["prefill_attention"][1]


def test_auto_on_cuda_takes_the_triton_decode(fresh, monkeypatch):
    fake_gpu_backends(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything loads: no warning
        chosen_ops = ops_lib.select("auto", "cuda")
    assert chosen(chosen_ops.choices) == AUTO_ON_CUDA
    assert {name: backend_of(getattr(chosen_ops, name)) for name in ops_lib.OP_NAMES} == AUTO_ON_CUDA
    assert "until benchmarks/kernel_speed.py shows the CUDA one faster" in chosen_ops.choices["decode_attention"][1]


def test_auto_on_cuda_without_triton_falls_back_per_op(fresh, monkeypatch):
    fake_gpu_backends(monkeypatch, triton_loads=False)
    with pytest.warns(RuntimeWarning, match="auto' on cuda fell back.*no module named 'triton'"):
        choices = ops_lib.backends("auto", "cuda")
    assert chosen(choices) == AUTO_ON_CUDA_WITHOUT_TRITON


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
    assert set(chosen(choices).values()) == {"torch"}
    assert all("cpu unavailable" in why for _, why in choices.values())
    ops_lib._CACHE.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        ops_lib.select("auto", "cpu")
    with pytest.raises(ops_lib.BackendError, match="kernels='cpu' on cpu: ops rms_norm.*no C\\+\\+ compiler"):
        ops_lib.select("cpu", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_explicit_cuda_without_a_gpu_raises(fresh):
    with pytest.raises(ops_lib.BackendError, match="kernels='cuda' on cpu: ops rotary_kv_append, .*CUDA tensors"):
        ops_lib.select("cuda", "cpu")
    with pytest.raises(ops_lib.BackendError, match="kernels='cpu' on cuda"):
        ops_lib.select("cpu", "cuda")


def test_a_failed_build_is_tried_once(fresh_builds, monkeypatch):
    """pytest -m gpu selects ~350 times: a broken build must fail once, then raise the same error at once."""
    from torch.utils import cpp_extension

    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("Error building extension 'hybrid_engine_cpu_ops': ninja exited with status 1")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(builder.BuildError, match="build failed in .*ninja exited") as first:
        builder.CpuOpsBuilder().load()
    with pytest.raises(builder.BuildError) as second:
        builder.CpuOpsBuilder().load()  # a new builder object: the failure is remembered per extension
    assert second.value is first.value and len(calls) == 1


def test_a_library_that_does_not_import_falls_back_once(fresh, fresh_builds, monkeypatch):
    """An ImportError from loading the built .so (an undefined symbol) is a BuildError like a failed compile:
    auto warns once and takes torch's references instead of crashing."""
    from torch.utils import cpp_extension

    calls = []

    def unloadable(**kwargs):
        calls.append(kwargs["name"])
        raise ImportError(f"{kwargs['name']}.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")

    monkeypatch.setattr(cpp_extension, "load", unloadable)
    with pytest.warns(RuntimeWarning, match="auto' on cpu fell back.*undefined symbol"):
        choices = ops_lib.backends("auto", "cpu")
    assert set(chosen(choices).values()) == {"torch"}
    ops_lib._CACHE.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        ops_lib.select("auto", "cpu")
    with pytest.raises(ops_lib.BackendError, match="kernels='cpu' on cpu: .*undefined symbol"):
        ops_lib.select("cpu", "cpu")
    assert len(calls) == 1


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


@pytest.mark.parametrize("triton_loads,helper", [(True, "triton"), (False, "torch")])
def test_explicit_cuda_serves_the_ops_it_lacks_from_their_own_tables(fresh, monkeypatch, triton_loads, helper):
    """ops/specs.py: the CUDA backend has no norm or prefill kernel, so their specs list no cuda backend and
    kernels="cuda" takes them from their auto order (Triton, else torch), saying so."""
    fake_gpu_backends(monkeypatch, triton_loads=triton_loads)
    chosen_ops = ops_lib.select("cuda", "cuda")
    lacking = ("rms_norm", "layer_norm", "prefill_attention")
    expected = {name: helper if name in lacking else "cuda" for name in ops_lib.OP_NAMES}
    expected["moe_experts"] = "torch"  # torch ops only: no Triton kernel either
    assert chosen(chosen_ops.choices) == expected
    if triton_loads:  # every function is a stand-in named after its backend (torch's are the references)
        assert {name: backend_of(getattr(chosen_ops, name)) for name in ops_lib.OP_NAMES} == expected
    assert "requested cuda has no rms_norm kernel; using " + helper in chosen_ops.choices["rms_norm"][1]


def test_build_dir_is_named_by_the_sources_not_their_path(monkeypatch, tmp_path):
    """Two checkouts of the same csrc/ share one build; a changed source (a planted fault, an edit) gets its own."""
    monkeypatch.setenv("HYBRID_ENGINE_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "a" / "csrc", tmp_path / "b" / "csrc"
    for copy in (first, second):
        shutil.copytree(builder.CSRC, copy)
    dirs = {}
    for copy in (first, second, builder.CSRC):
        monkeypatch.setattr(builder, "CSRC", copy)
        dirs[copy] = builder.CpuOpsBuilder().build_dir()
    assert len(set(dirs.values())) == 1
    norm = second / "cpu" / "norm.cpp"
    norm.write_text(norm.read_text() + "\n// edited\n")
    monkeypatch.setattr(builder, "CSRC", second)
    edited = builder.CpuOpsBuilder().build_dir()
    assert edited != dirs[first] and edited.parent == dirs[first].parent
    staged = builder.stage_sources(edited)  # compiled from its own copy, at a path that names its content
    assert (staged / "cpu" / "norm.cpp").read_text() == norm.read_text()
    assert builder.stage_sources(edited) == staged


def test_a_build_compiles_the_staged_copy(fresh_builds, monkeypatch):
    from torch.utils import cpp_extension

    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs)
        (Path(kwargs["build_directory"]) / f"{kwargs['name']}.so").write_bytes(b"built")
        return object()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    b = builder.CpuOpsBuilder()
    b.load()
    staged = b.build_dir() / "csrc"
    assert seen["build_directory"] == str(b.build_dir() / "build")
    assert seen["sources"] == [str(staged / p.relative_to(builder.CSRC)) for p in b.sources()]
    assert all(Path(s).is_file() for s in seen["sources"]) and seen["extra_include_paths"] == [str(staged)]
    assert b.library(b.build_dir()).read_bytes() == b"built" and not (b.build_dir() / "build").exists()
