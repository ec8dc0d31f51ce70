"""Multi-turn environments and tools (rlhf/envs): the calculator's safe evaluator, tool-call parsing, tools run in a
killable process, the observation suffix of a chat template, and the rollout's trajectory: model tokens with their
logprobs as actions, observations attended to but never trained, rewards per turn, and faults as rows."""
import json
import math
import os
import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from hybrid_engine.generation import GenerationOutput, SamplingParams, next_tokens
from rlhf.core.experience import action_logprobs
from rlhf.envs import (
    ChatFormat,
    Environment,
    MultiTurn,
    StepResult,
    ToolEnvironment,
    TurnSettings,
    call_with_timeout,
    parse_tool_calls,
    safe_eval,
)
from rlhf.envs.calculator import CalculatorEnvironment, calculator
from rlhf.models import position_ids_from_mask
from tests.hf_models import save_word_actor


@pytest.mark.parametrize("expression, value", [("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("-7 // 2", -4),
                                                ("2 ** 10", 1024), ("7 / 2", 3.5), ("10 % 4", 2), ("+-3", -3)])
def test_safe_eval_computes_arithmetic(expression, value):
    assert safe_eval(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os')", "not Call"), ("x + 1", "not Name"), ("(1).real", "not Attribute"),
    ("2 ** 1000", "exponent 1000 larger than 64"), ("1 / 0", "division by zero"), ("1 +", "not an arithmetic"),
    ("1" * 300, "longer than 200"), ("'a' * 3", "not Constant"), ("9.9e99 * 10", "out of range"),
])
def test_safe_eval_refuses_everything_else(expression, message):
    with pytest.raises(ValueError, match=message):
        safe_eval(expression)


def test_calculator_tool_answers_with_text():
    assert calculator("6 * 7") == "42" and calculator("1 / 4") == "0.25" and calculator("4 / 2") == "2"


def test_parse_tool_calls_reads_the_hermes_format():
    text = ('I will compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call> and '
            '<tool_call>\n{"name": "search", "parameters": {"q": "x"}}\n</tool_call><tool_call>{oops}</tool_call>'
            '<tool_call>[1]</tool_call><tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
            '<tool_call>{"name": "g", "arguments": 3}</tool_call>')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls[:2]] == [("calculator", {"expression": "2+3"}), ("search", {"q": "x"})]
    assert calls[2].error.startswith("not JSON") and "name" in calls[3].error
    assert (calls[4].name, calls[4].arguments, calls[4].error) == ("f", {"a": 1}, None)
    assert calls[5].error == "arguments must be a JSON object"
    assert parse_tool_calls("no call here, <tool_call> unterminated") == []


def _raises(x):
    raise KeyError(x)


def _hangs():
    time.sleep(60)


def _dies():
    os._exit(3)


def test_a_tool_runs_in_a_process_that_cannot_hang_or_crash_the_run():
    assert call_with_timeout(calculator, {"expression": "2*21"}, 5) == (True, "42")
    assert call_with_timeout(lambda: {"a": 1}, {}, 5) == (True, '{"a": 1}')
    assert call_with_timeout(_raises, {"x": "k"}, 5) == (False, "KeyError: 'k'")
    start = time.perf_counter()
    assert call_with_timeout(_hangs, {}, 0.5) == (False, "timed out after 0.5 s")
    assert time.perf_counter() - start < 5
    ok, why = call_with_timeout(_dies, {}, 5)
    assert not ok and "died" in why
    ok, why = call_with_timeout(calculator, {"wrong": "1"}, 5)
    assert not ok and why.startswith("TypeError")


@pytest.fixture(scope="module")
def smol_tokenizer():
    from tests.real_model import real_model_dir

    return AutoTokenizer.from_pretrained(real_model_dir())


