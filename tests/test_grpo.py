"""GRPO (stage 4): advantages and loss on hand-made tensors, answer extraction, rewards, curriculum, a smoke
run that changes every trainable parameter, exact resume, and the headline — a tiny model that went through
stages 1-2 on simple arithmetic gets better on held-out problems after a short GRPO run."""

import json
import math

import pytest
import torch

from instar.train.grpo import Config, Curriculum, Problems
from instar.train.losses import group_advantages, grpo_loss, k3_kl
from instar.train.rewards import (FORMAT_BONUS, correctness_reward, extract_answer, format_reward, math_messages,
                                  score)
from train_fixtures import unchanged_params


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


def one_process():
    """The part of a training session `grpo.updates` reads: one CPU process, fp32, sums over ranks = local sums."""
    from types import SimpleNamespace

    return SimpleNamespace(device=torch.device("cpu"), bf16=False, all_sum=lambda x: sum(x) if isinstance(x, list) else x)


def test_a_step_whose_groups_all_have_equal_rewards_updates_nothing():
    """No informative group: the update has no closures at all, and the loop's optimizer steps without gradients
    (grad_clip 0 included: it used to die stacking no gradient norms) leave the weights alone."""
    from instar.train.grpo import updates
    from instar.train.loop import make_optimizer, make_scheduler, optimizer_step
    from instar.train.sampling import Completions

    cfg = Config(epochs=2, max_steps=10, warmup=0, grad_clip=0)
    model = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, per_step=cfg.epochs)
    rewards = torch.tensor([[1.1, 1.1], [0.0, 0.0]])  # all right / all wrong: no signal
    ones = torch.ones(4, 3, dtype=torch.long)
    ro = {"gen": Completions([""] * 4, ones, ones, ones, ones), "adv": group_advantages(rewards).flatten(),
          "informative": rewards.max(1).values > rewards.min(1).values}
    ro["trained"] = ro["informative"]
    groups = updates(one_process(), model, None, cfg.model_copy(update={"group_size": 2}), [ro])
    assert groups == [[], []]
    for _ in groups:
        assert optimizer_step(list(model.parameters()), opt, sched, cfg) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sched.last_epoch == 2  # the schedule still advances one step per epoch


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


def test_chat_reward_pays_a_reply_in_words_not_a_drill_or_nothing():
    from instar.train.rewards import chat_score

    replies = ["Tide pools hold crabs and snails.", "3 + 4 = 7\nAnswer: 7", "Tide pools are\nAnswer: 2", "ok", "",
               "Visit at low tide: 9 to 5 on weekdays."]
    assert chat_score(replies, {"question": "Tell me about tide pools."}) == (
        [1.0, 0.0, 0.0, 0.0, 0.0, 1.0], [True, False, False, False, False, True])


def test_worked_steps_are_checked_by_computation_up_to_their_first_wrong_character():
    from instar.train.rewards import checked_steps

    text = ("42 + 86\n2 + 6 = 8\n4 + 8 = 13\n42 + 86 = 138\n4 - 9 = 5\n2 + 8 = 1\n(4 + 9) - 7 = 6\n"
            "-5 - 7 = -12\nx + 1 = 2\n7 = 7\n3 + 4 = 7")
    steps = [(text[start:good], None if bad is None else text[bad]) for start, good, bad in checked_steps(text)]
    assert steps == [("8", None), ("1", "3"), ("1", "3"), ("", "5"), ("1", "\n"), ("6", None), ("-12", None)]
    # not steps: the restated question (no result), words ("x + 1"), no operation ("7 = 7"), and the last line,
    # which has no newline yet (a rollout cut there may have stopped mid-number)


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


