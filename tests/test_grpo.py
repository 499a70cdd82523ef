"""GRPO (stage 4): advantages and loss on hand-made tensors, answer extraction, rewards, curriculum, a smoke
run that changes every trainable parameter, exact resume, and the headline — a tiny model that went through
stages 1-2 on simple arithmetic gets better on held-out problems after a short GRPO run."""

import json
import math

import pytest
import torch

from instar.train.grpo import Config, Curriculum, Problems, group_advantages, grpo_loss, k3_kl
from instar.train.rewards import (FORMAT_BONUS, correctness_reward, extract_answer, format_reward, math_messages,
                                  score)


# --- advantages and loss ------------------------------------------------------------------------------------
def test_group_advantages_subtract_the_group_mean_without_std_scaling():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.1, 1.1, 1.1, 1.1], [1.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(r)
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [0.75, -0.25, -0.25, -0.25]]))
    scaled = group_advantages(r, scale=True)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased std, as GRPO uses
    assert torch.allclose(scaled[0], adv[0] / (std + 1e-4))
    assert torch.allclose(scaled[1], torch.zeros(4))  # equal rewards: zero, not NaN


def test_k3_kl_is_zero_at_equality_and_matches_its_formula():
    p = torch.tensor([[-1.0, -2.0]])
    assert torch.allclose(k3_kl(p, p), torch.zeros(1, 2))
    q = torch.tensor([[-1.5, -1.0]])
    d = q - p
    assert torch.allclose(k3_kl(p, q), torch.exp(d) - d - 1)
    assert (k3_kl(p, q) > 0).all()


def test_loss_is_token_level_and_micro_batches_add_up():
    # Two completions: 3 tokens with A = +1, 1 token with A = -1 (ratio 1, so loss = -sum(A * mask) / tokens).
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, m = grpo_loss(logp, logp.detach(), None, adv, mask, clip=0.2, beta=0.0, total_tokens=4.0)
    assert math.isclose(loss.item(), -(3 * 1.0 - 1.0) / 4)  # token mean; a per-sequence mean would give 0
    loss.backward()
    loss = loss.detach()
    assert torch.allclose(logp.grad, -adv[:, None] * mask / 4)  # policy gradient, padding gets none
    assert m["clip_frac"] == 0.0
    # Splitting the batch into micro-batches gives the same total.
    a, _ = grpo_loss(logp[:1], logp[:1].detach(), None, adv[:1], mask[:1], 0.2, 0.0, 4.0)
    b, _ = grpo_loss(logp[1:], logp[1:].detach(), None, adv[1:], mask[1:], 0.2, 0.0, 4.0)
    assert math.isclose((a + b).item(), loss.item(), rel_tol=1e-6)


def test_loss_clips_the_ratio_and_adds_k3_kl_with_beta():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9]]))  # ratios 1.5 (outside 1 +- 0.2) and 0.9 (inside)
    mask = torch.ones(1, 2)
    adv = torch.tensor([1.0])
    loss, m = grpo_loss(logp, old, None, adv, mask, clip=0.2, beta=0.0, total_tokens=2.0)
    assert math.isclose(float(loss), -(1.2 + 0.9) / 2, rel_tol=1e-6)  # positive advantage: ratio capped at 1.2
    assert m["clip_frac"] == 0.5
    ref = torch.tensor([[-0.1, 0.2]])
    with_kl, m = grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.5, total_tokens=2.0)
    kl = k3_kl(logp, ref)
    assert math.isclose(float(with_kl), float(loss) + 0.5 * float(kl.sum()) / 2, rel_tol=1e-6)
    assert math.isclose(m["kl"], float(kl.mean()), rel_tol=1e-6)
    no_beta, m0 = grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.0, total_tokens=2.0)
    assert math.isclose(float(no_beta), float(loss)) and m0["kl"] > 0  # measured, not optimised, at beta 0


# --- the answer format -----------------------------------------------------------------------------------
@pytest.mark.parametrize("completion, expected", [
    ("3 + 4 = 7\nAnswer: 7", "7"),
    ("Answer: 7", "7"),
    ("answer:   -12  ", "-12"),
    ("So the total is\nAnswer: 1,234", "1,234"),
    ("Answer: 7/2", "7/2"),
    ("Answer: -3.5.", "-3.5"),
    ("Answer: $12", "$12"),
    ("Answer: 12%\n\n", "12%"),
    ("7", None),                                     # no answer line
    ("The answer is 7", None),
    ("", None),
    ("Answer:", None),                               # empty answer
    ("Answer: 3\nAnswer: 4", None),                  # two answers: a hedge never wins
    ("Answer: 7\nI hope this helps!", None),         # text after the answer line
    ("Answer: 42 apples", None),                     # words next to the number
    ("Answer: seven", None),
    ("Answer: 1e5", None),
    ("Answer: " + "9" * 70, None),                   # huge number: refused, no overflow
    ("Answer: ١٢", None),                            # Unicode digits
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_rewards_correctness_plus_small_format_bonus():
    row = {"question": "What is 3 + 4?", "answer": "7"}
    completions = ["3 + 4 = 7\nAnswer: 7", "Answer: 8", "Answer: 7.0", "7", "Answer: " + "9" * 40]
    assert correctness_reward(completions, **row) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert format_reward(completions, **row) == [FORMAT_BONUS, FORMAT_BONUS, FORMAT_BONUS, 0.0, FORMAT_BONUS]
    totals, correct = score(completions, row)
    assert totals == pytest.approx([1.1, 0.1, 1.1, 0.0, 0.1])
    assert correct == [True, False, True, False, False]
    assert score(["Answer: 7/2"], {"answer": "3.5"})[1] == [True]
    assert score(["Answer: -1,000"], {"answer": "-1000"})[1] == [True]


def test_math_messages_teach_the_format_the_parser_reads():
    rec = {"question": "What is 2 + 2?", "answer": "4", "solution": "2 + 2 = 4"}
    msgs = math_messages(rec)["messages"]
    assert msgs[0]["role"] == "user" and msgs[0]["content"].startswith("What is 2 + 2?")
    assert extract_answer(msgs[1]["content"]) == "4"
    assert math_messages(rec, instruction="")["messages"][0]["content"] == "What is 2 + 2?"


# --- curriculum and data ----------------------------------------------------------------------------------
def test_curriculum_moves_toward_half_pass_rate():
    c = Curriculum(level=2, lo=1, hi=5, target=0.5, band=0.2)
    assert c.update(0.9) == 3          # too easy: harder (history resets)
    assert c.update(0.5) == 3          # in band: stay
    assert c.update(0.0) == 3          # smoothed 0.35, still in band
    assert c.update(0.0) == 2          # smoothed 0.245 < 0.3: easier
    for _ in range(5):
        c.update(0.0)
    assert c.level == 1                # never below lo
    c = Curriculum(level=5, lo=1, hi=5, target=0.5, band=0.2)
    assert c.update(1.0) == 5          # never above hi


def test_training_batches_never_contain_held_out_problems():
    cfg = Config(families=["arithmetic"], eval_difficulty=1, eval_problems=40, batch_size=16)
    problems = Problems(cfg, store=None)
    held = {r["question"] for r in problems.heldout}
    assert 20 <= len(held) <= 40   # single-digit sums repeat; duplicates are removed
    seen = set()
    for step in range(30):
        batch = problems.batch(step, 1)
        assert len(batch) == 16 and not held & {r["question"] for r in batch}
        seen |= {r["question"] for r in batch}
        assert batch == problems.batch(step, 1)  # a pure function of the step: exact resume
    assert len(seen) > 40
