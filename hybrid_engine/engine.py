"""HybridEngine: one model, two modes. train() hands the module back to autograd; eval() describes the
training parameters for the project's own inference forward (re-laying only the fused buffers) and
generate() runs it over a preallocated KV cache."""
from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import ops as ops_lib
from .arguments import concat_outputs, from_generation_config, left_packed
from .cache import KVCache, available_bytes
from .continuation import KeptRows, ReprefillRows, check_rows, continue_rows
from .generation import GenerationOutput, SamplingParams, generate, prompt_masks
from .logprobs import token_logprobs
from .models import FAMILIES, InferenceModel, Relayer
from .models.common import can_pack, cast_linears, check_rope, pack_linears, unserved_rope
from .static import StaticDecoder
from .zero import StreamedLayers, ZeroParams, build_weights


@dataclass
class EngineConfig:
    max_seq_len: int = 512        # prompt + new tokens, the KV cache's length
    max_batch_size: int = 8       # rows of the KV cache
    tp_size: int = 1              # tensor-parallel degree for generation
    kernels: str | None = None    # auto | cuda | triton | cpu | torch; None reads $HYBRID_ENGINE_KERNELS
    allow_fallback: bool = False  # unsupported architecture: delegate generate() to Hugging Face
    force_fallback: bool = False  # use Hugging Face generate even for a supported family (for comparisons)
    release_cache_after_generate: bool = False  # DeepSpeed-Chat's --release_inference_cache
    # ZeRO-3 (DeepSpeed-Chat's --unpin_actor_parameters, inverted): True keeps the gathered weights from eval()
    # to train(); False streams the layers during each forward (memory of two groups, one all-gather of the
    # layers per token); None: True when the whole model fits in half of the free memory.
    pin_parameters: bool | None = None
    gather_partition_size: int = 0  # ZeRO-3 / TP: layers per all-gather (next group prefetched); 0: all at once
    tp_group: object = None          # TP process group; None: consecutive blocks of tp_size ranks of the world
    # CPU: oneDNN-packed copies of the projection weights for decode (2-3x faster small-batch matmuls than
    # MKL's sgemm here, for one more copy of those weights); None: on wherever oneDNN can pack the dtype.
    pack_weights: bool | None = None
    # A static decode step compiled with torch.compile(fullgraph=True) (hybrid_engine/static.py): inductor, and on
    # CUDA each batch bucket's step captured once as a CUDA graph and replayed. None: on for CUDA, off on CPU
    # (benchmarks/RESULTS.md: on this 2-core CPU the eager step with oneDNN-packed weights is faster).
    compile: bool | None = None
    compile_backend: object = "inductor"  # torch.compile's backend (a name or callable); "aot_eager": no codegen
    eos_check_every: int = 8           # compiled step: the host reads "all rows finished" every k steps
    # The dtype policy: generate() and score() under an active torch.autocast run the projections in the autocast
    # dtype (the rest in the parameters'), as the training forward runs under that autocast. Set, this dtype is
    # used instead, inside an autocast or not: bf16 for a trainer whose forward alone runs under autocast (as
    # accelerate's mixed precision wraps it); the parameters' dtype (fp32) to generate in it even under an
    # autocast (on SmolLM2 fp32 is nearer to HF's bf16 autocast forward on average than any other bf16 run:
    # tests/test_real_model.py). None: an active autocast's dtype, else the parameters'.
    autocast_dtype: torch.dtype | None = None


@dataclass
class SwitchStats:
    """What a mode switch cost: wall time in total and per part, and the bytes each part wrote."""
    seconds: float = 0.0
    relaid_bytes: int = 0     # written into re-laid buffers (fused QKV, gate/up, LoRA merges)
    gather_s: float = 0.0     # ZeRO-3 all-gather of the parameters (streamed: also those during generate())
    gathered_bytes: int = 0   # full-size bytes the all-gathers materialised on this rank
    relay_s: float = 0.0      # describing the model and filling the re-laid buffers
    tp_s: float = 0.0         # cutting the TP shards
    tp_bytes: int = 0         # bytes of this rank's TP shards
    pack_s: float = 0.0       # oneDNN packing of the projection weights for CPU decode (their bytes: in relaid)
    release_s: float = 0.0    # partitioning the gathered parameters again (train switch)


