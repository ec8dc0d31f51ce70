"""benchmarks/throughput.py's bandwidth floor counts the bytes a decode step reads, worked out by hand here."""
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
_SPEC = importlib.util.spec_from_file_location("throughput", _PATH)
throughput = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(throughput)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_decode_step_bytes_counts_looked_up_rows_the_lm_head_and_the_cache(tied):
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)  # fp32: 4 bytes a value
    # per layer: q 16x16, k and v 16x8 (2 kv heads of 4), o 16x16, gate/up/down 3 x 16x32, two norms of 16
    layers = 2 * (256 + 128 + 128 + 256 + 3 * 512 + 2 * 16)
    lm_head = 100 * 16  # read whole every step (the tied table is the lm_head)
    looked_up = 3 * 16  # batch 3: three rows of the embedding table, not its 100
    cache = 2 * 2 * 3 * 2 * 10 * 4  # K and V, 2 layers, batch 3, 2 kv heads, 10 slots, head dim 4
    assert throughput.decode_step_bytes(model, batch=3, length=10) == 4 * (layers + 16 + lm_head + looked_up + cache)
