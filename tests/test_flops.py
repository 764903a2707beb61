"""The analytic FLOP count against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rlscale.rl.accounting import FlopModel
from rlscale.rl.generate import Batch, completion_logprobs, encode_completions, encode_prompts, sample
from rlscale.rl.model import ModelConfig, load_model


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


@pytest.mark.parametrize("train", [False, True])
def test_deduplicated_logprobs_flops_match_flop_counter(train):
    """GRPO groups repeat a prompt G times (and often a completion): counted as computed, once each."""
    model, tok = load_model(ModelConfig(size="micro"), seed=0)
    model.config._attn_implementation = "eager"
    fm = FlopModel.of(model)
    batch = sample(model, tok, ["12+34=", "7*8=", "5+5="] * 4, max_new_tokens=6,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = completion_logprobs(model, batch)
    with FlopCounterMode(display=False) as fc:
        logp = completion_logprobs(model, batch, dedupe=True)
        if train:
            (logp * batch.completion_mask).sum().backward()
    assert torch.allclose(logp.detach(), plain, atol=1e-5)  # the same values, fewer FLOPs
    assert fc.get_total_flops() == pytest.approx(fm.logprobs(batch, train=train, dedupe=True), rel=0.05)
    assert fm.logprobs(batch, train=train, dedupe=True) < 0.6 * fm.logprobs(batch, train=train)


@pytest.mark.parametrize("shared", [False, True])
def test_p_yes_flops_match_flop_counter(shared):
    """The verdict read from the shared prefix: counted as computed (prefix once with one logit, the two tails); with
    heads, each distinct head once, then each row's rest with one logit."""
    from rlscale.rl.self_verify import p_yes

    model, tok = load_model(ModelConfig(size="micro"), seed=0)
    model.config._attn_implementation = "eager"
    prompts = ["12+34=46 ok?", "7*8=54 ok?", "5+5=10 ok?", "12+34=47 ok?", "12+34=146 ok?"]
    traces = ["12+34=46", "", "5+5=10 10=10", "", "x"]
    heads = ["12+34=", "7*8=", "5+5=", "12+34=", "12+34="] if shared else None
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        _, passes = p_yes(model, tok, prompts, traces, heads)
    assert len(passes) == (3 if shared else 2)
    assert fc.get_total_flops() == pytest.approx(sum(FlopModel.of(model).forward(*x) for x in passes), rel=0.05)


@pytest.mark.parametrize("attn,width", [("eager", 1024), ("sdpa", 1024), ("eager", 12)])
def test_the_packed_pass_gives_each_row_its_own_log_probs_and_gradients(attn, width, monkeypatch):
    """One pass over each distinct prompt followed by its rows' completions (a block mask keeps every row to its
    prompt and itself; past PACK_WIDTH a prompt's next rows start a sequence of their own): the log-probs and
    gradients of running each row alone, with left-padded prompts of three lengths and completions of several, and
    the FLOPs counted as torch's FlopCounter sees them."""
    from rlscale.rl import generate

    monkeypatch.setattr(generate, "PACK_WIDTH", width)
    model, tok = load_model(ModelConfig(size="micro"), seed=0)
    model.config._attn_implementation = attn
    prompts = [p for p in ["12+34=", "7*8=", "5+5=", "12+345="] for _ in range(4)]
    answers = ["46", "46", "4", "460", "56", "56", "56", "5", "10", "1", "100", "10", "127", "127", "12", ""]
    batch = Batch(*encode_prompts(tok, prompts, torch.device("cpu")),
                  *encode_completions(tok, answers, torch.device("cpu")), answers)
    assert batch.prompt_mask.sum(1).unique().numel() == 3 and batch.completion_mask.sum(1).unique().numel() == 4
    assert (len(generate.pack(batch)[0]) > 4) == (width == 12)  # 12 wide (one row's width): prompts run again

    def run(dedupe: bool):
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as fc:
            logp = completion_logprobs(model, batch, dedupe=dedupe)
            (logp * batch.completion_mask * torch.linspace(0.5, 2.0, 16)[:, None]).sum().backward()
        return logp.detach() * batch.completion_mask, [p.grad.clone() for p in model.parameters()], fc

    (packed, g1, fc), (alone, g2, _) = run(True), run(False)
    assert torch.allclose(packed, alone, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(g1, g2))
    if attn == "eager":  # every matmul visible to the counter
        assert fc.get_total_flops() == pytest.approx(FlopModel.of(model).logprobs(batch, True, dedupe=True), rel=0.02)
