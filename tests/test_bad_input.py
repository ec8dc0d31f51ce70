"""Bad input ends a run with one line on stderr naming the path or flag and what was expected, exit status 2, no
traceback and nothing written (issue 9, section 5); data without signal is dropped with one warning."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhf.cli import main
from rlhf.cli.presets import build_word_tokenizer
from rlhf.data import DataError, Example, build_pair_dataset, build_sft_dataset
from rlhf.models import ModelError, RewardModel, create_reward_model, load_tokenizer, save_reward_model
from rlhf.runtime.config import config_from_options, require_output_dir
from rlhf.steps.dpo import DPOConfig
from rlhf.steps.rl import main as ppo_main
from rlhf.steps.rl_config import RLConfig
from rlhf.steps.sft import SFTConfig
from tests.hf_models import save_word_actor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny saved actor (with the preset's word tokenizer), a reward model, and broken copies of both."""
    root = tmp_path_factory.mktemp("models")
    config, tokenizer = save_word_actor(root / "actor")
    save_reward_model(create_reward_model(config), tokenizer, root / "reward")
    paths = {"actor": root / "actor", "reward": root / "reward", "file": root / "file.txt"}
    paths["file"].write_text("not a model\n")
    for name, source, broken in [("truncated", "actor", "model.safetensors"), ("bad_config", "actor", "config.json"),
                                 ("truncated_head", "reward", "value_head.safetensors")]:
        paths[name] = root / name
        shutil.copytree(root / source, paths[name])
        file = paths[name] / broken
        if broken == "config.json":
            file.write_text('{"model_type": "llama", ')
        else:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return paths


def one_error_line(capsys, prog: str = "rlhf train") -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "real_accelerator" not in line]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.mark.parametrize("name,flags,message", [
    ("missing", [], "./no/such/dir: not a saved model (no such directory); pass a checkpoint directory"),
    ("file", [], "file.txt: not a saved model (a file, not a checkpoint directory)"),
    ("bad_config", [], "bad_config/config.json: not valid JSON (Expecting property name enclosed in double quotes "
     "at line 1 column 25); expected a Hugging Face model config"),
    ("truncated", [], "truncated/model.safetensors: truncated or corrupt (Error while deserializing header: "
     "incomplete metadata, file not fully covered); save or download the checkpoint again"),
    ("actor", ["--max-new-tokens", "0"], "argument --max-new-tokens: expected at least 1, got 0 (rlhf chat --help"),
    ("actor", ["--top-p", "1.5"], "argument --top-p: expected a number in (0, 1], got 1.5"),
])
def test_chat_refuses_a_path_that_is_not_a_checkpoint(models, name, flags, message, capsys):
    path = "./no/such/dir" if name == "missing" else str(models[name])
    assert main(["chat", path, "--prompt", "hi", *flags]) == 2
    assert message in one_error_line(capsys, "rlhf chat")


