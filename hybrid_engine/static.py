"""A static decode step: one traced graph serves every token of every generation of a batch bucket.

The eager loop (generation.py) passes the cache slot and the attention length as Python ints that change at
every token, so a trace of it would be specialised to one token. Here everything that changes per token or per
call is a tensor in a `DecodeState`, allocated once per batch bucket and updated in place:

    tokens (Bb, 1)   the token each row feeds next       positions (Bb, 1)  its position (pads excluded)
    slot (Bb,)       the cache slot each row writes it   key_mask (Bb, S)   real (non-pad) slots of the prompt
                     to (one for a left-padded batch;    finished (Bb,)     rows past EOS
                     each row's own for continued rows)  logits (Bb, V)     the last step's logits
    column (1,)      the step's output column            out_* (Bb, S)      chosen tokens, logprobs, alive flags
    pad, temperature 0-d tensors, so neither is a constant of the graph

Buckets are powers of two up to max_batch_size (and max_batch_size itself): a batch of B rows runs in the
smallest bucket >= B, the extra rows finished from the start and attending to zeros, so one graph serves every
batch size in the bucket. Their slot is the cache's last, where they stay (slots are clamped there): that slot
never holds a token anyone reads (a generation writes at most up to the one before), while the cache rows of a
batch of continued rows past B may hold other kept rows' caches (hybrid_engine/continuation.py).

`step` (compiled with fullgraph=True by `StaticDecoder`) runs the forward at `slot` (KV written in place,
index_put_ on the cache tensor), then, for greedy decoding, chooses the next token, records it and updates
`finished` on the device. Sampling stays beside the graph: `torch.multinomial` with the caller's
generator cannot be traced (dynamo has no torch.Generator), and drawing it eagerly from the same logits keeps
the tokens identical to the eager path's. The host reads `finished` every `eos_check_every` steps only.

On CUDA each (bucket, greedy, EOS) variant is captured once as a torch.cuda.CUDAGraph and replayed; the graph
holds the addresses of the weights, the re-laid buffers, the rotary table, the KV cache and the state. The
optimizer updates parameters in place and eval() refills the re-laid buffers in place, so graphs stay valid
across train()/eval(); `StaticDecoder` compares those addresses before each generation and re-captures when one
moved (a buffer reallocated: release_memory(), a ZeRO-3 gather into new memory, a dtype or shape change).
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import KVCache
from .generation import GenerationOutput, SamplingParams, next_tokens, prompt_masks
from .logprobs import token_logprobs
from .models import InferenceModel


def bucket_of(batch: int, max_batch_size: int) -> int:
    """The smallest power of two >= batch, capped at max_batch_size (itself a bucket)."""
    return min(1 << (batch - 1).bit_length(), max_batch_size)


@dataclass
class DecodeState:
    tokens: torch.Tensor        # (Bb, 1) long
    positions: torch.Tensor     # (Bb, 1) long
    slot: torch.Tensor          # (Bb,) long
    column: torch.Tensor        # (1,) long
    key_mask: torch.Tensor      # (Bb, S) bool
    finished: torch.Tensor      # (Bb,) bool
    logits: torch.Tensor        # (Bb, V) float32
    out_tokens: torch.Tensor    # (Bb, S) long
    out_logprobs: torch.Tensor  # (Bb, S) float32
    out_alive: torch.Tensor     # (Bb, S) bool
    pad: torch.Tensor           # () long
    temperature: torch.Tensor   # () float32
    eos: torch.Tensor           # (E,) long; E = 0 without EOS

    @classmethod
    def allocate(cls, rows: int, max_seq_len: int, vocab: int, device) -> DecodeState:
        def long(*shape):
            return torch.zeros(shape, dtype=torch.long, device=device)

        def flag(*shape):
            return torch.zeros(shape, dtype=torch.bool, device=device)

        return cls(long(rows, 1), long(rows, 1), long(rows), long(1), flag(rows, max_seq_len), flag(rows),
                   torch.zeros(rows, vocab, device=device), long(rows, max_seq_len),
                   torch.zeros(rows, max_seq_len, device=device), flag(rows, max_seq_len), long(),
                   torch.ones((), device=device), long(0))

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


def choose_and_record(state: DecodeState, tok: torch.Tensor, logp: torch.Tensor, has_eos: bool) -> None:
    """Record the chosen tokens (B,) and logprobs (B,) at output column `column`, as the eager loop does: rows past
    EOS get the pad token, logprob 0 and alive False; then mark rows that chose an EOS token as finished."""
    alive = ~state.finished                                                   # (Bb,)
    tok = torch.where(alive, tok, state.pad)
    state.tokens.copy_(tok[:, None])
    state.out_tokens.index_copy_(1, state.column, tok[:, None])
    state.out_logprobs.index_copy_(1, state.column, torch.where(alive, logp, 0.0)[:, None])
    state.out_alive.index_copy_(1, state.column, alive[:, None])
    if has_eos:
        state.finished.logical_or_(torch.isin(tok, state.eos))


def greedy_choice(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """next_tokens' greedy branch with the temperature a tensor: (tokens (B,), logprobs (B,))."""
    tok = logits.argmax(dim=-1)
    return tok, token_logprobs(logits, tok, temperature)