def test_the_curriculum_steers_by_the_problems_drawn_at_its_level():
    """With mixed_levels 0.5 the first half of a batch is at the curriculum's level: only its pass rate counts."""
    from instar.train.grpo import level_pass_rate

    cfg = Config(batch_size=4, group_size=2, mixed_levels=0.5)
    ro = {"correct": torch.tensor([1.0, 1.0, 1.0, 0.0] + [0.0] * 4)}  # level problems 3/4 right, mixed ones 0/4
    assert level_pass_rate([ro, ro], cfg) == 0.75
    assert level_pass_rate([ro], cfg.model_copy(update={"mixed_levels": 0.0})) == 0.375
    assert level_pass_rate([ro], cfg.model_copy(update={"mixed_levels": 1.0})) == 0.375
    assert level_pass_rate([ro], cfg.model_copy(update={"source": "store"})) == 0.375


def test_dynamic_sampling_draws_more_problems_and_trains_on_at_most_a_batch_of_groups_with_signal():
    """oversample 2: 8 problems sampled for a batch of 4 (the level's first, the mixed-level share scaled with them,
    the curriculum still steering by the level's ones); of 5 groups with signal, 4 drawn at random (seeded) are
    trained on, one chunk each at micro_batch = G; with fewer than 4, every one."""
    from instar.train.grpo import at_most, level_pass_rate, mixed_count, updates
    from instar.train.sampling import Completions

    cfg = Config(batch_size=4, group_size=2, oversample=2.0, mixed_levels=0.5, micro_batch=2)
    batch = Problems(cfg, store=None).batch(0, 3)
    assert len(batch) == 8 and mixed_count(cfg) == 4
    assert level_pass_rate([{"correct": torch.tensor([1.0] * 8 + [0.0] * 8)}], cfg) == 1.0
    informative = torch.tensor([True, False, True, True, False, True, False, True])
    picked = at_most(informative, 4, seed=7)
    assert int(picked.sum()) == 4 and not bool((picked & ~informative).any())
    assert torch.equal(picked, at_most(informative, 4, seed=7))  # a pure function of the step: exact resume
    assert len({tuple(at_most(informative, 4, seed=k).tolist()) for k in range(20)}) > 1
    assert torch.equal(at_most(informative, 5, seed=7), informative)
    ones = torch.ones(16, 3, dtype=torch.long)
    ro = {"gen": Completions([""] * 16, ones, ones, ones, ones), "adv": torch.zeros(16), "trained": picked}
    assert [len(g) for g in updates(one_process(), torch.nn.Linear(2, 2), None, cfg, [ro])] == [4]


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


# --- end to end on a tiny arithmetic world ------------------------------------------------------------------
FAMILIES = ["money", "ages"]  # both are single-digit sums at level 1, worded differently (arithmetic's level 1
                              # mixes sums and differences in ~90 phrasings: too much for 150 steps)
GRPO_FAST = ['families=["money", "ages"]', "difficulty=1", "eval_difficulty=1", "curriculum=false",
             'instruction=""', "max_new_tokens=24", "batch_size=8", "group_size=8", "save_every=0",
             "log_every=5", "sample_tokens=8", "seed=0"]


