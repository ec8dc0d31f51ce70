"""Data sources with weights (``--data a.jsonl:2 b.jsonl:1``) and DeepSpeed-Chat's per-step split.

Split (``--data-split 2,4,4``): each source is shuffled once with the seed (the same permutation on every
rank, since it depends only on the seed and the source's size) and cut into disjoint slices in the
normalised proportions; step k uses slice k. A source with no preference pairs (SFT-only) gives all of its
records to step 1 and nothing to steps 2 and 3; a source of prompts without answers (step-3 prompts) gives all of
them to step 3: the split cuts pair sources only.

Blend: a source's weight multiplies its share of a step: weight 2 repeats the slice twice, 0.5 keeps a
seeded half. The blended list is shuffled with the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf.data.formats import DataError, Example, load_examples

STEPS = (1, 2, 3)


@dataclass(frozen=True)
class DataSource:
    path: Path
    weight: float = 1.0


def parse_data_spec(spec: str) -> DataSource:
    """``"path"`` or ``"path:weight"`` -> DataSource; weight 1 when none is given."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).exists():  # an existing path may itself contain a colon
        return DataSource(Path(spec))
    try:
        weight = float(tail)
    except ValueError:
        raise DataError(f"--data {spec}: weight '{tail}' is not a number (expected PATH or PATH:WEIGHT)") from None
    if not math.isfinite(weight) or weight <= 0:
        raise DataError(f"--data {spec}: weight must be a positive finite number, got {tail}")
    return DataSource(Path(head), weight)


def parse_data_split(spec: str | tuple[float, ...]) -> tuple[float, float, float]:
    """``"2,4,4"`` -> (0.2, 0.4, 0.4): three non-negative proportions with a positive sum, normalised."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"--data-split {spec}: expected three numbers like 2,4,4") from None
    if len(values) != 3 or any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise DataError(
            f"--data-split {spec}: expected three non-negative numbers with a positive sum, like 2,4,4"
        )
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def split_indices(n: int, split: tuple[float, float, float], seed: int) -> list[list[int]]:
    """Disjoint index slices of one seeded permutation of ``range(n)``, one per step, sized by ``split``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    bounds = [0]
    cumulative = 0.0
    for fraction in split:
        cumulative += fraction
        bounds.append(min(n, round(cumulative * n)))
    bounds[-1] = n  # rounding must not lose the last record
    return [order[bounds[k] : bounds[k + 1]] for k in range(3)]


def step_slice(examples: list[Example], step: int, split: tuple[float, float, float], seed: int) -> list[Example]:
    """The records of one source that ``step`` (1, 2 or 3) uses."""
    if step not in STEPS:
        raise ValueError(f"step must be 1, 2 or 3, got {step}")
    if examples and all(e.is_prompt for e in examples):  # step-3 prompts: all of them are step 3's
        return list(examples) if step == 3 else []
    if not any(e.is_pair for e in examples):  # SFT-only source: all of it is step 1's
        return list(examples) if step == 1 else []
    return [examples[i] for i in split_indices(len(examples), split, seed)[step - 1]]


def _apply_weight(examples: list[Example], weight: float, rng: random.Random) -> list[Example]:
    whole, fraction = divmod(weight, 1.0)
    out = list(examples) * int(whole)
    extra = round(fraction * len(examples))
    out += rng.sample(examples, extra) if extra else []
    return out


def load_step_examples(
    sources: list[DataSource | str], step: int, split: str | tuple[float, ...] = "2,4,4", seed: int = 1234
) -> list[Example]:
    """Load, split and blend every source for one step; the result is the same on every rank."""
    fractions = parse_data_split(split)
    rng = random.Random(seed)
    blended: list[Example] = []
    for source in sources:
        if isinstance(source, str):
            source = parse_data_spec(source)
        examples = step_slice(load_examples(source.path), step, fractions, seed)
        if step > 1:  # the reward model needs pairs; step 3 the prompts of pair sources, or a source of prompts
            examples = [e for e in examples if e.is_pair or (step == 3 and e.is_prompt)]
        blended += _apply_weight(examples, source.weight, rng)
    rng.shuffle(blended)
    return blended


def train_eval_split(
    examples: list[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded held-out share of a step's records for evaluation (at least one record when any are held out)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(examples)))
    random.Random(seed + 1).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(examples))) if eval_fraction > 0 and len(examples) > 1 else 0
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]