def _checked_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, length: str) -> torch.Tensor:
    """The attention mask of (batch, `length`) input ids: all ones when None; one line when a shape is wrong."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected (batch, {length}), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    return attention_mask


def _check_sampling(params: SamplingParams) -> None:
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p={params.top_p}: expected a value in (0, 1]")
    if params.top_k is not None and params.top_k < 0:
        raise ValueError(f"top_k={params.top_k}: expected 0 or None (off) or a positive count")
    if params.temperature <= 0.0:
        raise ValueError(f"temperature={params.temperature}: expected a positive value")
    if not 0.0 <= params.min_p <= 1.0:
        raise ValueError(f"min_p={params.min_p}: expected a value in [0, 1] (0: off)")
    if params.repetition_penalty <= 0.0:
        raise ValueError(f"repetition_penalty={params.repetition_penalty}: expected a positive value (1: off)")


# wrappers whose `.module` is the whole model, parameters in place: DeepSpeed's engine (its ZeRO-3 partitions are
# gathered by zero.py), torch's DDP and DataParallel (what accelerate.prepare returns on CPU and single-node GPUs)
_MODULE_WRAPPERS = ("DeepSpeedEngine", "DistributedDataParallel", "DataParallel")


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face module under a DeepSpeed engine, DDP / DataParallel (accelerate's wrappers), a
    torch.compile'd module, and/or a PEFT model (LoRA layers stay in place). FSDP, whose ranks hold shards of flat
    parameters, is refused in one line."""
    while True:
        name = type(model).__name__
        if name in ("FullyShardedDataParallel", "FSDPModule") or name.startswith("FSDP"):
            raise NotImplementedError(f"hybrid_engine.wrap: {name} shards the parameters across ranks, which the "
                                      "engine cannot read in place; wrap the model under DDP or DeepSpeed ZeRO-3")
        if name in _MODULE_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            break
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


