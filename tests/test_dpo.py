"""DPO: the loss against its formula on hand-checked numbers, the answer-only sequence logprob against a loop, and
the tiny preset end to end (held-out implicit-reward accuracy, sampled gold score above the SFT model's)."""
import math
import time

import pytest
import torch

from rlhf.cli import main as cli_main
from rlhf.cli.presets import build_word_tokenizer, get_preset
from rlhf.cli.train import main as train_main
from rlhf.cli.train import parse_args, preset_defaults, sft_gold_baseline
from rlhf.core.losses import dpo_loss
from rlhf.data import IGNORE_INDEX, Example, build_pair_dataset, encode_prompt
from rlhf.runtime.config import config_from_options
from rlhf.runtime.metrics import read_metrics
from rlhf.steps.dpo import DPOConfig, answer_logprob_sums, run_dpo
from rlhf.steps.rl_config import RLConfig


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# Two pairs: h = (logp_c - ref_c) - (logp_r - ref_r) = (1 - (-1), 0 - (-0.5)) = (2, 0.5).
POLICY_C, POLICY_R = [-1.0, -2.0], [-3.0, -1.5]
REF_C, REF_R = [-2.0, -2.0], [-2.0, -1.0]


def pair_tensors():
    policy_c = torch.tensor(POLICY_C, dtype=torch.float64, requires_grad=True)
    policy_r = torch.tensor(POLICY_R, dtype=torch.float64, requires_grad=True)
    return policy_c, policy_r, torch.tensor(REF_C, dtype=torch.float64), torch.tensor(REF_R, dtype=torch.float64)


def test_dpo_sigmoid_loss_rewards_and_gradient():
    policy_c, policy_r, ref_c, ref_r = pair_tensors()
    loss, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    # beta h = (1, 0.25): loss = mean(-log sigmoid(1), -log sigmoid(0.25)) = mean(0.313262, 0.575940)
    assert loss.item() == pytest.approx(-(log_sigmoid(1.0) + log_sigmoid(0.25)) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.444601, abs=1e-6)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, -0.25]  # beta (logp - logp_ref)
    assert not chosen.requires_grad and not rejected.requires_grad
    loss.backward()
    # d/d logp_c of -log sigmoid(beta h) / B = -beta sigmoid(-beta h) / B; the rejected gradient is its negative.
    expected = [-0.5 * (1 / (1 + math.exp(z))) / 2 for z in (1.0, 0.25)]
    assert policy_c.grad.tolist() == pytest.approx(expected, abs=1e-12)
    assert policy_r.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-12)


def test_dpo_label_smoothing_is_the_expected_loss_under_flipped_labels():
    policy_c, policy_r, ref_c, ref_r = pair_tensors()
    eps = 0.1
    loss, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5, label_smoothing=eps)
    rows = [-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z) for z in (1.0, 0.25)]
    assert loss.item() == pytest.approx(sum(rows) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.507101, abs=1e-6)  # mean(0.9 * 0.313262 + 0.1 * 1.313262, 0.600939)


def test_ipo_loss_is_the_squared_distance_to_half_over_beta():
    policy_c, policy_r, ref_c, ref_r = pair_tensors()
    loss, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(((2.0 - 1.0) ** 2 + (0.5 - 1.0) ** 2) / 2, abs=1e-12)  # 1/(2 beta) = 1
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, -0.25]
    loss.backward()
    assert policy_c.grad.tolist() == pytest.approx([2 * 1.0 / 2, 2 * -0.5 / 2], abs=1e-12)  # 2 (h - 1) / B
    with pytest.raises(ValueError, match="DPO loss 'hinge'"):
        dpo_loss(policy_c, policy_r, ref_c, ref_r, loss_type="hinge")


def test_pair_labels_and_answer_logprob_sums_skip_prompt_and_padding():
    tokenizer = build_word_tokenizer()
    examples = [Example("review: pizza movie", "great fun", "bad"),
                Example("review: book", "the book was very very fun", "so so and dull"),
                Example("review: concert hotel park", "lovely", "the concert was awful and noisy")]
    dataset = build_pair_dataset(tokenizer, examples, max_seq_len=64)
    batch = dataset.collate([dataset[i] for i in range(3)])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # (6, T)
    prompt_lens = [len(encode_prompt(tokenizer, ex.prompt)) for ex in examples] * 2
    for row, n in enumerate(prompt_lens):
        length = int(mask[row].sum())
        assert labels[row, :n].eq(IGNORE_INDEX).all() and labels[row, length:].eq(IGNORE_INDEX).all()
        assert labels[row, n:length].tolist() == ids[row, n:length].tolist()
        assert labels[row, length - 1].item() == tokenizer.eos_token_id  # the answer's EOS is scored

    torch.manual_seed(0)
    logits = torch.randn(ids.shape[0], ids.shape[1], 37)  # (6, T, V), a vocabulary the size of none above
    ids = ids % 37
    labels = torch.where(labels == IGNORE_INDEX, labels, ids)
    expected = []
    for row, n in enumerate(prompt_lens):
        total = 0.0
        for t in range(n, int(mask[row].sum())):  # answer tokens only: token t is predicted at t - 1
            total += torch.log_softmax(logits[row, t - 1].double(), -1)[ids[row, t]].item()
        expected.append(total)
    assert answer_logprob_sums(logits, labels).tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("fields,message", [
    (dict(model_name_or_path=None), "DPO needs --model-name-or-path"),
    (dict(beta=0.0), "--beta 0.0: expected a positive number"),
    (dict(label_smoothing=0.5), "--label-smoothing 0.5: expected a number in [0, 0.5)"),
    (dict(loss="ipo", label_smoothing=0.1), "applies to the sigmoid loss, not --loss ipo"),
])
def test_dpo_config_errors_are_one_line(fields, message):
    with pytest.raises(ValueError) as err:
        DPOConfig(**{"model_name_or_path": "out/actor", **fields}).validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_step3_refuses_dpo():
    with pytest.raises(ValueError, match="--algorithm dpo has no step 3"):
        config_from_options(RLConfig, algorithm="dpo").validate()


