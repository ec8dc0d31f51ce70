"""Reward-model scoring under left and right padding, checkpoint round trips, LoRA options, atomic saves,
metrics and the tiny preset's tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.cli.presets import build_word_tokenizer, get_preset
from rlhf.models import (
    ModelOptions,
    RewardModel,
    create_actor,
    create_critic,
    create_reward_model,
    last_token_index,
)
from rlhf.runtime.checkpoint import atomic_directory, atomic_save, save_actor_checkpoint, save_reward_checkpoint
from rlhf.runtime.metrics import MetricsLogger, plot, read_metrics


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def config(tokenizer):
    preset = get_preset("tiny")
    preset.model.update(hidden_size=32, num_hidden_layers=2, intermediate_size=64)
    return preset.model_config(tokenizer)


def test_tokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Human: review: pizza movie\n\nAssistant: the pizza was great"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded(text)["input_ids"][0] == loaded.bos_token_id
    assert (loaded.pad_token, loaded.eos_token) == ("<pad>", "</s>")
    assert loaded.decode(tokenizer("the pizza was great", add_special_tokens=False)["input_ids"]) == \
        "the pizza was great"


def test_last_token_index_left_and_right():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 2]


def test_reward_score_same_for_left_and_right_padding(config):
    torch.manual_seed(0)
    model = create_reward_model(config).eval()
    seq = torch.randint(5, config.vocab_size, (1, 6))
    pad = config.pad_token_id
    right = torch.cat([seq, torch.full((1, 3), pad)], 1)
    left = torch.cat([torch.full((1, 3), pad), seq], 1)
    mask_right = torch.tensor([[1] * 6 + [0] * 3])
    mask_left = torch.tensor([[0] * 3 + [1] * 6])
    with torch.no_grad():
        alone = model.score(seq)
        values = model(right, mask_right)  # (1, 9)
        scores = model.score(torch.cat([right, left]), torch.cat([mask_right, mask_left]))
    assert values[0, 5].item() == pytest.approx(alone.item(), abs=1e-5)  # the last real token, not a pad
    assert values[0, 8].item() != pytest.approx(alone.item(), abs=1e-3)
    assert scores.tolist() == pytest.approx([alone.item()] * 2, abs=1e-5)


def test_actor_checkpoint_round_trip(config, tokenizer, tmp_path):
    torch.manual_seed(0)
    actor = create_actor(config).eval()
    save_actor_checkpoint(actor, tokenizer, tmp_path / "actor")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "actor").eval()
    ids = torch.randint(5, config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(actor(ids).logits, loaded(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "actor").pad_token == "<pad>"


def test_reward_checkpoint_round_trip_and_critic(config, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = create_reward_model(config).eval()
    torch.nn.init.normal_(model.value_head.weight)
    save_reward_checkpoint(model, tokenizer, tmp_path / "rm")
    assert (tmp_path / "rm" / "value_head.safetensors").exists()
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["loader"].endswith("from_pretrained")
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    critic = create_critic(tmp_path / "rm").eval()
    ids = torch.randint(5, config.vocab_size, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        expected = model(ids, mask)
        assert torch.equal(loaded(ids, mask), expected)
        assert torch.equal(critic(ids, mask), expected)


def test_lora_options_and_merged_save(config, tokenizer, tmp_path):
    torch.manual_seed(0)
    options = ModelOptions(lora_dim=4, lora_module_name="layers.", only_optimize_lora=True)
    actor = create_actor(config, options)
    trainable = [n for n, p in actor.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in actor.named_parameters():  # make LoRA change the output, then check the merged save
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    save_actor_checkpoint(actor, tokenizer, tmp_path / "lora_actor")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lora_actor").eval()
    ids = torch.randint(5, config.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(actor.eval()(ids).logits, loaded(ids).logits, atol=1e-5, rtol=1e-5)
    full = create_actor(config, ModelOptions(lora_dim=4, only_optimize_lora=False))
    assert all(p.requires_grad for p in full.parameters())
    with pytest.raises(ValueError, match="matches no Linear"):
        create_actor(config, ModelOptions(lora_dim=4, lora_module_name="no_such_module"))


def test_dropout_override_and_checkpointing(config):
    actor = create_actor(config, ModelOptions(dropout=0.3, gradient_checkpointing=True))
    assert actor.config.attention_dropout == 0.3 and config.attention_dropout == 0.0  # caller's config untouched
    flag = "is_activation_checkpointing" if hasattr(actor, "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    assert getattr(actor, flag)


def test_atomic_save_leaves_no_partial_directory(tmp_path):
    target = tmp_path / "ckpt"
    atomic_save(target, lambda d: (d / "weights.bin").write_text("old"))

    def failing_writer(d):
        (d / "weights.bin").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save(target, failing_writer)
    assert (target / "weights.bin").read_text() == "old"  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary sibling left behind
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "fresh") as d:
        (d / "x").write_text("partial")
        raise KeyboardInterrupt
    assert not (tmp_path / "fresh").exists()
    atomic_save(target, lambda d: (d / "weights.bin").write_text("new"))
    assert (target / "weights.bin").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_metrics_lines_and_plot(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 4):
        logger.log("sft", step, loss=torch.tensor(2.0 / step), lr=1e-3)
    logger.log("reward_eval", 3, accuracy=0.9)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step_name": "sft", "st')  # a torn last line, as after a crash mid-write
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert records[1] == {"step_name": "sft", "step": 2, "loss": 1.0, "lr": 1e-3}
    png = plot(tmp_path)
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
