"""Multi-process scenarios of the hybrid engine under DeepSpeed (gloo, CPU, fp32), run by test_distributed.py.

    python -m tests.distributed_worker OUT_DIR [SCENARIO ...]     # spawns 2 processes, writes OUT_DIR/rank*.json

Every rank builds the same random model, wraps it in a DeepSpeed engine and compares the hybrid engine's greedy
tokens for its own prompts with single-process Hugging Face `generate` on the same weights (a copy kept before
DeepSpeed touched the model). One spawn runs every scenario: DeepSpeed and transformers take ~20 s to import.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import traceback

import torch
import torch.multiprocessing as mp

WORLD = 2
NEW_TOKENS = 6


def _setup(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from rlhf.runtime.distributed import init_distributed

    init_distributed("gloo")


def _config(name: str):
    from transformers import LlamaConfig

    from tests.hf_models import CONFIGS, VOCAB

    if name == "gemma3_tp":  # 4 heads over 2 kv heads: splits over 2 ranks
        cfg = CONFIGS["gemma3"]()
        cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
        return cfg
    if name == "mixtral_tp":  # 4 heads over 2 kv heads: splits over 2 ranks
        cfg = CONFIGS["mixtral"]()
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 10
        return cfg
    if name == "llama_6_3":  # 6 query heads over 3 kv heads: on 2 ranks the kv groups straddle the split
        return LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=3, head_dim=10, max_position_embeddings=128)
    return CONFIGS[name]()


def _model(name: str, lora: bool | str = False):
    """The named tiny config with random weights; `lora`: adapters on q_proj, v_proj and down_proj, or on the
    target_modules it names ("all-linear": on Mixtral also its router and experts, PEFT's ParamWrappers)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name))
    model.generation_config.eos_token_id = None  # the tests generate a fixed number of tokens
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = lora if isinstance(lora, str) else ["q_proj", "v_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)  # PEFT starts B at zero; make the adapters matter
    return model.eval()


def _ds(model, stage: int, lr: float = 0.05):
    import deepspeed

    from rlhf.runtime.engines import ds_config

    cfg = ds_config(2, 1, stage)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny norms
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _prompts(rank: int):
    from tests.hf_models import left_padded_prompts

    lengths = [[6, 3, 5], [4, 7]][rank]  # different batch sizes and prompt lengths per rank
    return left_padded_prompts(lengths, pad_id=0, seed=10 + rank)


def _hf(ref, ids, mask):
    return ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                        eos_token_id=None, pad_token_id=0)


def _full_state(model) -> dict:
    import deepspeed

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, enabled=bool(params)):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _partitioned(model) -> bool:
    return all(p.data.numel() == 0 and p.ds_status.name == "NOT_AVAILABLE" for p in model.parameters()
               if hasattr(p, "ds_id"))


def _greedy_matches(engine, ref, rank) -> tuple[bool, str]:
    ids, mask = _prompts(rank)
    out = engine.eval().generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0)
    hf = _hf(ref, ids, mask)
    return torch.equal(out.sequences, hf), f"engine {out.sequences.tolist()} hf {hf.tolist()}"


def scenario_zero3_tp1(rank):
    return _zero3_tp1(rank, "llama")


def _zero3_tp1(rank, name: str):
    import hybrid_engine

    model = _model(name)
    ref = copy.deepcopy(model)
    ds = _ds(model, 3)
    res = {}
    engine = hybrid_engine.wrap(ds, max_seq_len=24, max_batch_size=4)
    res["greedy"] = _greedy_matches(engine, ref, rank)
    res["gathered_on_eval"] = (engine.live_buffers()["gathered"] > 0, str(engine.live_buffers()))
    engine.release_memory()
    live = engine.live_buffers()
    res["release_memory"] = (all(v == 0 for v in live.values()) and _partitioned(model), str(live))
    # an optimizer step in training mode: the next rollout must read the new weights
    ids, mask = _prompts(rank)
    before = engine.eval().generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0).sequences
    engine.train()
    live = engine.live_buffers()
    res["train_releases"] = (_partitioned(model) and live["kv_cache"] > 0 and sum(live.values()) == live["kv_cache"],
                             str(live))
    labels = torch.randint(3, 101, ids.shape, generator=torch.Generator().manual_seed(rank))
    loss = ds(input_ids=ids, attention_mask=mask, labels=labels).loss
    ds.backward(loss)
    ds.step()
    ref.load_state_dict(_full_state(model))
    after = engine.eval().generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0).sequences
    hf = _hf(ref, ids, mask)
    res["after_step"] = (torch.equal(after, hf) and not torch.equal(before, after),
                         f"before {before.tolist()} after {after.tolist()} hf {hf.tolist()}")
    engine.train()
    # streamed: one layer at a time, the next prefetched, the previous released
    streamed = hybrid_engine.wrap(ds, max_seq_len=24, max_batch_size=4, pin_parameters=False,
                                  gather_partition_size=1)
    res["streamed_greedy"] = _greedy_matches(streamed, ref, rank)
    streamed.release_memory()
    res["streamed_release"] = (_partitioned(model) and not any(streamed.live_buffers().values()),
                               str(streamed.live_buffers()))
    return res


