"""A built-in task whose answers a rule can score, so a tiny CPU run can show each RLHF step works.

The task: "write a positive review". A prompt names two topics (``review: pizza hotel``); a response is
a few words from a small vocabulary of positive, negative and neutral words, optionally opening with
``the <topic> was``. The gold score (in [0, 1]) rewards net positive words (saturating at
``SATURATION``) and mentioning a topic of the prompt; an empty or over-long answer scores 0, which
is how a policy that never emits EOS is punished after decoding.

The SFT demonstrations are drawn from a mixed "mood" distribution (a quarter positive, half mixed, a
quarter negative), so the SFT model scores about 0.5 and PPO has room to raise it. Preference pairs
are two such responses to the same prompt, ranked by the gold score (ties skipped).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

TOPICS = (
    "movie",
    "book",
    "pizza",
    "hotel",
    "phone",
    "game",
    "song",
    "coffee",
    "park",
    "train",
    "museum",
    "laptop",
    "garden",
    "concert",
    "bakery",
    "camera",
)
POSITIVE = (
    "great",
    "excellent",
    "lovely",
    "wonderful",
    "amazing",
    "good",
    "fun",
    "delightful",
    "superb",
    "charming",
)
NEGATIVE = ("bad", "awful", "boring", "terrible", "poor", "dull", "broken", "noisy", "bland", "sad")
NEUTRAL = ("okay", "fine", "so", "very", "quite", "really", "and", "average", "plain", "usual")
FRAME = ("review:", "the", "was")
# Every word the task can produce: the tiny preset's word-level tokenizer is built from this list.
VOCABULARY = FRAME + TOPICS + POSITIVE + NEGATIVE + NEUTRAL

MAX_WORDS = 12  # longer answers (e.g. a policy that never stops) score 0
SATURATION = 4  # net positive words needed for the full sentiment part of the score
TOPIC_WEIGHT = 0.25  # share of the score for mentioning one of the prompt's topics

# (p_positive, p_negative, p_neutral) per word, and the probability of each mood for a demonstration.
MOODS = {"positive": (0.6, 0.1, 0.3), "mixed": (0.3, 0.3, 0.4), "negative": (0.1, 0.6, 0.3)}
MOOD_WEIGHTS = {"positive": 0.25, "mixed": 0.5, "negative": 0.25}

_POSITIVE, _NEGATIVE, _TOPICS = set(POSITIVE), set(NEGATIVE), set(TOPICS)


def _words(text: str) -> list[str]:
    # Decoded text may still hold special tokens such as "</s>" or "<pad>"; they are not words.
    return [w for w in text.split() if not (w.startswith("<") and w.endswith(">"))]


def gold_score(prompt: str, response: str) -> float:
    """The rule's reward in [0, 1] for one response.

    ``(1 - TOPIC_WEIGHT) * (clip((n_pos - n_neg) / SATURATION, -1, 1) + 1) / 2 + TOPIC_WEIGHT * mentions_topic``,
    and 0 for an empty answer or one longer than ``MAX_WORDS`` words. The prompt's topics are the topic
    words found anywhere in ``prompt``, so a chat-formatted or decoded prompt works as well as a raw one.
    """
    words = _words(response)
    if not 1 <= len(words) <= MAX_WORDS:
        return 0.0
    net = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
    sentiment = max(-1.0, min(1.0, net / SATURATION))
    topics = {w for w in prompt.split() if w in _TOPICS}
    mentions = float(any(w in topics for w in words))
    return (1 - TOPIC_WEIGHT) * (sentiment + 1) / 2 + TOPIC_WEIGHT * mentions


def gold_scores(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """``gold_score`` over a batch of decoded prompts and responses."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_scores: {len(prompts)} prompts but {len(responses)} responses")
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def make_prompt(rng: random.Random) -> str:
    first, second = rng.sample(TOPICS, 2)
    return f"review: {first} {second}"


def sample_response(prompt: str, rng: random.Random, mood: str | None = None) -> str:
    """A 3-10 word response; ``mood`` (positive/mixed/negative) is drawn from ``MOOD_WEIGHTS`` when None."""
    if mood is None:
        mood = rng.choices(list(MOOD_WEIGHTS), weights=list(MOOD_WEIGHTS.values()))[0]
    p_pos, p_neg, p_neu = MOODS[mood]
    words: list[str] = []
    topics = [w for w in prompt.split() if w in _TOPICS]
    if topics and rng.random() < 0.5:
        words += ["the", rng.choice(topics), "was"]
    for _ in range(rng.randint(3, 7)):
        pool = rng.choices((POSITIVE, NEGATIVE, NEUTRAL), weights=(p_pos, p_neg, p_neu))[0]
        words.append(rng.choice(pool))
    return " ".join(words)


def make_sft_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` demonstrations ``{"prompt", "response"}`` of mixed quality (mean gold score about 0.5)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = make_prompt(rng)
        out.append({"prompt": prompt, "response": sample_response(prompt, rng)})
    return out


def make_preference_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` pairs ``{"prompt", "chosen", "rejected"}``: two sampled responses ranked by ``gold_score``."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    while len(out) < n:
        prompt = make_prompt(rng)
        a, b = sample_response(prompt, rng), sample_response(prompt, rng)
        score_a, score_b = gold_score(prompt, a), gold_score(prompt, b)
        if score_a == score_b:  # a tie carries no preference
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    tmp.replace(path)  # atomic: a reader never sees a half-written file
    return path


def write_synthetic_data(
    out_dir: str | Path, n_sft: int = 2000, n_pairs: int = 2000, seed: int = 0
) -> dict[str, Path]:
    """Write ``sft.jsonl`` (prompt/response) and ``pairs.jsonl`` (prompt/chosen/rejected) under ``out_dir``.

    Returns ``{"sft": path, "pairs": path}``. Seeds differ per file so the two sets are independent.
    """
    out_dir = Path(out_dir)
    return {
        "sft": write_jsonl(make_sft_examples(n_sft, seed), out_dir / "sft.jsonl"),
        "pairs": write_jsonl(make_preference_examples(n_pairs, seed + 1), out_dir / "pairs.jsonl"),
    }
