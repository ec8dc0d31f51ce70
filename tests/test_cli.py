"""The console script: bad input ends a run with one line naming the file, line and field (exit status 2)."""
import pytest
from transformers import AutoModelForCausalLM

from rlhf.cli import main
from tests.hf_models import CONFIGS


def test_malformed_record_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "x", "rejected": "y"}\n')
    assert main(["train", "--data", str(bad), "--output-dir", str(tmp_path / "run"), "--disable-tqdm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"rlhf train: error: {bad}:2: field 'chosen' missing (expected prompt+chosen+rejected, "
                       "prompt+response, prompt alone (step 3), hh-rlhf chosen/rejected, or conversational messages / "
                       "chosen+rejected message lists)")
    assert not (tmp_path / "run" / "actor").exists()  # nothing half-written


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "missing.jsonl"], "missing.jsonl: file not found"),
    (["chat", "no/such/model", "--prompt", "hi"], "no/such/model: not a saved model (no such directory)"),
    (["train", "--inference-tp-size", "2", "--step", "3"], "--inference-tp-size > 1 requires --actor-zero-stage 3"),
    (["train", "--report-to", "tensorboard,mlflow"], "--report-to: unknown 'mlflow' (expected a comma-separated list "
     "of tensorboard, wandb, or none)"),
])
def test_bad_arguments_get_one_line_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + (["--output-dir", str(tmp_path / "run")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"rlhf {argv[0]}: error: ") and message in err


def test_unknown_command_shows_usage(capsys):
    assert main(["serve"]) == 2
    assert "unknown command 'serve'" in capsys.readouterr().err


def test_step3_alone_checks_its_model_paths_first(tmp_path, capsys):
    """`--step 3` reads --actor-model / --reward-model (else OUTPUT_DIR/actor and /reward); a path that is not a
    checkpoint ends the run with one line before any model is loaded."""
    causal_lm = tmp_path / "lm"
    AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(causal_lm)  # no value head
    capsys.readouterr()
    out = str(tmp_path / "run")
    cases = [
        (["--actor-model", "no/such/actor"],
         "no/such/actor: not a saved model (no such directory); give --actor-model"),
        ([], f"{out}/actor: not a saved model (no such directory)"),
        (["--actor-model", str(causal_lm), "--reward-model", str(causal_lm)],
         f"{causal_lm}: not a saved reward model (no value_head.safetensors); give --reward-model a step-2"),
    ]
    for flags, message in cases:
        assert main(["train", "--step", "3", "--output-dir", out, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rlhf train: error: ") and message in err[0], err


def test_tokenizer_given_with_the_preset_sets_the_new_models_vocabulary(tmp_path):
    """`rlhf train --tokenizer T` on the preset's model: SFT trains a model with T's vocabulary (it was ignored)."""
    from transformers import AutoTokenizer

    from rlhf.cli.presets import build_word_tokenizer

    tokenizer = build_word_tokenizer()
    tokenizer.add_tokens(["zebra", "quokka", "axolotl"])
    tokenizer.save_pretrained(tmp_path / "tok")
    assert main(["train", "--step", "1", "--sft-max-steps", "2", "--tokenizer", str(tmp_path / "tok"),
                 "--output-dir", str(tmp_path / "out"), "--disable-tqdm"]) == 0
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "actor")
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "actor")
    assert actor.config.vocab_size == len(tokenizer) == len(saved) == len(build_word_tokenizer()) + 3


def test_disable_tqdm_prints_a_line_per_logged_step(tmp_path, capsys):
    """No bar, but not silence: step name, step/total and the loss, every --sft-log-interval steps and the last."""
    main(["train", "--step", "1", "--sft-max-steps", "3", "--sft-log-interval", "2", "--disable-tqdm",
          "--output-dir", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 1 SFT ")]
    assert [line.split(":")[0] for line in lines] == ["step 1 SFT 2/3", "step 1 SFT 3/3"], lines
    assert all(line.split(": ")[1].startswith("loss ") for line in lines)


def test_warmup_ratio_sets_the_warmup_steps_of_steps_1_and_2(tmp_path):
    """--sft-warmup-ratio 0.5 of 4 optimizer steps is --sft-num-warmup-steps 2: the same learning rates."""
    import json

    def lrs(out, *flags):
        main(["train", "--step", "1", "--sft-max-steps", "4", "--sft-log-interval", "1", "--disable-tqdm",
              "--output-dir", str(out), *flags])
        return [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["step_name"] == "sft"]

    ratio = lrs(tmp_path / "ratio", "--sft-warmup-ratio", "0.5")
    assert ratio == lrs(tmp_path / "steps", "--sft-num-warmup-steps", "2", "--sft-warmup-ratio", "0.5")
    assert ratio == lrs(tmp_path / "steps2", "--sft-num-warmup-steps", "2")
    assert ratio[0] == pytest.approx(ratio[1] / 2) and ratio != lrs(tmp_path / "none")


def test_steps_1_and_2_on_a_file_of_prompts_say_it_is_step_3s(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "review: pizza", "answer": "great"}\n' * 4)
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), "--disable-tqdm"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlhf train: error: SFT: no training examples for step 1 in ['{data}'] with --data-split 2,4,4 "
        "(prompts without answers are step 3's data alone: run --step 3)")


def test_inference_tp_on_olmo2_is_refused_in_one_line_before_any_step(tmp_path, capsys):
    """OLMo 2's whole-projection q/k norms cannot be split by tensor parallelism: said before a model is loaded."""
    actor = tmp_path / "olmo2"
    AutoModelForCausalLM.from_config(CONFIGS["olmo2"]()).save_pretrained(actor)
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["train", "--step", "3", "--actor-model", str(actor), "--inference-tp-size", "2",
                 "--actor-zero-stage", "3", "--algorithm", "grpo", "--reward-fn", "synthetic",
                 "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rlhf train: error: --inference-tp-size 2: {actor}: "), err
    assert "cannot serve 'olmo2'" in err[0] and not out.exists()