def scenario_zero3_compile(rank):
    """compile=True under ZeRO-3 (pinned: the gathered weights stay from eval() to train()): HF's tokens before
    and after an optimizer step with one compilation; streamed layers (gathered inside the forward) take the
    eager step instead."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    import hybrid_engine

    torch._dynamo.reset()
    model = _model("llama")
    ref = copy.deepcopy(model)
    ds = _ds(model, 3)
    counter = CompileCounterWithBackend("aot_eager")
    engine = hybrid_engine.wrap(ds, max_seq_len=24, max_batch_size=4, compile=True, compile_backend=counter,
                                pin_parameters=True)
    res = {"greedy": _greedy_matches(engine, ref, rank)}
    ids, mask = _prompts(rank)
    before = engine.eval().generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0).sequences
    engine.train()
    labels = torch.randint(3, 101, ids.shape, generator=torch.Generator().manual_seed(rank))
    ds.backward(ds(input_ids=ids, attention_mask=mask, labels=labels).loss)
    ds.step()
    ref.load_state_dict(_full_state(model))
    after = engine.eval().generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0).sequences
    hf = _hf(ref, ids, mask)
    res["after_step"] = (torch.equal(after, hf) and not torch.equal(before, after),
                         f"before {before.tolist()} after {after.tolist()} hf {hf.tolist()}")
    res["one_compilation"] = (counter.frame_count == 1, f"{counter.frame_count} compilations")
    engine.train()
    streamed = hybrid_engine.wrap(ds, max_seq_len=24, max_batch_size=4, compile=True, compile_backend=counter,
                                  pin_parameters=False, gather_partition_size=1)
    res["streamed_eager"] = _greedy_matches(streamed, ref, rank)
    streamed.release_memory()
    return res


def _tp_scenario(rank, name: str, stage: int, lora: bool = False, group_size: int = 0):
    import hybrid_engine

    model = _model(name, lora)
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = _ds(model, stage)
    engine = hybrid_engine.wrap(ds, max_seq_len=24, max_batch_size=4, tp_size=2, gather_partition_size=group_size)
    res = {"greedy": _greedy_matches(engine, ref, rank)}
    w, cfg = engine.inference.w, ref.config
    from hybrid_engine.parallel import head_split

    kv_local = len(head_split(cfg.num_attention_heads, cfg.num_key_value_heads, rank, 2)[1])
    arch = w.arch
    rows = (cfg.num_attention_heads // 2 + 2 * kv_local) * arch.head_dim
    res["sharded"] = (arch.num_heads == cfg.num_attention_heads // 2 and arch.num_kv_heads == kv_local
                      and w.layers[0].qkv.weight.shape[0] == rows, f"{arch.num_heads} {arch.num_kv_heads}")
    moe_layers = [layer for layer in w.layers if getattr(layer, "experts", None) is not None]
    if moe_layers:  # each expert's intermediate width halved, the partial sums all-reduced
        from hybrid_engine.parallel import RowParallelExperts

        width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        shapes = [(tuple(layer.experts.gate_up.shape), tuple(layer.experts.down.shape)) for layer in moe_layers]
        res["experts_sharded"] = (all(isinstance(layer.experts, RowParallelExperts) for layer in moe_layers) and all(
            gu[1] == width and d[2] == width // 2 for gu, d in shapes), str(shapes))
    # sampling: the group samples the same tokens; each rank's logprobs equal the training forward's
    from tests.hf_models import hf_logprobs

    ids, mask = _prompts(rank)
    out = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.8, eos_token_id=[],
                          pad_token_id=0, generator=torch.Generator().manual_seed(100 + rank))
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], NEW_TOKENS, dtype=mask.dtype)], dim=1)
    gap = (out.logprobs - hf_logprobs(ref, out.sequences, full_mask, ids.shape[1], 0.8)).abs().max().item()
    res["sampled_logprobs"] = (gap < 1e-5, f"gap {gap:.2e}")
    engine.train()
    if stage == 3:
        live = engine.live_buffers()
        res["train_releases"] = (_partitioned(model) and sum(live.values()) == live["kv_cache"], str(live))
    after = _full_state(model)
    res["weights_bit_exact"] = (all(torch.equal(after[n], p) for n, p in before.items()), "")
    engine.release_memory()
    res["release_memory"] = (not any(engine.live_buffers().values()) and (stage < 3 or _partitioned(model)),
                             str(engine.live_buffers()))
    return res


def scenario_zero3_tp2(rank):
    return _tp_scenario(rank, "llama", 3, group_size=1)  # one layer per all-gather, the next prefetched


def scenario_zero2_tp2(rank):
    return _tp_scenario(rank, "llama", 2)


def scenario_zero3_tp2_mqa(rank):
    return _tp_scenario(rank, "mistral", 3)  # one kv head: replicated on both ranks


def scenario_zero3_tp2_straddle(rank):
    return _tp_scenario(rank, "llama_6_3", 3)  # each rank keeps one kv head per local query head


def scenario_families_tp2(rank):
    """Every other family under TP 2, without DeepSpeed: Conv1D layout (GPT-2), per-head fused QKV and parallel
    residual (GPT-NeoX), project_in/out and post-norm (OPT), QKV bias (Qwen2), per-head q/k norms (Qwen3), fused
    qkv_proj and gate_up_proj read in place (Phi-3), norms before and after each sublayer and two rotaries (Gemma 3),
    attention soft-capping over 3 local heads and 1 kv head (Gemma 2).
    """
    import hybrid_engine

    res = {}
    for name in ("gpt2", "gpt_neox", "opt", "opt_post_norm", "qwen2", "qwen3_tied", "phi3", "gemma3_tp", "gemma2"):
        model = _model(name)
        res[name] = _greedy_matches(hybrid_engine.wrap(model, max_seq_len=24, max_batch_size=4, tp_size=2), model,
                                    rank)
    return res


def scenario_new_families_zero3(rank):
    """Issue 21's dense families under ZeRO-3: Qwen3's per-head q/k norms, Phi-3's in-place fused projections and
    Gemma 2's and 3's (1 + w) norm buffers gathered and sharded for TP 2; OLMo 2 (whose whole-projection q/k norms
    TP cannot split) gathered at TP 1."""
    import hybrid_engine

    res = {}
    for name in ("qwen3_tied", "phi3", "gemma3_tp", "gemma2"):
        res.update({f"{name} {k}": v for k, v in _tp_scenario(rank, name, 3).items()})
    model = _model("olmo2")
    ref = copy.deepcopy(model)
    engine = hybrid_engine.wrap(_ds(model, 3), max_seq_len=24, max_batch_size=4)
    res["olmo2 greedy"] = _greedy_matches(engine, ref, rank)
    engine.train()
    res["olmo2 train_releases"] = (_partitioned(model), "")
    return res


def scenario_moe(rank):
    """Mixture of experts under ZeRO-3: Qwen3-MoE (a dense layer between MoE layers) gathered at TP 1, pinned and
    streamed, before and after an optimizer step; Mixtral and Qwen2-MoE (shared expert, dense first layer) with each
    expert's width split over TP 2."""
    import hybrid_engine

    res = {f"qwen3_moe {k}": v for k, v in _zero3_tp1(rank, "qwen3_moe").items()}
    for name in ("mixtral_tp", "qwen2_moe"):
        res.update({f"{name} {k}": v for k, v in _tp_scenario(rank, name, 3).items()})
    # LoRA on Mixtral's attention, router and experts (PEFT's ParamWrappers), gathered at TP 1 and split over TP 2
    model = _model("mixtral_tp", lora="all-linear")
    ref = copy.deepcopy(model)
    ds = _ds(model, 3)
    res["mixtral lora greedy"] = _greedy_matches(hybrid_engine.wrap(ds, max_seq_len=24, max_batch_size=4), ref, rank)
    res["mixtral lora tp2"] = _greedy_matches(hybrid_engine.wrap(ds, max_seq_len=24, max_batch_size=4, tp_size=2), ref,
                                              rank)
    return res