@pytest.fixture(scope="module")
def arith_world(tmp_path_factory):
    """(store, sft run dir): a tiny model taken through stages 1-2 on single-digit sums, ~50 s on 2 cores.

    Like data a weak teacher writes, the SFT replies end in one of two styles: 40% with the documented
    `Answer: N` line, 60% with "The answer is N." — so the stage-2 model's greedy answers mostly miss the
    format GRPO rewards. No held-out question (the GRPO eval set, eval_problems=64) appears in any stage's
    data; their sums do appear, worded differently (the other family, other names)."""
    import random

    from instar.datasets.store import Provenance, Store
    from instar.generate.procedural import make_problems
    from instar.train import run_stage
    from instar.train.rewards import format_answer

    path = tmp_path_factory.mktemp("arith")
    store = Store.open(path / "instar.db")
    held = {r["question"] for r in Problems(Config(families=FAMILIES, eval_difficulty=1, eval_problems=64), None).heldout}
    recs = {r["question"]: r for r in make_problems(1000, seed=11, families=FAMILIES, difficulty=1)
            if r["question"] not in held}
    rng = random.Random(0)
    convs = []
    for r in recs.values():
        last = format_answer(r["answer"]) if rng.random() < 0.4 else f"The answer is {r['answer']}."
        convs.append({"messages": [{"role": "user", "content": r["question"]},
                                   {"role": "assistant", "content": f"{r['solution']}\n{last}"}]})
    store.add("text", [{"text": c["messages"][0]["content"] + "\n" + c["messages"][1]["content"]} for c in convs],
              Provenance(source="procedural"))
    store.add("messages", convs, Provenance(source="procedural"))
    fast = ["eval_every=0", "save_every=0", "log_every=50", "sample_tokens=8", "eval_batches=2", "batch_size=16",
            "max_len=64"]
    run_stage("pretrain", None, [f"out={path}/pt", "max_steps=40"] + fast, store)
    # 300 steps: with money + ages (longer questions than the old "What is a + b?") and digit tokens, 150 steps left
    # a model GRPO lifted only 0.00 -> 0.17 (0.08 without digit tokens); 300 steps: 0.00 -> 0.94 (measured).
    run_stage("sft", None, [f"model={path}/pt", f"out={path}/sft", "max_steps=300", "lr=1e-3"] + fast, store)
    return store, path / "sft"


