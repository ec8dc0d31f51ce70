"""Op builder: JIT-compile the C++/CUDA sources under csrc/ with ninja, in the manner of DeepSpeed's op_builder.

Each builder declares its `sources()`, `include_paths()`, `cxx_flags()`, `nvcc_flags()` and `is_compatible()`;
`load()` checks the toolchain, compiles once through `torch.utils.cpp_extension.load` into
`$HYBRID_ENGINE_CACHE` (default `~/.cache/hybrid_engine/`), in a folder named by the sources' content (every
checkout of the same sources shares it), and caches the module for the process; a failure is
cached too, so the next `load()` raises the same BuildError at once instead of compiling again. Two
builders exist, named here and nowhere else: `CpuOpsBuilder` (every C++ CPU twin in one extension, so CI pays
for one build) and `CudaOpsBuilder` (the CUDA kernels plus their thin torch binding, GPU machines only).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

# An installed package carries the sources as hybrid_engine/csrc (setup.py maps csrc/ there); a checkout or an
# editable install finds the repository's csrc/, next to hybrid_engine/.
_PACKAGE = Path(__file__).resolve().parents[1]
CSRC = next((p for p in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc") if p.is_dir()), _PACKAGE.parent / "csrc")


class BuildError(RuntimeError):
    """An op could not be built or loaded: the message says what is missing."""


_LOADED: dict[str, object] = {}  # builder name -> loaded module, so each extension is built/loaded once
# builder name -> why it could not be built or loaded: a broken build fails once per process, not once per
# select() (pytest -m gpu selects ~350 times; each retry recompiled for ~1 minute before failing the same way).
_FAILED: dict[str, BuildError] = {}


def cache_dir() -> Path:
    """Where the JIT builds live: $HYBRID_ENGINE_CACHE or ~/.cache/hybrid_engine, one folder per torch version."""
    root = os.environ.get("HYBRID_ENGINE_CACHE") or Path.home() / ".cache" / "hybrid_engine"
    return Path(root) / f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


class OpBuilder:
    """One extension: its sources and flags, a compatibility check, and a cached load()."""

    name = ""

    def sources(self) -> list[Path]:
        raise NotImplementedError

    def include_paths(self) -> list[Path]:
        return [CSRC]

    def cxx_flags(self) -> list[str]:
        return ["-O3"]

    def nvcc_flags(self) -> list[str]:
        return []

    def ldflags(self) -> list[str]:
        return []

    def is_compatible(self) -> tuple[bool, str]:
        """(ok, reason): whether this machine can build and run the op, and why not."""
        missing = [str(p) for p in self.sources() if not p.exists()]
        if missing:
            return False, f"{self.name}: sources not found: {', '.join(missing)}"
        return True, "ok"

    def _check_toolchain(self) -> None:
        from torch.utils import cpp_extension

        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError as err:
            raise BuildError(f"{self.name}: ninja is required to JIT-compile C++ ops (pip install ninja)") from err
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise BuildError(f"{self.name}: no C++ compiler: {cxx!r} not found on PATH (install g++ or set CXX)")

    def load(self, verbose: bool = False):
        """Compile (first call on a machine, ~40 s) or load (later calls) the extension; cached per process,
        and so is a failure: later calls raise the first call's BuildError without trying again."""
        if self.name in _LOADED:
            return _LOADED[self.name]
        if self.name in _FAILED:
            raise _FAILED[self.name].with_traceback(None)  # no traceback piling up over repeated raises
        try:
            module = self._build(verbose)
        except BuildError as err:
            _FAILED[self.name] = err
            raise
        _LOADED[self.name] = module
        return module

    def build_dir(self) -> Path:
        """The cache folder of this extension's build, named by a hash of the csrc/ tree and the flags: every
        checkout with the same sources shares one build (compiled from a copy of the sources staged inside it,
        so ninja sees the same paths), and a changed source or flag gets a folder of its own."""
        digest = hashlib.sha256(repr((self.cxx_flags(), self.nvcc_flags(), self.ldflags())).encode())
        for path in _tree(CSRC):
            digest.update(str(path.relative_to(CSRC)).encode() + b"\0" + path.read_bytes() + b"\0")
        return cache_dir() / f"{self.name}-{digest.hexdigest()[:16]}"

    def _build(self, verbose: bool):
        ok, reason = self.is_compatible()
        if not ok:
            raise BuildError(reason)
        self._check_toolchain()
        from torch.utils import cpp_extension

        build_dir = self.build_dir()
        staged = stage_sources(build_dir)
        try:
            return cpp_extension.load(
                name=self.name, sources=[str(staged / p.relative_to(CSRC)) for p in self.sources()],
                extra_include_paths=[str(staged / p.relative_to(CSRC)) for p in self.include_paths()],
                extra_cflags=self.cxx_flags(),
                extra_cuda_cflags=self.nvcc_flags(), extra_ldflags=self.ldflags(),
                build_directory=str(build_dir), verbose=verbose)
        except (RuntimeError, OSError, ImportError) as err:
            # ImportError: the .so built but does not load (an undefined symbol, a torch ABI mismatch)
            raise BuildError(f"{self.name}: build failed in {build_dir}: {err}") from err


