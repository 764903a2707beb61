"""Advantages and the GRPO loss against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlscale.rl.evaluate import pass_at_k, pick, verifier_scores
from rlscale.rl.grpo import GRPOConfig, group_advantages, grpo_loss, lr_lambda


def test_group_advantages_scaled_and_unscaled():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, 4, scale=True, eps=1e-4)
    std = math.sqrt(((0.75**2) + 3 * (0.25**2)) / 3) + 1e-4  # unbiased std of [1, 0, 0, 0], plus eps
    assert adv[:4].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std])
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # a zero-variance group carries no signal
    raw = group_advantages(r, 4, scale=False)
    assert raw[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def _inputs():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.9, 0.1]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 0.5], [0.4, 0.9, 0.1]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    return logp, old, mask, adv


def test_clipped_loss_by_hand_each_aggregation():
    logp, old, mask, adv = _inputs()
    # ratios: row 0 = [2, 1, -], row 1 = [0.5, 1, 1]; eps_low 0.2, eps_high 0.28
    # row 0 (A=+1): -min(2*1, 1.28*1) = -1.28, -min(1, 1) = -1
    # row 1 (A=-1): -min(-0.5, -0.8) = 0.8, -min(-1, -1) = 1, 1
    tokens = [[-1.28, -1.0], [0.8, 1.0, 1.0]]
    cfg = GRPOConfig(loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28)
    loss, stats = grpo_loss(logp, old, None, adv, mask, cfg)
    assert float(loss) == pytest.approx((sum(tokens[0]) / 2 + sum(tokens[1]) / 3) / 2)
    assert stats["clip_frac"] == pytest.approx(2 / 5)  # the 2 and the 0.5 ratios are clipped
    dapo, _ = grpo_loss(logp, old, None, adv, mask, cfg.model_copy(update={"loss_type": "dapo"}))
    assert float(dapo) == pytest.approx((sum(tokens[0]) + sum(tokens[1])) / 5)
    dr, _ = grpo_loss(logp, old, None, adv, mask, cfg.model_copy(update={"loss_type": "dr_grpo"}))
    assert float(dr) == pytest.approx((sum(tokens[0]) + sum(tokens[1])) / (2 * 3))
    dr, _ = grpo_loss(logp, old, None, adv, mask, cfg.model_copy(update={"loss_type": "dr_grpo"}), max_len=8)
    assert float(dr) == pytest.approx((sum(tokens[0]) + sum(tokens[1])) / (2 * 8))  # a constant L, not the width


def test_kl_term_k3():
    logp, _, mask, adv = _inputs()
    ref = logp + 0.1
    cfg = GRPOConfig(loss_type="dapo", beta=0.5)
    with_kl, stats = grpo_loss(logp, logp.detach(), ref, adv, mask, cfg)
    without, _ = grpo_loss(logp, logp.detach(), None, adv, mask, cfg)
    k3 = math.exp(0.1) - 0.1 - 1
    assert stats["kl"] == pytest.approx(k3, rel=1e-4)
    assert float(with_kl - without) == pytest.approx(0.5 * k3, rel=1e-4)


def test_gradient_is_policy_gradient_at_ratio_one():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor([2.0]), torch.ones(1, 2), GRPOConfig(loss_type="dapo"))
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1.0, -1.0])  # d/dlogp of -rho*A/2 tokens at rho=1


def test_cispo_by_hand_keeps_the_gradient_of_clipped_tokens():
    logp, old, mask, adv = _inputs()
    logp = logp.clone().requires_grad_(True)
    # ratios: row 0 = [2, 1, -] (A=+1), row 1 = [0.5, 1, 1] (A=-1); weights sg(min(rho, 1 + 0.28))
    cfg = GRPOConfig(loss_type="cispo", epsilon_low=0.2, epsilon_high=0.28)
    loss, stats = grpo_loss(logp, old, None, adv, mask, cfg)
    lp = logp.detach()
    tokens = [-1.28 * 1 * lp[0, 0], -1.0 * 1 * lp[0, 1], 0.5 * lp[1, 0], 1.0 * lp[1, 1], 1.0 * lp[1, 2]]
    assert loss.item() == pytest.approx(float(sum(tokens)) / 5)  # token-level: 1 / sum_i |o_i|
    assert stats["clip_frac"] == pytest.approx(1 / 5)  # only the ratio 2 is truncated; 0.5 is not (no lower clip)
    loss.backward()
    # d/dlogp_t = -w_t A_i / 5: the clipped token (ratio 2) still has a gradient, unlike PPO/GRPO's clip
    want = [[-1.28 / 5, -1.0 / 5, 0.0], [0.5 / 5, 1.0 / 5, 1.0 / 5]]
    assert logp.grad.tolist() == [pytest.approx(row) for row in want]
    grpo_logp = logp.detach().clone().requires_grad_(True)
    grpo, _ = grpo_loss(grpo_logp, old, None, adv, mask, cfg.model_copy(update={"loss_type": "dapo"}))
    grpo.backward()
    assert grpo_logp.grad[0, 0] == 0.0  # the same token under the clipped objective: no gradient


def test_gspo_sequence_ratio_by_hand():
    logp, old, mask, adv = _inputs()
    logp = logp.clone().requires_grad_(True)
    # log s_0 = (log 2 + log 1) / 2 -> s_0 = sqrt 2; log s_1 = (log .5 + 0 + 0) / 3 -> s_1 = .5 ** (1/3)
    s0, s1 = math.sqrt(2), 0.5 ** (1 / 3)
    cfg = GRPOConfig(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.2, epsilon_high=0.28)
    loss, stats = grpo_loss(logp, old, None, adv, mask, cfg)
    seq0 = -min(s0 * 1, 1.28 * 1)  # A = +1, s_0 = 1.414 clipped to 1.28
    seq1 = -min(s1 * -1, max(s1, 0.8) * -1)  # A = -1, s_1 = 0.794 clipped up to 0.8
    assert loss.item() == pytest.approx((seq0 + seq1) / 2)  # every token of a sequence carries its s_i
    assert stats["clip_frac"] == pytest.approx(1.0)  # both sequences clipped: all 5 tokens
    same = old + 0.1  # equal per-token log ratios: the sequence ratio is the token ratio
    tok, _ = grpo_loss(same, old, None, adv, mask, cfg.model_copy(update={"importance_sampling_level": "token"}))
    seq, _ = grpo_loss(same, old, None, adv, mask, cfg)
    assert float(tok) == pytest.approx(float(seq))
    unclipped = cfg.model_copy(update={"epsilon_low": 0.9, "epsilon_high": 9.0})
    at_one = logp.detach().clone().requires_grad_(True)
    loss, _ = grpo_loss(at_one, at_one.detach(), None, adv, mask, unclipped)
    loss.backward()  # at s_i = 1: d/dlogp_t = -A_i / |o_i| / G, the same for every token of a sequence
    assert at_one.grad.tolist() == [pytest.approx([-1 / 4, -1 / 4, 0.0]), pytest.approx([1 / 6, 1 / 6, 1 / 6])]


def test_lr_schedule():
    f = lr_lambda("cosine", 10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda("linear", 0, 100)(50) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 100)(99) == 1.0


def test_pass_at_k():
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)


def test_verifier_scores_on_a_known_confusion_matrix():
    """8 correct answers, 4 accepted (TPR 0.5); 2 wrong ones, both rejected (TNR 1.0): raw accuracy 0.6, balanced
    0.75; a verifier that always says no scores raw 0.2, balanced 0.5."""
    truth = [True] * 8 + [False] * 2
    pred = [True] * 4 + [False] * 4 + [False] * 2
    p = [0.9] * 4 + [0.3] * 4 + [0.05, 0.25]
    s = verifier_scores(pred, truth, p)
    assert (s["verify_tpr"], s["verify_tnr"]) == (0.5, 1.0)
    assert s["verify_accuracy"] == pytest.approx(0.6) and s["verify_balanced_accuracy"] == pytest.approx(0.75)
    # bins: [0.9]x4 all correct: |3.6 - 4|; [0.3]x4 all correct: |1.2 - 4|; 0.05 and 0.25 wrong: |0.05|, |0.25|
    assert s["verify_ece"] == pytest.approx((0.4 + 2.8 + 0.05 + 0.25) / 10)
    # AUC: of the 8 x 2 (correct, wrong) pairs, the 4 at 0.9 beat both wrong ones, the 4 at 0.3 beat 0.05 and 0.25
    assert s["verify_auc"] == pytest.approx(16 / 16)
    flipped = verifier_scores(pred, truth, [0.9] * 4 + [0.1] * 4 + [0.05, 0.25])  # 0.1 beats 0.05, loses to 0.25
    assert flipped["verify_auc"] == pytest.approx((8 + 4) / 16)
    tied = verifier_scores(pred, truth, [0.5] * 10)
    assert tied["verify_auc"] == pytest.approx(0.5) and tied["verify_balanced_accuracy"] == pytest.approx(0.75)
    never = verifier_scores([False] * 10, truth, [0.0] * 10)
    assert never["verify_balanced_accuracy"] == 0.5 and never["verify_tpr"] == 0.0
    assert verifier_scores([True, True], [True, True], [1.0, 1.0])["verify_balanced_accuracy"] == 1.0  # one class
    assert "verify_tnr" not in verifier_scores([True, True], [True, True], [1.0, 1.0])  # no wrong answers: undefined
    assert "verify_auc" not in verifier_scores([True, True], [True, True], [1.0, 1.0])


def test_selection_rules_vote_weighted_vote_and_best():
    answers = ["7", "7", "7", "9", "9"]
    scores = [0.2, 0.2, 0.2, 0.5, 0.5]
    assert answers[pick(answers, scores, "vote")] == "7"  # 3 votes against 2
    assert answers[pick(answers, scores, "weighted_vote")] == "9"  # 1.0 against 0.6
    assert answers[pick(answers, [0.2, 0.95, 0.2, 0.5, 0.5], "best")] == "7"  # the single most trusted sample
    assert answers[pick(answers, [0.2, 0.95, 0.2, 0.5, 0.5], "weighted_vote")] == "7"  # 1.35 against 1.0
    assert pick(["1", "2"], [0.5, 0.5], "vote") == 0 and pick(["1", "2"], [0.5, 0.5], "best") == 0  # ties: first