def test_observation_tokens_are_the_templates_suffix_after_the_models_turn(smol_tokenizer):
    tok = smol_tokenizer
    fmt = ChatFormat(tok)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    turn = tok("<tool_call>{}</tool_call>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, rerendered = fmt.observation_ids(messages, turn, [{"role": "tool", "content": "5"}])
    assert not rerendered and tok.decode(ids) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    # the whole conversation, tokenized as one, is the prompt + the model's turn + this suffix (same text)
    whole = fmt.render([*messages, {"role": "assistant", "content": "<tool_call>{}</tool_call>"},
                        {"role": "tool", "content": "5"}])
    assert tok.decode(fmt.prompt_ids(messages) + turn + ids) == whole
    # a turn cut by the token budget (no end-of-turn token): the suffix closes it
    ids, _ = fmt.observation_ids(messages, turn[:-1], [{"role": "user", "content": "go on"}])
    assert tok.decode(ids) == "<|im_end|>\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_rerenders_earlier_turns_gets_the_probe_suffix(smol_tokenizer):
    """Qwen3's template drops earlier <think> blocks: the conversation re-rendered is no extension of what the model
    saw. The generated tokens stay; the observation is the suffix the template writes after any assistant turn."""
    tok = smol_tokenizer
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = ChatFormat(tok)
    turn = tok("<think>hmm</think>5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, rerendered = fmt.observation_ids([{"role": "user", "content": "2+3?"}], turn,
                                          [{"role": "user", "content": "sure?"}])
    assert rerendered and tok.decode(ids) == "\n<|im_start|>user\nsure?<|im_end|>\n<|im_start|>assistant\n"


class ReprefillEngine:
    """The engine's turn API (generate with keep_cache, continue_rows) done the slow, obviously right way: every
    token re-runs the Hugging Face model over each row's whole trajectory so far. For the rollout's own logic."""

    def __init__(self, model, pad: int):
        self.module, self.pad, self.rows = model, pad, []

    def _generate(self, rows: list[list[int]], max_new_tokens, eos_token_id, sampling) -> GenerationOutput:
        new = [[] for _ in rows]
        logprobs = torch.zeros(len(rows), max_new_tokens)
        done = torch.zeros(len(rows), dtype=torch.bool)
        for t in range(max_new_tokens):
            seqs = [r + n for r, n in zip(rows, new)]
            width = max(map(len, seqs))
            ids = torch.tensor([[self.pad] * (width - len(s)) + s for s in seqs])
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
            with torch.no_grad():
                logits = self.module(input_ids=ids, attention_mask=mask,
                                     position_ids=position_ids_from_mask(mask)).logits[:, -1].float()
            tokens, lps = next_tokens(logits, sampling)
            for i in range(len(rows)):
                if not done[i]:
                    new[i].append(int(tokens[i]))
                    logprobs[i, t] = lps[i]
                    done[i] = int(tokens[i]) == eos_token_id
            if done.all():
                break
        N = max_new_tokens
        action = torch.tensor([[j < len(n) for j in range(N)] for n in new])
        sequences = torch.tensor([n + [self.pad] * (N - len(n)) for n in new])
        for i, n in enumerate(new):
            self.rows_by_index[i if self.kept is None else self.kept[i]] += n
        return GenerationOutput(sequences, logprobs * action, action)

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, sampling,
                 keep_cache=False):
        self.rows_by_index = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
        self.kept = None
        return self._generate([list(r) for r in self.rows_by_index], max_new_tokens, eos_token_id, sampling)

    def continue_rows(self, rows, tokens, max_new_tokens, eos_token_id, pad_token_id, sampling):
        for r, ids in zip(rows, tokens):
            self.rows_by_index[r] += ids
        self.kept = list(rows)
        return self._generate([list(self.rows_by_index[r]) for r in rows], max_new_tokens, eos_token_id, sampling)


