"""The non-finite guard on one DeepSpeed engine: a NaN loss skips its backward, a NaN gradient under a finite loss
is dropped before the step, both are counted, and too many in a row stop with one line."""

import pytest
import torch
from torch import nn

from rlhf.runtime.distributed import init_distributed
from rlhf.runtime.engines import ds_config, initialize
from rlhf.runtime.guards import NonFiniteError, NonFiniteGuard, guarded_update


@pytest.fixture
def engine():
    init_distributed()
    torch.manual_seed(0)
    return initialize(nn.Linear(4, 2), ds_config(1, 1, 0), lr=0.1, weight_decay=0.1, num_training_steps=10,
                      scheduler="constant")


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def test_nonfinite_loss_and_gradient_skip_the_update(engine):
    x, guard = torch.ones(1, 4), NonFiniteGuard(3, "test step")
    before = weights(engine)
    out = engine(x).sum()
    zero_with_nan_gradient = torch.sqrt((out - out.detach()).abs())  # value 0, d sqrt at 0 times d|.| at 0 = NaN
    with pytest.warns(RuntimeWarning, match="test step 1: gradient_norm not finite; update skipped .1 so far."):
        assert guarded_update(engine, zero_with_nan_gradient, guard, 1)
    assert all(torch.equal(before[k], v) for k, v in weights(engine).items()), "the NaN gradient reached a weight"
    with pytest.warns(RuntimeWarning, match="test step 2: loss not finite; update skipped .2 so far."):
        assert not guarded_update(engine, engine(x).sum() * float("nan"), guard, 2)
    assert guard.skipped == 2 and guard.in_a_row == 2
    assert guarded_update(engine, engine(x).sum(), guard, 3)
    assert guard.in_a_row == 0 and guard.skipped == 2
    assert not torch.equal(before["weight"], engine.module.weight), "a finite update changed nothing"


def test_too_many_in_a_row_stop_with_one_line(engine):
    guard = NonFiniteGuard(2, "step 1 (sft) step")
    guard.last_checkpoint = "out/checkpoints/sft/step-000004"
    with pytest.warns(RuntimeWarning):
        guarded_update(engine, torch.tensor(float("inf")), guard, 5)
    with pytest.raises(NonFiniteError) as err:
        guarded_update(engine, torch.tensor(float("inf")), guard, 6)
    assert str(err.value) == ("step 1 (sft) step 6: loss not finite for 2 updates in a row (--max-nonfinite-steps 2); "
                              "the last good checkpoint is out/checkpoints/sft/step-000004")
    with pytest.raises(ValueError, match="--max-nonfinite-steps 0: expected at least 1"):
        NonFiniteGuard(0, "x")
