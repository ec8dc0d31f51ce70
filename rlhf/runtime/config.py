"""Step configs as typed dataclasses and the argparse generated from them: every field carries its --help
text and its bounds; flags are DeepSpeed-Chat's names in dash form (``--zero-stage``, ``--lora-dim``). A ``prefix`` lets
one parser hold several steps (``--sft-learning-rate``, ``--rm-learning-rate``)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from rlhf.models import ModelOptions, require_model_source, require_tokenizer_source
from rlhf.runtime.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, init_distributed


@dataclass(frozen=True)
class Bounds:
    """The values a numeric option accepts: ``low`` and ``high``, each included unless ``*_open``; None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return "a positive number" if self.low == 0 and self.low_open else f"at least {self.low:g}"
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1, NON_NEGATIVE, POSITIVE = Bounds(1), Bounds(0), Bounds(0, low_open=True)


PROBABILITY = Bounds(0, 1, high_open=True)  # dropout, a held-out share: 1 would leave nothing
UNIT = Bounds(0, 1)  # gamma, lambda, an EMA decay


def bounded(kind: type, bounds: Bounds) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses values outside ``bounds``."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value not in bounds:
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


def check_bounds(cfg: Any) -> None:
    """One-line ValueError for the first numeric option of ``cfg`` (groups included) outside its field's bounds.
    None (a per-algorithm default, "keep the model's") is always accepted."""
    for option in _options_by_name(type(cfg)).values():
        value = get_option(cfg, option.name)
        if option.bounds is not None and isinstance(value, (int, float)) and value not in option.bounds:
            raise ValueError(f"--{option.flag} {value}: expected {option.bounds}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line through ``run_cli`` (a ValueError: "prog: error: ..., exit status 2), not
    the usage block, which for ``rlhf train`` is 120 lines. Flags are never abbreviated (``--lr 1e-5`` would be taken
    as ``--lr-scheduler-type``); an unknown flag close to a known one is named ("did you mean --actor-model?")."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ValueError(f"{message}{self._suggestion(message)} ({self.prog} --help lists the options)")

    def _suggestion(self, message: str) -> str:
        """"; did you mean --x?" for the unknown flags of an "unrecognized arguments" message that are close to a
        known flag (difflib's ratio at least 0.7: ``--model`` -> ``--actor-model``, not ``--lr`` -> ``--lam``)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [s for s in self._option_string_actions if s.startswith("--")]
        hints = {}
        for token in message.split(":", 1)[1].split():
            flag = token.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.7) if flag.startswith("--") else []
            if close:
                hints[flag] = close[0]
        if len(hints) == 1:
            return f"; did you mean {next(iter(hints.values()))}?"
        return "; did you mean " + ", ".join(f"{v} for {k}" for k, v in hints.items()) + "?" if hints else ""


def opt(default: Any, help: str, bounds: Bounds | None = None, **kwargs) -> Any:
    """A dataclass field with its --help text and, for a number, the values it accepts (checked as the flag is
    parsed and as a config is built in code); other keyword arguments go to argparse (``choices``)."""
    metadata = {"help": help, **({"bounds": bounds} if bounds is not None else {}), **kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def group(cls: type, prefix: str = "", helps: dict[str, str] | None = None, **defaults) -> Any:
    """A field holding a group of options (a dataclass of ``opt`` fields). Its flags are its fields' names after
    ``prefix`` (``actor_`` + ``learning_rate``: ``--actor-learning-rate``), so grouping never renames a flag;
    ``defaults`` and ``helps`` replace the group class's own for this field (the actor's and the critic's
    learning rates differ). ``{role}`` in a help text is the prefix without its underscore."""
    return field(default_factory=lambda: cls(**defaults),
                 metadata={"group": cls, "prefix": prefix, "helps": helps or {}})


@dataclass(frozen=True)
class Option:
    """One leaf option of a config class: its flat name (the flag's dest, unique in the config), the attribute
    path to it, and its field."""

    name: str                 # e.g. "actor_learning_rate"
    path: tuple[str, ...]     # e.g. ("actor", "learning_rate")
    field: dataclasses.Field
    kind: Any                 # the field's type hint
    help: str

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")

    @property
    def bounds(self) -> Bounds | None:
        return self.field.metadata.get("bounds")


def options(config_cls: type, prefix: str = "", path: tuple[str, ...] = (), helps: dict | None = None) -> list[Option]:
    """Every leaf option of ``config_cls``, groups expanded in field order."""
    out = []
    hints = get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if "group" in meta:
            out += options(meta["group"], prefix + meta["prefix"], (*path, f.name), meta["helps"])
            continue
        role = prefix.rstrip("_").replace("_", " ")
        text = (helps or {}).get(f.name, meta.get("help", f.name)).replace("{role}", role)
        out.append(Option(prefix + f.name, (*path, f.name), f, hints[f.name], text))
    return out


def option_bounds(config_cls: type, name: str) -> Bounds | None:
    """The bounds of ``config_cls``'s option ``name`` (another parser's flag that takes the same values)."""
    return next(option.bounds for option in options(config_cls) if option.name == name)


@functools.cache
def _options_by_name(config_cls: type) -> dict[str, Option]:
    """``options(config_cls)`` by flat name, walked once per class (get/set_option and check_bounds look up every
    option of a 72-option config when one is built)."""
    return {option.name: option for option in options(config_cls)}


def _option(cfg: Any, name: str) -> tuple[Any, str]:
    option = _options_by_name(type(cfg)).get(name)
    if option is None:
        raise TypeError(f"{type(cfg).__name__} has no option {name!r}")
    owner = cfg
    for attr in option.path[:-1]:
        owner = getattr(owner, attr)
    return owner, option.path[-1]


def get_option(cfg: Any, name: str) -> Any:
    """The value of the option named ``name`` (its flag's dest, e.g. ``actor_learning_rate``)."""
    owner, attr = _option(cfg, name)
    return getattr(owner, attr)


def set_option(cfg: Any, name: str, value: Any) -> None:
    owner, attr = _option(cfg, name)
    setattr(owner, attr, value)


def config_from_options(config_cls: type, **values) -> Any:
    """``config_cls`` with the named options (flag names, groups flattened) set and its bounds checked: the way code
    states a config in the CLI's terms, ``config_from_options(RLConfig, actor_learning_rate=1e-3)``."""
    cfg = config_cls()
    for name, value in values.items():
        set_option(cfg, name, value)
    check_bounds(cfg)
    return cfg


@dataclass
class StepConfig:
    """Options common to SFT and reward-model training (DeepSpeed-Chat defaults unless noted)."""

    model_name_or_path: str | None = opt(None, "Hugging Face model id or local path; none: build from --preset")
    tokenizer_name_or_path: str | None = opt(None, "tokenizer id or path (default: the model's)")
    data: list[str] = opt([], "data files or dataset dirs, each PATH or PATH:WEIGHT (JSON, JSONL, .jsonl.gz)")
    data_split: str = opt("2,4,4", "proportions of each pair source for steps 1,2,3 (normalised, disjoint)")
    output_dir: str = opt("outputs/model", "where the checkpoint is written")
    # Not inside output_dir: the atomic checkpoint save replaces that whole directory.
    metrics_dir: str | None = opt(None, "where metrics.jsonl and the plot go (default: output dir's parent)")
    max_seq_len: int = opt(512, "max tokens of prompt + answer (longer sequences are truncated)", bounds=AT_LEAST_1)
    per_device_train_batch_size: int = opt(16, "training batch size per device", bounds=AT_LEAST_1)
    per_device_eval_batch_size: int = opt(16, "evaluation batch size per device", bounds=AT_LEAST_1)
    learning_rate: float = opt(1e-3, "initial learning rate (after warmup)", bounds=POSITIVE)
    weight_decay: float = opt(0.0, "weight decay (not applied to biases and norms)", bounds=NON_NEGATIVE)
    num_train_epochs: int = opt(1, "passes over the training data", bounds=AT_LEAST_1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", bounds=AT_LEAST_1)
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule after warmup",
                                 choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                          "constant_with_warmup"])
    num_warmup_steps: int = opt(0, "optimizer steps of linear warmup", bounds=NON_NEGATIVE)
    warmup_ratio: float | None = opt(None, "linear warmup over this fraction of the run's optimizer steps, in place "
                                     "of --num-warmup-steps (default: use the steps)", bounds=UNIT)
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)", bounds=NON_NEGATIVE)
    eval_fraction: float = opt(0.1, "share of this step's records held out for evaluation", bounds=PROBABILITY)
    seed: int = opt(1234, "seed of the data split, shuffling and initialisation")
    # Our default is fp32 (DeepSpeed-Chat's fp16 does not run on CPU); use bf16 on GPUs that support it.
    dtype: str = opt("fp32", "training precision", choices=["fp32", "bf16", "fp16"])
    zero_stage: int = opt(0, "ZeRO stage for this model", choices=[0, 1, 2, 3])
    offload: bool = opt(False, "offload optimizer state (and ZeRO-3 parameters) to CPU memory")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    dropout: float | None = opt(None, "override the model's dropout probabilities (default: keep the model's)",
                                bounds=PROBABILITY)
    lora_dim: int = opt(0, "LoRA rank (0: no LoRA)", bounds=NON_NEGATIVE)
    lora_module_name: str = opt("layers.", "LoRA is applied to Linear layers whose name contains this")
    only_optimize_lora: bool = opt(False, "train only the LoRA weights")
    lora_learning_rate: float = opt(5e-4, "learning rate of the LoRA weights", bounds=POSITIVE)
    print_loss: bool = opt(False, "print the loss of every step")
    log_interval: int = opt(10, "optimizer steps between metrics.jsonl records", bounds=AT_LEAST_1)
    disable_tqdm: bool = opt(False, "no progress bars: one line per logged step instead")

    def __post_init__(self) -> None:
        check_bounds(self)

    def metrics_path(self) -> str:
        return self.metrics_dir or str(Path(self.output_dir).resolve().parent)

    def model_options(self) -> ModelOptions:
        # Weights stay fp32: DeepSpeed casts the engine to bf16/fp16 and keeps fp32 master weights itself.
        return ModelOptions(dtype="fp32", dropout=self.dropout, gradient_checkpointing=self.gradient_checkpointing,
                            lora_dim=self.lora_dim, lora_module_name=self.lora_module_name,
                            only_optimize_lora=self.only_optimize_lora)


