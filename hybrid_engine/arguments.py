"""What generate() takes from an outside caller and the engine's own loop does not: right-padded prompts (re-packed
left padded), a transformers GenerationConfig (mapped to SamplingParams), and batches larger than the KV cache's
rows (generated in chunks, their outputs joined here)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .generation import GenerationOutput, SamplingParams


def left_packed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with each row's real tokens moved to its end, in order: right-padded (or
    gapped) prompts become left-padded ones. Left-padded input comes back as the same objects."""
    mask = attention_mask.long()
    if not bool((mask[:, 1:] < mask[:, :-1]).any()):  # no real token before a pad: left padded already
        return input_ids, attention_mask
    order = torch.sort(mask, dim=1, stable=True).indices                          # (B, P): pads first
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def concat_outputs(outs: list[GenerationOutput], pad_token_id: int) -> GenerationOutput:
    """The outputs of consecutive row chunks as one: each padded to the longest N (pad tokens, logprob 0, mask
    False: what a row that stopped early holds in one call) and stacked."""
    n = max(o.logprobs.shape[1] for o in outs)
    seqs, logps, masks = [], [], []
    for o in outs:
        extra = n - o.logprobs.shape[1]
        seqs.append(F.pad(o.sequences, (0, extra), value=pad_token_id))
        logps.append(F.pad(o.logprobs, (0, extra), value=0.0))
        masks.append(F.pad(o.action_mask, (0, extra), value=False))
    return GenerationOutput(torch.cat(seqs), torch.cat(logps), torch.cat(masks))


# GenerationConfig fields that say nothing about which tokens come out (formats, caches, versions)
_GENCONFIG_IGNORED = {"transformers_version", "bos_token_id", "use_cache", "output_scores", "output_logits",
                      "return_dict_in_generate", "output_attentions", "output_hidden_states", "cache_implementation",
                      "max_length", "_from_model_config", "decoder_start_token_id", "disable_compile"}
_GENCONFIG_MAPPED = {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
                     "eos_token_id", "pad_token_id"}


def unhonoured_fields(gen_config) -> list[str]:
    """The fields a transformers GenerationConfig sets (away from its defaults) that change which tokens come out
    and that the engine does not honour (beams, n-gram bans, suppressed tokens, ...), sorted."""
    return sorted(k for k in gen_config.to_diff_dict() if k not in _GENCONFIG_MAPPED | _GENCONFIG_IGNORED)


def from_generation_config(gen_config, max_new_tokens: int, eos_token_id, pad_token_id,
                           generator: torch.Generator | None, warn: bool = True) -> tuple:
    """(SamplingParams, max_new_tokens, eos_token_id, pad_token_id) from a transformers GenerationConfig: its
    fields where set (not None), else the defaults (off) and the arguments given; one warning line names the
    fields it sets that the engine cannot honour (warn=False: the caller says it, as the TRL adapter does)."""
    def field(name, default):
        value = getattr(gen_config, name, None)
        return default if value is None else value

    unhonoured = unhonoured_fields(gen_config) if warn else []
    if unhonoured:
        warnings.warn(f"hybrid_engine.generate: generation_config sets {', '.join(unhonoured)}, which the engine "
                      "does not honour; it samples with do_sample, temperature, top_k, top_p, min_p and "
                      "repetition_penalty only", stacklevel=3)
    params = SamplingParams(bool(field("do_sample", False)), float(field("temperature", 1.0)), field("top_k", 0),
                            float(field("top_p", 1.0)), generator, float(field("min_p", 0.0)),
                            float(field("repetition_penalty", 1.0)))
    return (params, field("max_new_tokens", max_new_tokens), field("eos_token_id", eos_token_id),
            field("pad_token_id", pad_token_id))
