"""`rlhf train` on checkpoints of the families of issue 21: a two-round step-3 GRPO run from the CLI with a reward
function, on the engine for a served family and on Hugging Face generate (after one warning) for a family the
engine does not serve; and the reward model's value head on each new family's backbone."""
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, StableLmConfig

import hybrid_engine
from hybrid_engine.engine import HybridEngine
from hybrid_engine.models import FAMILIES
from rlhf.cli import main as cli_main
from tests.hf_models import CONFIGS, save_word_actor, tiny_model
from tests.test_rewards import prompt_file

NEW_FAMILIES = ("qwen3", "phi3", "olmo2", "gemma3", "gemma2")  # tests/hf_models.py's configs of issue 21's families
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


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_grpo_on_a_checkpoint_of_each_new_family_rolls_out_with_the_engine(name, tmp_path, capsys, monkeypatch):
    config, _ = save_word_actor(tmp_path / name, CONFIGS[name]())

    def no_fallback(*args, **kwargs):
        raise AssertionError("a served family fell back to Hugging Face generate")

    monkeypatch.setattr(HybridEngine, "_hf_generate", no_fallback)
    grpo_two_rounds(tmp_path / name, tmp_path, capsys)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "grpo" / "actor")
    assert trained.config.model_type == config.model_type and trained.config.vocab_size == config.vocab_size


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


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_reward_model_value_head_on_each_new_backbone(name, tmp_path):
    """A reward model (step 2's, and the PPO critic's) on the family's backbone: the score is read at the last real
    token whatever the padding side, survives a save and load, and a step on it trains head and backbone."""
    from rlhf.cli.presets import build_word_tokenizer
    from rlhf.models import RewardModel, create_reward_model, save_reward_model

    tiny_model(name, tmp_path)  # saved at tmp_path / name
    torch.manual_seed(0)
    model = create_reward_model(str(tmp_path / name)).eval()
    torch.nn.init.normal_(model.value_head.weight)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    seq = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    right = torch.cat([seq, torch.full((2, 3), pad)], 1)
    left = torch.cat([torch.full((2, 3), pad), seq], 1)
    mask_right = torch.tensor([[1] * 7 + [0] * 3] * 2)
    with torch.no_grad():
        alone = model.score(seq)
        scores = model.score(torch.cat([right, left]), torch.cat([mask_right, mask_right.flip(1)]))
    torch.testing.assert_close(scores, alone.repeat(2), atol=1e-5, rtol=0)
    save_reward_model(model, build_word_tokenizer(), tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(seq), alone, atol=0, rtol=0)
    model.train()
    model.score(seq).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "value_head.weight" in grads and any(n.startswith("backbone.") for n in grads)