def _tree(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def stage_sources(build_dir: Path) -> Path:
    """build_dir/csrc: a copy of the csrc/ tree (made once, by whichever process gets there first; the folder's
    name already says its content)."""
    staged = build_dir / "csrc"
    if staged.is_dir():
        return staged
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / f".csrc-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(CSRC, tmp)
    try:
        tmp.rename(staged)
    except OSError:  # another process staged it first
        shutil.rmtree(tmp, ignore_errors=True)
    return staged


class CpuOpsBuilder(OpBuilder):
    """Every C++ CPU twin (norms, rotary + cache append, decode/prefill attention, TP pack/unpack)."""

    def __init__(self) -> None:
        # AVX2+FMA code only where the CPU has both; the name keeps such a build apart in a shared cache.
        self.simd = ["-mavx2", "-mfma"] if {"avx2", "fma"} <= _cpu_flags() else []
        self.name = "hybrid_engine_cpu_ops" + ("_avx2" if self.simd else "")

    def sources(self) -> list[Path]:
        cpu = CSRC / "cpu"
        names = ("bindings.cpp", "norm.cpp", "rotary.cpp", "attention.cpp", "tensor_parallel.cpp")
        return [cpu / name for name in names]

    def cxx_flags(self) -> list[str]:
        # OpenMP: at::parallel_for's threads and `omp simd` reductions (fp32 sums vectorised without -ffast-math).
        return super().cxx_flags() + ["-fopenmp"] + self.simd

    def ldflags(self) -> list[str]:
        return ["-fopenmp"]


def cuda_arch_flags() -> list[str]:
    """-gencode flags from TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"), else from every visible GPU."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        archs = [a.strip() for a in env.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    else:
        archs = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i))
                        for i in range(torch.cuda.device_count())})
    flags = []
    for arch in archs:
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


class CudaOpsBuilder(OpBuilder):
    """The CUDA kernels (decode attention, rotary + cache append, TP pack/unpack) and their torch binding."""

    name = "hybrid_engine_cuda_ops"

    def sources(self) -> list[Path]:
        return [CSRC / "cuda_bindings.cpp", CSRC / "attention" / "decode_attention.cu",
                CSRC / "tensor_parallel" / "tp_pack.cu"]

    def nvcc_flags(self) -> list[str]:
        return ["-O3", "-lineinfo"] + cuda_arch_flags()

    def is_compatible(self) -> tuple[bool, str]:
        if torch.version.cuda is None:
            return False, f"{self.name}: this torch ({torch.__version__}) is built without CUDA"
        if not torch.cuda.is_available():
            return False, f"{self.name}: no CUDA GPU visible"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            return False, f"{self.name}: nvcc not found (set CUDA_HOME to a CUDA toolkit)"
        return super().is_compatible()
