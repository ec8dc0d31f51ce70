"""Multi-turn environments and tools for step 3 (`--environment`, `--tools`): what an environment is
(base.py), tool calls (tools.py), the built-in calculator (calculator.py), and the rollout that runs them on the
hybrid engine's cache (rollout.py)."""

from rlhf.envs.base import Environment, StepResult, load_environment
from rlhf.envs.calculator import CalculatorEnvironment, safe_eval
from rlhf.envs.rollout import ChatFormat, MultiTurn, Trajectories, TurnSettings
from rlhf.envs.tools import ToolEnvironment, call_with_timeout, load_tools, parse_tool_calls

__all__ = ["CalculatorEnvironment", "ChatFormat", "Environment", "MultiTurn", "StepResult", "ToolEnvironment",
           "Trajectories", "TurnSettings", "call_with_timeout", "load_environment", "load_tools", "parse_tool_calls",
           "safe_eval"]
