"""The engine's contract beyond greedy exactness: switching, stopping, sampling, LoRA, the Hugging Face fallback,
errors."""
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import hybrid_engine
from hybrid_engine.generation import SamplingParams, filter_logits, next_tokens
from tests.hf_models import (
    assert_logprobs_match_forward,
    assert_stops_at_first_eos,
    eos_produced_mid_generation,
    left_padded_prompts,
    tiny_model,
)


@pytest.fixture
def llama(tmp_path):
    return tiny_model("llama", tmp_path)


def test_weight_change_in_training_mode_is_seen_after_eval(llama):
    ids, mask = left_padded_prompts([6, 4], pad_id=0)
    engine = hybrid_engine.wrap(llama, max_seq_len=24, max_batch_size=2)
    before = engine.eval().generate(ids, mask, max_new_tokens=8, eos_token_id=[]).sequences
    engine.train()
    opt = torch.optim.SGD(engine.module.parameters(), lr=0.5)
    labels = torch.randint(3, 101, ids.shape)
    engine.module(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()  # changes q/k/v and gate/up in place: the fused buffers must be refilled on eval()
    after = engine.eval().generate(ids, mask, max_new_tokens=8, eos_token_id=[]).sequences
    hf = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    assert not torch.equal(before, after)
    assert torch.equal(after, hf)


def test_inference_reads_training_parameters_in_place(llama):
    engine = hybrid_engine.wrap(llama, pack_weights=False).eval()
    w = engine.inference.w
    assert w.embed.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    assert w.layers[0].o.weight.data_ptr() == llama.model.layers[0].self_attn.o_proj.weight.data_ptr()
    attn, mlp = llama.model.layers[0].self_attn, llama.model.layers[0].mlp
    fused = sum(p.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
                for p in m.parameters()) * 4 * len(llama.model.layers)
    assert engine.relaid_bytes == fused  # only the fused QKV and gate/up buffers are copies
    # packing for CPU decode adds one oneDNN copy of every projection (and the head), and says so
    packed = hybrid_engine.wrap(llama).eval()
    linears = sum(m.weight.numel() * 4 for m in llama.modules() if isinstance(m, torch.nn.Linear))
    assert packed.packed_bytes == linears and packed.relaid_bytes == fused + linears


def test_per_row_stop_at_eos_pads_after_and_exits_early(llama):
    ids, mask = left_padded_prompts([6, 4, 5], pad_id=0)
    engine = hybrid_engine.wrap(llama, max_seq_len=48, max_batch_size=4).eval()
    free = engine.generate(ids, mask, max_new_tokens=12, eos_token_id=[]).sequences[:, ids.shape[1]:]
    eos = int(free[0, 3])  # a token row 0 produces at step 3: an EOS for this test
    out = engine.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    hf = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                        pad_token_id=0)
    assert torch.equal(out.sequences, hf)
    new = out.sequences[:, ids.shape[1]:]
    for row in range(3):
        hits = (new[row] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else new.shape[1]
        assert out.action_mask[row, :stop].all() and not out.action_mask[row, stop:].any()
        assert (new[row, stop:] == 0).all() and (out.logprobs[row, stop:] == 0).all()
    # every row stopping before the limit ends the loop early, as in Hugging Face
    all_eos = [int(free[r, 0]) for r in range(3)]
    short = engine.generate(ids, mask, max_new_tokens=12, eos_token_id=all_eos, pad_token_id=0)
    assert short.sequences.shape[1] == ids.shape[1] + 1 and short.action_mask.all()


def test_sampling_is_reproducible_and_its_logprobs_match_the_forward(llama):
    ids, mask = left_padded_prompts([5, 2, 4], pad_id=0)
    engine = hybrid_engine.wrap(llama, max_seq_len=32, max_batch_size=4).eval()
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=[])
    a = engine.generate(ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    b = engine.generate(ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    c = engine.generate(ids, mask, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    assert_logprobs_match_forward(llama, a, mask, temperature=0.7)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.8), (7, 1.0), (5, 0.5), (0, 0.05)])
