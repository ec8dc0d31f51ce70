"""compile=True (issue 11): the static decode step, proven on the CPU.

For every family and each CPU backend (torch references, C++ twins): 64 greedy tokens from the compiled step
equal the eager engine's and Hugging Face generate's, seeded sampling equals the eager engine's, the step traces
into one graph (fullgraph=True, no graph break) compiled at most once per batch bucket, and an optimizer step
with train()/eval() changes the tokens (to HF's on the new weights) without a recompile. Most cases trace with
the aot_eager backend (the same graph, no code generation: ~1 s); inductor, which compiles C++ for ~25-30 s,
runs once per backend. LoRA runs here; 2-process ZeRO-3 in tests/test_distributed.py.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import hybrid_engine
from hybrid_engine.static import bucket_of
from tests.hf_models import (
    CONFIGS,
    assert_logprobs_match_forward,
    assert_stops_at_first_eos,
    eos_produced_mid_generation,
    left_padded_prompts,
    tiny_model,
)

NEW_TOKENS = 64
LENGTHS = [7, 3, 5]   # 3 rows: the bucket of 4, with one row padded in
MAX_SEQ = 80


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo caches per code object, so one test's graphs (other families,
    other variants) would count toward the next test's compilations and its recompile limit."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def family_pad(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def engines(model, kernels: str, backend="aot_eager", **options):
    """(eager engine, compiled engine, compile counter) on the same model."""
    counter = CompileCounterWithBackend(backend)
    eager = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, kernels=kernels, compile=False, **options)
    compiled = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, kernels=kernels, compile=True,
                                  compile_backend=counter, **options)
    return eager.eval(), compiled.eval(), counter


def hf_greedy(model, ids, mask, pad: int) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=pad)


def assert_no_graph_break() -> None:
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"


def greedy(engine, ids, mask, pad):
    return engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=pad)


def check_family(name: str, kernels: str, backend, tmp_path, sample: bool = True) -> None:
    model = tiny_model(name, tmp_path)
    pad = family_pad(model)
    ids, mask = left_padded_prompts(LENGTHS, pad)
    eager, compiled, counter = engines(model, kernels, backend)
    out = greedy(compiled, ids, mask, pad)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for one batch bucket"
    assert_no_graph_break()
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, pad)), "compiled tokens differ from HF generate"
    ref = greedy(eager, ids, mask, pad)
    assert torch.equal(out.sequences, ref.sequences), "compiled tokens differ from the eager engine's"
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert_logprobs_match_forward(model, out, mask)
    if not sample:
        return
    sampling = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.8, top_k=30, top_p=0.9, eos_token_id=[],
                  pad_token_id=pad)
    a = compiled.generate(ids, mask, generator=torch.Generator().manual_seed(5), **sampling)
    b = eager.generate(ids, mask, generator=torch.Generator().manual_seed(5), **sampling)
    assert torch.equal(a.sequences, b.sequences), "seeded sampling differs from the eager engine's"
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    # the sampled variant is a second graph of the same bucket (the greedy choice is outside it)
    assert counter.frame_count == 2
    assert_no_graph_break()


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_step_matches_eager_and_hugging_face(name, kernels, tmp_path):
    check_family(name, kernels, "aot_eager", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name,kernels", [("llama", "torch"), ("qwen2", "cpu"), ("mixtral", "cpu")])
def test_inductor_step_matches_eager_and_hugging_face(name, kernels, tmp_path):
    """The code inductor generates (C++ on CPU), one family per backend, greedy: one compilation of ~25-30 s each
    (the sampled variant, a second graph, is checked under aot_eager for every family above). Mixtral: the grouped
    experts as an opaque custom op inside inductor's graph."""
    check_family(name, kernels, "inductor", tmp_path, sample=False)


@pytest.mark.slow
def test_inductor_bf16_step_matches_eager(tmp_path):
    """In bf16 the inductor step rounds after every op as eager does (emulate_precision_casts), so its tokens are
    the eager step's and its (fp32) logprobs within 1e-5; rounding only at each fused kernel's end, a greedy token
    differed and the logprobs were 0.69 apart."""
    model = tiny_model("qwen2", tmp_path, dtype=torch.bfloat16)
    ids, mask = left_padded_prompts(LENGTHS, 0)
    eager = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, kernels="cpu").eval()
    # the backend by name: the engine passes inductor its options (a counter wrapping it would not)
    compiled = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, kernels="cpu", compile=True,
                                  compile_backend="inductor").eval()
    a = compiled.generate(ids, mask, max_new_tokens=32, eos_token_id=[], pad_token_id=0)
    b = eager.generate(ids, mask, max_new_tokens=32, eos_token_id=[], pad_token_id=0)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert_no_graph_break()