@pytest.mark.parametrize("flag,name,message", [
    # a local-looking path is never sent to the hub ("check your internet connection")
    ("--actor-model", "missing", "./no/such/dir: not a saved model (no such directory); --actor-model expects a "
     "checkpoint directory or a Hugging Face model id"),
    ("--actor-model", "truncated", "truncated/model.safetensors: truncated or corrupt"),
    ("--actor-model", "bad_config", "bad_config/config.json: not valid JSON"),
    ("--reward-model", "missing", "./no/such/dir: not a saved model (no such directory); --reward-model expects"),
    ("--reward-model", "file", "file.txt: not a saved model (a file, not a checkpoint directory); --reward-model"),
    ("--tokenizer", "missing", "./no/such/dir: not a saved tokenizer (no such directory); --tokenizer expects a "
     "tokenizer directory or a Hugging Face model id"),
    ("--tokenizer", "reward_dir_without_tokenizer", "not a saved tokenizer (no tokenizer.json or "
     "tokenizer_config.json)"),
])
def test_train_refuses_model_and_tokenizer_paths_before_writing(models, tmp_path, flag, name, message, capsys):
    if name == "missing":
        path = "./no/such/dir"
    elif name == "reward_dir_without_tokenizer":
        path = str(tmp_path / "no_tokenizer")
        shutil.copytree(models["actor"], path, ignore=shutil.ignore_patterns("tokenizer*"))
    else:
        path = str(models[name])
    out = tmp_path / "run"
    flags = [flag, path] if flag == "--actor-model" else ["--actor-model", str(models["actor"]), flag, path]
    assert main(["train", "--step", "1", "2", "--data", "pairs.jsonl", "--output-dir", str(out), *flags]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()  # nothing written


def test_checkpoint_without_model_type_or_weights(models, tmp_path, capsys):
    no_type = tmp_path / "no_type"
    shutil.copytree(models["actor"], no_type)
    (no_type / "config.json").write_text('{"hidden_size": 16}')
    no_weights = tmp_path / "no_weights"
    shutil.copytree(models["actor"], no_weights, ignore=shutil.ignore_patterns("model.safetensors"))
    cases = [(no_type, f"{no_type}/config.json: no 'model_type' (expected a Hugging Face model config)"),
             (no_weights, f"{no_weights}: not a saved model (no model.safetensors or pytorch_model.bin); pass a")]
    for path, message in cases:
        assert main(["chat", str(path), "--prompt", "hi"]) == 2
        assert message in one_error_line(capsys, "rlhf chat")


def test_hugging_face_errors_on_a_hub_id_become_one_line(monkeypatch):
    """What Hugging Face raises for a hub id (no network, no such repo) is cut to its first line, naming the id."""
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet "
                      "connection or see the docs.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelError, match=r"^someorg/somemodel: cannot load the tokenizer \(We couldn't connect to "
                       r"'https://huggingface.co' to load the files.\)$"):
        load_tokenizer("someorg/somemodel")


@pytest.mark.parametrize("name,message", [
    ("actor", "actor: not a saved reward model (no value_head.safetensors); give --reward-model a step-2 checkpoint"),
    ("truncated_head", "truncated_head/value_head.safetensors: truncated or corrupt"),
])
def test_step3_refuses_a_reward_model_without_an_intact_value_head(models, tmp_path, name, message, capsys):
    out = tmp_path / "run"
    assert main(["train", "--step", "3", "--actor-model", str(models["actor"]), "--reward-model", str(models[name]),
                 "--output-dir", str(out)]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("given", [True, False], ids=["checkpoints", "tiny_preset"])
def test_an_inference_tp_size_that_does_not_split_the_heads_is_refused_before_any_step(models, tmp_path, given,
                                                                                         capsys):
    """SmolLM2-135M's 9 heads over --inference-tp-size 2 used to end in a traceback from the first eval(), after
    steps 1 and 2 had trained."""
    out = tmp_path / "run"
    flags = ["--step", "3", "--actor-model", str(models["actor"]), "--reward-model", str(models["reward"])]
    assert main(["train", *(flags if given else []), "--inference-tp-size", "3", "--actor-zero-stage", "3",
                 "--output-dir", str(out)]) == 2
    what = f"{models['actor']} has 2 attention heads" if given else "the tiny preset's model has 4 attention heads"
    sizes = "1, 2" if given else "1, 2, 4"
    assert one_error_line(capsys).endswith(f"tensor parallelism over 3 ranks: {what}, which do not split into 3 "
                                           f"equal parts (tp sizes that do: {sizes})")
    assert not out.exists()


def test_an_inference_tp_size_that_does_not_divide_the_processes_is_refused_before_any_step(tmp_path, capsys,
                                                                                             monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process
    out = tmp_path / "run"
    assert main(["train", "--inference-tp-size", "2", "--actor-zero-stage", "3", "--output-dir", str(out)]) == 2
    assert one_error_line(capsys).endswith("--inference-tp-size 2: this run has 1 process(es), which do not form "
                                           "groups of 2 (launch a multiple of it: torchrun --nproc-per-node 2 -m "
                                           "rlhf.train ...)")
    assert not out.exists()


def test_the_engine_refuses_such_a_tp_size_when_it_wraps_the_model():
    import hybrid_engine

    config = LlamaConfig(vocab_size=32, hidden_size=18, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"^tensor parallelism over 2 ranks: the llama model has 3 attention heads, "
                                         r"which do not split into 2 equal parts \(tp sizes that do: 1, 3\)$"):
        hybrid_engine.wrap(AutoModelForCausalLM.from_config(config), max_seq_len=8, max_batch_size=1, tp_size=2)


def test_every_reward_model_loader_says_there_is_no_value_head(models, tmp_path, capsys):
    """`python -m rlhf.steps.rl` and `RewardModel.from_pretrained` (the critic's loader too), not only `rlhf train`."""
    with pytest.raises(ModelError, match="actor: not a saved reward model \\(no value_head.safetensors\\)"):
        RewardModel.from_pretrained(models["actor"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"review: pizza {w}", "chosen": "great", "rejected": "bad"}) + "\n"
                             for w in ("movie", "park", "book", "game") * 4))
    from rlhf.runtime.process import run_cli

    argv = ["--actor-model-name-or-path", str(models["actor"]), "--critic-model-name-or-path", str(models["actor"]),
            "--data", str(pairs), "--data-split", "0,0,1", "--output-dir", str(tmp_path / "ppo"), "--max-steps", "1",
            "--disable-tqdm"]
    assert run_cli(ppo_main, "python -m rlhf.steps.rl", argv) == 2
    line = one_error_line(capsys, "python -m rlhf.steps.rl")
    assert "actor: not a saved reward model (no value_head.safetensors)" in line
    assert not (tmp_path / "ppo").exists()


def test_output_dir_must_be_a_writable_directory(tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("x")
    cases = [(file, f"--output-dir {file}: exists and is not a directory (expected a directory to write into)"),
             (file / "run", f"--output-dir {file}/run: {file} is a file, so no directory can be made under it")]
    for out, message in cases:
        assert main(["train", "--output-dir", str(out)]) == 2
        assert message in one_error_line(capsys)
    # Not writable: a read-only directory, or for root (whom permissions do not stop) /sys.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = Path("/sys/rlhf-run") if os.geteuid() == 0 else locked / "run"
    with pytest.raises(ValueError, match=f"--output-dir {out}: cannot write in {out.parent} \\(Permission denied"):
        require_output_dir(out)
    assert not out.exists() and not list(locked.iterdir())  # the write probe leaves nothing


@pytest.mark.parametrize("flags,message", [
    (["--max-seq-len", "0"], "argument --max-seq-len: expected at least 1, got 0"),
    (["--sft-per-device-train-batch-size", "0"], "argument --sft-per-device-train-batch-size: expected at least 1"),
    (["--rm-learning-rate", "-0.001"], "argument --rm-learning-rate: expected a positive number, got -0.001"),
    (["--per-device-generation-batch-size", "0"], "argument --per-device-generation-batch-size: expected at least 1"),
    (["--max-answer-seq-len", "1"], "argument --max-answer-seq-len: expected at least 2, got 1"),
    (["--cliprange", "1.5"], "argument --cliprange: expected a number in (0, 1], got 1.5"),
    (["--kl-ctl", "-0.1"], "argument --kl-ctl: expected at least 0, got -0.1"),
    (["--gamma", "2"], "argument --gamma: expected a number in [0, 1], got 2"),
    (["--algorithm", "dpo", "--dpo-beta", "0"], "argument --dpo-beta: expected a positive number, got 0"),
    (["--sft-dropout", "1"], "argument --sft-dropout: expected a number in [0, 1), got 1"),
    (["--sft-zero-stage", "7"], "argument --sft-zero-stage: invalid choice: 7 (choose from 0, 1, 2, 3)"),
])
def test_numeric_flags_out_of_range(flags, message, tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "run"), *flags]) == 2
    line = one_error_line(capsys)
    assert message in line and line.endswith("(rlhf train --help lists the options)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,message", [
    (["--algorithm", "distill"], "--algorithm distill needs --teacher-model PATH"),
    (["--algorithm", "grpo", "--teacher-model", "x"], "--teacher-model is read by --algorithm distill only, not grpo"),
    (["--algorithm", "ppo", "--dynamic-sampling"], "--dynamic-sampling drops groups of equal rewards: --algorithm ppo"),
    (["--rollout-correction", "tis", "--reuse-rollout-logprobs"], "drop --reuse-rollout-logprobs"),
])
def test_the_new_algorithms_options_are_checked_before_any_step(flags, message, tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "run"), *flags]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match=r"^--max-seq-len 0: expected at least 1$"):
        SFTConfig(max_seq_len=0)
    with pytest.raises(ValueError, match=r"^--beta -1: expected a positive number$"):
        DPOConfig(beta=-1)
    with pytest.raises(ValueError, match=r"^--temperature 0.0: expected a positive number$"):
        config_from_options(RLConfig, temperature=0.0).validate()


