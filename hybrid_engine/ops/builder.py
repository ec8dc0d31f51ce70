"""Op builder: JIT-compile the C++/CUDA sources under csrc/ with ninja, in the manner of DeepSpeed's op_builder.

Each builder declares its `sources()`, `include_paths()`, `cxx_flags()`, `nvcc_flags()` and `is_compatible()`;
`load()` loads the extension's library from `$HYBRID_ENGINE_CACHE` (default `~/.cache/hybrid_engine/`) when it
is built already, else compiles it once through `torch.utils.cpp_extension.load`, and caches the module for the
process; a failure is cached too, so the next `load()` raises the same BuildError at once instead of compiling
again. Two builders exist, named here and nowhere else: `CpuOpsBuilder` (every C++ CPU twin in one extension,
so CI pays for one build) and `CudaOpsBuilder` (the CUDA kernels plus their thin torch binding, GPU machines
only).

The cache folder of a build is named by a hash of everything that changes the library (`key_inputs()`): the
content of csrc/, torch's version and build (git hash, CUDA version, C++11 ABI), the Python version and ABI, the
compiler and its version, and the flags; not the paths of the checkout or of the virtualenv's torch headers.
So every checkout and every virtualenv with the same torch build shares one library, and loads it directly
(importlib, no ninja: torch's build.ninja embeds the venv's include path, so handing the folder to ninja again
from a second venv recompiled everything, 70-110 s), while a changed source, torch or compiler gets a folder of
its own. A build runs under an OS file lock (released when its holder dies, unlike torch's lock file, which a
killed build leaves behind for every later process to wait on), in a scratch folder wiped first, and publishes
the library by an atomic rename: a killed build never leaves a half library that a later process loads.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path

import torch

# An installed package carries the sources as hybrid_engine/csrc (setup.py maps csrc/ there); a checkout or an
# editable install finds the repository's csrc/, next to hybrid_engine/.
_PACKAGE = Path(__file__).resolve().parents[1]
CSRC = next((p for p in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc") if p.is_dir()), _PACKAGE.parent / "csrc")
COMPILING = "compiling hybrid_engine C++ ops (first use, about a minute)"  # the one line a cold build prints


class BuildError(RuntimeError):
    """An op could not be built or loaded: the message says what is missing."""


_LOADED: dict[str, object] = {}  # builder name -> loaded module, so each extension is built/loaded once
# builder name -> why it could not be built or loaded: a broken build fails once per process, not once per
# select() (pytest -m gpu selects ~350 times; each retry recompiled for ~1 minute before failing the same way).
_FAILED: dict[str, BuildError] = {}


def cache_dir() -> Path:
    """Where the JIT builds live: $HYBRID_ENGINE_CACHE or ~/.cache/hybrid_engine, one folder per torch version
    (for finding and clearing old builds by eye; the build key tells builds apart)."""
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


def tool_identity(program: str) -> str:
    """`program`'s resolved path and its `--version`, or that it is not found."""
    path = shutil.which(program)
    if path is None:
        return f"{program}: not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"{os.path.realpath(path)}: {err}"
    return f"{os.path.realpath(path)}: {' | '.join(line for line in out.splitlines() if line.strip())}"


