"""hybrid_engine.integrations.trl against TRL's own generation (issue 23, item 1): the same seed gives the same
sampled tokens, the engine's logprobs match TRL's training forward after each update (the adapter's audit, every
rollout here), the forward TRL spends on old logprobs is skipped, training moves every trainable parameter (TRL's own
test style), with full weights, PEFT LoRA, bf16 autocast, RLOO, the tool loop's continued turns, and on SmolLM2;
benchmarks/vs_trl.py at toy sizes. Skipped without trl."""
import json
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from hybrid_engine.integrations.trl import (  # noqa: E402
    HybridEngineGRPOTrainer,
    HybridEngineRLOOTrainer,
    check_trl_version,
)
from tests.hf_models import VOCAB, tiny_model  # noqa: E402

WORDS = [f"w{i}" for i in range(VOCAB - 4)]
EOS = 2


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace tokenizer over VOCAB ids: <pad> 0, <s> 1, </s> 2 (EOS), <unk> 3, then the words."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": EOS, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for these trainer runs: on the shared 2-core machine this file took 12.9 min with torch's
    default threads (load average 17) and 35 s with one (OMP_NUM_THREADS=1, load average 8): threads waiting on each
    other at every parallel region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama of tests/hf_models.py with EOS's LM-head row scaled up, so some rows stop early: its path."""
    tmp = tmp_path_factory.mktemp("trl")
    model = tiny_model("llama", tmp)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 3
    model.save_pretrained(tmp / "policy")
    return tmp / "policy"


# prompts of 3 to 6 words: each generation batch (2 prompts x 4 samples) mixes lengths, so rows are left padded
DATA = Dataset.from_dict({"prompt": [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(3 + i % 4))
                                     for i in range(8)]})


def reward(completions, **kwargs):
    return [float(c.count("w5")) + 0.1 * len(c.split()) for c in completions]


def train(trainer_cls, path, tokenizer=None, data=DATA, reward_funcs=reward, **options):
    """Train for the run's max_steps; returns (trainer, each rollout's completion ids, the initial trainable
    parameters by name)."""
    config_cls = GRPOConfig if issubclass(trainer_cls, GRPOTrainer) else RLOOConfig
    extra = {k: options.pop(k) for k in ("engine_kwargs", "logprob_audit_every", "peft_config") if k in options}
    args = dict(output_dir=str(path.parent / "out"), per_device_train_batch_size=8, num_generations=4,
                max_completion_length=6, max_steps=2, learning_rate=1e-2, beta=0.1, seed=3, bf16=False, use_cpu=True,
                report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True)
    args.update(options)
    trainer = trainer_cls(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=reward_funcs,
                          args=config_cls(**args), train_dataset=data, processing_class=tokenizer or word_tokenizer(),
                          **extra)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rollouts = []
    generate = trainer._generate

    def recorded(prompts):
        result = generate(prompts)
        rollouts.append([list(ids) for ids in result[1]])
        return result

    trainer._generate = recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations inside TRL
        trainer.train()
    return trainer, rollouts, before


def assert_every_parameter_changed(trainer, before):
    for name, p in trainer.model.named_parameters():
        if name in before:
            assert not torch.equal(p, before[name]), f"{name} did not change"


def assert_audited(trainer, rollouts: int, tol: float):
    """One audit per rollout (logprob_audit_every=1), each gap under tol."""
    assert len(trainer.logprob_gaps) == rollouts, trainer.logprob_gaps
    assert max(gap for _, gap in trainer.logprob_gaps) <= tol, trainer.logprob_gaps


def count_forwards(monkeypatch, trainer_cls) -> list:
    """Records compute_entropy of every call of TRL's own forward of the policy or reference (the adapter's override
    reaches it through super())."""
    calls = []
    original = trainer_cls._get_per_token_logps_and_entropies

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("compute_entropy", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_cls, "_get_per_token_logps_and_entropies", counted)
    return calls


