"""Every benchmark script starts the way the README runs it (`python benchmarks/X.py --help`, in a fresh process)
and explains its options: they run by hand, not in CI. Importing them as modules inside the suite hid a crash:
transformers 5.25 imports Hugging Face's `kernels` package, and `benchmarks/kernels.py`, first on the script's
sys.path, shadowed it (`cannot import name 'CUDAProperties' from 'kernels'`); the suite passed only because an
earlier test had imported the real package first."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))  # _x: helpers


def test_every_benchmark_is_listed():
    assert {"throughput", "rlhf_step", "switch_cost", "kernel_speed", "logprob_gap", "multiturn"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_starts_as_the_readme_runs_it(name):
    done = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {name}.py"), done.stdout[:200]


def test_no_project_module_shadows_an_installed_package():
    """A script's folder is first on its sys.path, so a module there named like an installed top-level package
    (`kernels`, `datasets`, `accelerate`, ...) replaces it for every library the script imports."""
    installed = set(importlib.metadata.packages_distributions())
    ours = {p.stem for folder in ("benchmarks", "tests") for p in (ROOT / folder).glob("*.py")}
    ours |= {p.name for p in ROOT.iterdir() if p.is_dir()} - {"hybrid_engine", "rlhf"}
    assert not ours & installed, f"project modules named like installed packages: {sorted(ours & installed)}"


def test_throughput_runs_a_random_model_of_a_family():
    """`throughput.py --family gemma2 opt` at toy sizes: a table per family, and exit 0 only when the engine's tokens
    equal Hugging Face's (fp32)."""
    done = subprocess.run([sys.executable, "benchmarks/throughput.py", "--family", "gemma2", "opt", "--batch-sizes",
                           "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--kernels", "torch"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    models = [line for line in done.stdout.splitlines() if line.startswith("model: ")]
    assert [line.split(" (")[0] for line in models] == ["model: random gemma2", "model: random opt"], done.stdout
    engine = [line for line in done.stdout.splitlines() if "engine eager" in line]
    assert len(engine) == 2 and all(line.split()[-1] == "True" for line in engine), done.stdout
