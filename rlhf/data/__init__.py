"""Data for the three RLHF steps: formats, blending and per-step splits, tokenization, a synthetic task."""

from rlhf.data.blend import (
    DataSource,
    load_step_examples,
    parse_data_spec,
    parse_data_split,
    split_indices,
    step_slice,
    train_eval_split,
)
from rlhf.data.formats import DataError, Example, load_examples, parse_record, split_hh_dialogue
from rlhf.data.tokenize import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    PairDataset,
    PromptDataset,
    SFTDataset,
    build_pair_dataset,
    build_prompt_dataset,
    build_sft_dataset,
    encode_answer,
    encode_prompt,
    format_prompt,
    pad_token_id,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
    "DataError",
    "DataSource",
    "Example",
    "PairDataset",
    "PromptDataset",
    "SFTDataset",
    "build_pair_dataset",
    "build_prompt_dataset",
    "build_sft_dataset",
    "encode_answer",
    "encode_prompt",
    "format_prompt",
    "load_examples",
    "load_step_examples",
    "pad_token_id",
    "parse_data_spec",
    "parse_data_split",
    "parse_record",
    "split_hh_dialogue",
    "split_indices",
    "step_slice",
    "train_eval_split",
]
