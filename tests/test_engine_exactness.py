"""The engine's greedy tokens equal Hugging Face generate's and its logprobs equal the HF forward's, for every
supported family on awkward tiny configs (fp32, CPU), under every kernel backend that runs on a CPU: the torch
references, the C++ CPU twins and the Triton kernels (interpreted; tests/conftest.py sets TRITON_INTERPRET);
through both projection paths (oneDNN-packed copies and plain F.linear); and with EOS stops."""
import pytest
import torch

import hybrid_engine
from hybrid_engine.models.base import PACKED_MAX_ROWS
from hybrid_engine.ops import SPECS
from tests.hf_models import (
    CONFIGS,
    assert_logprobs_match_forward,
    assert_stops_at_first_eos,
    eos_produced_mid_generation,
    hf_logprobs,
    left_padded_prompts,
    tiny_model,
)

NEW_TOKENS = 12


def family_pad(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def assert_greedy_matches_hugging_face(model, engine, lengths: list[int]) -> None:
    """Greedy tokens equal HF generate's and logprobs equal HF forward's, with no EOS: every row runs the full
    length, so all tokens are compared."""
    pad = family_pad(model)
    ids, mask = left_padded_prompts(lengths, pad)
    out = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=pad)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                        eos_token_id=None, pad_token_id=pad)
    assert out.sequences.shape == (len(lengths), ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out.sequences, hf), "engine tokens differ from Hugging Face"
    assert out.action_mask.all()
    assert_logprobs_match_forward(model, out, mask)


@pytest.mark.parametrize("kernels", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton_cpu)])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_and_logprobs_match_hugging_face(name, kernels, tmp_path):
    model = tiny_model(name, tmp_path)
    engine = hybrid_engine.wrap(model, max_seq_len=32, max_batch_size=4, kernels=kernels)
    # every op from the requested backend, except those it has no kernel for (the grouped experts: torch ops only)
    expected = {spec.name: kernels if kernels in spec.backends else "torch" for spec in SPECS}
    assert {name: backend for name, (backend, _) in engine.ops.choices.items()} == expected
    assert_greedy_matches_hugging_face(model, engine.eval(), [7, 3, 5, 1])


@pytest.mark.parametrize("pack_weights", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("kernels", ["torch", "cpu"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plain_and_packed_projections_match_hugging_face(name, kernels, pack_weights, tmp_path):
    """pack_weights=False sends every projection through the plain F.linear (GPT-2: x @ W) path, the one GPUs
    always take and CPU decode otherwise never reaches. With packing on, a prefill of 4 x 40 = 160 rows, more
    than PACKED_MAX_ROWS, also takes the plain path, and decode then reads the packed copies: the two paths
    must agree, since one fills the KV cache the other attends to. The 40-token prompts also run the attention
    kernels past Mistral's sliding window in prefill. (Interpreted Triton is left out: 4-5 s a case.)"""
    model = tiny_model(name, tmp_path)
    engine = hybrid_engine.wrap(model, max_seq_len=64, max_batch_size=4, kernels=kernels, pack_weights=pack_weights)
    lengths = [40, 9, 33, 1]
    assert len(lengths) * max(lengths) > PACKED_MAX_ROWS
    assert (engine.eval().packed_bytes > 0) == pack_weights
    assert_greedy_matches_hugging_face(model, engine, lengths)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eos_stops_each_row_like_hugging_face(name, tmp_path):
    """With an EOS the model produces mid-generation, sequences equal HF generate's; each row's action_mask runs up
    to and including its first EOS, then pad tokens and logprob 0; the logprobs before equal HF forward's. The
    same with pad id == EOS id (GPT-2's convention), where the EOS must still be in the mask."""
    model = tiny_model(name, tmp_path)
    pad = family_pad(model)
    ids, mask = left_padded_prompts([7, 3, 5, 1], pad)
    P = ids.shape[1]
    engine = hybrid_engine.wrap(model, max_seq_len=32, max_batch_size=4).eval()
    free = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=pad).sequences
    eos = eos_produced_mid_generation(free[:, P:])
    for pad_id in (pad, eos):
        out = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad_id)
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            eos_token_id=eos, pad_token_id=pad_id)
        assert torch.equal(out.sequences, hf), f"pad {pad_id}: engine tokens differ from Hugging Face"
        stops = assert_stops_at_first_eos(out, P, eos, pad_id)
        # the stop was exercised: a row ended early and that changed the tokens
        assert min(stops) < NEW_TOKENS and not torch.equal(out.sequences, free[:, :out.sequences.shape[1]])
        assert_logprobs_match_forward(model, out, mask)


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_logprobs_are_as_accurate_as_hugging_faces_bf16(name, kernels, tmp_path):
    """In bf16 the engine cannot equal HF bit for bit (other kernels, other rounding), so it is held to
    flash-attention's bar: its error against an fp32 forward of the same weights is at most twice that of
    Hugging Face's own bf16 forward."""
    model = tiny_model(name, tmp_path, dtype=torch.bfloat16)
    reference = tiny_model(name, tmp_path, dtype=torch.bfloat16).float()  # the same bf16 weights, in fp32
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, mask = left_padded_prompts([7, 3, 5, 1], pad)
    engine = hybrid_engine.wrap(model, max_seq_len=32, max_batch_size=4, kernels=kernels).eval()
    out = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=pad)
    full_mask = torch.cat([mask, torch.ones(4, NEW_TOKENS, dtype=mask.dtype)], dim=1)
    exact = hf_logprobs(reference, out.sequences, full_mask, ids.shape[1])
    hf_bf16 = hf_logprobs(model, out.sequences, full_mask, ids.shape[1])
    # A mixture of experts routes each token by a top-k choice: where a token's k-th and (k+1)-th experts are within
    # bf16 rounding of a tie, any bf16 forward (HF's too) may take the other one, a jump of a few 1e-2 in that token's
    # logprob (qwen2_moe on the cpu backend: one token of 48 at 0.034, the rest as close as HF's, max 0.009). There
    # the bar is on the mean error over the tokens; on the dense families, on the worst token.
    reduce = torch.mean if getattr(model.config, "num_experts_per_tok", None) else torch.max
    engine_err = reduce((out.logprobs - exact).abs()).item()
    hf_err = reduce((hf_bf16 - exact).abs()).item()
    assert 0 < engine_err <= 2 * hf_err, (engine_err, hf_err)


