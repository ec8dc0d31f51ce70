"""Multi-turn rollouts on the hybrid engine: the model answers, the environment replies, the model goes on from
its cache, and the trajectory stays tokens throughout.

    traj = MultiTurn(engine, tokenizer, env_class, settings).rollout(records, sampling)
    traj.sample           # a Sample: prompt (left padded) + [turn 1 | observation 1 | turn 2 | ...] (right padded)
    traj.sample.action_mask   # the model's tokens only: what trains; observations are attended to, never trained
    traj.scores           # (B,) each trajectory's reward: the sum of its turns'

Nothing is decoded and re-tokenized for training: the model's tokens are the sampled ones, with the engine's
logprobs; an observation's tokens are the text the chat template adds after the model's turn (its end-of-turn
token, the tool or user header and message, the next assistant header), tokenized once. They are found by rendering
the conversation so far (prompt + the model's turn as its text) and the conversation with the new messages: the
difference is the suffix. When the template re-renders an earlier turn differently (Qwen3 drops earlier `<think>`
blocks), the second rendering is no extension of the first; the suffix is then taken from a two-message probe
conversation ending in the same kind of turn, and the turn is counted (`rerendered`). The generated tokens stay as
generated either way.

Budgets: `turn_tokens` new tokens per model turn, `total_tokens` after the prompt (turns and observations); a row
whose next observation and turn would not fit ends there, truncated (its reward is what it has earned). A row
ends when the environment says done, at `max_turns`, or truncated. An environment whose `reset` or `step` raises,
returns the wrong type or a non-finite reward, or runs past `timeout` seconds ends its row with zero reward from
that turn on; the error is counted and kept (the trainer stops after --max-env-errors).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from rlhf.core.experience import RolloutStats, Sample
from rlhf.envs.base import Environment, StepResult

PROBE = "\x00TURN\x00"  # stands for the model's turn in the probe conversation


@dataclass
class TurnSettings:
    max_turns: int = 4
    turn_tokens: int = 256      # new tokens per model turn
    total_tokens: int = 1024    # tokens after the prompt: model turns and observations
    timeout: float = 10.0       # seconds an environment's step (or reset) may take


@dataclass
class Row:
    """One trajectory being built: its segments after the prompt, and what happened."""
    env: Environment
    messages: list = field(default_factory=list)
    segments: list = field(default_factory=list)  # (role, token ids, logprobs or None)
    turns: int = 0
    reward: float = 0.0
    turn_rewards: list = field(default_factory=list)  # (index of the turn's last token after the prompt, reward)
    tool_calls: int = 0
    well_formed: int = 0
    tool_errors: int = 0
    error: str | None = None
    truncated: bool = False
    rerendered: int = 0

    @property
    def length(self) -> int:
        return sum(len(ids) for _, ids, _ in self.segments)


@dataclass
class Trajectories:
    sample: Sample
    scores: torch.Tensor             # (B,) the sum of each row's rewards
    turn_rewards: list[list]         # per row, (action position, reward) of every turn with a nonzero reward
    rows: list[Row]

    def counts(self) -> dict[str, float]:
        """Per-round metrics: mean turns; tool calls, well-formed calls, errors, truncated rows and re-rendered
        templates, summed."""
        rows = self.rows
        return {"turns": sum(r.turns for r in rows) / len(rows), "tool_calls": sum(r.tool_calls for r in rows),
                "well_formed_calls": sum(r.well_formed for r in rows),
                "tool_errors": sum(r.tool_errors for r in rows), "env_errors": sum(r.error is not None for r in rows),
                "truncated": sum(r.truncated for r in rows), "rerendered": sum(r.rerendered for r in rows)}


def trajectory_records(trajectories: Trajectories, tokenizer, step: int) -> list[dict]:
    """--log-rollouts lines: per trajectory its turns (role, text, token ids, the model's logprobs), reward, the
    turns' rewards, error and truncation."""
    out = []
    for i, row in enumerate(trajectories.rows):
        turns = [{"role": role, "text": tokenizer.decode(ids), "ids": ids,
                  **({"logprobs": [round(x, 6) for x in lp.tolist()]} if lp is not None else {})}
                 for role, ids, lp in row.segments]
        out.append({"step": step, "row": i, "messages": row.messages, "turns": turns,
                    "reward": float(trajectories.scores[i]), "turn_rewards": row.turn_rewards, "error": row.error,
                    "truncated": row.truncated})
    return out


class ChatFormat:
    """A conversation's token ids: the tokenizer's chat template, else hh-rlhf style turns (`Human: ...`)."""
    ROLES = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}

    def __init__(self, tokenizer, tools: list | None = None):
        self.tokenizer, self.tools = tokenizer, tools or None
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        if self.templated:
            return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        text = "\n\n".join(f"{self.ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
        return text + ("\n\nAssistant:" if generation_prompt else "")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        # a chat template writes its own BOS; plain text gets the tokenizer's
        return self.tokenizer(self.render(messages), add_special_tokens=not self.templated)["input_ids"]

    def observation_ids(self, messages: list[dict], turn_ids: list[int], new: list[dict]) -> tuple[list[int], bool]:
        """The token ids that follow the model's turn `turn_ids` (after `messages`) when `new` messages come next,
        up to the next assistant header; and whether the template re-rendered earlier turns (see the module)."""
        tok = self.tokenizer
        content = tok.decode(turn_ids, skip_special_tokens=True)
        if not self.templated:
            return tok("\n\n" + self.render(new), add_special_tokens=False)["input_ids"], False
        before = self.render(messages) + tok.decode(turn_ids)
        after = self.render([*messages, {"role": "assistant", "content": content}, *new])
        if after.startswith(before):
            return tok(after[len(before):], add_special_tokens=False)["input_ids"], False
        probe = self.render([{"role": "user", "content": "?"}, {"role": "assistant", "content": PROBE}, *new])
        suffix = probe[probe.index(PROBE) + len(PROBE):]
        eos = tok.eos_token or ""
        if eos and turn_ids and turn_ids[-1] == tok.eos_token_id and suffix.startswith(eos):
            suffix = suffix[len(eos):]  # the model's own end-of-turn token is already in the trajectory
        return tok(suffix, add_special_tokens=False)["input_ids"], True


def call_env(fn, *args, timeout: float):
    """(value, None) or (None, error text): `fn(*args)` in a thread given `timeout` seconds (a hung environment is
    left behind, its row ended, rather than hanging the run)."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - any failure of the user's environment is its row's error
            box["error"] = f"raised {type(err).__name__}: {err}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None, f"took longer than {timeout:g} s"
    return box.get("value"), box.get("error")


def checked_step(result) -> tuple[StepResult | None, str | None]:
    if not isinstance(result, StepResult):
        return None, f"step returned {type(result).__name__}, expected StepResult(messages, reward, done)"
    if not isinstance(result.reward, (int, float)) or not math.isfinite(result.reward):
        return None, f"step returned reward {result.reward!r}, expected a finite number"
    if not isinstance(result.messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                        for m in result.messages):
        return None, "step returned messages that are not a list of {'role', 'content'} dicts"
    return result, None


class MultiTurn:
    """Runs multi-turn rollouts of one environment class on one engine (see the module docstring)."""

    def __init__(self, engine, tokenizer, env_class: type, settings: TurnSettings, tools: list | None = None,
                 make_env=None):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.make_env = make_env or env_class
        self.format = ChatFormat(tokenizer, tools if tools is not None else getattr(env_class, "tools", None))
        self.env_name = getattr(env_class, "__name__", str(env_class))

    def rollout(self, records: list[dict], sampling, max_prompt_len: int | None = None) -> Trajectories:
        s, tok = self.settings, self.tokenizer
        rows = [Row(self.make_env()) for _ in records]
        for row, record in zip(rows, records):
            messages, row.error = call_env(row.env.reset, record, timeout=s.timeout)
            if row.error is None and not (isinstance(messages, list) and messages):
                row.error = f"reset returned {type(messages).__name__}, expected a non-empty list of messages"
            row.messages = messages if row.error is None else [{"role": "user", "content": record["prompt"]}]
        prompts = [self.format.prompt_ids(row.messages) for row in rows]
        if max_prompt_len is not None:
            for i, ids in enumerate(prompts):
                if len(ids) > max_prompt_len:
                    raise ValueError(f"--environment {self.env_name}: row {i}: the first messages are {len(ids)} "
                                     f"tokens, more than --max-prompt-seq-len {max_prompt_len}")
        P = max(len(ids) for ids in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(rows), P), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), P), dtype=torch.long)
        for i, row_ids in enumerate(prompts):
            ids[i, P - len(row_ids):] = torch.tensor(row_ids)
            mask[i, P - len(row_ids):] = 1
        device = self.engine_device()
        start, new_tokens = time.perf_counter(), 0
        out = self.engine.generate(ids.to(device), mask.to(device), max_new_tokens=s.turn_tokens,
                                   eos_token_id=tok.eos_token_id, pad_token_id=pad, sampling=sampling,
                                   keep_cache=True)
        active = list(range(len(rows)))
        for turn in range(1, s.max_turns + 1):
            new_tokens += self.take(out, active, rows)
            going, observations = [], []
            for r in active:
                obs = self.step(rows[r], last_turn=turn == s.max_turns)
                if obs is not None:
                    going.append(r)
                    observations.append(obs)
            if not going:
                break
            out = self.engine.continue_rows(going, observations, max_new_tokens=s.turn_tokens,
                                            eos_token_id=tok.eos_token_id, pad_token_id=pad, sampling=sampling)
            active = going
        stats = RolloutStats(time.perf_counter() - start, new_tokens, 0.0, 0)
        return self.assemble(rows, ids, mask, stats, sampling.temperature if sampling.do_sample else 1.0)

    def engine_device(self) -> torch.device:
        return next(self.engine.module.parameters()).device

    @staticmethod
    def take(out, active: list[int], rows: list[Row]) -> int:
        """Append each active row's new turn (up to and including its stop token) with its logprobs."""
        count = 0
        for i, r in enumerate(active):
            n = int(out.action_mask[i].sum())
            rows[r].segments.append(("model", out.sequences[i, -out.action_mask.shape[1]:][:n].tolist(),
                                     out.logprobs[i, :n].float().cpu()))
            rows[r].turns += 1
            count += n
        return count

    def step(self, row: Row, last_turn: bool) -> list[int] | None:
        """The environment's answer to the row's last turn: the observation's token ids when the row goes on,
        else None (done, errored, out of turns or of budget)."""
        s = self.settings
        turn_ids = row.segments[-1][1]
        if row.error is not None:  # reset failed: one turn, no reward
            return None
        text = self.tokenizer.decode(turn_ids, skip_special_tokens=True)
        counts = [getattr(row.env, k, 0) for k in ("calls", "well_formed", "errors")]
        value, error = call_env(row.env.step, text, timeout=s.timeout)
        result, error = (None, error) if error else checked_step(value)
        row.tool_calls, row.well_formed, row.tool_errors = (
            total + getattr(row.env, k, 0) - before
            for total, k, before in zip((row.tool_calls, row.well_formed, row.tool_errors),
                                        ("calls", "well_formed", "errors"), counts))
        if error is not None:
            row.error = error
            return None
        if result.reward:
            row.reward += result.reward
            row.turn_rewards.append((row.length - 1, float(result.reward)))
        if result.done or last_turn:
            return None
        obs, rerendered = self.format.observation_ids(row.messages, turn_ids, result.messages)
        row.rerendered += rerendered
        row.messages = [*row.messages, {"role": "assistant", "content": text}, *result.messages]
        if not obs or row.length + len(obs) + s.turn_tokens > s.total_tokens:
            row.truncated = bool(obs)
            return None
        row.segments.append(("env", obs, None))
        return obs

    def assemble(self, rows: list[Row], ids: torch.Tensor, mask: torch.Tensor, stats: RolloutStats,
                 temperature: float) -> Trajectories:
        """The rows as one left-padded-prompt, right-padded batch (a Sample) with the model's tokens as actions."""
        B, P = ids.shape
        N = max(row.length for row in rows)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        sequences = torch.cat([ids, torch.full((B, N), pad, dtype=torch.long)], dim=1)
        attention = torch.cat([mask, torch.zeros((B, N), dtype=torch.long)], dim=1)
        action = torch.zeros((B, N), dtype=torch.bool)
        logprobs = torch.zeros((B, N))
        for b, row in enumerate(rows):
            at = 0
            for role, seg, lp in row.segments:
                sequences[b, P + at:P + at + len(seg)] = torch.tensor(seg, dtype=torch.long)
                attention[b, P + at:P + at + len(seg)] = 1
                if role == "model":
                    action[b, at:at + len(seg)] = True
                    logprobs[b, at:at + len(seg)] = lp
                at += len(seg)
        device = self.engine_device()
        sample = Sample(sequences.to(device), attention.to(device), action.to(device), P, logprobs.to(device), stats,
                        temperature)
        scores = torch.tensor([row.reward if row.error is None else 0.0 for row in rows])
        return Trajectories(sample, scores, [row.turn_rewards if row.error is None else [] for row in rows], rows)