def pair(prompt: str, chosen: str, rejected: str) -> Example:
    return Example(prompt, chosen, rejected)


def test_pairs_without_signal_are_dropped_with_one_warning(caplog):
    tokenizer = build_word_tokenizer()
    examples = [pair("review: pizza movie", "great fun", "great fun"),           # identical as written
                pair("review: pizza movie", "great Paris", "great London"),      # both unknown words: <unk>
                pair("review: pizza movie", "great fun awful", "great fun bad"),  # identical once cut to 8 tokens
                pair("review: pizza movie", "great", "awful"),
                pair("review: book park", "lovely", "boring")]
    with caplog.at_level(logging.WARNING, logger="rlhf.data.tokenize"):
        dataset = build_pair_dataset(tokenizer, examples, max_seq_len=8)
    assert len(dataset) == 2
    warnings = [r.getMessage() for r in caplog.records if "unknown token" not in r.getMessage()]
    assert warnings == ["dropped 3 of 5 preference pairs whose chosen and rejected answers are the same (1 identical "
                        "as written, 1 identical once tokenized, 1 identical once truncated to --max-seq-len 8): they "
                        "carry no preference"]
    with pytest.raises(DataError, match=r"none of the 3 preference pairs has a chosen answer that differs from the "
                       r"rejected one \(1 identical as written, 1 identical once tokenized, 1 identical once truncated "
                       r"to --max-seq-len 8\); expected pairs whose answers differ \(a longer --max-seq-len keeps"):
        build_pair_dataset(tokenizer, examples[:3], max_seq_len=8)


