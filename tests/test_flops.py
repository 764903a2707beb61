"""The analytic FLOP count against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rl.accounting import FlopModel
from rl.generate import sample
from rl.model import ModelConfig, load_model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_analytic_flops_match_flop_counter(attn):
    model, tok = load_model(ModelConfig(size="micro"), seed=0)
    model.config._attn_implementation = attn
    fm = FlopModel.of(model)
    ids = torch.randint(4, 90, (8, 48))
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids)
    assert fc.get_total_flops() == pytest.approx(fm.sequences(8, 48), rel=0.15)
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids).logits.float().pow(2).mean().backward()
    assert fc.get_total_flops() == pytest.approx(fm.sequences(8, 48, train=True), rel=0.15)
    with FlopCounterMode(display=False) as fc:
        batch = sample(model, tok, ["12+34=", "7*8="] * 4, max_new_tokens=12)
    assert fc.get_total_flops() == pytest.approx(fm.generation(batch), rel=0.15)
    if attn == "eager":  # every matmul, attention included, is visible to the counter: the match is tight
        assert fc.get_total_flops() == pytest.approx(fm.generation(batch), rel=0.01)
