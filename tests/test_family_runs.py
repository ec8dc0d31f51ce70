"""`rlhf train` on a checkpoint of a family the engine does not serve: a two-round step-3 GRPO run from the CLI
with a reward function, on Hugging Face generate after one warning."""
import warnings

import pytest
from transformers import AutoModelForCausalLM, StableLmConfig

import hybrid_engine
from hybrid_engine.models import FAMILIES
from rlhf.cli import main as cli_main
from tests.hf_models import save_word_actor
from tests.test_rewards import prompt_file

REWARD = "def f(prompts, responses, **fields):\n    return [float(len(r.split()) % 3) for r in responses]\n"


def unserved_config():
    """StableLM: a causal LM family the engine has no inference path for (LayerNorm, partial rotary, GQA)."""
    return StableLmConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, partial_rotary_factor=0.5, max_position_embeddings=64)


def grpo_two_rounds(actor, tmp_path, capsys) -> str:
    """`rlhf train --step 3 --algorithm grpo --actor-model ACTOR --reward-fn ... --data ...`, 2 rounds of 4 prompts x
    2 answers of up to 4 tokens: what it printed."""
    (tmp_path / "reward.py").write_text(REWARD)
    code = cli_main(["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(actor), "--reward-fn",
                     f"{tmp_path / 'reward.py'}:f", "--data", str(prompt_file(tmp_path, 8)), "--output-dir",
                     str(tmp_path / "run"), "--max-steps", "2", "--per-device-generation-batch-size", "4",
                     "--per-device-training-batch-size", "8", "--n-samples-per-prompt", "2",
                     "--max-answer-seq-len", "4", "--eval-prompts", "0", "--disable-tqdm"])
    printed = capsys.readouterr().out
    assert code == 0 and "step 3 grpo 2/2: reward " in printed, printed[-2000:]
    return printed


def test_grpo_on_an_unserved_family_falls_back_to_hugging_face_after_one_warning(tmp_path, capsys):
    """Issue 21 item 4: no dead end for an unknown family in `rlhf train`; `wrap` still refuses it by default."""
    assert "stablelm" not in FAMILIES, "StableLM is served now: pick another family the engine does not serve"
    save_word_actor(tmp_path / "stablelm", unserved_config())
    with pytest.raises(NotImplementedError, match="architecture 'stablelm'"):
        hybrid_engine.wrap(AutoModelForCausalLM.from_pretrained(tmp_path / "stablelm"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grpo_two_rounds(tmp_path / "stablelm", tmp_path, capsys)
    about = [str(w.message) for w in caught if "stablelm" in str(w.message)]
    assert len(about) == 1, about
    assert "delegates to Hugging Face generate" in about[0] and "1.7-3x faster" in about[0]