def _scalar_type(annotation: Any) -> type:
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_cls: type, prefix: str = "",
                    skip: tuple[str, ...] = (), defaults: Any = None) -> None:
    """One ``--{prefix}{option}`` flag per leaf option of ``config_cls`` (groups expanded), with its help text,
    bounds and default (from ``defaults``, a config instance, when given). ``skip`` names options (flat names)."""
    defaults = defaults or config_cls()
    for option in options(config_cls):
        if option.name in skip:
            continue
        flag = f"--{prefix}{option.flag}"
        dest = f"{prefix.replace('-', '_')}{option.name}"
        default = get_option(defaults, option.name)
        extra = {k: v for k, v in option.field.metadata.items() if k not in ("help", "bounds")}
        shown = default not in (None, [], False)
        help_text = option.help + (f" (default: {default})" if shown else "")
        kind = _scalar_type(option.kind)
        if kind is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif get_origin(kind) is list:
            parser.add_argument(flag, dest=dest, nargs="+", default=list(default),
                                metavar=extra.get("metavar", "PATH[:WEIGHT]"), help=help_text)
        else:
            bounds = option.bounds
            parser.add_argument(flag, dest=dest, type=bounded(kind, bounds) if bounds else kind, default=default,
                                help=help_text, **extra)


def config_from_args(config_cls: type, args: argparse.Namespace, prefix: str = "", **overrides) -> Any:
    """Build ``config_cls`` from the flags ``add_config_args`` added (skipped options keep their defaults);
    ``overrides`` name options as flags do (``actor_model_name_or_path``)."""
    values = {}
    for option in options(config_cls):
        dest = f"{prefix.replace('-', '_')}{option.name}"
        if hasattr(args, dest):
            values[option.name] = getattr(args, dest)
    values.update(overrides)
    return config_from_options(config_cls, **values)