def _import_library(name: str, path: Path):
    """The extension module in `path` (what cpp_extension.load imports after building, without ninja)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        """Load the built library, or compile it first (first use for this key, ~40-90 s); cached per process,
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

    def key_inputs(self) -> dict[str, str]:
        """Everything that changes the built library, by name (the build folder is named by their hash)."""
        digest = hashlib.sha256()
        for path in _tree(CSRC):
            digest.update(str(path.relative_to(CSRC)).encode() + b"\0" + path.read_bytes() + b"\0")
        return {
            "extension": self.name,
            "sources": digest.hexdigest(),
            # torch's build rather than its headers' paths: a venv's own install of the same wheel has the same
            # headers and ABI at another path
            "torch": torch.__version__,
            "torch_git": str(torch.version.git_version),
            "torch_cuda": str(torch.version.cuda),
            "torch_hip": str(getattr(torch.version, "hip", None)),
            "cxx11_abi": str(torch._C._GLIBCXX_USE_CXX11_ABI),
            "python": f"{sys.version} {sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}",
            "compiler": tool_identity(os.environ.get("CXX", "c++")),
            "flags": repr((self.cxx_flags(), self.nvcc_flags(), self.ldflags(),
                           [str(p.relative_to(CSRC)) for p in self.include_paths()])),
        }

    def build_dir(self) -> Path:
        """The cache folder of this extension's build, named by the hash of `key_inputs()`: every checkout and
        virtualenv with the same sources, torch build and toolchain shares one build (compiled from a copy of the
        sources staged inside it), and a change to any of them gets a folder of its own."""
        key = hashlib.sha256(json.dumps(self.key_inputs(), sort_keys=True).encode()).hexdigest()
        return cache_dir() / f"{self.name}-{key[:16]}"

    def library(self, build_dir: Path) -> Path:
        """The published library of a build: present only once complete (an atomic rename puts it there)."""
        return build_dir / f"{self.name}.so"

    def _build(self, verbose: bool):
        ok, reason = self.is_compatible()
        if not ok:
            raise BuildError(reason)
        build_dir = self.build_dir()
        try:
            if self.library(build_dir).is_file():  # built already, by any process or virtualenv: no ninja
                return _import_library(self.name, self.library(build_dir))
            with self._lock(build_dir):
                if self.library(build_dir).is_file():  # built while this process waited
                    return _import_library(self.name, self.library(build_dir))
                return self._compile(build_dir, verbose)
        except BuildError:  # a missing toolchain, said as it is
            raise
        except (RuntimeError, OSError, ImportError) as err:
            # ImportError: the .so built but does not load (an undefined symbol, a torch ABI mismatch)
            raise BuildError(f"{self.name}: build failed in {build_dir}: {err}") from err

    @contextmanager
    def _lock(self, build_dir: Path):
        """Hold the build folder's lock: an flock, which the OS releases when its holder exits or is killed."""
        build_dir.mkdir(parents=True, exist_ok=True)
        path = build_dir / "build.lock"
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"hybrid_engine: waiting for another process compiling {self.name} (lock {path})",
                      file=sys.stderr, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _compile(self, build_dir: Path, verbose: bool):
        """Compile in build_dir/build (wiped first: whatever a killed build left there), then publish the library
        by an atomic rename. Called with the build lock held."""
        self._check_toolchain()
        from torch.utils import cpp_extension

        print(f"{COMPILING}: {self.name} into {build_dir}", file=sys.stderr, flush=True)
        staged = stage_sources(build_dir)
        scratch = build_dir / "build"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        module = cpp_extension.load(
            name=self.name, sources=[str(staged / p.relative_to(CSRC)) for p in self.sources()],
            extra_include_paths=[str(staged / p.relative_to(CSRC)) for p in self.include_paths()],
            extra_cflags=self.cxx_flags(),
            extra_cuda_cflags=self.nvcc_flags(), extra_ldflags=self.ldflags(),
            build_directory=str(scratch), verbose=verbose)
        partial = build_dir / f".{self.name}.so.{os.getpid()}"
        shutil.copy2(scratch / f"{self.name}.so", partial)
        os.replace(partial, self.library(build_dir))
        shutil.rmtree(scratch, ignore_errors=True)  # the objects: the library is all a later load needs
        return module


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
        return sorted((CSRC / "cpu").glob("*.cpp"))  # a new op's .cpp joins the extension by being there

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
        return [CSRC / "cuda_bindings.cpp"] + sorted(CSRC.glob("*/*.cu"))  # every kernel family's .cu files

    def nvcc_flags(self) -> list[str]:
        return ["-O3", "-lineinfo"] + cuda_arch_flags()

    def key_inputs(self) -> dict[str, str]:
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else "nvcc"
        return super().key_inputs() | {"nvcc": tool_identity(nvcc)}

    def is_compatible(self) -> tuple[bool, str]:
        if torch.version.cuda is None:
            return False, f"{self.name}: this torch ({torch.__version__}) is built without CUDA"
        if not torch.cuda.is_available():
            return False, f"{self.name}: no CUDA GPU visible"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            return False, f"{self.name}: nvcc not found (set CUDA_HOME to a CUDA toolkit)"
        return super().is_compatible()
