"""Continued rows (issue 22 item 1): generate(keep_cache=True), then continue_rows with appended tokens of
different lengths per row, turn after turn, for every family on its tiny config (fp32, CPU).

A trajectory of 3 turns over 4 left-padded prompts of different lengths: turn 2 continues rows [3, 0, 2] (out of
order; row 1 waits, its cache must survive the turn, and under the compiled step the bucket's extra row runs over
its cache row), turn 3 continues rows [1, 2] (rows 0 and 3 dropped out after turn 2, row 1 goes on after skipping
one). Each turn's greedy tokens equal Hugging Face generate given the whole compact trajectory so far (left padded,
re-prefilled); the logprobs of every generated token equal one Hugging Face forward over each row's whole
trajectory within 1e-5. The EOS is a token the model produces mid-generation, so rows stop early and leave the
cache slots after their stop unused.
"""
import pytest
import torch

import hybrid_engine
from tests.hf_models import CONFIGS, VOCAB, eos_produced_mid_generation, left_padded_prompts, tiny_model
from tests.multiturn import Trajectories, assert_logprobs_match_one_forward, hf_turn

NEW_TOKENS = 6
LENGTHS = [7, 3, 5, 1]
TURNS = [([3, 0, 2], [2, 1, 4]), ([1, 2], [3, 1])]  # (rows, appended tokens per row) of turns 2 and 3
MAX_SEQ = 48


def family_pad(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def observation(row: int, turn: int, length: int) -> list[int]:
    """A fixed environment's reply: `length` token ids, different per row and turn."""
    g = torch.Generator().manual_seed(100 * turn + row)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def run_trajectory(model, engine, check_hf: bool = True, sampling=None) -> Trajectories:
    pad = family_pad(model)
    ids, mask = left_padded_prompts(LENGTHS, pad)
    free = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=pad)
    eos = eos_produced_mid_generation(free.sequences[:, ids.shape[1]:])
    out = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad,
                          keep_cache=True, sampling=sampling)
    traj = Trajectories(ids, mask)
    for b in range(len(LENGTHS)):
        traj.add(b, out, b)
    stopped_early = bool((out.action_mask.sum(1) < out.action_mask.shape[1]).any())
    for turn, (rows, lengths) in enumerate(TURNS, start=2):
        appended = [observation(r, turn, n) for r, n in zip(rows, lengths)]
        out = engine.continue_rows(rows, appended, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad,
                                   sampling=sampling)
        N = out.sequences.shape[1]
        assert out.sequences.shape == out.logprobs.shape == out.action_mask.shape == (len(rows), N)
        assert (out.logprobs[~out.action_mask] == 0).all() and (out.sequences[~out.action_mask] == pad).all()
        if check_hf:
            hf = hf_turn(model, [traj.tokens[r] + a for r, a in zip(rows, appended)], NEW_TOKENS, eos, pad)
            assert torch.equal(out.sequences, hf), f"turn {turn}: engine {out.sequences.tolist()} != HF {hf.tolist()}"
        for i, (r, a) in enumerate(zip(rows, appended)):
            traj.tokens[r] += a
            traj.add(r, out, i)
        stopped_early |= bool((out.action_mask.sum(1) < N).any())
    # greedy: the EOS is one the model produces, so some row stops early (sampled tokens need not reach it)
    assert stopped_early or sampling is not None, "no row stopped at the EOS: the unused slots were not exercised"
    return traj


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_three_turns_match_hugging_face(name, kernels, tmp_path):
    model = tiny_model(name, tmp_path)
    engine = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, kernels=kernels).eval()
    traj = run_trajectory(model, engine)
    assert_logprobs_match_one_forward(model, traj, family_pad(model))


@pytest.mark.triton_cpu
def test_three_turns_with_triton_kernels(tmp_path):
    model = tiny_model("mistral", tmp_path)  # a sliding window shorter than the trajectories
    engine = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, kernels="triton").eval()
    from hybrid_engine.ops.specs import SPECS

    # every op from Triton, except those it has no kernel for (the grouped experts: torch ops only)
    expected = {spec.name: "triton" if "triton" in spec.backends else "torch" for spec in SPECS}
    assert {name: backend for name, (backend, _) in engine.ops.choices.items()} == expected
    traj = run_trajectory(model, engine)
    assert_logprobs_match_one_forward(model, traj, family_pad(model))


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "phi3"])
def test_three_turns_through_the_compiled_step(name, tmp_path):
    """compile=True: the per-row slots of the static step (aot_eager: the traced graph without code generation).
    Under it the 3 rows of turn 2 run in the bucket of 4, whose extra row is the cache row of waiting row 1."""
    torch._dynamo.reset()
    model = tiny_model(name, tmp_path)
    engine = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, kernels="cpu", compile=True,
                                compile_backend="aot_eager").eval()
    assert engine.static is not None
    traj = run_trajectory(model, engine)
    assert_logprobs_match_one_forward(model, traj, family_pad(model))
    torch._dynamo.reset()