def test_train_errors_when_no_pair_has_signal(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"review: pizza {w}", "chosen": "great", "rejected": "great"}) + "\n"
                            for w in ("movie", "park", "book", "game") * 5))
    assert main(["train", "--step", "2", "--data", str(data), "--data-split", "0,1,0", "--output-dir",
                 str(tmp_path / "run"), "--disable-tqdm"]) == 2
    line = one_error_line(capsys)
    assert line.endswith("none of the 18 preference pairs has a chosen answer that differs from the rejected one (18 "
                         "identical as written); expected pairs whose answers differ")
    assert not (tmp_path / "run" / "reward").exists()


def test_a_tokenizer_that_does_not_know_the_data_is_named_once(caplog):
    tokenizer = build_word_tokenizer()
    english = [Example("What is the capital of France?", "Paris is the capital of France.")] * 4
    with caplog.at_level(logging.WARNING, logger="rlhf.data.tokenize"):
        build_sft_dataset(tokenizer, english, max_seq_len=64)
        build_sft_dataset(tokenizer, english, max_seq_len=64)  # the eval split, the next step: no second warning
        build_sft_dataset(build_word_tokenizer(), [Example("review: pizza movie", "great fun")], max_seq_len=64)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "% of the tokens of the SFT examples are the unknown token <unk> of the tokenizer 'tiny-preset-words'" \
        in warnings[0]
    assert "--actor-model" in warnings[0] and "tiny preset's word tokenizer" in warnings[0]


def test_the_console_script_exits_2_without_a_traceback_unless_asked(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "rlhf.cli", "chat", "./no/such/model", "--prompt", "hi"]
    quiet = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1] == ("rlhf chat: error: ./no/such/model: not a saved model (no such "
                                                     "directory); pass a checkpoint directory such as "
                                                     "outputs/run/ppo/actor")
    loud = subprocess.run(argv, cwd=tmp_path, env={**env, "RLHF_TRACEBACK": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "ModelError" in loud.stderr


def test_flags_are_never_abbreviated(tmp_path, capsys):
    """`--lr 1e-5` used to be taken as `--lr-scheduler-type` (argparse's allow_abbrev)."""
    assert main(["train", "--lr", "1e-5", "--output-dir", str(tmp_path / "run")]) == 2
    assert "unrecognized arguments: --lr 1e-5" in one_error_line(capsys)
    with pytest.raises(ValueError, match="unrecognized arguments: --actor-learning-r 1e-5"):  # the step scripts'
        ppo_main(["--actor-learning-r", "1e-5"])


def test_a_near_miss_flag_is_named(tmp_path, capsys):
    assert main(["train", "--model", "x", "--output-dir", str(tmp_path / "run")]) == 2
    assert one_error_line(capsys) == ("rlhf train: error: unrecognized arguments: --model x; did you mean "
                                      "--actor-model? (rlhf train --help lists the options)")
    assert main(["train", "--actor-modle", "x", "--sft-learning-rat=3", "--output-dir", str(tmp_path / "run")]) == 2
    assert ("did you mean --actor-model for --actor-modle, --sft-learning-rate for --sft-learning-rat?"
            in one_error_line(capsys))


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_step3_without_a_reward_model_names_reward_model_and_reward_fn(models, tmp_path, algorithm, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    out = tmp_path / "run"
    assert main(["train", "--step", "3", "--algorithm", algorithm, "--actor-model", str(models["actor"]),
                 "--data", str(data), "--output-dir", str(out)]) == 2
    line = one_error_line(capsys)
    assert "--reward-model" in line and "--reward-fn" in line, line
    assert not out.exists()
