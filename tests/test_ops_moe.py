"""The grouped experts op (ops.reference.moe_experts) against a dense reference that runs every expert on every token
and keeps each token's k: forward and backward, odd shapes, unequal routing (an expert with no tokens, one with most),
k = 1 and k = X, fp32 and bf16, eager and traced by torch.compile (the custom op, one graph)."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from hybrid_engine.ops import reference
from tests.op_testing import assert_matches


def dense_experts(x, gate_up, down, index, weights, act):
    """sum_j w[n, j] * down[e](act(gate[e] x[n]) * up[e] x[n]), e = index[n, j], with all X experts run on all N
    tokens: (N, E)."""
    fn = reference.ACTIVATIONS[act]
    inter = gate_up.shape[1] // 2
    gate = torch.einsum("ne,xie->xni", x, gate_up[:, :inter])                  # (X, N, I)
    up = torch.einsum("ne,xie->xni", x, gate_up[:, inter:])
    every = torch.einsum("xni,xei->xne", fn(gate) * up, down)                   # (X, N, E): expert x on token n
    tokens = torch.arange(x.shape[0])
    chosen = every[index, tokens[:, None]]                                      # (N, k, E)
    return (chosen * weights[..., None]).sum(dim=1).to(x.dtype)


def routing(N: int, X: int, k: int, gen):
    """Each token's k distinct experts, skewed: expert 0 in most tokens, expert X - 1 in none (X > k); random
    weights."""
    scores = torch.rand(N, X, generator=gen)
    scores[:, 0] += 0.7                          # most tokens pick expert 0
    if X > k:
        scores[:, X - 1] = -1.0                  # nobody picks the last one
    index = scores.topk(k, dim=-1).indices       # (N, k)
    return index, torch.rand(N, k, generator=gen) + 0.1


def operands(N, E, inter, X, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, E, generator=gen)
    gate_up = torch.randn(X, 2 * inter, E, generator=gen) * E ** -0.5
    down = torch.randn(X, E, inter, generator=gen) * inter ** -0.5
    index, weights = routing(N, X, k, gen)
    return [t.to(dtype) for t in (x, gate_up, down)] + [index, weights.to(dtype)]


@pytest.mark.parametrize("N,E,inter,X,k", [(13, 11, 7, 6, 2), (1, 5, 3, 6, 2), (9, 8, 6, 4, 1), (7, 6, 5, 3, 3)])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_grouped_experts_equal_the_dense_reference(N, E, inter, X, k, act):
    x, gate_up, down, index, weights = operands(N, E, inter, X, k, torch.float32)
    counts = torch.bincount(index.flatten(), minlength=X)
    unequal = counts[0] > counts[1:].max() and counts[-1] == 0
    assert N == 1 or X == k or unequal, counts
    out = reference.moe_experts(x, gate_up, down, index, weights, act)
    assert_matches("moe_experts", out, dense_experts(x, gate_up, down, index, weights, act), None)


def test_bf16_is_as_accurate_as_torchs_own_bf16():
    x, gate_up, down, index, weights = operands(13, 16, 8, 6, 2, torch.bfloat16)
    ref32 = dense_experts(*[t.float() if t.is_floating_point() else t for t in (x, gate_up, down, index, weights)],
                          "silu")
    out = reference.moe_experts(x, gate_up, down, index, weights, "silu")
    assert out.dtype == torch.bfloat16
    assert_matches("moe_experts bf16", out, ref32, dense_experts(x, gate_up, down, index, weights, "silu"))


def test_gradients_equal_the_dense_reference():
    """Every input that is a float (tokens, both expert weights, routing weights) gets the dense reference's
    gradient; the experts no token chose get zero."""
    x, gate_up, down, index, weights = operands(11, 9, 5, 6, 2, torch.float32, seed=3)
    grads = []
    for fn in (reference.moe_experts, dense_experts):
        leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
        out = fn(leaves[0], leaves[1], leaves[2], index, leaves[3], "silu")
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(("x", "gate_up", "down", "weights"), *grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")
    assert not grads[0][1][-1].any() and grads[0][1][0].abs().sum() > 0


def test_compiled_call_is_one_graph_equal_to_eager():
    """Under torch.compile the data-dependent grouping runs as the custom op hybrid_engine::moe_experts: no graph
    break, the eager result."""
    torch._dynamo.reset()
    counters.clear()
    x, gate_up, down, index, weights = operands(13, 11, 7, 6, 2, torch.float32)
    compiled = torch.compile(reference.moe_experts, backend="aot_eager", fullgraph=True)
    out = compiled(x, gate_up, down, index, weights, "silu")
    assert not counters["graph_break"]
    assert torch.equal(out, reference.moe_experts(x, gate_up, down, index, weights, "silu"))
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN packs CPU weights only")
def test_packed_experts_equal_the_dense_reference_eager_and_traced():
    """The per-expert oneDNN-packed copies (models/common.pack_linears, CPU decode) in place of gate_up and down."""
    x, gate_up, down, index, weights = operands(13, 16, 8, 6, 2, torch.float32)
    packs = [[torch.ops.mkldnn._reorder_linear_weight(w[e], 8) for e in range(w.shape[0])] for w in (gate_up, down)]
    dense = dense_experts(x, gate_up, down, index, weights, "silu")
    out = reference.moe_experts(x, gate_up, down, index, weights, "silu", *packs)
    assert_matches("moe_experts packed", out, dense, None)
    torch._dynamo.reset()
    compiled = torch.compile(reference.moe_experts, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, gate_up, down, index, weights, "silu", *packs), out)
    torch._dynamo.reset()