def step(model: InferenceModel, cache: KVCache, state: DecodeState, greedy: bool, has_eos: bool) -> torch.Tensor:
    """One token for every row: the forward of `state.tokens` at `state.slot`, then (greedy) the next choice.
    Everything it changes is changed in place; the logits (Bb, V) are also kept in state.logits."""
    logits = model.decode_static(state.tokens, state.positions, cache, state.slot, state.key_mask)  # (Bb, V)
    state.logits.copy_(logits)
    state.positions.add_(1)
    state.slot.add_(1).clamp_(max=state.key_mask.shape[1] - 1)  # the bucket's extra rows stay on the last slot
    state.column.add_(1)
    if greedy:
        tok, logp = greedy_choice(logits, state.temperature)
        choose_and_record(state, tok, logp, has_eos)
    return logits


class StaticDecoder:
    """The compiled step of one engine and the state of each batch bucket (see the module docstring).

    backend: a torch.compile backend ("inductor"; tests use "aot_eager"). cuda_graphs: capture each variant as a
    torch.cuda.CUDAGraph (CUDA only). eos_check_every: host reads of `finished` happen every k steps.
    """

    def __init__(self, backend: str = "inductor", cuda_graphs: bool = False, eos_check_every: int = 8):
        if eos_check_every < 1:
            raise ValueError(f"eos_check_every={eos_check_every}: expected at least 1")
        # inductor fuses pointwise ops and by default rounds bf16/fp16 only at a fused kernel's end, where eager
        # rounds after every op: a tiny bf16 Qwen2 then chose other greedy tokens than the eager step (logprobs
        # 0.69 apart); rounding as eager does, they are identical (tests/test_engine_compile.py)
        self.options = {"emulate_precision_casts": True} if backend == "inductor" else None
        self.backend = backend
        self.compiled: dict[tuple, Callable] = {}   # (bucket, greedy, has_eos, eos count) -> its compiled step
        self.cuda_graphs = cuda_graphs
        self.eos_check_every = eos_check_every
        self.states: dict[int, DecodeState] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[int]]] = {}
        self.captures = 0  # CUDA graphs captured so far (a re-capture counts again)

    def release(self) -> None:
        """Forget the states and graphs (the KV cache or the weights they point at are going away)."""
        self.states.clear()
        self.graphs.clear()

    def state_for(self, rows: int, max_seq_len: int, vocab: int, device) -> DecodeState:
        state = self.states.get(rows)
        if state is None or state.key_mask.shape[1] != max_seq_len or state.logits.shape[1] != vocab:
            state = self.states[rows] = DecodeState.allocate(rows, max_seq_len, vocab, device)
        return state

    @torch.inference_mode()
    def generate(self, model: InferenceModel, cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, params: SamplingParams, eos_ids: torch.Tensor | None,
                 pad_token_id: int) -> GenerationOutput:
        """generation.generate's contract and tokens, with the decode steps through the compiled step."""
        B, P = input_ids.shape
        key_mask, positions = prompt_masks(attention_mask, cache.max_seq_len)      # (B, S), (B, P)
        logits = model.forward(input_ids, positions, cache, 0, key_mask)         # (B, V) eager prefill
        slots = torch.full((B,), P, dtype=torch.long, device=input_ids.device)
        new = self.decode(model, cache, logits, key_mask, slots, positions[:, -1] + 1, max_new_tokens, params,
                          eos_ids, pad_token_id)
        return GenerationOutput(torch.cat([input_ids, new.sequences], dim=1), new.logprobs, new.action_mask)

    @torch.inference_mode()
    def decode(self, model: InferenceModel, cache: KVCache, logits: torch.Tensor, key_mask: torch.Tensor,
               slots: torch.Tensor, next_pos: torch.Tensor, max_new_tokens: int, params: SamplingParams,
               eos_ids: torch.Tensor | None, pad_token_id: int) -> GenerationOutput:
        """The new tokens after a prefill whose last logits are `logits` (B, V): the first chosen eagerly, the rest
        through the compiled step. key_mask: (B, S) bool, True on real slots and every slot after the rows'
        tokens; slots: (B,) long, where each row's first new token is written; next_pos: (B,) its position.
        Returns sequences (B, N) of the new tokens only."""
        B = logits.shape[0]
        device = logits.device
        rows = bucket_of(B, cache.max_batch_size)
        state = self.state_for(rows, cache.max_seq_len, logits.shape[-1], device)
        has_eos = eos_ids is not None
        self._reset(state, key_mask, slots, next_pos, pad_token_id, params.temperature, eos_ids)
        greedy = not params.do_sample
        tok, logp = next_tokens(logits, params)                                   # the first token, eagerly
        choose_and_record(state, _pad_rows(tok, rows), _pad_rows(logp, rows), has_eos)
        run = None  # made at the first decode step (a CUDA graph is not captured for a one-token generation)
        steps = 1
        while steps < max_new_tokens:
            if has_eos and steps % self.eos_check_every == 0 and bool(state.finished.all()):
                break
            run = run or self._runner(model, cache, state, greedy, has_eos)
            run()
            if not greedy:  # sampled beside the graph, from the real rows only (as many draws as eager makes)
                tok, logp = next_tokens(state.logits[:B], params)
                choose_and_record(state, _pad_rows(tok, rows), _pad_rows(logp, rows), has_eos)
            steps += 1
        alive = state.out_alive[:B, :steps]                                       # (B, steps)
        if has_eos:  # checked every k steps: drop the columns after the step where every row had finished
            live_cols = alive.any(0).nonzero()
            steps = int(live_cols.max()) + 1 if len(live_cols) else 1
        return GenerationOutput(state.out_tokens[:B, :steps].clone(), state.out_logprobs[:B, :steps].clone(),
                                state.out_alive[:B, :steps].clone())

    def _reset(self, state: DecodeState, key_mask, slots, next_pos, pad: int, temperature: float, eos_ids) -> None:
        B = key_mask.shape[0]
        state.key_mask.fill_(True)        # bucket rows past B: attend to the (zeroed or finite) cache, never used
        state.key_mask[:B].copy_(key_mask)
        state.positions.zero_()
        state.positions[:B, 0].copy_(next_pos)
        state.slot.fill_(state.key_mask.shape[1] - 1)  # bucket rows past B: the last slot (the class docstring)
        state.slot[:B].copy_(slots)
        state.column.zero_()
        state.finished.fill_(True)
        state.finished[:B] = False
        state.out_alive.zero_()
        state.pad.fill_(pad)
        state.temperature.fill_(temperature)
        eos = eos_ids if eos_ids is not None else state.eos[:0]
        if state.eos.shape != eos.shape:
            state.eos = torch.empty_like(eos)  # a new EOS count is a new graph variant (and a recompile)
        state.eos.copy_(eos)

    def step_for(self, key: tuple) -> Callable:
        """The compiled step of one (bucket, greedy, has_eos, eos count) variant: a copy of `step` with a code
        object of its own. Dynamo keeps compiled graphs per code object, at most recompile_limit (8) of them, and
        with fullgraph=True one more is a hard error (FailOnRecompileLimitHit): one shared `step` would fail at
        the 9th variant of a process (7 buckets of max_batch_size 64, greedy and sampled, already make 14). Each
        copy holds one graph (more only if the weights' dtypes or shapes change), and its guards are checked
        alone."""
        compiled = self.compiled.get(key)
        if compiled is None:
            rows, greedy, has_eos, eos_count = key
            name = f"decode_step_b{rows}_{'greedy' if greedy else 'sampled'}" + (f"_eos{eos_count}" if has_eos else "")
            code = step.__code__.replace(co_name=name)
            fn = types.FunctionType(code, step.__globals__, name, step.__defaults__, step.__closure__)
            compiled = self.compiled[key] = torch.compile(fn, backend=self.backend, fullgraph=True, dynamic=False,
                                                          options=self.options)
        return compiled

    def _runner(self, model: InferenceModel, cache: KVCache, state: DecodeState, greedy: bool, has_eos: bool):
        key = (state.tokens.shape[0], greedy, has_eos, state.eos.shape[0])
        compiled = self.step_for(key)
        if not self.cuda_graphs:
            return lambda: compiled(model, cache, state, greedy, has_eos)
        addresses = [t.data_ptr() for t in graph_inputs(model, cache, state)]
        captured = self.graphs.get(key)
        if captured is None or captured[1] != addresses:  # first use, or a buffer moved: (re-)capture
            graph = self._capture(lambda: compiled(model, cache, state, greedy, has_eos), state)
            captured = self.graphs[key] = (graph, addresses)
        return captured[0].replay

    def _capture(self, run, state: DecodeState) -> torch.cuda.CUDAGraph:
        """Warm the compiled step up on a side stream (compiles it, and lets the allocator settle), restore the
        state it advanced, then capture it. The warm-up writes a KV slot the real step writes again."""
        saved = [t.clone() for t in state.tensors()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
                for t, s in zip(state.tensors(), saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        self.captures += 1
        return graph


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (B, ...) extended with zeros to (rows, ...) for the bucket's extra rows (finished, so never recorded)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def graph_inputs(model: InferenceModel, cache: KVCache, state: DecodeState) -> list[torch.Tensor]:
    """Every tensor a captured step reads or writes in place: weights, re-laid buffers, rotary tables, cache,
    state. A change of any address means the captured graph would read freed memory."""
    found: list[torch.Tensor] = []

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)

    walk(model.w)
    walk(list(model.rotary_tables.values()))
    return found + [cache.k, cache.v] + state.tensors()