def optimizer_step(model, ids, mask) -> None:
    """One SGD step on the trainable parameters, of a loss that moves every projection."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean().backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_optimizer_step_is_read_after_eval(name, lora, tmp_path):
    """The engine equals Hugging Face before and after an optimizer step with train()/eval() in between: on the
    full weights, and with LoRA adapters on every projection (fused in the checkpoint or re-laid by the engine).
    The step must change the tokens or move the logprobs by more than 1e-3, which HF's are then compared with."""
    model = tiny_model(name, tmp_path)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if "lora_B" in param_name:
                    p.normal_(0.0, 0.05)  # PEFT starts B at zero; make the adapters matter
    lengths = [7, 3, 5, 1]
    ids, mask = left_padded_prompts(lengths, family_pad(model))
    engine = hybrid_engine.wrap(model, max_seq_len=32, max_batch_size=4).eval()
    before = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=family_pad(model))
    assert_greedy_matches_hugging_face(model, engine, lengths)
    engine.train()
    optimizer_step(model, ids, mask)
    engine.eval()
    after = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=family_pad(model))
    moved = (after.logprobs - before.logprobs).abs().max().item() if torch.equal(after.sequences, before.sequences) \
        else float("inf")
    assert moved > 1e-3, f"the step moved the logprobs by {moved:.1e} only: a weak test"
    assert_greedy_matches_hugging_face(model, engine, lengths)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16, "attention_factor": 0.8,
     "beta_fast": 16.0, "beta_slow": 2.0},
], ids=["linear", "yarn", "yarn_attention_factor"])
def test_static_rope_variants_match_hugging_face(rope, tmp_path, monkeypatch):
    """Linear and YaRN scaling (inv_freq and attention_scaling fixed at init, read from the rotary module) on the
    Llama config; the rest of the parametrized tests cover default and llama3 rope."""
    from transformers import LlamaConfig

    from tests import hf_models

    monkeypatch.setitem(hf_models.CONFIGS, "rope", lambda: LlamaConfig(
        vocab_size=hf_models.VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=128, rope_scaling=dict(rope, rope_theta=5000.0)))
    model = tiny_model("rope", tmp_path)
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    engine = hybrid_engine.wrap(model, max_seq_len=32, max_batch_size=4, kernels="torch")
    assert_greedy_matches_hugging_face(model, engine.eval(), [7, 3, 5, 1])


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6,
     "original_max_position_embeddings": 16},
], ids=["dynamic", "longrope"])
def test_rope_depending_on_length_is_refused_at_wrap(rope):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.hf_models import VOCAB

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                      num_attention_heads=4, head_dim=12, max_position_embeddings=128,
                      rope_scaling=dict(rope, rope_theta=5000.0))
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(NotImplementedError, match=f"rope type '{rope['rope_type']}' of 'llama' is not supported"):
        hybrid_engine.wrap(model)
    assert hybrid_engine.wrap(model, allow_fallback=True, force_fallback=True) is not None
    # allowed a fallback (as rlhf train is), generate() delegates to Hugging Face after a warning naming the rope type
    engine = hybrid_engine.wrap(model, allow_fallback=True, max_seq_len=16, max_batch_size=2).eval()
    ids = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=f"rope type '{rope['rope_type']}'.*delegates to Hugging Face generate"):
        out = engine.generate(ids, max_new_tokens=3, eos_token_id=[], pad_token_id=0)
    assert not engine.supported and torch.equal(out.sequences, model.generate(
        input_ids=ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0))
