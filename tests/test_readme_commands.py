"""The commands in the README's shell blocks parse: every `rlhf train` / `rlhf eval` / `rlhf chat` line (also under
`deepspeed --module` and `torchrun -m`) through the CLI's own parser, every `python benchmarks/X.py` line through
that script's. An option renamed in the code and left in the README fails here, not in a user's terminal."""
import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the ```bash blocks: continuation lines joined, comments dropped, `a && b` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while "&&" in words:
                at = words.index("&&")
                commands.append(words[:at])
                words = words[at + 1:]
            if words:
                commands.append(words)
    return commands


def cli_argv(words: list[str]) -> tuple[str, list[str]] | None:
    """(which CLI, its arguments) for the commands this test checks; None for the others (pip, pytest)."""
    if words[:2] in (["rlhf", "train"], ["rlhf", "eval"], ["rlhf", "chat"]):
        return words[1], words[2:]
    for flag in ("--module", "-m"):  # deepspeed --module rlhf.train ..., torchrun ... -m rlhf.train ...
        if words[0] in ("deepspeed", "torchrun") and flag in words:
            at = words.index(flag)
            return words[at + 1].removeprefix("rlhf."), words[at + 2:]
    if words[0] == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
        return words[1], words[2:]
    return None


COMMANDS = [c for c in map(cli_argv, shell_commands(README.read_text())) if c is not None]


class Parsed(Exception):
    pass


def test_the_readme_has_the_commands_this_test_checks():
    kinds = {name for name, _ in COMMANDS}
    assert {"train", "eval", "chat", "benchmarks/throughput.py", "benchmarks/rlhf_step.py"} <= kinds, kinds


@pytest.mark.parametrize("name,argv", COMMANDS, ids=[" ".join([n, *a])[:60] for n, a in COMMANDS])
def test_readme_command_parses(name, argv, monkeypatch, capsys, tmp_path):
    if "--config" in argv:  # the README's ```yaml block is the file its `--config FILE` commands read
        monkeypatch.chdir(tmp_path)
        config = tmp_path / argv[argv.index("--config") + 1]
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)[0])
    if name == "train":
        from rlhf.cli.train import parse_args

        parse = parse_args
    elif name == "eval":
        from rlhf.cli.eval import parse_args as parse
    elif name == "chat":
        from rlhf.cli.chat import build_parser

        parse = build_parser().parse_args
    else:  # a benchmark's main() parses sys.argv first thing: stop it right after
        module = importlib.import_module(name.removesuffix(".py").replace("/", "."))
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            original(self, args, namespace)
            raise Parsed

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        monkeypatch.setattr(sys, "argv", [name, *argv])

        def parse(_argv):
            with pytest.raises(Parsed):
                module.main()
    try:
        parse(argv)
    except SystemExit as done:  # --help, or argparse's error (its message is on stderr)
        assert done.code == 0 and "--help" in argv, capsys.readouterr().err
