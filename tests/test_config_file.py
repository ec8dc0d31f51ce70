"""`rlhf train --config FILE`: every option as YAML, flags on the command line overriding it, each value checked as
its flag is; every run writes OUTPUT_DIR/config.yaml, which parses back to the same options."""
import pytest

from rlhf.cli.train import CONFIG_FILE, parse_args
from rlhf.cli.train import main as train_main
from rlhf.runtime.process import run_cli

OPTIONS = """\
algorithm: grpo
actor-learning-rate: 1e-5      # YAML reads this as a string: the flag's own type parses it
kl_loss_coef: 0.3
max-steps: 7
step: [3]
enable-ema: true
data: [a.jsonl, "b.jsonl:2"]
reuse-rollout-logprobs: null
"""


def options(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("config", "config_text")}


def test_a_config_file_sets_options_and_flags_override_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(OPTIONS)
    args, _ = parse_args(["--config", str(path), "--max-steps", "9"])
    assert (args.algorithm, args.actor_learning_rate, args.kl_loss_coef) == ("grpo", 1e-5, 0.3)
    assert (args.max_steps, args.step, args.enable_ema, args.data) == (9, [3], True, ["a.jsonl", "b.jsonl:2"])
    assert args.reuse_rollout_logprobs is None
    # the algorithm named in the file chooses the per-algorithm budget of the preset, as the flag would
    grpo_budget = parse_args(["--algorithm", "grpo"])[0].per_device_generation_batch_size
    assert args.per_device_generation_batch_size == grpo_budget
    assert options(args) != options(parse_args(["--max-steps", "9"])[0])


def test_a_run_writes_a_config_that_reproduces_its_options(tmp_path):
    given = tmp_path / "run.yaml"
    given.write_text("sft-max-steps: 2\nsft-learning-rate: 3e-4\nseed: 5\n")
    out = tmp_path / "out"
    argv = ["--config", str(given), "--step", "1", "--output-dir", str(out), "--disable-tqdm"]
    train_main(argv)
    written = out / CONFIG_FILE
    assert "sft_learning_rate: 0.0003" in written.read_text()
    assert options(parse_args(["--config", str(written)])[0]) == options(parse_args(argv)[0])


@pytest.mark.parametrize("text, expected", [
    ("actor-lerning-rate: 1e-5\n", "unknown option 'actor_lerning_rate' (did you mean 'actor_learning_rate'?)"),
    ("max-steps: -3\n", "max_steps: expected at least 0, got -3"),
    ("enable-ema: 1\n", "enable_ema: expected true or false, got 1"),
    ("algorithm: ppo2\n", "algorithm: 'ppo2', expected one of ppo, grpo"),
    ("max-steps: [1, 2]\n", "max_steps: expected one value, got a list"),
    ("- max-steps\n", "expected a mapping of option: value, got a list"),
    ("max-steps: [1\n", "not valid YAML"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, capsys, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert run_cli(train_main, "rlhf train", ["--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlhf train: error: {path}: ") and expected in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert run_cli(train_main, "rlhf train", ["--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: cannot read it (No such file or directory)" in capsys.readouterr().err
