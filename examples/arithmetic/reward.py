"""The arithmetic task's reward: 1 for an answer that is exactly the number, 0.5 for one that states the right
number among other words, 0 otherwise.

    rlhf train --step 3 --algorithm grpo --reward-fn examples/arithmetic/reward.py:exact_number ...

`answer` is the records' field of that name: a record without it is refused before training.
"""
import re

NUMBER = re.compile(r"-?\d+")


def exact_number(prompts: list[str], responses: list[str], answer: list[str], **fields) -> list[float]:
    rewards = []
    for response, expected in zip(responses, answer):
        text = response.strip().rstrip(".")
        if text == expected:
            rewards.append(1.0)
        elif expected in NUMBER.findall(response):
            rewards.append(0.5)
        else:
            rewards.append(0.0)
    return rewards
