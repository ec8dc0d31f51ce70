"""Named presets: a model config, a tokenizer and step budgets that run together.

``tiny`` is the default run of ``rlhf train``: a word-level tokenizer built from the synthetic task's
vocabulary and a ~0.8M-parameter Llama-style model, sized so SFT + RM take about two minutes and PPO the
rest of a ten-minute budget on 2 CPU cores.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace

from transformers import LlamaConfig, PreTrainedTokenizerFast

from rlhf.core.algorithms import ALGORITHMS
from rlhf.data.synthetic import VOCABULARY
from rlhf.runtime.config import set_option

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# Words of the default "Human: ...\n\nAssistant:" format; the word-level tokenizer splits on whitespace.
FORMAT_WORDS = ("Human:", "Assistant:")


def build_word_tokenizer(words: tuple[str, ...] = VOCABULARY) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` (plus special and format tokens) that adds BOS.

    It saves with ``save_pretrained`` and loads with ``AutoTokenizer.from_pretrained``; decoding joins words
    with single spaces, which is all the synthetic task's gold score needs.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS.values(), *FORMAT_WORDS, *words):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    # The name is what warnings call it (rlhf/data/tokenize.py names a tokenizer that does not know the data).
    return PreTrainedTokenizerFast(tokenizer_object=core, name_or_path="tiny-preset-words", **SPECIAL_TOKENS)


@dataclass
class StepBudget:
    """Batch size, learning rate and epochs of one training step."""

    per_device_train_batch_size: int
    learning_rate: float
    num_train_epochs: int = 1
    weight_decay: float = 0.0
    num_warmup_steps: int = 0


@dataclass
class PPOBudget:
    """Step-3 knobs the preset fixes; each names an option of rlhf.steps.rl_config.RLConfig (its flag's name)."""

    per_device_generation_batch_size: int = 16
    per_device_training_batch_size: int = 16
    ppo_epochs: int = 1
    generation_batches: int = 1
    num_train_epochs: int = 1
    max_steps: int = 0  # PPO rounds (generation + update); 0: every prompt once per epoch
    num_warmup_steps: int = 100
    max_prompt_seq_len: int = 256
    max_answer_seq_len: int = 256
    actor_learning_rate: float = 9.65e-6
    critic_learning_rate: float = 5e-6
    kl_ctl: float = 0.1
    clip_reward_value: float = 5.0
    temperature: float = 1.0


@dataclass
class Preset:
    """Everything a named run needs besides the data paths."""

    name: str
    model: dict = field(default_factory=dict)  # LlamaConfig keyword arguments (vocabulary ids are added)
    sft: StepBudget = field(default_factory=lambda: StepBudget(16, 1e-3))
    reward: StepBudget = field(default_factory=lambda: StepBudget(16, 5e-5))
    dpo: StepBudget = field(default_factory=lambda: StepBudget(16, 1e-6))  # the DPO paper's learning rate
    ppo: PPOBudget = field(default_factory=PPOBudget)
    max_seq_len: int = 512
    data_split: str = "2,4,4"
    # Step-3 budget changes per algorithm (RLConfig option -> value), e.g. fewer prompts when each is sampled
    # several times.
    algorithm_overrides: dict[str, dict] = field(default_factory=dict)
    # Synthetic data sizes; used only when the run is given no --data.
    synthetic_sft: int = 2000
    synthetic_pairs: int = 2000
    seed: int = 1234

    def model_config(self, tokenizer) -> LlamaConfig:
        """The actor / reward-model config with the tokenizer's vocabulary size and special ids."""
        return LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **self.model,
        )

    def tokenizer(self) -> PreTrainedTokenizerFast:
        return build_word_tokenizer()


def apply_budget(cfg, budget):
    """``cfg`` (a step config) with every field of ``budget`` (a StepBudget or PPOBudget) copied onto the option of
    that name."""
    for f in fields(budget):
        set_option(cfg, f.name, getattr(budget, f.name))
    return cfg


TINY = Preset(
    name="tiny",
    # ~0.8M parameters: 4 layers of width 128 with grouped-query attention (4 query, 2 kv heads).
    model=dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    # 4 epochs (228 steps): held-out loss 4.08 -> 2.68 and a sampled gold score of 0.43; 2 epochs stop at
    # 2.79 / 0.37 (the model has not yet learned to name the prompt's topic). A step takes ~46 ms on 2 idle
    # cores (measured), but several times that when other processes compete for the cores.
    sft=StepBudget(per_device_train_batch_size=32, learning_rate=1e-3, num_train_epochs=4, num_warmup_steps=10),
    # One epoch at 1e-3 reaches ~0.95 held-out accuracy (two epochs: ~0.94-0.99 for twice the time).
    reward=StepBudget(per_device_train_batch_size=32, learning_rate=1e-3, num_train_epochs=1, num_warmup_steps=5),
    # Two epochs (58 steps) over the 900 pairs of step 2's slice at 1e-3, on the SFT models of seeds 1234, 2, 3, 4:
    # held-out implicit-reward accuracy 0.96, 0.94, 0.91, 0.95 and sampled gold 0.43 -> 0.63, 0.39 -> 0.69,
    # 0.40 -> 0.65, 0.39 -> 0.63, in ~11 s of one torch thread, evaluations included. Shorter or slower runs stop
    # mid-way for some seed: 1 epoch at 3e-4, seed 2, gold 0.39 -> 0.39 with 57 of 128 answers past the 12-word
    # limit (mean 11.9 words); after these 58 steps 5 are (mean 8.9 words, SFT's 6.2).
    dpo=StepBudget(per_device_train_batch_size=32, learning_rate=1e-3, num_train_epochs=2, num_warmup_steps=3),
    ppo=PPOBudget(
        per_device_generation_batch_size=32,
        per_device_training_batch_size=32,
        num_train_epochs=4,
        max_steps=100,
        num_warmup_steps=0,
        max_prompt_seq_len=16,
        max_answer_seq_len=16,
        actor_learning_rate=1e-4,
        critic_learning_rate=5e-4,
    ),
    # Grouped algorithms sample n answers per prompt: 32 / n prompts keep a rollout at PPO's 32 rows.
    algorithm_overrides={name: {"per_device_generation_batch_size": 32 // spec.n_samples_per_prompt}
                         for name, spec in ALGORITHMS.items() if spec.grouped},
    max_seq_len=40,
    # Step 1 learns from the SFT-only demonstrations (all of them); the preference pairs go half to the
    # reward model and half to PPO as prompts, so the SFT model is not skewed toward "chosen" answers.
    data_split="0,1,1",
    synthetic_sft=2000,
    synthetic_pairs=2000,
)

PRESETS = {"tiny": TINY}


def get_preset(name: str, **overrides) -> Preset:
    """A copy of the named preset, with top-level fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(sorted(PRESETS))}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)