class HybridEngine:
    def __init__(self, model: nn.Module, config: EngineConfig):
        self.module = model
        self.config = config
        self.hf_model = unwrap(model)
        model_type = getattr(self.hf_model.config, "model_type", type(self.hf_model).__name__)
        self.supported = model_type in FAMILIES and not config.force_fallback
        if model_type not in FAMILIES and not config.allow_fallback:
            raise NotImplementedError(
                f"hybrid_engine.wrap: architecture {model_type!r} ({type(self.hf_model).__name__}) is not supported; "
                f"supported families: {', '.join(sorted(FAMILIES))} (pass allow_fallback=True to use Hugging Face "
                "generate for it)")
        # why generate() delegates to Hugging Face (the fallback's warning says it), where it does unasked
        self.unserved = "" if model_type in FAMILIES else "has no inference path of its own"
        rope_type = unserved_rope(self.hf_model.config) if self.supported else None
        if rope_type is not None:
            if not config.allow_fallback:
                check_rope(self.hf_model.config)  # raises, naming the rope type
            self.supported = False
            self.unserved = f"has rope type {rope_type!r}, whose frequencies change with the sequence length"
        if config.tp_size > 1 and not self.supported:
            raise NotImplementedError(f"tp_size={config.tp_size}: tensor parallelism needs the engine's own "
                                      f"inference path; {model_type!r} has none")
        self.model_type = model_type
        self.ops = ops_lib.select(config.kernels, self._device().type)
        self.relayer = Relayer()
        self.packed_bytes = 0
        self.zero = ZeroParams(self.hf_model) if self.supported and ZeroParams.present(self.hf_model) else None
        self.tp = None
        if config.tp_size > 1:
            from .parallel import TensorParallel, check_tp_family, check_tp_heads

            # here, not at the first eval(), which may come after a training step
            check_tp_family(model_type, config.tp_size)
            check_tp_heads(self.hf_model.config.num_attention_heads, config.tp_size, f"the {model_type} model")
            self.tp = TensorParallel(config.tp_size, config.tp_group, self.ops)
        self.static = self._static_decoder()
        self.rotary_tables: dict = {}  # kept across eval()s: a captured CUDA graph reads the same table
        self.last_train_switch = SwitchStats()
        self.cache: KVCache | None = None
        self.kept: KeptRows | None = None  # generate(keep_cache=True)'s rows, for continue_rows
        self.inference: InferenceModel | None = None
        self.last_switch = SwitchStats()
        self._warned_fallback = False
        self.training = model.training
        self.caller_training: bool | None = None  # the module's mode when eval() switched; train() restores it
        self.compute_dtype: torch.dtype | None = None  # the autocast dtype eval() cast the projections to, or None

    def _static_decoder(self) -> StaticDecoder | None:
        """The compiled decode step, when config.compile (None: on for CUDA, off for CPU) asks for it."""
        cfg = self.config
        cuda = self._device().type == "cuda"
        wanted = cuda if cfg.compile is None else cfg.compile
        if not wanted or not self.supported:
            return None
        if cuda and getattr(self.hf_model.config, "num_experts_per_tok", None):  # a mixture of experts
            if cfg.compile:
                raise NotImplementedError("compile=True on CUDA: a mixture-of-experts model's grouped experts read "
                                          "each expert's token count on the host, which a CUDA graph cannot capture; "
                                          "use compile=False")
            return None
        if self.tp is not None:
            if cfg.compile:
                raise NotImplementedError(f"compile=True with tp_size={cfg.tp_size}: the compiled decode step has no "
                                          "tensor parallelism yet (its all-reduce is outside the graph); use "
                                          "compile=False")
            return None
        return StaticDecoder(cfg.compile_backend, cuda_graphs=cuda, eos_check_every=cfg.eos_check_every)

    def _device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def _dtype(self) -> torch.dtype:
        return self.hf_model.get_input_embeddings().weight.dtype

    def _autocast_dtype(self) -> torch.dtype | None:
        """The dtype policy's low dtype now: config.autocast_dtype where set, else an active autocast's on the
        model's device; None where that is the parameters' own dtype or neither is set."""
        dtype = self.config.autocast_dtype
        device_type = self._device().type
        if dtype is None and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        return None if dtype == self._dtype() else dtype

    def _stale(self) -> bool:
        """eval() must (re)describe the weights: after train() or release_memory(), or under another autocast."""
        return self.training or (self.supported and (self.inference is None
                                                     or self.compute_dtype != self._autocast_dtype()))

    def _no_autocast(self):
        """The engine's own forward runs outside any autocast: its projections carry the policy (AutocastLinear)
        and its kernels take one dtype."""
        return torch.autocast(self._device().type, enabled=False)

    # -- mode switches ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> HybridEngine:
        """Training mode: the module's own forward, with autograd. The module's own mode (module.training) goes
        back to what it was when eval() (or a generate() that switched) found it, so a caller that keeps its
        model in eval mode (no dropout) keeps it so; called with no eval() since the last train(), it sets
        module.train() as asked. Under ZeRO-3 the gathered parameters are partitioned again and the buffers made
        from them freed. The KV cache stays for the next rollout unless release_memory() is called (or
        release_cache_after_generate is set)."""
        if not mode:
            return self.eval()
        start = time.perf_counter()
        self.module.train(True if self.caller_training is None else self.caller_training)
        self.caller_training = None
        self.inference = None  # drops the packed copies with it (they are remade from the new weights)
        self.packed_bytes = 0
        self.training = True
        release_s = 0.0
        if self.zero is not None:
            # ZeRO-3 keeps the whole model off each rank while training: the fused and TP buffers, as large as
            # most of the layers, go too (eval() reallocates them; the allocation is small next to the gather)
            release_s = self.zero.release()
            self.relayer.release()
            if self.tp is not None:
                self.tp.release()
        self.last_train_switch = SwitchStats(time.perf_counter() - start, release_s=release_s)
        return self

    @torch.no_grad()
    def eval(self) -> HybridEngine:
        """Inference mode: re-read the training parameters (in place) and refill the re-laid buffers. The module's
        mode is remembered for train() to restore."""
        start = time.perf_counter()
        if self.caller_training is None:  # a second eval() in a row must not remember its own eval mode
            self.caller_training = self.module.training
        self.module.eval()
        self.training = False
        stats = SwitchStats()
        if self.supported:
            if self.zero is not None:
                self.zero.release()  # a second eval() in a row: start from partitioned parameters
            weights = build_weights(self.hf_model, FAMILIES[self.model_type], self.relayer, self.zero, self.tp,
                                    self.config.gather_partition_size, self._pinned(), stats)
            self.compute_dtype = self._autocast_dtype()
            self.packed_bytes = 0
            if self.compute_dtype is not None:
                if isinstance(weights.layers, StreamedLayers):
                    raise NotImplementedError("generate() under autocast with streamed ZeRO-3 layers: the low-dtype "
                                              "copies would be remade per forward; use pin_parameters=True")
                self.packed_bytes = cast_linears(weights, self.compute_dtype)  # copies: counted with the packed
            if self._pack(weights):
                t = time.perf_counter()
                self.packed_bytes += pack_linears(weights, self.config.max_batch_size)
                stats.pack_s = time.perf_counter() - t
                stats.relaid_bytes += self.packed_bytes
            self.inference = InferenceModel(weights, self.ops, self.rotary_tables)
        stats.seconds = time.perf_counter() - start
        self.last_switch = stats
        return self

    def _pack(self, weights) -> bool:
        if self.config.pack_weights is False or isinstance(weights.layers, StreamedLayers):
            return False  # streamed ZeRO-3 layers live for one forward: packing them would cost more than it saves
        if can_pack(weights.embed):
            return True
        if self.config.pack_weights:
            raise ValueError(f"pack_weights=True: oneDNN cannot pack {weights.embed.dtype} weights on "
                             f"{weights.embed.device} (CPU fp32/bf16 only)")
        return False

    def _pinned(self) -> bool:
        if self.config.pin_parameters is not None or self.zero is None:
            return self.config.pin_parameters is not False
        free = available_bytes(self._device())
        full = sum(p.ds_numel * p.element_size() for ps in self.zero.layer_params for p in ps)
        return free is None or 2 * full < free

    @property
    def relaid_bytes(self) -> int:
        """Bytes of the buffers re-laid from the training weights (fused QKV, gate/up, LoRA merges, packed)."""
        return self.relayer.nbytes + self.packed_bytes

    def release_memory(self) -> None:
        """Free the KV cache, every re-laid buffer and TP shard, and partition gathered ZeRO-3 parameters again;
        the next eval() re-creates them. Rows kept for continue_rows are dropped."""
        self.cache = None
        self.kept = None
        self.relayer.release()
        self.rotary_tables.clear()
        if self.static is not None:
            self.static.release()  # its CUDA graphs point at the buffers freed here
        self.packed_bytes = 0
        if self.tp is not None:
            self.tp.release()
        if self.zero is not None:
            self.zero.release()
        if self.inference is not None and hasattr(self.inference.w.layers, "reset"):
            self.inference.w.layers.reset()
        self.inference = None

    def live_buffers(self) -> dict:
        """Bytes the engine holds now: KV cache, re-laid and packed buffers, TP shards, gathered ZeRO-3
        parameters."""
        return {"kv_cache": self.cache.nbytes if self.cache is not None else 0, "relaid": self.relayer.nbytes,
                "packed": self.packed_bytes,
                "tp_shards": self.tp.nbytes if self.tp is not None else 0,
                "gathered": self.zero.live_bytes if self.zero is not None else 0}

    def _cache_for(self) -> KVCache:
        w = self.inference.w
        if self.cache is None:
            rows = self.config.max_batch_size * self.config.tp_size  # a TP group generates for all its ranks
            self.cache = KVCache(len(w.layers), rows, w.arch.num_kv_heads, self.config.max_seq_len,
                                 w.arch.head_dim, self._dtype(), self._device())
        return self.cache

    # -- generation ------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = 0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, sampling: SamplingParams | None = None,
                 keep_cache: bool = False, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 generation_config=None) -> GenerationOutput:
        """Generate after the prompts. See GenerationOutput for what comes back.

        Prompts may be left padded, right padded (SmolLM2's tokenizer's default) or both: each row's real tokens
        are re-packed left padded internally, and `sequences` keeps the prompts exactly as given, so
        sequences[:, P:] are the new tokens in either layout. A batch larger than max_batch_size is generated
        max_batch_size rows at a time and concatenated (greedy: the tokens of one call; sampled: the same
        distribution, drawn chunk after chunk from `generator`); a prompt longer than planned re-plans the KV cache
        to hold P + max_new_tokens (rounded up to a multiple of 64). Under an active torch.autocast, generation
        runs in the autocast dtype (see HybridEngine.eval).

        Sampling: top_k 0 or None is off; min_p and repetition_penalty follow Hugging Face's MinPLogitsWarper
        (after temperature, top-k, top-p) and RepetitionPenaltyLogitsProcessor (over the prompt as given and the
        new tokens); they change the choice only, the logprobs stay log softmax(logits / temperature) of the
        unpenalized logits. `sampling` carries these settings as one object (rlhf's trainer passes its run's);
        given, it replaces `do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty` and
        `generator`. `generation_config` (a transformers GenerationConfig) does the same from its fields, and also
        sets max_new_tokens, eos_token_id and pad_token_id where it has them; one warning line names any field it
        sets that the engine cannot honour (beams, n-gram bans, ...). keep_cache=True keeps every row's KV cache
        (its prompt and its new tokens up to and including its stop token) for continue_rows; a new generate()
        drops it."""
        if generation_config is not None:
            if sampling is not None:
                raise ValueError("generate: pass sampling= or generation_config=, not both")
            sampling, max_new_tokens, eos_token_id, pad_token_id = from_generation_config(
                generation_config, max_new_tokens, eos_token_id, pad_token_id, generator)
        if sampling is not None:
            params = dataclasses.replace(sampling)  # a copy: TP replaces its generator
        else:
            params = SamplingParams(do_sample, temperature, top_k, top_p, generator, min_p, repetition_penalty)
        self.kept = None
        attention_mask = _checked_mask(input_ids, attention_mask, "prompt_len")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1")
        _check_sampling(params)
        given_ids = input_ids
        input_ids, attention_mask = left_packed(input_ids, attention_mask)
        B, P = input_ids.shape
        if keep_cache and self.tp is not None:
            raise NotImplementedError("keep_cache=True with tp_size > 1: the ranks of a TP group would have to "
                                      "continue the same number of rows in lockstep; use tp_size=1")
        limit = self.config.max_batch_size
        if B > limit and self.supported and (self.tp is not None or keep_cache):
            why = "the ranks of a TP group generate in lockstep" if self.tp is not None else \
                "keep_cache=True keeps the rows in the cache's max_batch_size rows"
            raise ValueError(f"batch size {B} exceeds max_batch_size {limit} ({why}): raise max_batch_size")
        if B > limit and self.supported:
            outs = [self._generate(input_ids[i:i + limit], attention_mask[i:i + limit], max_new_tokens, params,
                                   eos_token_id, pad_token_id, False) for i in range(0, B, limit)]
            out = concat_outputs(outs, self._stop_tokens(eos_token_id, pad_token_id, input_ids.device)[2])
        else:
            out = self._generate(input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id,
                                 keep_cache)
        if input_ids is not given_ids:  # right padded: the prompts as the caller laid them out
            out = GenerationOutput(torch.cat([given_ids, out.sequences[:, P:]], dim=1), out.logprobs,
                                   out.action_mask)
        return out

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  params: SamplingParams, eos_token_id, pad_token_id, keep_cache: bool) -> GenerationOutput:
        """generate() on left-padded prompts of at most max_batch_size rows."""
        if self._stale():
            self.eval()
        eos_token_id, eos_ids, pad_token_id = self._stop_tokens(eos_token_id, pad_token_id, input_ids.device)
        if not self.supported:
            out = self._hf_generate(input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id)
            if keep_cache:  # no cache of ours to keep: the rows' tokens, re-prefilled by continue_rows
                self.kept = ReprefillRows.after_generate(input_ids, attention_mask, out)
            return out
        rows = None
        if self.tp is not None:
            # every rank of the group gathers the same prompts, so every rank re-plans the cache alike
            input_ids, attention_mask, rows = self.tp.gather_prompts(input_ids, attention_mask, pad_token_id)
            if params.do_sample:
                params.generator = self.tp.shared_generator(params.generator, input_ids.device)
        self._plan_seq_len(input_ids.shape[1] + max_new_tokens)
        static = self._static_step() if not params.penalized else None  # the penalty's state is the eager loop's
        run = static.generate if static is not None else generate
        with self._no_autocast():
            out = run(self.inference, self._cache_for(), input_ids, attention_mask, max_new_tokens, params, eos_ids,
                      pad_token_id)
        if keep_cache:
            self.kept = KeptRows.after_generate(attention_mask, out, self.config.max_seq_len)
        if rows is not None:
            out = self.tp.own_rows(out, rows)
        if self.zero is not None:  # streamed ZeRO-3 gathers during generation: count those too
            self.last_switch.gather_s, self.last_switch.gathered_bytes = self.zero.gather_s, self.zero.gathered_bytes
        # made under inference_mode; clones are ordinary tensors a training forward may save for backward
        out = GenerationOutput(out.sequences.clone(), out.logprobs.clone(), out.action_mask.clone())
        if self.config.release_cache_after_generate and not keep_cache:
            self.cache = None
            if self.static is not None:
                self.static.release()
        return out

    def _plan_seq_len(self, needed: int) -> None:
        """Re-plan the KV cache for `needed` positions when it holds fewer: the next _cache_for() allocates it
        anew (rounded up to a multiple of 64, so prompts a little longer each time do not re-plan every call)."""
        if needed <= self.config.max_seq_len:
            return
        self.config.max_seq_len = -(-needed // 64) * 64
        self.cache = None
        if self.static is not None:
            self.static.release()  # its states and graphs are sized by the old cache

    def continue_rows(self, rows: list[int] | torch.Tensor, tokens: list[list[int]], max_new_tokens: int = 64,
                      eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                      sampling: SamplingParams | None = None) -> GenerationOutput:
        """The next turn of chosen rows of the batch generate(..., keep_cache=True) kept: `tokens[i]` (at least one
        id) is appended after what row `rows[i]` has cached (an observation, a tool response, a user turn) and
        prefilled at the row's own offset, then up to max_new_tokens are generated for those rows only, each
        stopping at EOS. Returns the new tokens only, in the order of `rows`: sequences (R, N), logprobs (R, N),
        action_mask (R, N). Rows not chosen are left alone and may be continued later; call it again for turn 3,
        4, ... `sampling` None: greedy. release_memory(), score() or a new generate() drop the kept rows."""
        params = sampling if sampling is not None else SamplingParams()
        _check_sampling(params)
        if params.penalized:
            raise NotImplementedError("continue_rows: repetition_penalty is not served for continued rows yet")
        if isinstance(self.kept, ReprefillRows):  # the Hugging Face fallback: the whole trajectory again
            eos_token_id, _, pad_token_id = self._stop_tokens(eos_token_id, pad_token_id, self.hf_model.device)
            return self.kept.continue_rows(self._hf_generate, rows, tokens, max_new_tokens, params, eos_token_id,
                                           pad_token_id, self.config.max_seq_len, self.hf_model.device)
        rows = check_rows(self.kept, rows, tokens, max_new_tokens, self.config.max_seq_len)
        if self._stale():  # after train(): the weights are described again
            self.eval()
        _, eos_ids, pad_token_id = self._stop_tokens(eos_token_id, pad_token_id, self.kept.cached.device)
        with self._no_autocast():
            out = continue_rows(self.inference, self._cache_for(), self.kept, rows, tokens, max_new_tokens, params,
                                eos_ids, pad_token_id, self._static_step())
        return GenerationOutput(out.sequences.clone(), out.logprobs.clone(), out.action_mask.clone())

    def _static_step(self) -> StaticDecoder | None:
        """The compiled decode step where configured, else None (the eager loop)."""
        if self.static is not None and not isinstance(self.inference.w.layers, StreamedLayers):
            return self.static
        return None  # streamed ZeRO-3 layers gather inside the forward: eager only

    def _stop_tokens(self, eos_token_id, pad_token_id, device) -> tuple:
        """(eos_token_id as given or the model's, EOS ids as a tensor or None, pad id): an empty EOS list means
        never stop early; the pad id defaults to the config's, else the first EOS, else 0."""
        if eos_token_id is None:
            eos_token_id = getattr(self.hf_model.generation_config, "eos_token_id", None)
        eos_ids = None
        if eos_token_id is not None:
            eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            if eos_list:
                eos_ids = torch.tensor(eos_list, dtype=torch.long, device=device)
        if pad_token_id is None:
            pad_token_id = getattr(self.hf_model.config, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = int(eos_ids[0]) if eos_ids is not None else 0
        return eos_token_id, eos_ids, pad_token_id

    # -- scoring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, prompt_len: int = 1,
              temperature: float = 1.0) -> torch.Tensor:
        """Logprobs of tokens [prompt_len, T) of each sequence under one prefill-only inference forward: (B,
        T - prompt_len) fp32, column t = log softmax(logits / temperature) at column prompt_len - 1 + t, gathered
        at token prompt_len + t, as the training forward gives them (PPO's reference logprobs).

        For frozen models: the weights are described at the first call (or after train()); after changing them
        call eval() again. input_ids, attention_mask: (B, T), left padded or not padded, T <= max_seq_len and
        B <= max_batch_size (the prefill writes the KV cache, which is then simply overwritten next time).
        """
        attention_mask = _checked_mask(input_ids, attention_mask, "seq_len")
        B, T = input_ids.shape
        self.kept = None  # the prefill below writes the cache rows a kept batch would continue from
        if not 1 <= prompt_len < T:
            raise ValueError(f"prompt_len={prompt_len}: expected 1 <= prompt_len < seq_len {T}")
        if temperature <= 0.0:
            raise ValueError(f"temperature={temperature}: expected a positive value")
        keep = T - prompt_len + 1  # columns P-1 .. T-1: the LM head runs only where its logits are read
        if not self.supported:
            positions = prompt_masks(attention_mask, T)[1]                                # (B, T)
            # most families take logits_to_keep; the others compute every column's logits, sliced below
            takes_keep = "logits_to_keep" in inspect.signature(self.hf_model.forward).parameters
            extra = {"logits_to_keep": keep} if takes_keep else {}
            logits = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                   use_cache=False, **extra).logits[:, -keep:]        # (B, T - P + 1, V)
        else:
            if self.tp is not None:
                raise NotImplementedError("score() with tp_size > 1: every rank of the group would have to score "
                                          "the same rows; wrap the frozen model with tp_size=1")
            if T > self.config.max_seq_len:
                raise ValueError(f"seq_len {T} exceeds max_seq_len {self.config.max_seq_len}")
            if B > self.config.max_batch_size:
                raise ValueError(f"batch size {B} exceeds max_batch_size {self.config.max_batch_size}")
            if self._stale():
                self.eval()
            cache = self._cache_for()
            key_mask, positions = prompt_masks(attention_mask, cache.max_seq_len)         # (B, S_max), (B, T)
            with self._no_autocast():
                logits = self.inference.forward(input_ids, positions, cache, 0, key_mask, keep=keep)  # (B, T-P+1, V)
        return token_logprobs(logits[:, :-1], input_ids[:, prompt_len:], temperature)  # (B, T - P)

    @torch.no_grad()
    def _hf_generate(self, input_ids, attention_mask, max_new_tokens, params: SamplingParams, eos_token_id,
                     pad_token_id) -> GenerationOutput:
        if not self._warned_fallback and self.unserved and not self.config.force_fallback:  # asked for: no warning
            warnings.warn(f"hybrid_engine: architecture {self.model_type!r} ({type(self.hf_model).__name__}) "
                          f"{self.unserved}; generate() delegates to Hugging Face generate, slower: the engine "
                          "generated 1.7-3x faster on the CPU benchmarks of benchmarks/RESULTS.md", stacklevel=3)
            self._warned_fallback = True
        kwargs = dict(do_sample=params.do_sample, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, output_scores=False, output_logits=True, return_dict_in_generate=True)
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p,
                          min_p=params.min_p or None)
        if params.penalized:
            kwargs.update(repetition_penalty=params.repetition_penalty)
        res = self.hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new = res.sequences[:, input_ids.shape[1]:]
        logprobs = token_logprobs(torch.stack(res.logits, dim=1), new, params.temperature)  # (B, N)
        action_mask = torch.ones_like(new, dtype=torch.bool)
        if eos_token_id is not None:
            eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id, device=new.device)
            hit = torch.isin(new, eos).long()
            action_mask = (hit.cumsum(-1) - hit) == 0   # up to and including the first EOS
        return GenerationOutput(res.sequences, logprobs.masked_fill(~action_mask, 0.0), action_mask)