def step_main(config_cls: type, run: Callable, description: str, argv: list[str] | None = None) -> dict:
    """`python -m rlhf.<step>`: every field of `config_cls` as a flag, then `run(config)`; prints the summary."""
    # under `python -m rlhf.steps.sft` the module is __main__; its spec keeps the name
    module = sys.modules[config_cls.__module__]
    prog = f"python -m {getattr(module.__spec__, 'name', None) or config_cls.__module__}"
    parser = ArgumentParser(prog=prog, description=description)
    add_launcher_args(parser)
    add_config_args(parser, config_cls)
    args = parser.parse_args(argv)
    cfg = config_from_args(config_cls, args)
    require_output_dir(cfg.output_dir)
    if getattr(cfg, "model_name_or_path", None):  # step 3's models: rlhf.steps.rl.require_step3_models
        require_model_source(cfg.model_name_or_path, "--model-name-or-path")
    if getattr(cfg, "tokenizer_name_or_path", None):
        require_tokenizer_source(cfg.tokenizer_name_or_path, "--tokenizer-name-or-path")
    init_distributed(timeout_s=args.collective_timeout)
    summary = run(cfg)
    print(summary)
    return summary


def require_output_dir(path: str | Path, flag: str = "--output-dir") -> None:
    """One-line ValueError unless ``path`` is a directory this process can write in, or can be made as one.
    Nothing is left behind: a probe file in the nearest existing directory is made and removed."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a directory (expected a directory to write into)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, so no directory can be made under it")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".rlhf-write-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write in {existing} ({err.strerror}; expected a writable "
                         "directory)") from err


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """The flag the ``deepspeed`` launcher passes to every process (torchrun sets LOCAL_RANK instead), and the
    collective timeout of a run across processes."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="set by the deepspeed launcher; init_distributed reads LOCAL_RANK either way")
    parser.add_argument("--collective-timeout", type=bounded(float, POSITIVE), default=DEFAULT_COLLECTIVE_TIMEOUT_S,
                        metavar="SECONDS",
                        help="how long a rank waits in a collective for a silent peer (a lost node, a pulled "
                        "cable) before the run stops with an error naming the lost ranks (default: "
                        f"{DEFAULT_COLLECTIVE_TIMEOUT_S:.0f}); given to torch.distributed and DeepSpeed")


