"""Steps 1 and 2 on the synthetic task: SFT lowers held-out loss, the reward model ranks held-out pairs well
above chance, both save loadable checkpoints and log metrics; the argparse builders cover every option."""

import argparse
import dataclasses
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.cli.presets import get_preset
from rlhf.data.synthetic import write_synthetic_data
from rlhf.models import RewardModel
from rlhf.runtime.metrics import read_metrics
from rlhf.steps.reward import RewardConfig, add_reward_args, reward_config_from_args, run_reward
from rlhf.steps.sft import SFTConfig, add_sft_args, run_sft, sft_config_from_args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    preset = get_preset("tiny")
    preset.model.update(hidden_size=64, num_hidden_layers=2, intermediate_size=128)  # fast on 2 cores
    tokenizer = preset.tokenizer()
    paths = write_synthetic_data(root / "data", n_sft=600, n_pairs=1000, seed=0)
    return root, preset.model_config(tokenizer), tokenizer, [str(paths["sft"]), str(paths["pairs"])]


def test_sft_lowers_loss_and_saves(setup):
    root, config, tokenizer, data = setup
    cfg = SFTConfig(data=data, data_split="0,1,1", output_dir=str(root / "actor"), max_seq_len=40,
                    per_device_train_batch_size=32, learning_rate=2e-3, num_train_epochs=2, num_warmup_steps=3,
                    log_interval=5, disable_tqdm=True, seed=1)
    summary = run_sft(cfg, model_config=config, tokenizer=tokenizer)
    assert summary["train_examples"] == 540 and summary["eval_examples"] == 60 and summary["steps"] == 34
    # A random model is near log(vocab) = 4.0 nats; the task's answers are far more predictable than that.
    assert summary["initial_eval_loss"] > 3.5
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5
    model = AutoModelForCausalLM.from_pretrained(root / "actor")
    batch = tokenizer(["Human: review: pizza movie\n\nAssistant: the pizza was great"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    records = [r for r in read_metrics(root) if r["step_name"] == "sft"]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 34]


def test_reward_model_ranks_held_out_pairs(setup):
    root, config, tokenizer, data = setup
    cfg = RewardConfig(data=data, data_split="0,1,1", output_dir=str(root / "reward"), max_seq_len=40,
                       per_device_train_batch_size=32, learning_rate=1e-3, num_train_epochs=2, num_warmup_steps=3,
                       eval_fraction=0.2, disable_tqdm=True, seed=1)
    summary = run_reward(cfg, model_config=config, tokenizer=tokenizer)
    assert summary["eval_pairs"] == 100
    assert summary["accuracy"] > 0.75, summary
    assert summary["chosen_score"] > summary["rejected_score"]
    model = RewardModel.from_pretrained(root / "reward").eval()
    good = tokenizer(["Human: review: pizza movie\n\nAssistant: the pizza was great lovely fun </s>",
                      "Human: review: pizza movie\n\nAssistant: bad awful boring </s>"], return_tensors="pt",
                     padding=True)
    with torch.no_grad():
        scores = model.score(good["input_ids"], good["attention_mask"])
    assert scores[0] > scores[1]


def test_arg_builders_cover_every_field_with_help():
    parser = argparse.ArgumentParser()
    add_sft_args(parser, prefix="sft-")
    add_reward_args(parser, prefix="rm-", skip=("data",))
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    for field in dataclasses.fields(SFTConfig):
        assert actions[f"sft_{field.name}"].help
    assert "rm_data" not in actions
    args = parser.parse_args(["--sft-zero-stage", "2", "--sft-lora-dim", "8", "--sft-gradient-checkpointing",
                              "--sft-data", "a.jsonl:2", "b.jsonl", "--rm-learning-rate", "1e-4",
                              "--rm-dropout", "0.0"])
    sft = sft_config_from_args(args, prefix="sft-")
    rm = reward_config_from_args(args, prefix="rm-")
    assert (sft.zero_stage, sft.lora_dim, sft.gradient_checkpointing) == (2, 8, True)
    assert sft.data == ["a.jsonl:2", "b.jsonl"] and sft.learning_rate == 1e-3
    assert (rm.learning_rate, rm.dropout, rm.data) == (1e-4, 0.0, [])
    with pytest.raises(SystemExit):
        parser.parse_args(["--sft-zero-stage", "5"])


def test_train_cli_parses_preset_defaults_and_step_prefixes(capsys):
    from rlhf.cli import main as cli_main
    from rlhf.cli.train import parse_args

    args, preset = parse_args([])
    assert preset.name == "tiny" and args.step == [1, 2, 3]
    assert (args.sft_learning_rate, args.sft_per_device_train_batch_size) == (preset.sft.learning_rate, 32)
    assert args.rm_learning_rate == preset.reward.learning_rate
    args, preset = parse_args(["--actor-model", "some/model", "--step", "1", "--sft-zero-stage", "3"])
    assert preset is None and args.sft_learning_rate == 1e-3 and args.sft_zero_stage == 3  # DeepSpeed-Chat's
    assert cli_main([]) == 2 and "rlhf train" in capsys.readouterr().out


def test_a_rising_held_out_loss_warns_with_the_learning_rate():
    from rlhf.steps.sft import warn_if_eval_loss_rose

    with pytest.warns(RuntimeWarning, match=r"held-out loss rose 3.071 -> 4.850 in 3 steps at learning rate 0.001"):
        assert warn_if_eval_loss_rose(3.0713, 4.8503, 3, 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_eval_loss_rose(4.08, 2.68, 228, 1e-3)  # the tiny preset's SFT: lower, silent
        assert not warn_if_eval_loss_rose(None, 2.68, 3, 1e-3)    # no initial evaluation