def test_grpo_raises_held_out_accuracy(arith_world, tmp_path):
    """The headline: 15 GRPO steps (8 problems x 8 samples) lift held-out greedy pass@1 by far more than noise.
    Measured on this 2-core box (59 held-out problems): 0.00 -> 0.46; with seed 1, seed 2 (when held-out sets still
    changed with the seed) or dtype fp32 instead,
    0.44, 0.38, 0.37. Most of the gain is the model adopting the rewarded `Answer:` line for sums it can do;
    the binomial noise of one accuracy at p ~ 0.3, n = 59 is ~0.06, so the bar of +0.20 is over 3 sigma."""
    from instar.datasets import runs
    from instar.train import run_stage

    store, sft = arith_world
    out = tmp_path / "grpo"
    summary = run_stage("grpo", None, [f"model={sft}", f"out={out}", "max_steps=15", "lr=1e-4", "temperature=0.7",
                                       "eval_problems=64", "eval_every=0"] + GRPO_FAST, store)
    start, end = summary["start"], summary["end"]
    assert end["accuracy"] >= start["accuracy"] + 0.20, (start, end)
    assert end["reward_mean"] > start["reward_mean"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["start"]["accuracy"] == start["accuracy"] and on_disk["end"]["accuracy"] == end["accuracy"]
    # The run tables hold the same numbers, per-step training metrics and the sample rows.
    run = runs.get_run(store, summary["run_id"])
    assert run["status"] == "done" and run["summary"]["end"]["accuracy"] == end["accuracy"]
    acc = runs.metric_series(store, summary["run_id"], "accuracy")
    assert acc[0] == (0, start["accuracy"]) and acc[-1] == (15, end["accuracy"])
    for name in ("rollout_reward", "pass_rate", "completion_len", "kl", "clip_frac", "difficulty"):
        assert len(runs.metric_series(store, summary["run_id"], name)) == 15, name


def test_ptx_teaches_the_worked_solutions_of_the_problems_the_samples_miss(arith_world, tmp_path):
    """`ptx_coef`: a planted reward that never differs inside a group leaves GRPO itself no signal, so only the
    ptx term can move the model: the SFT loss on the worked solutions (which end with the answer line) of the
    problems fewer than half of whose samples were right. The stage-2 model ends 60% of its replies "The answer
    is N.", so its greedy answer-line rate rises with ptx; without it no weight moves."""
    from instar.train import load_stage_config, train_stage
    from instar.train.models import load_model
    from instar.train.rewards import math_messages

    store, sft = arith_world

    def verbatim(completions, row):  # right = the worked solution word for word; reward 0 all the same
        want = math_messages(row, "")["messages"][-1]["content"]
        return [0.0] * len(completions), [c.strip() == want for c in completions]

    def train(out, ptx_coef):
        cfg = load_stage_config("grpo", None, GRPO_FAST + [
            f"model={sft}", f"out={tmp_path / out}", "max_steps=8", "lr=1e-3", "eval_problems=64", "eval_every=0",
            "external_eval=false", "max_new_tokens=48", f"ptx_coef={ptx_coef}"])
        return train_stage("grpo", cfg, store, scorer=verbatim)

    plain = train("plain", 0.0)
    assert plain["end"]["format_rate"] == plain["start"]["format_rate"]
    before = load_model(sft)[0]
    assert len(unchanged_params(before, load_model(tmp_path / "plain")[0])) == len(list(before.parameters()))
    taught = train("ptx", 1.0)
    assert taught["end"]["format_rate"] >= taught["start"]["format_rate"] + 0.2, (taught["start"], taught["end"])


def test_chat_prompts_teach_a_math_drilled_model_to_answer_questions_in_words(arith_world, tmp_path):
    """`chat_prompts`: the stage-2 model of this world learned sums only, so it answers "Why do people like owls?"
    with a sum; with chat rows beside the math problems (questions about the stored documents' topics in wordings
    SFT never used), rewarded by `rewards.chat_score`, GRPO moves its replies to words (measured: chat reward 0.00,
    0.03, 0.34 in the first steps, 0.92-0.98 from step 9; at lr 1e-4 and temperature 0.7 no sample of this model
    avoided a sum, so no group had signal)."""
    from instar.datasets import runs
    from instar.datasets.store import Provenance, Store
    from instar.generate.prompts import TOPICS
    from instar.generate.requests import QUESTIONS, REQUESTS
    from instar.train import run_stage

    assert not set(QUESTIONS) & set(REQUESTS)  # no wording SFT's topic requests were taught
    _, sft = arith_world
    assert len(Problems(Config(chat_prompts=2), None).chats) == len(TOPICS) * len(QUESTIONS)  # the built-in pool
    store = Store.open(tmp_path / "chat.db")
    for topic in ("owls", "kites", "tea"):
        store.add("text", [{"text": f"A text about {topic}."}], Provenance(source="test", topic=topic))
    problems = Problems(Config(chat_prompts=3, batch_size=4, families=FAMILIES), store)
    assert {r["question"] for r in problems.chats} == {q.format(topic=t) for t in ("owls", "kites", "tea")
                                                       for q in QUESTIONS}
    rows = problems.batch(0, 1)
    assert [bool(r.get("chat")) for r in rows] == [False] * 4 + [True] * 3 and rows == problems.batch(0, 1)
    summary = run_stage("grpo", None, [f"model={sft}", f"out={tmp_path / 'g'}", "max_steps=12", "lr=1e-3",
                                       "temperature=1.0", "eval_problems=16", "eval_every=0", "chat_prompts=8",
                                       "external_eval=false"] + GRPO_FAST, store)
    chat = [v for _, v in runs.metric_series(store, summary["run_id"], "chat_reward")]
    assert len(chat) == 12 and sum(chat[-3:]) / 3 >= sum(chat[:3]) / 3 + 0.3, chat
    assert summary["data"]["chat_prompts"] == len(problems.chats)


def test_the_math_metrics_leave_the_chat_rows_out():
    """One problem and one chat row, 2 samples each: pass rate, reward and lengths are the problem's alone."""
    from types import SimpleNamespace

    from instar.train.grpo import metrics

    ro = {"rows": [{"question": "What is 1 + 1?"}, {"question": "Why do people like owls?", "chat": True}],
          "n_math": 1, "rewards": torch.tensor([1.1, 0.0, 1.0, 1.0]), "correct": torch.tensor([1.0, 0.0, 1.0, 1.0]),
          "truncated": torch.tensor([0.0, 1.0, 0.0, 0.0]), "informative": torch.tensor([True, False]),
          "trained": torch.tensor([True, False]), "step_right": None, "demos": [], "level": 1,
          "gen": SimpleNamespace(completion_mask=torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]]))}
    m = metrics(SimpleNamespace(all_sum=lambda x: x), [ro], {}, False, 2)
    assert m["pass_rate"] == 0.5 and m["rollout_reward"] == pytest.approx(0.55) and m["chat_reward"] == 1.0
    assert m["completion_len"] == 1.5 and m["truncated"] == 0.5