def test_dpo_on_tiny_preset_beats_sft(tiny_run):
    """The preset's DPO budget on step 2's pairs: held-out implicit-reward accuracy above 0.8 and a higher sampled
    gold score than the SFT model's on the same held-out prompts and seed."""
    preset = get_preset("tiny")
    tokenizer = preset.tokenizer()
    data = [str(tiny_run / "data" / "sft.jsonl"), str(tiny_run / "data" / "pairs.jsonl")]
    cfg = preset_defaults(preset)[2]
    cfg.model_name_or_path, cfg.output_dir, cfg.metrics_dir = str(tiny_run / "actor"), str(tiny_run / "dpo"), None
    cfg.data, cfg.data_split, cfg.max_seq_len, cfg.disable_tqdm = data, preset.data_split, preset.max_seq_len, True
    start = time.time()
    summary = run_dpo(cfg, tokenizer=tokenizer)
    print(f"DPO on the tiny preset: {summary}, {time.time() - start:.1f} s")
    assert summary["initial_accuracy"] == 0.5  # the policy is the reference: every pair a tie, counted half
    assert summary["accuracy"] > 0.8 and summary["margin"] > 0
    before = sft_gold_baseline(str(tiny_run / "actor"), tokenizer, data, preset.data_split, preset.seed)
    after = sft_gold_baseline(cfg.output_dir, tokenizer, data, preset.data_split, preset.seed)
    print(f"gold: SFT {before:.4f}, DPO {after:.4f}")
    assert after > before
    records = [r for r in read_metrics(tiny_run) if r["step_name"] in ("dpo", "dpo_eval")]
    assert {"loss", "train_accuracy", "margin"} <= set(next(r for r in records if r["step_name"] == "dpo"))
    assert [r["step"] for r in records if r["step_name"] == "dpo_eval"] == [0, summary["steps"]]


def test_train_cli_dpo_runs_sft_then_dpo(tmp_path, capsys):
    out = tmp_path / "run"
    summary = train_main(["--algorithm", "dpo", "--output-dir", str(out), "--disable-tqdm", "--sft-max-steps", "4",
                          "--dpo-max-steps", "2", "--dpo-beta", "0.2"])
    assert list(summary) == ["step 1: SFT", "DPO", "run"]  # no reward model, no step 3
    dpo = summary["DPO"]
    assert dpo["steps"] == 2 and 0.0 <= dpo["gold_before"] <= 1.0 and 0.0 <= dpo["gold_after"] <= 1.0
    assert "gold_score (sampled)" not in summary["step 1: SFT"]  # DPO reports it as gold_before
    printed = capsys.readouterr().out
    assert "[DPO]" in printed and "gold_before" in printed and "gold_after" in printed
    assert (out / "dpo" / "config.json").exists() and not (out / "reward").exists()
    golds = [r["gold"] for r in read_metrics(out) if r["step_name"] == "dpo_eval" and "gold" in r]
    assert golds == [dpo["gold_before"], dpo["gold_after"]]


def test_train_cli_dpo_options_and_errors(tmp_path, capsys):
    args, preset = parse_args(["--algorithm", "dpo", "--dpo-loss", "ipo"])
    assert (args.dpo_learning_rate, args.dpo_per_device_train_batch_size) == (preset.dpo.learning_rate, 32)
    assert (args.dpo_beta, args.dpo_loss) == (0.1, "ipo")
    out = tmp_path / "run"
    cases = [(["--step", "2"], f"{out}/actor: not a saved model (no such directory); give --actor-model"),
             (["--dpo-beta", "0"], "argument --dpo-beta: expected a positive number, got 0")]
    for flags, message in cases:  # each ends the run before any step starts
        assert cli_main(["train", "--algorithm", "dpo", "--output-dir", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rlhf train: error: ") and message in err[0], err
        assert not (out / "actor").exists()