def test_top_k_top_p_filter_matches_hugging_face(top_k, top_p):
    scores = torch.randn(6, 53) * 3
    ref = scores.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(filter_logits(scores, top_k, top_p).isinf(), ref.isinf())


def hf_sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution Hugging Face samples from: its temperature, top-k and top-p warpers in generate's order,
    then softmax. logits: (B, V) -> (B, V)."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


def assert_draws_follow(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """tokens: (n,) draws; probs: (V,). No token of probability 0 is drawn, and every token's frequency is within
    5 sigma of its probability, sigma = sqrt(p (1 - p) / n)."""
    n = tokens.numel()
    freq = torch.bincount(tokens, minlength=probs.numel()).double() / n                # (V,)
    p = probs.double()
    outside = ((freq > 0) & (p == 0)).nonzero().flatten()
    assert len(outside) == 0, f"drew tokens outside the filtered set: {outside.tolist()}"
    sigma = (p * (1 - p) / n).sqrt()                                                   # (V,)
    z = torch.where(p > 0, (freq - p).abs() / sigma, 0.0)                               # (V,) in sigmas
    worst = int(z.argmax())
    assert z[worst] <= 5, f"token {worst}: frequency {freq[worst]:.4f}, probability {p[worst]:.4f} ({z[worst]:.1f} sd)"


@pytest.mark.parametrize("temperature,top_k,top_p,support", [
    (0.7, 0, 1.0, 20), (1.0, 6, 1.0, 6), (1.0, 0, 0.6, 6), (1.4, 12, 0.83, 9)])
def test_sampled_tokens_follow_the_filtered_tempered_softmax(temperature, top_k, top_p, support):
    """20,000 draws from next_tokens on one fixed row of 20 logits follow Hugging Face's tempered, top-k/top-p
    filtered softmax: no token outside top-k or the nucleus, and each frequency within 5 sigma of its probability.
    The false-failure chance of that bound, summed over the 4 x <= 20 tokens with exact binomial tails (scipy), is
    3e-5 (the smallest probability is 0.0028, 56 expected draws); the draws are seeded besides. The nucleus
    boundaries are >= 0.03 of mass away from top_p, so float rounding cannot move them. Sampling from the plain
    softmax(logits) instead (unfiltered, T = 1) is off by >= 14 sigma, or draws filtered-out tokens, in each."""
    V, n = 20, 20_000
    logits = torch.linspace(1.5, -1.5, V)[torch.randperm(V, generator=torch.Generator().manual_seed(0))]   # (V,)
    probs = hf_sampling_probs(logits[None], temperature, top_k, top_p)[0]                                   # (V,)
    assert int((probs > 0).sum()) == support
    params = SamplingParams(True, temperature, top_k, top_p, torch.Generator().manual_seed(1))
    tokens, logp = next_tokens(logits.expand(n, V), params)                                   # (n,), (n,)
    assert_draws_follow(tokens, probs)
    torch.testing.assert_close(logp, torch.log_softmax(logits / temperature, -1)[tokens], atol=1e-6, rtol=0)


def test_generate_samples_from_the_filtered_tempered_distribution(llama):
    """End to end: generate(do_sample=True, temperature, top_k, top_p) on 2,000 copies of one prompt draws its
    first token from Hugging Face's filtered, tempered softmax of HF's forward (the bound of
    assert_draws_follow; false-failure chance 5e-6 for these 7 tokens), and reports log softmax(logits / T)."""
    n, T, top_k, top_p = 2000, 0.8, 8, 0.85
    ids, _ = left_padded_prompts([5], pad_id=0)
    with torch.no_grad():
        logits = llama(input_ids=ids).logits[:, -1].float()                                  # (1, V)
    probs = hf_sampling_probs(logits, T, top_k, top_p)[0]                                    # (V,)
    assert int((probs > 0).sum()) == 7  # the nucleus cuts inside the top 8, 0.05 of mass from its boundary
    engine = hybrid_engine.wrap(llama, max_seq_len=8, max_batch_size=n).eval()
    out = engine.generate(ids.expand(n, -1), max_new_tokens=1, do_sample=True, temperature=T, top_k=top_k,
                          top_p=top_p, eos_token_id=[], generator=torch.Generator().manual_seed(2))
    tokens = out.sequences[:, -1]                                                            # (n,)
    assert_draws_follow(tokens, probs)
    torch.testing.assert_close(out.logprobs[:, 0], torch.log_softmax(logits[0] / T, -1)[tokens], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sampled_rows_stop_at_their_first_eos(name, tmp_path):
    """A seeded sampled run with an EOS that a row samples mid-generation: each row keeps the tokens of the same
    seeded run without EOS up to and including its first EOS (a row's draws do not depend on the other rows':
    torch.multinomial draws one exponential per entry), then pad tokens, logprob 0 and a False mask; the logprobs
    before equal HF forward's at temperature T. GPT-2 has no pad token, so pad defaults to its EOS there."""
    model = tiny_model(name, tmp_path)
    pad = 0 if name == "llama" else None
    ids, mask = left_padded_prompts([6, 2, 4, 5], pad_id=0)
    P, N, T = ids.shape[1], 12, 0.7
    engine = hybrid_engine.wrap(model, max_seq_len=24, max_batch_size=4).eval()
    kw = dict(max_new_tokens=N, do_sample=True, temperature=T, top_k=30, pad_token_id=pad)
    free = engine.generate(ids, mask, eos_token_id=[], generator=torch.Generator().manual_seed(5), **kw).sequences
    eos = eos_produced_mid_generation(free[:, P:])
    out = engine.generate(ids, mask, eos_token_id=eos, generator=torch.Generator().manual_seed(5), **kw)
    pad_id = eos if pad is None else pad
    stops = assert_stops_at_first_eos(out, P, eos, pad_id)
    assert min(stops) < N
    expected = free[:, :P + max(stops)].clone()                                              # (B, P + N')
    for row, stop in enumerate(stops):
        expected[row, P + stop:] = pad_id
    assert torch.equal(out.sequences, expected)
    assert_logprobs_match_forward(model, out, mask, T)


def test_lora_generation_uses_adapters_and_leaves_training_weights_bit_exact(llama):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # PEFT starts B at zero; make the adapters matter
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    ids, mask = left_padded_prompts([5, 3], pad_id=0)
    engine = hybrid_engine.wrap(peft_model, max_seq_len=24, max_batch_size=2).eval()
    out = engine.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    hf = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.sequences, hf)
    engine.train()
    for n, p in peft_model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_unsupported_architecture_is_named_and_fallback_warns_once(tmp_path):
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                     is_decoder=True)
    model = BertLMHeadModel(cfg).eval()
    with pytest.raises(NotImplementedError, match=r"'bert'.*supported families: gemma2, gemma3_text, gpt2, gpt_neox"):
        hybrid_engine.wrap(model)
    engine = hybrid_engine.wrap(model, allow_fallback=True, max_seq_len=16, max_batch_size=2).eval()
    ids = torch.randint(3, 50, (2, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = engine.generate(ids, max_new_tokens=3, eos_token_id=[], pad_token_id=0)
        engine.generate(ids, max_new_tokens=3, eos_token_id=[], pad_token_id=0)
    assert sum("delegates to Hugging Face" in str(w.message) for w in caught) == 1
    hf = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, hf) and out.logprobs.shape == (2, 3)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_fallback_matches_hugging_face_generate_and_forward(name, tmp_path):
    """The Hugging Face fallback (an unsupported family, or force_fallback on a supported one) returns HF
    generate's tokens and log softmax(logits / T) of HF's forward at each of them, greedy and sampled at T != 1;
    with an EOS, the mask up to and including it and logprob 0 after."""
    if name == "bert":
        cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=40, is_decoder=True)
        model = BertLMHeadModel(cfg).eval()
        ids = torch.randint(3, 50, (2, 4), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)  # BERT's absolute positions ignore left padding: none here
        engine = hybrid_engine.wrap(model, allow_fallback=True, max_seq_len=16, max_batch_size=2)
    else:
        model = tiny_model(name, tmp_path)
        ids, mask = left_padded_prompts([5, 2], pad_id=0)
        engine = hybrid_engine.wrap(model, force_fallback=True, max_seq_len=16, max_batch_size=2)
    P, N = ids.shape[1], 8
    kw = dict(max_new_tokens=N, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-engine delegation warning (tested above)
        greedy = engine.eval().generate(ids, mask, eos_token_id=[], **kw)
        torch.manual_seed(4)  # Hugging Face samples from the global generator
        sampled = engine.generate(ids, mask, do_sample=True, temperature=0.7, top_k=10, eos_token_id=[], **kw)
        eos = eos_produced_mid_generation(greedy.sequences[:, P:])
        stopped = engine.generate(ids, mask, eos_token_id=eos, **kw)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=None, **kw)
    assert torch.equal(greedy.sequences, hf)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=eos, **kw)
    assert torch.equal(stopped.sequences, hf)
    assert min(assert_stops_at_first_eos(stopped, P, eos, 0)) < N
    assert greedy.action_mask.all() and sampled.action_mask.all()
    for out, T in [(greedy, 1.0), (sampled, 0.7), (stopped, 1.0)]:
        assert_logprobs_match_forward(model, out, mask, T)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens=0: expected at least 1"),
    (dict(batch=5, keep_cache=True), "batch size 5 exceeds max_batch_size 4"),
    (dict(min_p=1.5), r"min_p=1.5: expected a value in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0: expected a positive value"),
    (dict(top_p=0.0), r"top_p=0.0: expected a value in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5: expected a value in \(0, 1\]"),
    (dict(temperature=0.0), "temperature=0.0: expected a positive value"),
    (dict(top_k=-1), "top_k=-1"),
])
def test_bad_generate_arguments_get_one_line_errors(llama, kwargs, match):
    engine = hybrid_engine.wrap(llama, max_seq_len=32, max_batch_size=4).eval()
    ids = torch.randint(3, 101, (kwargs.pop("batch", 2), kwargs.pop("prompt_len", 4)))
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match) as err:
        engine.generate(ids, **kwargs)
    assert "\n" not in str(err.value)