def test_sampled_turns_match_the_training_forward(tmp_path):
    """Sampling (temperature 1, so the logprobs are the forward's): the tokens drawn are whatever they are, and
    their logprobs still equal one forward over the whole trajectory."""
    model = tiny_model("qwen2", tmp_path)
    engine = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, kernels="cpu").eval()
    sampling = hybrid_engine.SamplingParams(do_sample=True, generator=torch.Generator().manual_seed(3))
    traj = run_trajectory(model, engine, check_hf=False, sampling=sampling)
    assert_logprobs_match_one_forward(model, traj, family_pad(model))


def test_keep_cache_false_is_unchanged(tmp_path):
    """keep_cache=False keeps nothing, and keep_cache=True returns the same tokens and logprobs."""
    model = tiny_model("llama", tmp_path)
    engine = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4).eval()
    ids, mask = left_padded_prompts(LENGTHS, 0)
    plain = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0)
    assert engine.kept is None
    kept = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0, keep_cache=True)
    assert torch.equal(plain.sequences, kept.sequences) and torch.equal(plain.logprobs, kept.logprobs)
    assert engine.kept is not None


def test_errors(tmp_path):
    model = tiny_model("llama", tmp_path)
    engine = hybrid_engine.wrap(model, max_seq_len=24, max_batch_size=4).eval()
    ids, mask = left_padded_prompts(LENGTHS, 0)
    engine.generate(ids, mask, max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    with pytest.raises(ValueError, match=r"keep_cache=True\) first"):
        engine.continue_rows([0], [[5]], max_new_tokens=2)
    engine.generate(ids, mask, max_new_tokens=4, eos_token_id=[], pad_token_id=0, keep_cache=True)
    # each row holds 7 + 4 tokens (its left pad included): 11 + 6 appended + 8 new > 24
    with pytest.raises(ValueError, match=r"row 2: its length 11 \+ 6 appended tokens \+ max_new_tokens 8 exceeds "
                                         r"max_seq_len 24"):
        engine.continue_rows([1, 2], [[5], [5] * 6], max_new_tokens=8)
    with pytest.raises(ValueError, match=r"rows \[0, 0\] repeat a row"):
        engine.continue_rows([0, 0], [[5], [6]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"rows \[4\] out of range: the kept batch has rows 0..3"):
        engine.continue_rows([4], [[5]], max_new_tokens=2)
    with pytest.raises(ValueError, match="row 1: no tokens to append"):
        engine.continue_rows(torch.tensor([1]), [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 token lists for 1 rows"):
        engine.continue_rows([1], [[5], [6]], max_new_tokens=2)
    engine.continue_rows([1, 2], [[5], [5] * 5], max_new_tokens=8)  # 11 + 5 + 8 = 24 fits
    engine.release_memory()
    with pytest.raises(ValueError, match=r"keep_cache=True\) first"):
        engine.continue_rows([0], [[5]], max_new_tokens=2)


def test_a_family_the_engine_does_not_serve_continues_by_reprefilling(tmp_path):
    """The Hugging Face fallback (allow_fallback, an unserved family) keeps each row's tokens and re-prefills the
    whole trajectory at each continue_rows: the same tokens as HF turn by turn, logprobs of one forward."""
    from transformers import AutoModelForCausalLM, StableLmConfig

    config = StableLmConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                            max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "stablelm")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stablelm").eval()
    with pytest.warns(UserWarning, match="stablelm"):
        engine = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, allow_fallback=True).eval()
        traj = run_trajectory(model, engine)
    assert_logprobs_match_one_forward(model, traj, family_pad(model))
    with pytest.raises(ValueError, match="rows must be distinct"):
        engine.continue_rows([1, 1], [[3], [4]], max_new_tokens=2)
