"""Stage-3 losses on hand-made tensors: every expected number here was worked out by hand (see comments)."""

import math

import torch

from instar.train.losses import bt_loss, dpo_loss, entropy, gae, kl_penalty, ppo_policy_loss, ppo_value_loss, whiten


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_bt_loss_by_hand():
    # diffs 2 and -1: loss = mean(log(1+e^-2), log(1+e^1)); accuracy 1/2; margin 0.5
    loss, m = bt_loss(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 1.0]))
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2
    assert close(loss, expected)
    assert close(m["pair_accuracy"], 0.5) and close(m["margin"], 0.5)


def test_bt_loss_is_stable_for_huge_margins():
    loss, _ = bt_loss(torch.tensor([-500.0]), torch.tensor([500.0]))
    assert torch.isfinite(loss) and close(loss, 1000.0, tol=1e-3)


def test_dpo_loss_by_hand():
    # pair 1: chosen reward 0.1*(-1+1.5)=0.05, rejected 0.1*(-2+1.5)=-0.05, margin 0.1
    # pair 2: chosen 0.1*(-3+2)=-0.1, rejected 0.1*(-1+1)=0, margin -0.1
    pi_c, pi_r = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    ref_c, ref_r = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -1.0])
    loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    expected = (-math.log(1 / (1 + math.exp(-0.1))) - math.log(1 / (1 + math.exp(0.1)))) / 2
    assert close(loss, expected)
    assert close(m["chosen_reward"], (0.05 - 0.1) / 2)
    assert close(m["rejected_reward"], (-0.05 + 0.0) / 2)
    assert close(m["reward_accuracy"], 0.5)
    assert close(m["reward_margin"], 0.0)


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    lp = torch.tensor([-7.3, -2.1, -11.0])
    loss, m = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.5)
    assert close(loss, math.log(2))
    assert close(m["reward_margin"], 0.0) and close(m["reward_accuracy"], 0.0)


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pi_c, pi_r = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(pi_c, pi_r, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    loss.backward()
    # d/dpi_c of -log sigmoid(beta*(pi_c - pi_r)) at margin 0 = -beta * sigmoid(0) = -0.05
    assert close(pi_c.grad, [-0.05]) and close(pi_r.grad, [0.05])


def test_gae_by_hand_with_padding():
    # row 0 (gamma 1, lam 0.5), values .5 .6 .7, reward 1 at the end:
    #   d2 = 1 - .7 = .3 -> A2 = .3; d1 = .7 - .6 = .1 -> A1 = .1 + .5*.3 = .25; d0 = .1 -> A0 = .1 + .5*.25 = .225
    # row 1 is 2 tokens long; its padded slot holds garbage that must not leak:
    #   d1 = 1 + 0 - .6 = .4 -> A1 = .4; d0 = .6 - .5 = .1 -> A0 = .1 + .5*.4 = .3
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert close(adv, [[0.225, 0.25, 0.3], [0.3, 0.4, 0.0]])
    assert close(ret, [[0.725, 0.85, 1.0], [0.8, 1.0, 0.0]])


def test_gae_with_lambda_one_is_monte_carlo():
    rewards = torch.tensor([[-0.1, -0.2, 2.0]])
    values = torch.tensor([[0.3, -0.4, 1.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    to_go = torch.tensor([[1.7, 1.8, 2.0]])  # sum of rewards from t to the end
    assert close(ret, to_go, tol=1e-5) and close(adv, to_go - values, tol=1e-5)


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    w = whiten(x, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    s = math.sqrt(1.5)  # 1 / sqrt(var = 2/3)
    assert close(w, [[-s, 0.0, s, 0.0]], tol=1e-5)


def test_policy_loss_clipping_by_hand():
    adv = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    # ratios 1, 1.5, 0.5 with A=1: per-token losses max(-r, -clip(r)) = -1, -1.2 (clipped), -0.5 (not clipped)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
    loss, m = ppo_policy_loss(new, old, adv, torch.ones(1, 3), clip=0.2)
    assert close(loss, (-1.0 - 1.2 - 0.5) / 3)
    assert close(m["clip_frac"], 1 / 3)
    # first epoch: policy == rollout policy -> loss = -mean(A), nothing clipped
    loss, m = ppo_policy_loss(old, old, torch.tensor([[2.0, -1.0, 0.0]]), torch.ones(1, 3))
    assert close(loss, -1 / 3) and close(m["clip_frac"], 0.0)


def test_value_loss_clipping_by_hand():
    # v moved 0 -> 1 but may only move 0.2: max((1-1)^2, (0.2-1)^2) = 0.64, times 0.5
    loss = ppo_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1))
    assert close(loss, 0.32)


def test_kl_penalty_and_entropy():
    assert close(kl_penalty(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])), [0.5, -1.0])
    logits = torch.zeros(1, 2, 4)  # uniform over 4 -> ln 4 per token
    logits[0, 1] = torch.tensor([100.0, 0.0, 0.0, 0.0])  # near one-hot, but masked out
    assert close(entropy(logits, torch.tensor([[1.0, 0.0]])), math.log(4))
