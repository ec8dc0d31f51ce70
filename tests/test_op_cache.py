"""The JIT build cache (hybrid_engine/ops/builder.py): one build per key, the key made of everything that changes
the library and nothing else (not the checkout's or the virtualenv's paths), a built library loaded without
ninja, one line on a cold build and one while waiting on another process's build, and no half library after a
killed build. One test compiles for real, into a cold cache (~90 s on 2 cores)."""
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from hybrid_engine.ops import builder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_builds(monkeypatch, tmp_path):
    """No extension loaded or failed yet in this process, builds under tmp_path, the toolchain taken as present."""
    monkeypatch.setattr(builder, "_LOADED", {})
    monkeypatch.setattr(builder, "_FAILED", {})
    monkeypatch.setenv("HYBRID_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builder.OpBuilder, "_check_toolchain", lambda self: None)


def fake_compiler(tmp_path: Path, version: str) -> str:
    path = tmp_path / f"c++-{version}"
    path.write_text(f"#!/bin/sh\necho 'g++ (fake) {version}'\n")
    path.chmod(0o755)
    return str(path)


CHANGES = {
    "torch version": lambda mp, tmp: mp.setattr(torch, "__version__", "2.13.1+cpu"),
    "torch build": lambda mp, tmp: mp.setattr(torch.version, "git_version", "0" * 40),
    "torch CUDA": lambda mp, tmp: mp.setattr(torch.version, "cuda", "13.0"),
    "C++11 ABI": lambda mp, tmp: mp.setattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", not torch._C._GLIBCXX_USE_CXX11_ABI),
    "Python": lambda mp, tmp: mp.setattr(sys, "version", "3.12.0 (main) [GCC 13.1.0]"),
    "compiler": lambda mp, tmp: mp.setenv("CXX", fake_compiler(tmp, "99.1")),
    "flags": lambda mp, tmp: mp.setattr(builder.CpuOpsBuilder, "cxx_flags", lambda self: ["-O2"]),
    "source": lambda mp, tmp: mp.setattr(builder, "CSRC", edited_copy(tmp)),
}


def edited_copy(tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "edited" / "csrc"
    shutil.copytree(builder.CSRC, copy)
    norm = copy / "cpu" / "norm.cpp"
    norm.write_text(norm.read_text() + "\n// edited\n")
    return copy


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_key_changes_with_each_of_its_inputs(monkeypatch, tmp_path, change):
    monkeypatch.setenv("HYBRID_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", fake_compiler(tmp_path, "12.2"))
    before = builder.CpuOpsBuilder().build_dir()
    CHANGES[change](monkeypatch, tmp_path)
    assert builder.CpuOpsBuilder().build_dir() != before


def test_the_key_ignores_where_torch_and_the_checkout_live(monkeypatch, tmp_path):
    """A second virtualenv's own install of the same torch build has its headers at another path: same key."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("HYBRID_ENGINE_CACHE", str(tmp_path / "cache"))
    before = builder.CpuOpsBuilder().build_dir()
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: ["/tmp/venvB/site-packages/torch/include"])
    monkeypatch.setattr(torch, "__file__", "/tmp/venvB/site-packages/torch/__init__.py")
    assert builder.CpuOpsBuilder().build_dir() == before
    assert set(builder.CpuOpsBuilder().key_inputs()) >= {"sources", "torch", "torch_git", "torch_cuda", "cxx11_abi",
                                                         "python", "compiler", "flags"}


def test_a_built_library_is_loaded_without_ninja(fresh_builds, monkeypatch, capfd):
    from torch.utils import cpp_extension

    def no_ninja(*args, **kwargs):
        raise AssertionError("ninja invoked for a built library")

    monkeypatch.setattr(cpp_extension, "load", no_ninja)
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", no_ninja)
    b = builder.CpuOpsBuilder()
    b.library(b.build_dir()).parent.mkdir(parents=True)
    b.library(b.build_dir()).write_bytes(b"a library")
    loaded = []
    monkeypatch.setattr(builder, "_import_library", lambda name, path: loaded.append(path) or "module")
    assert b.load() == "module" and loaded == [b.library(b.build_dir())]
    assert capfd.readouterr().err == ""


def test_a_killed_build_leaves_no_library_and_the_next_build_starts_clean(fresh_builds, monkeypatch, capfd):
    from torch.utils import cpp_extension

    b = builder.CpuOpsBuilder()
    scratch = b.build_dir() / "build"

    def killed(**kwargs):  # the compiler wrote half the library, then the process died
        (scratch / f"{b.name}.so").write_bytes(b"half")
        (scratch / "lock").write_text("")  # torch's own lock file, which a killed build leaves behind
        raise RuntimeError("killed")

    monkeypatch.setattr(cpp_extension, "load", killed)
    with pytest.raises(builder.BuildError):
        b.load()
    assert not b.library(b.build_dir()).exists()
    assert capfd.readouterr().err.count(builder.COMPILING) == 1

    seen = []

    def builds(**kwargs):
        seen.extend(os.listdir(scratch))  # what the killed build left is gone
        (scratch / f"{b.name}.so").write_bytes(b"whole")
        return "module"

    monkeypatch.setattr(cpp_extension, "load", builds)
    builder._FAILED.clear()
    assert b.load() == "module" and seen == []
    assert b.library(b.build_dir()).read_bytes() == b"whole"


def test_waiting_on_another_process_s_build_says_so_once(fresh_builds, monkeypatch, capfd):
    """An flock held elsewhere (another open file: as another process's): one line, then the library that
    build published is loaded, with nothing compiled here."""
    import fcntl

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("compiled while another process did"))
    monkeypatch.setattr(builder, "_import_library", lambda name, path: path.read_bytes())
    b = builder.CpuOpsBuilder()
    build_dir = b.build_dir()
    build_dir.mkdir(parents=True)
    held = open(build_dir / "build.lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX)

    def other_build_finishes():
        time.sleep(1.0)
        b.library(build_dir).write_bytes(b"published")
        held.close()

    thread = threading.Thread(target=other_build_finishes)
    thread.start()
    try:
        assert b.load() == b"published"
    finally:
        thread.join()
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "waiting for another process compiling" in err[0] and b.name in err[0]


LOAD = textwrap.dedent("""
    import sys, time
    start = time.perf_counter()
    import torch
    from torch.utils import cpp_extension
    def no_ninja(*args, **kwargs):
        raise AssertionError("ninja invoked")
    if sys.argv[1] == "warm":
        cpp_extension.load = cpp_extension.verify_ninja_availability = no_ninja
    from hybrid_engine import ops
    t0 = time.perf_counter()
    chosen = ops.select("cpu", "cpu")
    x = torch.randn(2, 8)
    torch.testing.assert_close(chosen.rms_norm(x, torch.ones(8), 1e-6), ops.reference.rms_norm(x, torch.ones(8), 1e-6))
    print(f"{time.perf_counter() - t0:.3f}")
""")


def load_in_a_fresh_process(mode: str, cache: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if cache:
        env["HYBRID_ENGINE_CACHE"] = cache
    return subprocess.run([sys.executable, "-c", LOAD, mode], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_a_second_process_with_the_cache_warm_compiles_nothing():
    """The cache this session uses (built by the first C++ op test if it was cold): a fresh process selects the
    C++ twins without ninja, a compile message, or a minute."""
    builder.CpuOpsBuilder().load()
    run = load_in_a_fresh_process("warm", os.environ.get("HYBRID_ENGINE_CACHE"))
    assert run.returncode == 0, run.stderr
    assert builder.COMPILING not in run.stderr and "waiting" not in run.stderr
    assert float(run.stdout.split()[-1]) < 5.0, run.stdout


@pytest.mark.slow
def test_a_cold_cache_compiles_once_with_one_line_then_never_again(tmp_path):
    cache = str(tmp_path / "cache")
    cold = load_in_a_fresh_process("cold", cache)
    assert cold.returncode == 0, cold.stderr
    lines = cold.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(builder.COMPILING) and "hybrid_engine_cpu_ops" in lines[0], lines
    built = [p for p in Path(cache).rglob("*.so")]
    assert len(built) == 1 and not list(Path(cache).rglob("build/*")), built  # the library alone, no scratch
    warm = load_in_a_fresh_process("warm", cache)
    assert warm.returncode == 0 and warm.stderr == "", warm.stderr
    assert float(warm.stdout.split()[-1]) < 5.0, warm.stdout
