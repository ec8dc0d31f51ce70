"""The engine's contract beyond greedy exactness: switching, stopping, sampling, LoRA, errors."""
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import hybrid_engine
from hybrid_engine.generation import filter_logits
from tests.hf_models import hf_logprobs, left_padded_prompts, tiny_model


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
    full_mask = torch.cat([mask, torch.ones(3, 10, dtype=mask.dtype)], dim=1)
    ref = hf_logprobs(llama, a.sequences, full_mask, ids.shape[1], temperature=0.7)
    torch.testing.assert_close(a.logprobs, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.8), (7, 1.0), (5, 0.5), (0, 0.05)])
def test_top_k_top_p_filter_matches_hugging_face(top_k, top_p):
    scores = torch.randn(6, 53) * 3
    ref = scores.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(filter_logits(scores, top_k, top_p).isinf(), ref.isinf())


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
    with pytest.raises(NotImplementedError, match=r"'bert'.*supported families: gpt2, gpt_neox, llama"):
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


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_len=30), "exceeds max_seq_len 32"),
    (dict(max_new_tokens=0), "max_new_tokens=0: expected at least 1"),
    (dict(batch=5), "batch size 5 exceeds max_batch_size 4"),
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
