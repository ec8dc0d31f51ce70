"""Every benchmark script imports and parses its options: they run by hand, not in CI, and one import renamed
elsewhere (switch_cost.py's `prompts`, renamed `random_prompts` in throughput.py) broke one unnoticed."""
import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def test_every_benchmark_is_listed():
    assert {"throughput", "rlhf_step", "switch_cost", "kernels"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports_and_explains_its_options(name, monkeypatch, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {name}.py")
