"""Multi-turn trajectories for the tests of continued rows (tests/test_engine_multiturn.py on the tiny configs,
tests/test_real_multiturn.py on SmolLM2): each row's compact trajectory, Hugging Face generate turn by turn, and
one training forward over the whole trajectories."""
from __future__ import annotations

import torch


class Trajectories:
    """Each row's compact trajectory (no pads) and where its generated tokens and their logprobs sit."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor):
        self.tokens = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
        self.generated: list[list[tuple[int, list[int], torch.Tensor]]] = [[] for _ in self.tokens]

    def add(self, row: int, out, i: int) -> None:
        """Row `row`'s answer: row i of GenerationOutput `out`'s new tokens, up to and including its stop."""
        n = int(out.action_mask[i].sum())
        new = out.sequences[i, -out.action_mask.shape[1]:][:n].tolist()
        self.generated[row].append((len(self.tokens[row]), new, out.logprobs[i, :n]))
        self.tokens[row] += new


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    return ids, mask


def hf_turn(model, seqs: list[list[int]], max_new_tokens: int, eos: int, pad: int) -> torch.Tensor:
    """Hugging Face generate re-prefilling the whole conversations so far: the new tokens (R, N)."""
    ids, mask = left_pad(seqs, pad)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
    return out[:, ids.shape[1]:]


def assert_logprobs_match_one_forward(model, traj: Trajectories, pad: int, tol: float = 1e-5) -> float:
    """One training forward over every row's whole trajectory (left padded, positions counting real tokens): the
    logprobs of each generated token equal the engine's within `tol`. Returns the largest gap."""
    ids, mask = left_pad(traj.tokens, pad)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float(), -1)
    gap = 0.0
    for b, spans in enumerate(traj.generated):
        left = ids.shape[1] - len(traj.tokens[b])
        for start, new, engine_logp in spans:
            cols = torch.arange(left + start, left + start + len(new))
            ref = logp[b, cols - 1].gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
            torch.testing.assert_close(engine_logp, ref, atol=tol, rtol=0, msg=lambda m, b=b: f"row {b}: {m}")
            gap = max(gap, (engine_logp - ref).abs().max().item())
    return gap