class Scripted(Environment):
    """Row-dependent observations: row k's reply is k+1 words; the row of prompt 'review: pizza' stops after its
    second turn with reward 1; the others get 0.25 per turn."""

    def reset(self, record):
        self.prompt, self.turn = record["prompt"], 0
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.turn += 1
        if "pizza" in self.prompt and self.turn == 2:
            return StepResult(reward=1.0, done=True)
        words = " ".join(["good"] * (len(self.prompt) % 4 + 1))
        return StepResult([{"role": "user", "content": words}], reward=0.25)


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("actor")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    _, tokenizer = save_word_actor(path, config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer


PROMPTS = [{"prompt": "review: pizza"}, {"prompt": "review: the movie"}, {"prompt": "review: a hotel room"}]


def test_a_three_turn_trajectory_is_tokens_with_the_models_logprobs_as_actions(word_model):
    model, tok = word_model
    engine = ReprefillEngine(model, tok.pad_token_id)
    rollout = MultiTurn(engine, tok, Scripted, TurnSettings(max_turns=3, turn_tokens=5, total_tokens=64))
    traj = rollout.rollout(PROMPTS, SamplingParams(do_sample=True, temperature=0.9,
                                                   generator=torch.Generator().manual_seed(1)))
    s = traj.sample
    assert [row.turns for row in traj.rows] == [2, 3, 3]  # the pizza row is done after its second turn
    assert traj.scores.tolist() == [1.25, 0.75, 0.75]
    for b, row in enumerate(traj.rows):
        roles = [role for role, _, _ in row.segments]
        assert roles == ["model", "env", "model"] + (["env", "model"] if b else [])
        tail = [t for _, ids, _ in row.segments for t in ids]
        assert s.sequences[b, s.prompt_len:s.prompt_len + len(tail)].tolist() == tail
        assert s.attention_mask[b, s.prompt_len:].sum() == len(tail)  # observations are attended to
        model_tokens = sum(len(ids) for role, ids, _ in row.segments if role == "model")
        assert s.action_mask[b].sum() == model_tokens  # ... but only the model's tokens are actions
        # the observation is the plain-text turn (no chat template), tokenized once
        words = " ".join(["good"] * (len(PROMPTS[b]["prompt"]) % 4 + 1))
        assert row.segments[1][1] == tok(f"\n\nHuman: {words}\n\nAssistant:", add_special_tokens=False)["input_ids"]
    lens = [len(row.segments[1][1]) for row in traj.rows]
    assert len(set(lens)) > 1, lens  # observations differ in length per row
    # the rollout's logprobs are one training forward's over the whole trajectory
    forward = action_logprobs(model, s.sequences, s.attention_mask, s.prompt_len, 0.9)
    gap = (forward - s.logprobs).abs().masked_fill(~s.action_mask, 0).max()
    assert gap < 1e-5, gap
    # a turn's reward sits at its last token
    pizza = traj.rows[0]
    first_end = len(pizza.segments[0][1]) - 1
    assert traj.turn_rewards[0][0] == (first_end, 0.25)


class Faulty(Environment):
    def __init__(self, fault: str = "raise"):
        self.fault = fault

    def reset(self, record):
        self.fault = record["fault"]
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        if self.fault == "raise":
            raise RuntimeError("boom")
        if self.fault == "type":
            return {"reward": 1}
        if self.fault == "nan":
            return StepResult(reward=math.nan)
        if self.fault == "hang":
            time.sleep(30)
        if self.fault == "messages":
            return StepResult(["not a dict"])
        return StepResult(reward=1.0, done=True)


def test_environment_faults_are_rows_with_zero_reward_not_crashes(word_model):
    model, tok = word_model
    faults = ["raise", "type", "nan", "hang", "messages", "fine"]
    rollout = MultiTurn(ReprefillEngine(model, tok.pad_token_id), tok, Faulty,
                        TurnSettings(max_turns=2, turn_tokens=3, total_tokens=32, timeout=0.5))
    start = time.perf_counter()
    traj = rollout.rollout([{"prompt": "review: pizza", "fault": f} for f in faults], SamplingParams())
    assert time.perf_counter() - start < 20
    errors = [row.error for row in traj.rows]
    assert errors[0] == "raised RuntimeError: boom"
    assert errors[1] == "step returned dict, expected StepResult(messages, reward, done)"
    assert errors[2] == "step returned reward nan, expected a finite number"
    assert errors[3] == "took longer than 0.5 s"
    assert errors[4] == "step returned messages that are not a list of {'role', 'content'} dicts"
    assert errors[5] is None
    assert traj.scores.tolist() == [0, 0, 0, 0, 0, 1.0]
    assert traj.counts()["env_errors"] == 5


def test_the_trainer_stops_after_max_env_errors_naming_environment_row_and_error():
    from types import SimpleNamespace

    from rlhf.envs.rollout import Row
    from rlhf.steps.rl_trainer import RLTrainer

    trainer = SimpleNamespace(env_errors=0, cfg=SimpleNamespace(env=SimpleNamespace(
        max_env_errors=2, environment="f.py:Env", tools=None)))
    rows = [Row(None, error=None), Row(None, error="raised KeyError: 'x'")]
    traj = SimpleNamespace(rows=rows, counts=lambda: {"env_errors": 1})
    assert RLTrainer.check_env(trainer, traj) == {"env_errors": 1}
    RLTrainer.check_env(trainer, traj)
    with pytest.raises(ValueError, match=r"^--environment f\.py:Env: row 1: raised KeyError: 'x' \(3 failed rows, "
                                         r"more than --max-env-errors 2\)$"):
        RLTrainer.check_env(trainer, traj)


def test_tool_environment_answers_calls_and_counts_them():
    env = ToolEnvironment([calculator], timeout=5)
    assert env.reset({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    result = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
                      '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{bad</tool_call>'
                      '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>')
    assert [m["content"] for m in result.messages][0] == "42" and not result.done
    assert result.messages[1]["content"].startswith("error: no tool named 'nope'")
    assert result.messages[2]["content"].startswith("error: not JSON")
    assert result.messages[3]["content"] == "error: ValueError: division by zero"
    # 4 calls, 3 well formed (the unknown name is well formed), 1 tool fault (the tool raised)
    assert (env.calls, env.well_formed, env.errors) == (4, 3, 1)
    assert env.step("The answer is 42.").done


def test_calculator_environment_rewards_the_final_number():
    env = CalculatorEnvironment(timeout=5)
    messages = env.reset({"prompt": "What is 6 * 7?", "answer": "42"})
    assert messages[0]["role"] == "system" and "<tool_call>" in messages[0]["content"]
    step = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 7"}}</tool_call>')
    assert step.messages == [{"role": "tool", "name": "calculator", "content": "42"}] and not step.done
    assert env.step("It is 42.") == StepResult(reward=1.0, done=True)
    assert env.step("It is 41.").reward == 0.0 and env.step("1,042").reward == 0.0
    with pytest.raises(ValueError, match="'answer' field"):
        env.reset({"prompt": "x"})


def test_rollout_records_are_json(word_model, tmp_path):
    from rlhf.envs.rollout import trajectory_records

    model, tok = word_model
    rollout = MultiTurn(ReprefillEngine(model, tok.pad_token_id), tok, Scripted,
                        TurnSettings(max_turns=2, turn_tokens=3, total_tokens=32))
    traj = rollout.rollout(PROMPTS[:2], SamplingParams())
    records = trajectory_records(traj, tok, step=7)
    line = json.loads(json.dumps(records[1]))
    assert line["step"] == 7 and line["row"] == 1 and [t["role"] for t in line["turns"]] == ["model", "env", "model"]
    assert len(line["turns"][0]["logprobs"]) == len(line["turns"][0]["ids"]) and "logprobs" not in line["turns"][1]
