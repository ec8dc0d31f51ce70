"""Tools: plain Python functions with docstrings, described to the model through the chat template's `tools=` and
called from its turns.

    def calculator(expression: str) -> str:
        '''Evaluate an arithmetic expression.

        Args:
            expression: the expression, e.g. "12 * (3 + 4)"
        '''

    rlhf train --step 3 --algorithm grpo --tools tools.py:calculator,search --reward-fn reward.py:exact ...

A call is the Hermes / Qwen format, `<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}
</tool_call>` (several per turn allowed; `"parameters"` is read as `"arguments"` too, as Llama 3.1 writes it). Each
call runs in a forked process, killed after `timeout` seconds: a tool never hangs a run. A call that is not JSON,
names no known tool, has wrong arguments, raises or times out gets an error message back as the tool's answer;
the last three (the tool's own failures) count as errors (`errors`), the others only as calls that were not
well-formed or named no tool. A turn without a call ends the trajectory (the reward function scores its final answer).
"""
from __future__ import annotations

import json
import multiprocessing
import re
from collections.abc import Callable
from dataclasses import dataclass

from rlhf.envs.base import Environment, StepResult
from rlhf.runtime.user_code import import_object

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class ToolCall:
    name: str | None
    arguments: dict | None
    error: str | None = None  # why the call cannot be made (malformed JSON, no name, arguments not a mapping)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` of a model turn, in order; a malformed one as a ToolCall with `error`."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(ToolCall(None, None, f"not JSON ({err.msg} at character {err.pos})"))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(ToolCall(None, None, 'expected {"name": ..., "arguments": {...}}'))
            continue
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(ToolCall(value["name"], None, "arguments must be a JSON object"))
            continue
        calls.append(ToolCall(value["name"], arguments))
    return calls


def _run(fn: Callable, arguments: dict, conn) -> None:
    try:
        conn.send(("ok", fn(**arguments)))
    except BaseException as err:  # noqa: BLE001 - whatever the tool raises is its answer
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def call_with_timeout(fn: Callable, arguments: dict, timeout: float) -> tuple[bool, str]:
    """(ok, text): the tool's result as text, or why it failed; run in a forked process killed after `timeout`
    seconds, so neither a hang nor a crash of the tool reaches the run."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run, args=(fn, arguments, send), daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(timeout):
            return False, f"timed out after {timeout:g} s"
        status, value = receive.recv()
    except EOFError:
        return False, f"the tool's process died (exit code {process.exitcode})"
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()
    if status != "ok":
        return False, value
    return True, value if isinstance(value, str) else json.dumps(value, default=str)


def load_tools(spec: str) -> list[Callable]:
    """`file.py:fn,fn2` or `module:fn` -> the functions; one line for a name that is not a function."""
    target, sep, names = spec.rpartition(":")
    tools = []
    for name in names.split(","):
        fn = import_object(f"{target}{sep}{name.strip()}", "--tools", "function")
        if not callable(fn):
            raise ValueError(f"--tools {spec}: {name.strip()!r} is not a function")
        tools.append(fn)
    return tools


class ToolEnvironment(Environment):
    """The model talks to tools: the record's prompt is the user's message; each turn's tool calls are run and
    their results come back as `tool` messages; a turn without a call ends the trajectory. The reward is the
    reward function's on the final answer (this environment gives none of its own)."""
    tools: list = []
    timeout: float = 10.0

    def __init__(self, tools: list[Callable] | None = None, timeout: float | None = None):
        if tools is not None:
            self.tools = tools
        if timeout is not None:
            self.timeout = timeout
        self.by_name = {fn.__name__: fn for fn in self.tools}
        self.calls = self.well_formed = self.errors = 0

    def reset(self, record: dict) -> list[dict]:
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text: str) -> StepResult:
        calls = parse_tool_calls(text)
        if not calls:
            return StepResult(done=True)
        messages = []
        for call in calls:
            self.calls += 1
            ok, result = self.call(call)
            self.well_formed += call.error is None
            self.errors += not ok and call.error is None and call.name in self.by_name  # the tool's own fault
            messages.append({"role": "tool", "name": call.name or "?", "content": result if ok else f"error: {result}"})
        return StepResult(messages)

    def call(self, call: ToolCall) -> tuple[bool, str]:
        if call.error is not None:
            return False, call.error
        fn = self.by_name.get(call.name)
        if fn is None:
            return False, f"no tool named {call.name!r} (tools: {', '.join(self.by_name)})"
        return call_with_timeout(fn, call.arguments, self.timeout)