def test_sft_keeps_the_prompt_form_of_its_math_conversations(arith_world, tmp_path):
    """The arithmetic world's SFT conversations ask the bare question, so its run keeps "" and a later stage
    (no summary of its own yet) and `instar eval` ask its models that way, not with the default instruction."""
    from instar.train.evaluate import math_prompt_form
    from instar.train.rewards import INSTRUCTION, load_prompt_form, prompt_form_of

    _, sft = arith_world
    assert load_prompt_form(sft) == "" and math_prompt_form(sft) == ""
    assert math_prompt_form(tmp_path / "ppo", base=sft) == ""
    assert math_prompt_form(tmp_path / "ppo") == INSTRUCTION  # nothing kept anywhere: the default
    asked = [[{"role": "user", "content": f"What is 2 + {i}? {INSTRUCTION}"}, {"role": "assistant", "content": "x"}]
             for i in range(3)]
    bare = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]] * 2
    assert prompt_form_of(asked) == INSTRUCTION and prompt_form_of(asked[:1] + bare) == ""  # the form most ask in
    assert prompt_form_of([]) is None


def test_every_trainable_parameter_changes_and_loss_is_finite(arith_world, tmp_path):
    from instar.datasets import runs
    from instar.train import run_stage
    from instar.train.models import load_model

    store, sft = arith_world
    out = tmp_path / "smoke"
    summary = run_stage("grpo", None, [f"model={sft}", f"out={out}", "max_steps=2", "lr=1e-3", "eval_problems=8",
                                       "eval_every=1", "epochs=2"] + GRPO_FAST, store)
    before, after = load_model(sft)[0], load_model(out)[0]
    assert unchanged_params(before, after) == []
    series = {n: runs.metric_series(store, summary["run_id"], n) for n in ("rollout_reward", "kl", "clip_frac")}
    assert all(math.isfinite(v) for values in series.values() for _, v in values)
    assert series["kl"][-1][1] > 0  # the policy moved away from the reference
    assert [step for step, _ in runs.metric_series(store, summary["run_id"], "accuracy")] == [0, 1, 2]
    rows = [r for r in runs.run_samples(store, summary["run_id"]) if json.loads(r["extra"] or "{}").get("tag") == "grpo"]
    assert rows and {r["step"] for r in rows} == {1, 2} and all(r["prompt"] and r["reward"] is not None for r in rows)
    assert all("advantage" in json.loads(r["extra"]) for r in rows)
    assert "accuracy" in summary["start"] and "reward_mean" in summary["end"]


