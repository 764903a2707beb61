"""The analytic FLOP count against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rlscale.rl.accounting import FlopModel
from rlscale.rl.generate import completion_logprobs, sample
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


def test_the_policy_pass_takes_the_prompts_pass_that_sampling_ran():
    """GRPO with mu = 1 samples from the model it trains: the prefill, run with its autograd graph, is the prompt part
    of the policy pass. The same answers, log-probs and gradients as running the prompts again, and the FLOPs
    counted (the prefill's forward in sampling, its backward in the policy pass) as torch's FlopCounter sees them."""
    model, tok = load_model(ModelConfig(size="micro"), seed=0)
    model.config._attn_implementation = "eager"
    fm = FlopModel.of(model)

    def run(grad_prompts: bool):
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as sampled:
            batch = sample(model, tok, ["12+34=", "7*8=", "5+5="] * 4, max_new_tokens=6,
                           generator=torch.Generator().manual_seed(0), grad_prompts=grad_prompts)
        with FlopCounterMode(display=False) as trained:
            logp = completion_logprobs(model, batch, dedupe=True, prompt_pass=batch.prompt_pass)
            (logp * batch.completion_mask).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return batch, logp.detach(), grads, sampled.get_total_flops(), trained.get_total_flops()

    (b1, logp1, g1, s1, t1), (b2, logp2, g2, s2, t2) = run(True), run(False)
    assert b1.prompt_pass is not None and b2.prompt_pass is None and b1.texts == b2.texts
    assert torch.equal(logp1, logp2) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(g1, g2))
    assert s1 == s2 == pytest.approx(fm.generation(b1), rel=0.01)
    assert t1 == pytest.approx(fm.logprobs(b1, train=True, dedupe=True, prompts_ran=3), rel=0.01)
    ran = fm.logprobs(b1, train=True, dedupe=True) - fm.logprobs(b1, train=True, dedupe=True, prompts_ran=3)
    assert t2 - t1 == pytest.approx(ran, rel=0.01) and ran > 0  # the prompts' forward, run once
