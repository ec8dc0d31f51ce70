"""The engine's greedy tokens equal Hugging Face generate's and its logprobs equal the HF forward's, for every
supported family on awkward tiny configs (fp32, CPU), under every kernel backend that runs on a CPU: the torch
references, the C++ CPU twins and the Triton kernels (interpreted; tests/conftest.py sets TRITON_INTERPRET)."""
import pytest
import torch

import hybrid_engine
from tests.hf_models import CONFIGS, hf_logprobs, left_padded_prompts, tiny_model

NEW_TOKENS = 12


@pytest.mark.parametrize("kernels", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_and_logprobs_match_hugging_face(name, kernels, tmp_path):
    model = tiny_model(name, tmp_path)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, mask = left_padded_prompts([7, 3, 5, 1], pad)
    engine = hybrid_engine.wrap(model, max_seq_len=32, max_batch_size=4, kernels=kernels)
    assert {backend for backend, _ in engine.ops.choices.values()} == {kernels}
    engine.eval()
    # no EOS: every row runs the full length, so all tokens are compared
    out = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=pad)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                        eos_token_id=None, pad_token_id=pad)
    assert out.sequences.shape == (4, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out.sequences, hf), f"{name}: engine tokens differ from Hugging Face"
    full_mask = torch.cat([mask, torch.ones(4, NEW_TOKENS, dtype=mask.dtype)], dim=1)
    ref = hf_logprobs(model, out.sequences, full_mask, ids.shape[1])
    torch.testing.assert_close(out.logprobs, ref, atol=1e-5, rtol=0)
    assert out.action_mask.all()


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
    engine_err = (out.logprobs - exact).abs().max().item()
    hf_err = (hf_bf16 - exact).abs().max().item()
    assert 0 < engine_err <= 2 * hf_err, (engine_err, hf_err)
