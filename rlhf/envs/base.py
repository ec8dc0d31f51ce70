"""What a multi-turn environment is, and how `--environment SPEC` finds one.

    class Guess(Environment):
        def reset(self, record):                  # the conversation's first messages, from one data record
            self.answer = record["answer"]
            return [{"role": "user", "content": record["prompt"]}]

        def step(self, text):                     # the model's turn, decoded -> the next messages, reward, done
            if text.strip() == self.answer:
                return StepResult(reward=1.0, done=True)
            return StepResult([{"role": "user", "content": "No, try again."}])

One instance per trajectory (the class is called with no arguments for each row). `tools` (plain Python functions
with docstrings) go to the chat template's `tools=`. SPEC is a built-in name (`calculator`), `path/file.py:Class`
or `package.module:Class`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.runtime.user_code import import_object


@dataclass
class StepResult:
    messages: list[dict] = field(default_factory=list)  # what the environment says next (user or tool turns)
    reward: float = 0.0                                 # this turn's reward (a trajectory's is their sum)
    done: bool = False                                  # no further turn


class Environment:
    """A conversation partner of the policy: `reset(record)` gives the first messages, `step(text)` answers each
    model turn. Subclasses override both; `tools` lists the functions the chat template describes."""
    tools: list = []

    def reset(self, record: dict) -> list[dict]:
        raise NotImplementedError

    def step(self, text: str) -> StepResult:
        raise NotImplementedError


def builtin_environments() -> dict[str, type]:
    from rlhf.envs.calculator import CalculatorEnvironment

    return {"calculator": CalculatorEnvironment}


def load_environment(spec: str) -> type:
    """The environment class SPEC names (`calculator`, `file.py:Class`, `module:Class`); one line otherwise."""
    builtins = builtin_environments()
    cls = builtins.get(spec) or import_object(spec, "--environment", "class", f"'{', '.join(builtins)}', ")
    if not isinstance(cls, type) or not callable(getattr(cls, "reset", None)) or not callable(getattr(cls, "step",
                                                                                                        None)):
        raise ValueError(f"--environment {spec}: expected a class with reset(record) and step(text), got "
                         f"{type(cls).__name__}")
    return cls
