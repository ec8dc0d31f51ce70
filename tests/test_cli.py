"""The console script: bad input ends a run with one line naming the file, line and field (exit status 2)."""
import pytest

from rlhf.cli import main


def test_malformed_record_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "x", "rejected": "y"}\n')
    assert main(["train", "--data", str(bad), "--output-dir", str(tmp_path / "run"), "--disable-tqdm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"rlhf train: error: {bad}:2: field 'chosen' missing (expected prompt+chosen+rejected, "
                       "prompt+response, or hh-rlhf chosen/rejected)")
    assert not (tmp_path / "run" / "actor").exists()  # nothing half-written


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "missing.jsonl"], "missing.jsonl: file not found"),
    (["chat", "no/such/model", "--prompt", "hi"], "no/such/model: not a saved model (no config.json)"),
    (["train", "--inference-tp-size", "2", "--step", "3"], "--inference-tp-size > 1 requires --actor-zero-stage 3"),
])
def test_bad_arguments_get_one_line_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + (["--output-dir", str(tmp_path / "run")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"rlhf {argv[0]}: error: ") and message in err


def test_unknown_command_shows_usage(capsys):
    assert main(["serve"]) == 2
    assert "unknown command 'serve'" in capsys.readouterr().err