def test_resume_after_a_crash_matches_an_uninterrupted_run(arith_world, tmp_path, monkeypatch):
    from instar.train import grpo, run_stage
    from instar.train.models import load_model

    store, sft = arith_world
    sets = [f"model={sft}", "max_steps=4", "lr=1e-3", "eval_problems=8", "eval_every=0", "log_kl=false"] + GRPO_FAST
    straight = run_stage("grpo", None, sets + [f"out={tmp_path / 'a'}"], store)

    real_update, calls = grpo.updates, {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(grpo, "updates", crash_on_third)
    b = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage("grpo", None, sets + [f"out={b}", "save_every=2"], store)
    assert (b / "checkpoint" / "state.pt").exists() and not (b / "summary.json").exists()
    monkeypatch.setattr(grpo, "updates", real_update)
    resumed = run_stage("grpo", None, sets + [f"out={b}", "save_every=2"], store)
    assert resumed["run_id"] != straight["run_id"]
    assert json.loads((b / "run.json").read_text())["run_id"] == resumed["run_id"]  # the id survived the crash
    wa, wb = dict(load_model(tmp_path / "a")[0].named_parameters()), dict(load_model(b)[0].named_parameters())
    assert all(torch.allclose(wa[n], wb[n], atol=1e-6) for n in wa)
    assert resumed["end"]["accuracy"] == straight["end"]["accuracy"]
    again = run_stage("grpo", None, sets + [f"out={b}", "save_every=2"], store)
    assert again.get("already_done") and again["run_id"] == resumed["run_id"]


def test_eval_cli_scores_math_records_with_the_reward_functions(arith_world, tmp_path, monkeypatch, capsys):
    import sys

    from instar import cli

    _, sft = arith_world
    data = tmp_path / "problems.jsonl"
    rows = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 4 + 4?", "answer": "8"}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(sys, "argv", ["instar", "eval", str(sft), "--data", str(data), "--json"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kind"] == "math" and result["n"] == 2
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["answers"]) == 2
    for given in result["answers"]:
        assert given["correct"] == score([given["completion"]], given)[1][0]
    assert result["accuracy"] == sum(g["correct"] for g in result["answers"]) / 2
    monkeypatch.setattr(sys, "argv", ["instar", "eval", str(sft), "--data", str(data)])  # the table skips answers
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0 and "accuracy" in capsys.readouterr().out

    sampled = []  # --samples: each question sampled K times, the same draws on a second call
    for _ in range(2):
        monkeypatch.setattr(sys, "argv", ["instar", "eval", str(sft), "--data", str(data), "--json", "--samples", "3",
                                          "--temperature", "1.0"])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 0
        sampled.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    got = sampled[0]
    assert got == sampled[1] and got["samples"] == 3 and got["accuracy"] == result["accuracy"]
    right = [g["samples_right"] for g in got["answers"]]
    assert all(0 <= n <= 3 for n in right)
    assert got["pass_at_k"] == sum(n > 0 for n in right) / 2 and got["sample_accuracy"] == sum(right) / 6
    assert got["majority_at_k"] <= got["pass_at_k"]


def test_lora_policy_uses_its_disabled_adapter_as_reference(arith_world, tmp_path):
    from instar.datasets import runs
    from instar.train import run_stage
    from instar.train.models import load_model

    store, sft = arith_world
    out = tmp_path / "lora"
    summary = run_stage("grpo", None, [f"model={sft}", f"out={out}", "max_steps=2", "lr=1e-2", "eval_problems=8",
                                       "eval_every=0", "lora=true", "lora_r=4"] + GRPO_FAST, store)
    kl = runs.metric_series(store, summary["run_id"], "kl")
    assert kl[0][1] < 1e-3 < kl[-1][1]  # step 1 rolls out before any update: policy == reference
    before, after = load_model(sft)[0], load_model(out)[0]  # model/ is a plain, merged model
    assert unchanged_params(before, after) != [] and len(unchanged_params(before, after)) < len(list(before.parameters()))