def num_update_steps(num_batches: int, cfg: StepConfig) -> int:
    """Optimizer steps the run will take (what the learning-rate schedule spans)."""
    total = math.ceil(num_batches / cfg.gradient_accumulation_steps) * cfg.num_train_epochs
    return min(total, cfg.max_steps) if cfg.max_steps > 0 else total


# -- config files: every option of a parser as YAML, flags on the command line overriding it
NOT_IN_CONFIG_FILES = ("help", "config", "local_rank", "resume", "overwrite")  # per launch, not per run


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options of a YAML config file (a mapping of option names, ``actor-learning-rate`` or
    ``actor_learning_rate``, to values), keyed by their argparse dest."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror})") from err
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got a {type(values).__name__}")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def _from_file(action: argparse.Action, value: Any, where: str) -> Any:
    """A config file's value for ``action``, converted and checked as the flag's own text would be; None (YAML's
    null) is the unset value of options that default to None."""
    if value is None:
        return None
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*")
    if isinstance(value, list) and not many:
        raise ValueError(f"{where}: expected one value, got a list")
    parsed = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, (dict, list)):
            raise ValueError(f"{where}: expected a number or a string, got {item!r}")
        try:  # YAML reads 1e-5 as a string and 0.1 as a float: the flag's own type decides either way
            item = action.type(str(item)) if action.type is not None else str(item)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from err
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{where}: {item!r}, expected one of {', '.join(map(str, action.choices))}")
        parsed.append(item)
    return parsed if many else parsed[0]


def apply_config_file(parser: argparse.ArgumentParser, values: dict[str, Any], path: str | Path) -> None:
    """Make a config file's values ``parser``'s defaults, each checked as its flag is: a flag given on the command
    line still wins. An unknown option is one line naming the file and the nearest option."""
    import difflib

    actions = {action.dest: action for action in parser._actions if action.dest not in NOT_IN_CONFIG_FILES}
    defaults = {}
    for key, value in values.items():
        if key not in actions:
            near = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" ({parser.prog} --help lists the options)"
            raise ValueError(f"{path}: unknown option '{key}'{hint}")
        defaults[key] = _from_file(actions[key], value, f"{path}: {key}")
    parser.set_defaults(**defaults)


def config_file_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``args`` as a config file that ``apply_config_file`` reads back to the same options, in the parser's order."""
    import yaml

    values = {action.dest: getattr(args, action.dest) for action in parser._actions
              if action.dest not in NOT_IN_CONFIG_FILES and hasattr(args, action.dest)}
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
