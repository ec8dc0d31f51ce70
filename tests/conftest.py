"""Session-wide set-up for the tests: where the Triton kernels run (tests/README.md says what runs where).

A process runs the Triton kernels either interpreted, on CPU tensors, or compiled, on CUDA tensors: triton reads
TRITON_INTERPRET when hybrid_engine.kernels is decorated, and it must be set before anything imports triton
(torch._dynamo, imported by peft among others, brings triton in; setting it later makes interpreted kernels fail:
"Cannot call @triton.jit'd outside of the scope of a kernel"). So the session picks once, here: interpreted
where there is no GPU, compiled where there is one. Each test says which tensors it runs Triton on, with the
marker `triton_cpu` (CPU tensors, so the interpreter) or `gpu` (CUDA tensors); a `triton_cpu` test in a
compiled session is skipped with the reason rather than failed. The engine never picks interpreted Triton by
itself, so no other test is affected.
"""
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The rule of hybrid_engine/kernels/_common.py, read without importing triton.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def pytest_collection_modifyitems(config, items):
    if TRITON_INTERPRETED:
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors needs the interpreter; this session compiles the kernels "
                            "for the GPU (CUDA_VISIBLE_DEVICES= pytest -m triton_cpu runs these)")
    for item in items:
        if item.get_closest_marker("triton_cpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Steps 1 and 2 of the tiny preset, through the CLI, once per session (test_ppo, test_step3_matrix)."""
    from rlhf.cli.train import main as train_main

    out = tmp_path_factory.mktemp("rlhf")
    prebuilt = os.environ.get("RLHF_TESTS_TINY_RUN")  # tests/mutation_check.py trains it once for every fault
    if prebuilt:
        shutil.copytree(prebuilt, out, dirs_exist_ok=True)
        return out
    summary = train_main(["--step", "1", "2", "--output-dir", str(out), "--disable-tqdm"])
    assert summary["step 2: reward model"]["accuracy"] > 0.8
    return out