def test_kv_cache_that_cannot_fit_says_how_many_bytes(llama):
    engine = hybrid_engine.wrap(llama, max_seq_len=1 << 20, max_batch_size=1 << 16).eval()
    with pytest.raises(MemoryError, match=r"KV cache needs [\d,]+ bytes"):
        engine.generate(torch.randint(3, 101, (1, 4)), max_new_tokens=2)


def test_release_memory_frees_cache_and_buffers(llama):
    engine = hybrid_engine.wrap(llama, max_seq_len=16, max_batch_size=2).eval()
    engine.generate(torch.randint(3, 101, (2, 4)), max_new_tokens=2)
    assert engine.cache is not None and engine.relaid_bytes > 0
    engine.release_memory()
    assert engine.cache is None and engine.relaid_bytes == 0
    out = engine.eval().generate(torch.randint(3, 101, (2, 4)), max_new_tokens=2)  # and it comes back
    assert out.sequences.shape == (2, 6)


def test_saved_checkpoint_still_loads_after_generation(llama, tmp_path):
    engine = hybrid_engine.wrap(llama, max_seq_len=16, max_batch_size=2).eval()
    engine.generate(torch.randint(3, 101, (2, 4)), max_new_tokens=2)
    engine.module.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for a, b in zip(again.parameters(), llama.parameters()):
        assert torch.equal(a, b)
