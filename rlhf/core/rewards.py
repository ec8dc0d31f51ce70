"""Where step 3's rewards come from: a trained reward model, or a Python function of the decoded text.

``--reward-fn SPEC`` names a function as ``synthetic`` (the built-in task's rule), ``path/to/file.py:name`` or
``package.module:name``. It is called on a batch, Hugging Face TRL's way::

    def reward(prompts: list[str], responses: list[str], answer: list[str], **fields) -> list[float]:
        # answer, fields: each other column of the data records, as a list aligned with the rows
        return [1.0 if ref in r else 0.0 for r, ref in zip(responses, answer)]

A parameter the function names after ``prompts`` and ``responses`` (``answer`` above, written without a default)
is a field every record must hold: a step-3 record without it is refused before training, naming its file and
line; a field read from ``**fields`` is optional (None where absent).

A function that cannot be imported, raises, or returns the wrong number of values or a non-number ends the run
with one line naming the function and the row. A NaN or infinite reward is passed on: the trainer skips that
rollout's update and counts it (rlhf/runtime/guards.py), and stops after ``--max-nonfinite-steps`` in a row.
"""
from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence

import torch

from rlhf.data.synthetic import gold_scores
from rlhf.runtime.user_code import import_object


def synthetic_reward(prompts: Sequence[str], responses: Sequence[str], **fields) -> list[float]:
    """The built-in task's rule (rlhf.data.synthetic.gold_score) as a reward function."""
    return gold_scores(prompts, responses)


def _import_function(spec: str) -> Callable:
    if spec == "synthetic":
        return synthetic_reward
    fn = import_object(spec, "--reward-fn", "function", "'synthetic', ")
    if not callable(fn):
        target, _, name = spec.rpartition(":")
        raise ValueError(f"--reward-fn {spec}: {target} has no function {name!r}")
    return fn


class RewardFunction:
    """A user's reward function, checked on every call: one number per row."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = _import_function(spec)

    def required_fields(self) -> list[str]:
        """The record fields the function names as parameters: those after the first two positional ones
        (prompts, responses), *args and **fields excepted."""
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):  # a builtin or C function: nothing declared to check
            return []
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        named = [p for p in params if p.kind in (*positional, inspect.Parameter.KEYWORD_ONLY)]
        leading = [p for p in named if p.kind in positional][:2]
        return [p.name for p in named if p not in leading]

    def check_fields(self, examples) -> None:
        """One-line ValueError naming the first record (its ``where``, "file:line") that lacks a field the function
        takes: found before training, not as a None in the middle of it."""
        required = self.required_fields()
        for example in examples if required else ():
            missing = next((name for name in required if name not in example.fields), None)
            if missing is not None:
                name = getattr(self.fn, "__name__", self.spec)
                raise ValueError(f"{example.where or '--data'}: field '{missing}' missing (the reward function {name} "
                                 f"takes {missing})")

    def _call(self, prompts: list[str], responses: list[str], fields: list[dict]) -> list:
        columns = {key: [f.get(key) for f in fields] for key in sorted({k for f in fields for k in f})}
        return self.fn(prompts, responses, **columns)

    def __call__(self, prompts: list[str], responses: list[str], fields: list[dict]) -> torch.Tensor:
        """(B,) float32 rewards of the rows."""
        try:
            values = self._call(prompts, responses, fields)
        except Exception as err:
            row = self._failing_row(prompts, responses, fields)
            where = f"row {row} (prompt {prompts[row][:60]!r})" if row is not None else f"a batch of {len(prompts)}"
            raise ValueError(f"--reward-fn {self.spec}: raised {type(err).__name__}: {err} on {where}") from err
        try:
            n = len(values)
        except TypeError:
            raise ValueError(f"--reward-fn {self.spec}: returned {type(values).__name__}, expected a list of "
                             f"{len(prompts)} numbers") from None
        if n != len(prompts):
            raise ValueError(f"--reward-fn {self.spec}: returned {n} values for {len(prompts)} rows")
        for row, value in enumerate(values):
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"--reward-fn {self.spec}: row {row}: returned {value!r} "
                                 f"({type(value).__name__}), expected a number")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)

    def _failing_row(self, prompts, responses, fields) -> int | None:
        """The first row that raises on its own, to name it in the error."""
        for row in range(len(prompts)):
            try:
                self._call(prompts[row:row + 1], responses[row:row + 1], fields[row:row + 1])
            except Exception:
                return row
        return None