def test_grpo_samples_trls_tokens_and_its_forwards_logprobs(tiny):
    """Sampled tokens (temperature 0.7, top_p 0.9, top_k 40) equal TRL's own generation under the same seed (the
    engine draws from the global RNG stream as HF generate does, one multinomial per step over the whole batch);
    rows stop at EOS; after each update the engine's logprobs (of softmax(logits / 0.7), as TRL's forward) match
    TRL's fp32 training forward within 1e-5 (measured <1e-6); the trained weights equal TRL's run's."""
    sampling = dict(temperature=0.7, top_p=0.9, top_k=40)
    trl_run, trl_rollouts, _ = train(GRPOTrainer, tiny, **sampling)
    ours, rollouts, before = train(HybridEngineGRPOTrainer, tiny, logprob_audit_every=1, **sampling)
    assert rollouts == trl_rollouts
    assert any(len(ids) < 6 and ids[-1] == EOS for r in rollouts for ids in r), "no row stopped at EOS"
    assert_audited(ours, rollouts=2, tol=1e-5)
    assert_every_parameter_changed(ours, before)
    for (name, p), q in zip(ours.model.named_parameters(), trl_run.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("do_sample", [False, True])
def test_tool_loop_turns_continue_the_kept_rows_with_trls_tokens(tiny, do_sample):
    """TRL's tool loop calls _generate_single_turn again with one row per trajectory (prompt + completion + tool
    response ids, num_generations=1): with tools the adapter kept every row's cache and continues the rows those
    prompts extend (engine.continue_rows, prefilling only the tool response), and gives TRL's own tokens, greedy
    (generation_kwargs do_sample=False) or sampled from the same RNG state; logprobs are returned."""
    tokenizer = word_tokenizer()
    trainers = [cls(model=AutoModelForCausalLM.from_pretrained(tiny), reward_funcs=reward, train_dataset=DATA,
                    processing_class=tokenizer,
                    args=GRPOConfig(output_dir=str(tiny.parent / "out"), per_device_train_batch_size=4,
                                    num_generations=2, max_completion_length=7, use_cpu=True, bf16=False,
                                    report_to=[], generation_kwargs={"do_sample": do_sample}))
                for cls in (GRPOTrainer, HybridEngineGRPOTrainer)]
    ours = trainers[1]
    ours.tools = [reward]  # what tools= sets (its chat-template checks need a tool-calling template)

    def both(prompts, num_generations):
        results = []
        for trainer in trainers:
            torch.manual_seed(11)
            results.append(trainer._generate_single_turn(prompts, None, {}, num_generations))
        return results

    prompts = [[5, 9, 11], [7, 8, 30, 31, 40, 41], [12, 13], [60, 61, 62, 63]]
    (trl_ids, _), (ids, logprobs) = both(prompts, 2)
    assert ids == trl_ids and [len(lp) for lp in logprobs] == [len(i) for i in ids]
    continued = []
    continue_rows = ours.engine.continue_rows
    ours.engine.continue_rows = lambda rows, *a, **k: continued.append(list(rows)) or continue_rows(rows, *a, **k)
    for turn in range(2):  # two tool calls of rows 3 and 1, in the loop's order (ascending rows)
        tool_turn = [prompts[r] + ids[r] + [20 + turn, 21, 22] for r in (1, 3)]  # + a "tool response"
        (trl_next, _), (ours_next, _) = both(tool_turn, 1)
        assert ours_next == trl_next
        for r, new in zip((1, 3), ours_next, strict=True):
            prompts[r], ids[r] = prompts[r] + ids[r] + [20 + turn, 21, 22], new
    assert continued == [[1, 3], [1, 3]]


@pytest.mark.parametrize("kind", ["rloo", "grpo_two_iterations"])
def test_rollout_logprobs_replace_trls_old_logprob_forward(tiny, monkeypatch, kind):
    """Where TRL recomputes old logprobs with a no-grad forward of the policy (RLOO always; GRPO when a rollout
    feeds two optimizer steps), the engine's are used: that forward runs only on audited rollouts (the first of
    every two here), whose gap is under 1e-5; tokens (with repetition_penalty, min_p) and the trained weights
    equal TRL's own run's."""
    trl_cls, cls, options = {
        "rloo": (RLOOTrainer, HybridEngineRLOOTrainer, dict(max_steps=2, repetition_penalty=1.3)),
        "grpo_two_iterations": (GRPOTrainer, HybridEngineGRPOTrainer, dict(max_steps=4, num_iterations=2,
                                                                           num_generations=2, min_p=0.02)),
    }[kind]
    trl_calls = count_forwards(monkeypatch, trl_cls)
    trl_run, trl_rollouts, _ = train(trl_cls, tiny, **options)
    no_grad_by_trl = trl_calls.count(False)
    trl_calls.clear()
    ours, rollouts, before = train(cls, tiny, logprob_audit_every=2, **options)
    assert rollouts == trl_rollouts and len(rollouts) == 2
    # per rollout TRL runs old + ref without grad; ours skips the old one on the second (unaudited) rollout
    assert no_grad_by_trl == 4 and trl_calls.count(False) == 3, trl_calls
    assert_audited(ours, rollouts=1, tol=1e-5)
    assert_every_parameter_changed(ours, before)
    for (name, p), q in zip(ours.model.named_parameters(), trl_run.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)


def test_peft_lora(tiny):
    """A LoRA policy (TRL wraps it with peft_config; the reference is the policy with its adapters off): TRL's
    tokens, the forward's logprobs after each update (the engine merges the adapters at each switch), and every LoRA
    parameter trained."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    _, trl_rollouts, _ = train(GRPOTrainer, tiny, peft_config=lora)
    ours, rollouts, before = train(HybridEngineGRPOTrainer, tiny, peft_config=lora, logprob_audit_every=1)
    assert rollouts == trl_rollouts
    assert_audited(ours, rollouts=2, tol=1e-5)
    assert before and all("lora_" in name for name in before)
    assert_every_parameter_changed(ours, before)


def test_bf16_autocast_gap_is_within_hfs_own_attention_spread(tiny):
    """bf16=True: TRL's forward runs under accelerate's bf16 autocast and the engine generates with its
    projections in bf16 (autocast_dtype). Bound: 2x the largest gap between HF's own eager and sdpa attention under
    the same autocast over the last rollout's sequences (flash-attention's rule, as tests/test_engine_faults.py's
    autocast test). Measured: engine gap 8.7e-3 and 8.3e-3 at the two audits, HF's eager vs sdpa spread 7.5e-3;
    generating in fp32 instead would pass this bound too, hence the check of the engine's compute dtype."""
    ours, _, before = train(HybridEngineGRPOTrainer, tiny, bf16=True, logprob_audit_every=1)
    assert ours.engine.compute_dtype == torch.bfloat16
    assert_every_parameter_changed(ours, before)
    batch = ours._buffered_inputs[0]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    keep = batch["completion_ids"].shape[1]
    spreads = []
    with torch.no_grad():
        for attn in ("eager", "sdpa"):
            ours.model.set_attn_implementation(attn)
            spreads.append(ours._get_per_token_logps_and_entropies(ours.model, ids, mask, keep)[0])
    spread = ((spreads[0] - spreads[1]).abs() * batch["completion_mask"]).max().item()
    assert 0 < spread, "eager and sdpa agree exactly: no measure of bf16's spread"
    assert_audited(ours, rollouts=2, tol=2 * spread)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_smollm2_step(kind, tmp_path):
    """SmolLM2-135M-Instruct, conversational prompts through its chat template, one step each way (GRPO, and RLOO,
    whose old-logprob forward the audit runs): TRL's sampled tokens, and the engine's fp32 logprobs within 1e-4 of
    TRL's forward (measured 2.6e-5 for GRPO: a real model's 30 layers and 49152-token vocabulary add rounding the
    tiny model has not)."""
    from transformers import AutoTokenizer

    from tests.real_model import QUESTIONS, real_model_dir

    path = real_model_dir()
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]})

    def length(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    trl_cls, cls = (GRPOTrainer, HybridEngineGRPOTrainer) if kind == "grpo" else (RLOOTrainer, HybridEngineRLOOTrainer)
    options = dict(tokenizer=AutoTokenizer.from_pretrained(path), data=data, reward_funcs=length, max_steps=1,
                   per_device_train_batch_size=4, num_generations=2, max_completion_length=5, learning_rate=1e-5,
                   beta=0.0, output_dir=str(tmp_path))  # not beside the shared checkpoint
    _, trl_rollouts, _ = train(trl_cls, path, **options)
    ours, rollouts, _ = train(cls, path, logprob_audit_every=1, **options)
    assert rollouts == trl_rollouts
    assert_audited(ours, rollouts=1, tol=1e-4)


def test_construction_warns_once_for_what_the_engine_does_not_serve(tiny):
    """One warning line names generation settings the engine cannot honour; rollout_func (a path the engine does not
    serve) gets one warning and TRL's own generation; a bad audit period is one line."""
    def build(**kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            HybridEngineGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny), reward_funcs=reward,
                                    train_dataset=DATA, processing_class=word_tokenizer(),
                                    args=GRPOConfig(output_dir=str(tiny.parent / "out"), use_cpu=True, bf16=False,
                                                    report_to=[], per_device_train_batch_size=2, num_generations=2,
                                                    **kwargs.pop("args", {})), **kwargs)
        return [str(w.message) for w in caught if "HybridEngine" in str(w.message)]

    assert build() == []
    unhonoured = build(args=dict(generation_kwargs={"no_repeat_ngram_size": 2}))
    assert len(unhonoured) == 1 and "no_repeat_ngram_size" in unhonoured[0] and "\n" not in unhonoured[0]
    fallback = build(rollout_func=lambda prompts, trainer: {})
    assert len(fallback) == 1 and "rollout_func" in fallback[0] and "TRL's own generation" in fallback[0]
    with pytest.raises(ValueError, match="logprob_audit_every=-1"):
        build(logprob_audit_every=-1)