def test_one_compilation_per_batch_bucket(tmp_path):
    model = tiny_model("llama", tmp_path)
    ids, mask = left_padded_prompts([6, 2, 4, 5], 0)
    _, compiled, counter = engines(model, "cpu")
    assert [bucket_of(b, 4) for b in (1, 2, 3, 4)] == [1, 2, 4, 4]
    for rows, prompt in [(3, 6), (4, 6), (3, 4)]:   # bucket 4: new batch sizes and prompt lengths, no recompile
        compiled.generate(ids[:rows, -prompt:], mask[:rows, -prompt:], max_new_tokens=20, eos_token_id=[])
    assert counter.frame_count == 1
    compiled.generate(ids[:1], mask[:1], max_new_tokens=20, eos_token_id=[])  # bucket 1
    assert counter.frame_count == 2
    assert_no_graph_break()


def test_variants_never_meet_dynamos_recompile_limit(monkeypatch, tmp_path):
    """Every (bucket, greedy or sampled, EOS) variant is compiled from a code object of its own, so none counts
    toward another's recompile limit (with fullgraph=True, passing it is a hard error): here a limit of 1 and
    3 buckets x 2 variants, a second engine on another model besides."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model = tiny_model("gpt2", tmp_path)
    ids, mask = left_padded_prompts([6, 2, 4], 0)
    _, compiled, counter = engines(model, "cpu")
    for rows in (1, 2, 3):
        for sample in (False, True):
            compiled.generate(ids[:rows], mask[:rows], max_new_tokens=4, do_sample=sample, eos_token_id=[],
                              generator=torch.Generator().manual_seed(0))
    other = hybrid_engine.wrap(tiny_model("opt", tmp_path), max_seq_len=MAX_SEQ, max_batch_size=4, kernels="cpu",
                               compile=True, compile_backend=counter)
    other.generate(ids, mask, max_new_tokens=4, eos_token_id=[], pad_token_id=1)
    assert counter.frame_count == 7
    assert_no_graph_break()


def test_weights_change_without_recompiling(tmp_path):
    """An optimizer step, train(), eval(): the compiled step reads the new weights (HF's tokens on them) with no
    recompilation, for fused (re-laid) and in-place weights alike."""
    model = tiny_model("llama", tmp_path)
    ids, mask = left_padded_prompts(LENGTHS, 0)
    _, compiled, counter = engines(model, "cpu")
    before = greedy(compiled, ids, mask, 0)
    compiled.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits.logsumexp(-1).mean().backward()  # a step that moves every projection
    opt.step()
    model.eval()
    compiled.eval()
    after = greedy(compiled, ids, mask, 0)
    assert not torch.equal(after.sequences, before.sequences), "the step did not change the tokens: a weak test"
    assert torch.equal(after.sequences, hf_greedy(model, ids, mask, 0))
    assert counter.frame_count == 1, "recompiled after a weight update"
    assert_no_graph_break()


@pytest.mark.parametrize("every", [1, 5])
def test_eos_checked_every_k_steps_gives_the_eager_output(every, tmp_path):
    model = tiny_model("gpt2", tmp_path)
    ids, mask = left_padded_prompts(LENGTHS, 0)
    eager, compiled, counter = engines(model, "cpu", eos_check_every=every)
    free = greedy(eager, ids, mask, 0)
    eos = eos_produced_mid_generation(free.sequences[:, ids.shape[1]:])
    a = compiled.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    b = eager.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.action_mask, b.action_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert_stops_at_first_eos(a, ids.shape[1], eos, 0)
    assert counter.frame_count == 1


def test_lora_compiled_matches_hugging_face(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2", tmp_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)   # an adapter that changes the tokens
    ids, mask = left_padded_prompts(LENGTHS, 0)
    eager, compiled, counter = engines(peft_model, "cpu")
    out = greedy(compiled, ids, mask, 0)
    assert torch.equal(out.sequences, greedy(eager, ids, mask, 0).sequences)
    hf = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.sequences, hf)
    assert counter.frame_count == 1
    assert_no_graph_break()


def test_compile_defaults_and_refusals(tmp_path):
    model = tiny_model("llama", tmp_path)
    assert hybrid_engine.wrap(model).static is None              # CPU: off unless asked
    assert hybrid_engine.wrap(model, compile=True).static is not None
    with pytest.raises(ValueError, match="eos_check_every=0"):
        hybrid_engine.wrap(model, compile=True, eos_check_every=0)


def test_moe_compile_on_cuda_is_refused_and_off_by_default(tmp_path, monkeypatch):
    """A CUDA graph cannot capture the grouped experts' host read of each expert's token count: on CUDA a mixture of
    experts decodes eagerly by default, and compile=True is refused in one line (wrap on a model taken for CUDA)."""
    from hybrid_engine.engine import HybridEngine

    model = tiny_model("mixtral", tmp_path)
    monkeypatch.setattr(HybridEngine, "_device", lambda self: torch.device("cuda"))
    assert hybrid_engine.wrap(model, kernels="torch").static is None
    with pytest.raises(NotImplementedError, match="^compile=True on CUDA: a mixture-of-experts model's"):
        hybrid_engine.wrap(model, kernels="torch", compile=True)
    monkeypatch.undo()
    assert hybrid_engine.wrap(model, compile=True).static is not None  # on CPU the custom op runs in the graph


def test_cpu_custom_ops_have_fake_implementations():
    """The C++ twins as torch.library ops: opcheck runs each on real tensors and checks its schema (declared
    mutations), its fake implementation against the real output, and its tracing."""
    from hybrid_engine import ops as ops_lib

    ops_lib.select("cpu", "cpu")  # builds and binds the extension
    lib = torch.ops.hybrid_engine_cpu
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    x, w, b = rand(3, 5, 24), rand(24), rand(24)
    q, k, v = rand(2, 1, 4, 12), rand(2, 1, 2, 12), rand(2, 1, 2, 12)
    cos, sin = rand(2, 1, 8), rand(2, 1, 8)
    cache = rand(4, 2, 9, 12)
    mask = torch.rand(4, 9, generator=g) > 0.3
    mask[:, 0] = True
    cases = [
        (lib.rms_norm, (x, w, 1e-6)), (lib.rms_norm_residual, (x, w, 1e-6, x + 1)),
        (lib.layer_norm, (x, w, b, 1e-5)), (lib.layer_norm_residual, (x, w, None, 1e-5, x + 1)),
        (lib.rotary_kv_append, (q, k, v, cos, sin, cache.clone(), cache.clone(), 3)),
        (lib.kv_append, (q, k, v, cache.clone(), cache.clone(), 4)),
        (lib.decode_attention, (rand(2, 4, 12), cache, cache, mask, 9, 0.3, 0.0)),
        (lib.decode_attention, (rand(2, 4, 12), cache, cache, mask, 9, 0.3, 1.5)),  # soft-capped (Gemma 2)
        (lib.prefill_attention, (rand(2, 4, 6, 12), rand(2, 2, 6, 12), rand(2, 2, 6, 12), mask[:2, :6], 0.3, None,
                                 0.0)),
        (lib.prefill_attention, (rand(2, 4, 6, 12), rand(2, 2, 6, 12), rand(2, 2, 6, 12), mask[:2, :6], 0.3, 4, 1.5)),
        (lib.tp_pack, (rand(8, 6), torch.empty(4, 6), 1, 2, [8], 0)),
        (lib.tp_unpack, (rand(4, 6), rand(8, 6), 0, 2, [8], 0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _sgd_step(model, ids, mask) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


def test_captured_addresses_survive_train_eval_and_move_on_release(tmp_path):
    """What a CUDA graph holds is the address of every tensor the step reads (static.graph_inputs). On the CPU:
    after an optimizer step and train()/eval() every one is where it was (parameters are updated in place, the
    fused buffers refilled in place, the rotary table kept), so the graphs need no re-capture; release_memory()
    frees buffers, and the next generation sees new addresses (and would re-capture). Packing is off as on a GPU
    (its oneDNN copies are CPU-only and remade at each eval())."""
    from hybrid_engine.static import graph_inputs

    model = tiny_model("qwen2", tmp_path)
    ids, mask = left_padded_prompts(LENGTHS, 0)
    _, compiled, _ = engines(model, "cpu", pack_weights=False)

    def addresses():
        greedy(compiled, ids, mask, 0)
        state = compiled.static.states[bucket_of(len(LENGTHS), 4)]
        return [t.data_ptr() for t in graph_inputs(compiled.inference, compiled.cache, state)]

    first = addresses()
    compiled.train()
    _sgd_step(model, ids, mask)
    compiled.eval()
    assert addresses() == first
    compiled.release_memory()
    assert addresses() != first


def test_capture_bookkeeping_replays_and_recaptures_when_it_should(monkeypatch, tmp_path):
    """The CUDA-graph path's decisions, on the CPU: `_capture` (the one CUDA-only piece) is replaced by a stand-in
    whose replay runs the compiled step. One capture per bucket and variant, replayed across prompts, an
    optimizer step and train()/eval() (with HF's tokens on the new weights); a new variant (EOS) captures its
    own; release_memory() forces a re-capture."""
    from types import SimpleNamespace

    from hybrid_engine.static import StaticDecoder

    def fake_capture(self, run, state):
        self.captures += 1
        return SimpleNamespace(replay=run)

    monkeypatch.setattr(StaticDecoder, "_capture", fake_capture)
    model = tiny_model("llama", tmp_path)
    ids, mask = left_padded_prompts(LENGTHS, 0)
    eager, compiled, counter = engines(model, "cpu", pack_weights=False)
    compiled.static.cuda_graphs = True
    out = greedy(compiled, ids, mask, 0)
    assert torch.equal(out.sequences, greedy(eager, ids, mask, 0).sequences)
    greedy(compiled, ids[:, 2:], mask[:, 2:], 0)
    assert compiled.static.captures == 1
    compiled.train()
    _sgd_step(model, ids, mask)
    model.eval()
    after = greedy(compiled.eval(), ids, mask, 0)
    assert torch.equal(after.sequences, hf_greedy(model, ids, mask, 0))
    assert compiled.static.captures == 1 and counter.frame_count == 1
    compiled.generate(ids, mask, max_new_tokens=8, eos_token_id=5, pad_token_id=0)   # the EOS variant
    assert compiled.static.captures == 2
    compiled.release_memory()
    greedy(compiled, ids, mask, 0)
    assert compiled.static.captures == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_captured_once_per_bucket_and_replayed_after_weight_updates(tmp_path):
    """On CUDA, compile=True (the default) captures each bucket's step once; an optimizer step with train()/eval()
    replays the same graph with the new weights (HF's tokens on them); release_memory() forces one re-capture."""
    model = tiny_model("llama", tmp_path).cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts(LENGTHS, 0))
    engine = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4).eval()
    eager = hybrid_engine.wrap(model, max_seq_len=MAX_SEQ, max_batch_size=4, compile=False).eval()
    assert engine.static is not None and engine.static.cuda_graphs
    out = greedy(engine, ids, mask, 0)
    assert torch.equal(out.sequences, greedy(eager, ids, mask, 0).sequences)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 0))
    assert engine.static.captures == 1
    greedy(engine, ids[:, 2:], mask[:, 2:], 0)   # a shorter prompt, same bucket: a replay
    assert engine.static.captures == 1
    engine.train()
    _sgd_step(model, ids, mask)
    model.eval()
    after = greedy(engine.eval(), ids, mask, 0)
    assert not torch.equal(after.sequences, out.sequences)
    assert torch.equal(after.sequences, hf_greedy(model, ids, mask, 0))
    assert engine.static.captures == 1, "re-captured after a weight update"
    engine.release_memory()
    greedy(engine, ids, mask, 0)
    assert engine.static.captures == 2


def test_real_model_compiled_matches_eager_and_hugging_face_with_eos_stops():
    """SmolLM2-135M-Instruct (tests/real_model.py): 8 chat prompts, greedy, stopping at the model's own EOS (some
    rows stop, some run on), the host checking every 8 steps: the compiled step's tokens, action mask and
    logprobs are the eager engine's, and the tokens HF generate's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.real_model import QUESTIONS, chat_batch, real_model_dir

    path = real_model_dir()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = chat_batch(tokenizer, QUESTIONS)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    counter = CompileCounterWithBackend("aot_eager")
    options = dict(max_seq_len=96, max_batch_size=len(QUESTIONS), kernels="cpu")
    compiled = hybrid_engine.wrap(model, compile=True, compile_backend=counter, **options).eval()
    eager = hybrid_engine.wrap(model, **options).eval()
    a = compiled.generate(ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad)
    b = eager.generate(ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.action_mask, b.action_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos,
                        pad_token_id=pad)
    assert torch.equal(a.sequences, hf)
    stopped = (a.sequences[:, ids.shape[1]:] == eos).any(-1)
    assert stopped.any() and not stopped.all()
    assert counter.frame_count == 1
    assert_no_graph_break()