def test_store_source_trains_on_the_train_split_and_holds_out_val(arith_world, tmp_path):
    from instar.datasets.store import Provenance, Store
    from instar.errors import InstarError
    from instar.generate.procedural import make_problems
    from instar.train import run_stage

    _, sft = arith_world
    store = Store.open(tmp_path / "math.db")
    with pytest.raises(InstarError, match="'math' records"):
        Problems(Config(source="store"), store)
    store.add("math", make_problems(300, seed=3, families=["arithmetic"], difficulty=1)
              + make_problems(100, seed=4, families=["arithmetic"], difficulty=3), Provenance(source="procedural"))
    problems = Problems(Config(source="store", batch_size=16), store)
    val = {r["question"] for r in store.records("math", "val")}
    assert {r["question"] for r in problems.heldout} == val and problems.levels == [1, 3]
    assert {r["difficulty"] for r in problems.batch(0, 2)} == {1}  # no level-2 records: the nearest level
    assert {r["difficulty"] for r in problems.batch(0, 3)} == {3}
    assert not val & {r["question"] for step in range(10) for r in problems.batch(step, 1)}
    summary = run_stage("grpo", None, [f"model={sft}", f"out={tmp_path / 'g'}", "source=store", "max_steps=1",
                                       "eval_every=0", "max_new_tokens=16", "batch_size=4", "group_size=4",
                                       'instruction=""', "sample_tokens=8", "log_kl=false"], store)
    assert summary["data"]["heldout_problems"] == len(store.records("math", "val"))


def test_curriculum_steps_down_when_the_level_is_too_hard(arith_world, tmp_path):
    from instar.datasets import runs
    from instar.train import run_stage

    store, sft = arith_world
    sets = [s for s in GRPO_FAST if not s.startswith(("curriculum", "difficulty"))]
    summary = run_stage("grpo", None, [f"model={sft}", f"out={tmp_path / 'c'}", "max_steps=2", "eval_problems=8",
                                       "eval_every=0", "log_kl=false", "curriculum=true", "difficulty=3"] + sets, store)
    # The model only ever saw single-digit sums: level 3 (three terms up to 50) passes < 30%, so it steps down.
    assert runs.metric_series(store, summary["run_id"], "difficulty") == [(1, 3.0), (2, 2.0)]
    assert summary["end"]["difficulty"] == 1


def test_held_out_problems_do_not_depend_on_the_seed():
    """SFT math stored under one seed must never hold another seed's held-out problems (instar run reuses data)."""
    sets = [{r["question"] for r in Problems(Config(seed=s, families=FAMILIES, eval_difficulty=1), None).heldout}
            for s in (0, 1, 7)]
    assert sets[0] == sets[1] == sets[2] and len(sets[0]) > 10


def test_shared_prompt_forward_gives_the_same_log_probs_and_gradients():
    """completion_logprobs(group=G) runs each group's prompt once and repeats its KV cache: the same function as
    the plain forward (left padding, varied completion lengths), gradients included."""
    from instar.train.grpo import completion_logprobs
    from instar.train.sampling import generate
    from train_fixtures import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    G = 4
    prompts = ["What is 2 + 3?", "Tom has 7 apples and eats 2. How many are left now?", "Hi"]
    gen = generate(model, tok, [p for p in prompts for _ in range(G)], 10, temperature=1.0, seed=0)
    seqs = {k: getattr(gen, k).clone() for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    for i in range(len(seqs["completion_ids"])):  # rows that stopped at different steps (a random model never does)
        seqs["completion_mask"][i, 3 + i % 7:] = 0
        seqs["completion_ids"][i, 3 + i % 7:] = tok.pad_token_id

    def logp_and_grads(group):
        model.zero_grad()
        logp = completion_logprobs(model, seqs, 0.7, group)
        (logp * seqs["completion_mask"]).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (plain, g_plain), (shared, g_shared) = logp_and_grads(1), logp_and_grads(G)
    mask = seqs["completion_mask"].bool()
    assert torch.allclose(plain[mask], shared[mask], atol=1e-5)
    for name, g in g_plain.items():
        assert torch.allclose(g, g_shared[name], atol=1e-5, rtol=1e-4), name
    seqs["prompt_ids"] = seqs["prompt_ids"].flip(0)  # prompts no longer in runs of G: the plain forward is used
    assert completion_logprobs(model, seqs, 0.7, G).shape == plain.shape