def test_trl_version_range_and_lazy_import():
    """A TRL outside the supported range is refused in one line naming it; importing hybrid_engine.integrations
    does not import trl (optional for users)."""
    check_trl_version("1.16.0")
    check_trl_version("1.16.3")
    for version in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(ImportError, match=f"trl>=1.16.0,<1.17.0 .*found trl {version}"):
            check_trl_version(version)
    done = subprocess.run([sys.executable, "-c", "import sys, hybrid_engine.integrations; "
                           "assert 'trl' not in sys.modules, 'trl imported'"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_vs_trl_benchmark_times_the_three_runs(tmp_path):
    """benchmarks/vs_trl.py at toy sizes: a row per run (trl, trl+hybrid_engine, rlhf) with the median step, its
    phases adding up to it, the answers' length and the speedup against TRL's own."""
    from benchmarks import vs_trl

    out = tmp_path / "rows.json"
    initialized = torch.distributed.is_initialized()
    try:
        assert vs_trl.main(["--prompts", "2", "--group", "2", "--new-tokens", "4", "--steps", "1", "--threads", "1",
                            "--clock", "cpu", "--json", str(out)]) == 0
    finally:  # rlhf train initialised torch.distributed (one process) in this process: leave it as it was found
        if not initialized and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    rows = json.loads(out.read_text())
    assert [row["run"] for row in rows] == ["trl", "trl+hybrid_engine", "rlhf"] and rows[0]["speedup"] == 1.0
    for row in rows:
        assert row["step_s"] > 0 and 1 <= row["answer_len"] <= 4 and set(row["phases_s"]) == set(vs_trl.PHASES)
        assert sum(row["phases_s"].values()) == pytest.approx(row["step_s"], rel=1e-6)
        assert row["phases_s"]["generate"] > 0 and row["phases_s"]["actor_update"] > 0
    assert rows[1]["phases_s"]["old_logprobs"] == 0 and rows[0]["phases_s"]["ref_logprobs"] > 0
