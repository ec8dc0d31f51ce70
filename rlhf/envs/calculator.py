"""The built-in `calculator` environment: prompt/answer records (`{"prompt": "What is 17 * 23?", "answer": "391"}`),
a calculator tool the model may call, and reward 1 when the final answer's last number equals the record's answer.

    rlhf train --step 3 --algorithm grpo --environment calculator --data arithmetic.jsonl ...

The calculator is a safe evaluator of arithmetic (numbers, + - * / // % **, parentheses, unary minus), walking
Python's syntax tree; it never calls `eval`, and refuses names, calls, attributes and powers or results too large.
The conversation starts with a system message saying how to call it (SmolLM2's template, for one, does not render
`tools=`), then the record's prompt as the user's.
"""
from __future__ import annotations

import ast
import math
import operator
import re

from rlhf.envs.base import StepResult
from rlhf.envs.tools import ToolEnvironment, parse_tool_calls

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_EXPONENT, MAX_MAGNITUDE, MAX_LENGTH = 64, 1e100, 200
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def safe_eval(expression: str) -> float | int:
    """The value of an arithmetic expression; ValueError for anything else (names, calls, huge powers)."""
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression ({err.msg})") from None

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = value(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} larger than {MAX_EXPONENT}")
            try:
                result = OPERATORS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
                raise ValueError("result out of range")
            return result
        raise ValueError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")

    return value(tree.body)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "12 * (3 + 4)"
    """
    result = safe_eval(expression)
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(round(result, 6) if isinstance(result, float) else result)


SYSTEM = ("You can use a calculator. To call it, write <tool_call>{\"name\": \"calculator\", \"arguments\": "
          "{\"expression\": \"2 + 3\"}}</tool_call> and wait for its result. When you know the answer, reply with "
          "the number only.")


def last_number(text: str) -> str | None:
    numbers = NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def same_number(a: str | None, b: str) -> bool:
    try:
        return a is not None and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return False


class CalculatorEnvironment(ToolEnvironment):
    """Arithmetic with a calculator tool: reward 1.0 when the final answer (a turn without a tool call) ends with
    the record's `answer`, 0 otherwise (and 0 when the turns run out)."""
    tools = [calculator]

    def reset(self, record: dict) -> list[dict]:
        if "answer" not in record:
            raise ValueError("the calculator environment needs records with an 'answer' field")
        self.answer = str(record["answer"])
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": record["prompt"]}]

    def step(self, text: str) -> StepResult:
        if parse_tool_calls(text):
            return super().step(text)
        return StepResult(reward=float(same_number(last_number(text), self.answer)), done=True)

