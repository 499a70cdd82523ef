"""Every loss and advantage of stages 3 and 4 as a pure tensor function: no models, no I/O, hand-testable.

    bt_loss(r_chosen, r_rejected)                         Bradley-Terry pairwise loss for the reward model
    dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)              sigmoid DPO (Rafailov et al. 2023, eq. 7)
    gae(rewards, values, mask, gamma, lam)                generalised advantage estimation (Schulman et al. 2016)
    whiten(x, mask)                                       zero-mean unit-variance over the valid tokens
    ppo_policy_loss / ppo_value_loss                      clipped PPO surrogates (Schulman et al. 2017)
    kl_penalty(logp, ref_logp)                            per-token KL estimate, k1 = log p - log q
    entropy(logits, mask)                                 mean per-token entropy of the sampling distribution
    adaptive_kl_coef(coef, kl, target, horizon)           PPO's adaptive KL controller (Ziegler et al. 2019)
    shaped_scores(scores, stopped, lengths, ref_length)   PPO's score with a no-EOS penalty and a length term
    group_advantages(rewards, scale)                      GRPO's group-relative advantages (Dr. GRPO: no std)
    k3_kl(logp, ref_logp)                                 per-token KL estimate k3 (Schulman 2020), >= 0
    grpo_loss(logp, old, ref, adv, mask, clip, beta, N)   clipped surrogate + beta * k3, token-level (DAPO)

Shapes: B = batch (pairs or rollouts), T = response tokens. A `mask` is 1.0 on real response tokens and
0.0 on padding, float so it multiplies directly. Every mean over tokens is `masked_mean`: padding never
counts, and an all-padding row cannot divide by zero.

Deliberately simple: one formulation each (no IPO/hinge DPO variants, no k2/k3 KL choice for PPO), the
same choices TRL makes in `DPOTrainer(loss_type="sigmoid")` and its PPO trainer, so the numbers can be
cross-checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1; `dim=None` means over everything."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------------
def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r); minimise its negative log-likelihood.

    r_chosen, r_rejected: (B,) scalar scores. Returns the mean loss and detached pair metrics."""
    diff = r_chosen - r_rejected                                  # (B,)
    loss = -F.logsigmoid(diff).mean()                             # logsigmoid: stable where log(sigmoid) is not
    metrics = {"pair_accuracy": (diff > 0).float().mean().detach(), "margin": diff.mean().detach()}
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------------
def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).

    All inputs: (B,) log-probabilities summed over response tokens only. The implicit rewards
    beta * (log pi - log ref) are what DPO trains; their difference's sign is the pair accuracy.
    With policy == reference every reward is 0 and the loss is -log sigmoid(0) = ln 2."""
    chosen_rewards = beta * (pi_chosen - ref_chosen)              # (B,)
    rejected_rewards = beta * (pi_rejected - ref_rejected)        # (B,)
    margin = chosen_rewards - rejected_rewards                    # (B,)
    loss = -F.logsigmoid(margin).mean()
    metrics = {"chosen_reward": chosen_rewards.mean().detach(), "rejected_reward": rejected_rewards.mean().detach(),
               "reward_accuracy": (margin > 0).float().mean().detach(), "reward_margin": margin.mean().detach()}
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------------
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate k1 = log pi(a) - log ref(a) at the sampled token: (B, T) -> (B, T).

    Unbiased for KL(pi || ref) under samples from pi; this is what the reward is penalised by, per token."""
    return logp - ref_logp


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    rewards, values, mask: (B, T); padding sits after each response (right-padded), so the value after the
    last real token is 0 (the episode ends there). gamma 1: a response is one short episode and the
    score arrives at its end; lam 0.95 trades the value head's bias against the variance of the score.
    Returns (advantages, returns), both (B, T), zero on padding. Returns = advantages + values."""
    B, T = rewards.shape
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)   # A_{t+1}
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]       # TD error, (B,)
        last = (delta + gamma * lam * last) * mask[:, t]                # padding resets the recursion
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, mean: float | None = None,
           var: float | None = None) -> torch.Tensor:
    """(x - mean) / std over masked positions; padding stays 0. Keeps advantage scale fixed across batches.
    `mean` and `var` given: those of a larger batch this one is part of (PPO's step over several rollouts)."""
    mean = masked_mean(x, mask) if mean is None else mean
    var = masked_mean((x - mean) ** 2, mask) if var is None else torch.tensor(var, dtype=x.dtype, device=x.device)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over tokens of max(-A * r, -A * clip(r, 1-e, 1+e)), r = pi / pi_old.

    logp, old_logp, advantages, mask: (B, T). Both log-probs must come from the same temperature-scaled
    logits, or r != 1 on the first epoch and every token looks off-policy."""
    ratio = torch.exp(logp - old_logp)                                   # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {"clip_frac": masked_mean((clipped > unclipped).float(), mask).detach(),
               "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask).detach()}
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within `clip` of the rollout's value: (B, T) -> ()."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of softmax(logits): (B, T, V), (B, T) -> (). Pass temperature-scaled logits."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)                                   # (B, T)
    return masked_mean(ent, mask)


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int = 10, n_steps: int = 1) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (sec. 2.2; TRL's AdaptiveKLController):
    e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * n_steps / horizon. A KL above target tightens the
    leash, below loosens it, by at most 20% x n_steps / horizon per update, so the policy drifts at a steady rate."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def shaped_scores(scores: torch.Tensor, stopped: torch.Tensor, lengths: torch.Tensor, ref_length: float,
                  no_eos_penalty: float = 0.0, length_coef: float = 0.0) -> torch.Tensor:
    """The reward model's score with two guards: (B,) scores, (B,) bool stopped, (B,) response tokens -> (B,).

    - a response cut at the token budget without its stop token loses `no_eos_penalty` (TRL's
      `missing_eos_penalty`): a reward model reads only the end of a response and cannot see it never ended;
    - `length_coef * |log(length / ref_length)|` is subtracted: zero at the starting policy's mean length and
      symmetric in the ratio (twice as long costs what half as long costs). Reward models favour length, and a
      policy that only grows (or shrinks) its answers is gaming the score, not improving its answers."""
    penalty = no_eos_penalty * (~stopped).float()                                       # (B,)
    penalty = penalty + length_coef * torch.log(lengths.float().clamp(min=1) / max(ref_length, 1.0)).abs()
    return scores - penalty


# ---------------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, scale: bool = False) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: r - mean over the group (/ std when `scale`, GRPO's original)."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return adv


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(q - p) - (q - p) - 1 >= 0 at the sampled token: [B, T]."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
              mask: torch.Tensor, clip: float, beta: float, total_tokens: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate + beta * k3 KL, summed over this micro-batch's tokens / ALL the step's tokens (DAPO).

    logp, old_logp, ref_logp, mask: [B, C] completion tokens; adv: [B] one advantage per completion.
    Dividing by the step's total token count makes micro-batching exact: the micro-batch losses add up to the
    token-level mean over the whole step."""
    n = mask.sum()
    pg, m = ppo_policy_loss(logp, old_logp, adv[:, None].expand_as(logp), mask, clip)   # mean over n tokens
    loss = pg * n / total_tokens
    metrics = {"clip_frac": float(m["clip_frac"]), "tokens": float(n)}
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        metrics["kl"] = float(masked_mean(kl.detach(), mask))
        if beta > 0:
            loss = loss + beta * (kl * mask).sum() / total_tokens
    return loss, metrics