def scenario_lora_zero3(rank):
    import hybrid_engine

    model = _model("llama", lora=True)
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = _ds(model, 3)
    engine = hybrid_engine.wrap(ds, max_seq_len=24, max_batch_size=4)
    res = {"greedy": _greedy_matches(engine, ref, rank)}
    engine.train()
    after = _full_state(model)
    res["weights_bit_exact"] = (all(torch.equal(after[n], p) for n, p in before.items()), "")
    res["lora_tp2"] = _greedy_matches(hybrid_engine.wrap(ds, max_seq_len=24, max_batch_size=4, tp_size=2), ref, rank)
    return res


SCENARIOS = {name.removeprefix("scenario_"): fn for name, fn in globals().items() if name.startswith("scenario_")}


def worker(rank: int, port: int, out_dir: str, names: list[str]) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    _setup(rank, port)
    results = {}
    for name in names:
        try:
            results[name] = {k: [bool(ok), msg] for k, (ok, msg) in SCENARIOS[name](rank).items()}
        except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
            results[name] = {"error": [False, traceback.format_exc()]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    from rlhf.runtime.process import end_process

    end_process(0)


def run(out_dir: str, names: list[str], port: int) -> None:
    mp.spawn(worker, args=(port, out_dir, names), nprocs=WORLD, join=True)


if __name__ == "__main__":
    out, *chosen = sys.argv[1:]
    run(out, chosen or list(SCENARIOS), 29400 + os.getpid() % 500)
