"""HybridEngine.score: a prefill-only inference forward returning per-token logprobs (for frozen models such as
PPO's reference), against Hugging Face's forward on every family (the real model: tests/test_real_model.py).

Tolerances, fp32: with kernels="torch" the engine's prefill runs the training forward's ops on the same shapes,
so on SmolLM2 it equals it bit for bit; on these toy shapes MKL blocks the fused QKV and gate/up products
(one matmul where HF runs two or three) differently and a logprob moves by up to 4.8e-7. The C++ kernels (cpu,
auto) sum RMSNorm, rotary and attention in their own order: 9.5e-7 here, 1-2.5e-5 after SmolLM2's 30 layers
(benchmarks/RESULTS.md, "engine prefill"). A wrong position, mask or column moves logprobs by 1e-2 or more.
"""
import pytest
import torch

import hybrid_engine
from tests.hf_models import CONFIGS, VOCAB, hf_logprobs, left_padded_prompts, tiny_model

ATOL = {"torch": 2e-6, "cpu": 5e-6, "auto": 5e-6}


def rollout_like(pad_id: int):
    """Left-padded prompts (9 columns) and answers of 11 columns, two rows stopped early (mask 0, pad after)."""
    ids, mask = left_padded_prompts([5, 9, 1, 7, 3], pad_id=pad_id)                    # (5, 9)
    g = torch.Generator().manual_seed(3)
    answers = torch.randint(3, VOCAB, (5, 11), generator=g)                             # (5, 11)
    answer_mask = torch.ones_like(answers)
    answer_mask[1, 6:], answer_mask[3, 2:] = 0, 0
    answers = answers.masked_fill(answer_mask == 0, pad_id)
    return torch.cat([ids, answers], 1), torch.cat([mask, answer_mask], 1), ids.shape[1], answer_mask.bool()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_score_equals_hugging_face_forward(name, tmp_path):
    model = tiny_model(name, tmp_path)
    pad_id = model.config.pad_token_id or 0
    seq, mask, P, answer_mask = rollout_like(pad_id)
    for kernels, atol in ATOL.items():
        engine = hybrid_engine.wrap(model, max_seq_len=24, max_batch_size=6, kernels=kernels)
        for temperature in (1.0, 0.7):
            got = engine.score(seq, mask, prompt_len=P, temperature=temperature)
            assert got.shape == (5, 11) and got.dtype == torch.float32
            ref = hf_logprobs(model, seq, mask, P, temperature)
            torch.testing.assert_close(got[answer_mask], ref[answer_mask], atol=atol, rtol=0,
                                       msg=lambda m, k=kernels, t=temperature: f"kernels={k}, T={t}: {m}")


def test_score_defaults_and_fallback_equal_the_forward(tmp_path):
    """prompt_len defaults to 1 (every token after the first), no mask means no padding; the Hugging Face
    fallback (force_fallback) runs HF's forward itself: equal bit for bit."""
    model = tiny_model("llama", tmp_path)
    seq = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(4))
    ref = hf_logprobs(model, seq, torch.ones_like(seq), 1)
    got = hybrid_engine.wrap(model, max_seq_len=16, max_batch_size=3, kernels="torch").score(seq)
    assert got.shape == (3, 11)
    torch.testing.assert_close(got, ref, atol=ATOL["torch"], rtol=0)
    fallback = hybrid_engine.wrap(model, max_seq_len=16, max_batch_size=3, force_fallback=True).score(seq)
    assert torch.equal(fallback, ref)


def test_score_reads_the_weights_again_after_train(tmp_path):
    """Described once, like generate(); train() then eval() (or the next score()) sees changed weights."""
    model = tiny_model("llama", tmp_path)
    seq = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    engine = hybrid_engine.wrap(model, max_seq_len=16, max_batch_size=2, kernels="torch")
    before = engine.score(seq, prompt_len=4)
    engine.train()
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    after = engine.score(seq, prompt_len=4)
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, hf_logprobs(model, seq, torch.ones_like(seq), 4), atol=ATOL["torch"], rtol=0)


@pytest.mark.parametrize("call, message", [
    (lambda e, s: e.score(s[0]), r"expected \(batch, seq_len\)"),
    (lambda e, s: e.score(s, s[:, :-1]), "attention_mask: shape"),
    (lambda e, s: e.score(s, prompt_len=0), "prompt_len=0"),
    (lambda e, s: e.score(s, prompt_len=10), "prompt_len=10"),
    (lambda e, s: e.score(s, temperature=0.0), "temperature=0.0"),
    (lambda e, s: e.score(torch.cat([s, s], 1)), "exceeds max_seq_len"),
    (lambda e, s: e.score(torch.cat([s, s, s])), "exceeds max_batch_size"),
])
def test_score_refuses_bad_input_in_one_line(call, message, tmp_path):
    engine = hybrid_engine.wrap(tiny_model("llama", tmp_path), max_seq_len=16, max_batch_size=4)
    seq = torch.randint(3, VOCAB, (2, 10))
    with pytest.raises(ValueError, match=message):
        call(engine, seq)
