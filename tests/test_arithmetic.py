"""Arithmetic in many phrasings, worked steps, the SFT math set, and the external yardstick kept apart from both."""

import json
import random
import re
from fractions import Fraction as F
from pathlib import Path

import pytest

from instar.datasets.store import validate_record
from instar.evalsets import arithmetic as external, external_questions
from instar.generate import arithmetic as ar
from instar.generate.procedural import FAMILIES, MAX_DIFFICULTY, heldout_problems, make_problem
from instar.generate.safe_eval import parse_number, safe_eval
from instar.generate.sft_math import LEVEL_WEIGHTS, math_sft_records
from instar.train.rewards import extract_answer

_STEP = re.compile(r"^\(?-?[\d.]+\)?( [-+*/] \(?-?[\d.]+\)?)+ = -?[\d./]+$")


def every_generated_question(per_level: int = 400) -> set[str]:
    """A large sample of what the training generators can emit: every family, every level, several seeds."""
    out = set()
    for family in FAMILIES:
        for level in range(1, MAX_DIFFICULTY + 1):
            rng = random.Random(f"leak:{family}:{level}")
            out.update(make_problem(family, rng, level).question for _ in range(per_level))
    return out


def template(question: str) -> str:
    """A question with its numbers and names masked: the sentence pattern it was made from."""
    names = "|".join(ar.NAMES + ar.MORE_NAMES + ["Priya", "Jonas", "Keiko", "Omar", "Lucia", "Dmitri", "Amara",
                                                 "Felix", "Noor", "Hugo", "Wren", "Tariq"])
    masked = re.sub(r"-?\d+", "N", question)
    return re.sub(rf"\b({names})\b", "P", masked)


# --- the external yardstick ---------------------------------------------------------------------------------
def test_external_set_is_valid_and_every_answer_recomputes():
    rows = external()
    assert 250 <= len(rows) <= 300 and len({r["question"] for r in rows}) == len(rows)
    forms = {r["family"] for r in rows}
    assert forms == {"two_digit", "three_digit", "negatives", "parentheses", "chains", "word", "products"}
    for r in rows:
        validate_record("math", r)
        assert safe_eval(r["solution"]) == parse_number(r["answer"]), r  # the kept expression gives the answer
    assert any(parse_number(r["answer"]) < 0 for r in rows) and any("(" in r["question"] for r in rows)


def test_no_training_generator_emits_an_external_question_or_its_template():
    generated = every_generated_question()
    rows = external()
    assert not generated & {r["question"] for r in rows}
    shared = {template(q) for q in generated} & {template(r["question"]) for r in rows}
    assert not shared, sorted(shared)[:5]
    # And the SFT set refuses them outright, even if a template were added that could produce one.
    assert not {m["messages"][0]["content"] for m in math_sft_records(400, 0, ["arithmetic", "story"])} & \
        external_questions()


# --- the procedural forms ------------------------------------------------------------------------------------
def check_steps(solution: str, answer: str):
    """Every worked line is a true equation of numbers (an operation, or a column with its carry), and the last
    result is the answer."""
    lines = solution.splitlines()
    if len(lines) > 1:  # more than one step: the first line is the question in symbols, worth the answer
        assert " = " not in lines[0] and safe_eval(lines[0]) == parse_number(answer), lines[0]
        lines = lines[1:]
    for line in lines:
        assert _STEP.match(line), line
        lhs, rhs = line.rsplit(" = ", 1)
        assert safe_eval(lhs) == parse_number(rhs), line
    assert parse_number(lines[-1].rsplit(" = ", 1)[-1]) == parse_number(answer)


@pytest.mark.parametrize("family", ["arithmetic", "story"])
def test_worked_steps_are_true_and_end_at_the_answer(family):
    for level in range(1, MAX_DIFFICULTY + 1):
        rng = random.Random(f"steps:{family}:{level}")
        for _ in range(60):
            p = make_problem(family, rng, level)
            check_steps(p.solution, p.record()["answer"])


def test_sums_and_differences_of_bigger_numbers_go_column_by_column():
    assert ar.columns(F(48), "+", F(37)) == ["8 + 7 = 15", "4 + 3 + 1 = 8"]
    assert ar.columns(F(52), "-", F(37)) == ["12 - 7 = 5", "4 - 3 = 1"]
    assert ar.columns(F(37), "-", F(52)) == []        # a negative result: see the magnitudes test below
    assert ar.columns(F(205), "+", F(43)) == ["5 + 3 = 8", "0 + 4 = 4"]    # the lone 2 is copied
    assert ar.columns(F(7), "+", F(5)) == [] and ar.columns(F(-15), "+", F(27)) == []
    assert ar.solution(("-", ("+", 48, 37, False), 9, False)).splitlines() == [
        "48 + 37 - 9", "8 + 7 = 15", "4 + 3 + 1 = 8", "48 + 37 = 85", "15 - 9 = 6", "7 - 0 = 7", "85 - 9 = 76"]


def test_a_product_with_a_one_digit_factor_goes_digit_by_digit():
    """Like the columns of a sum: each line one single-digit fact, or a carry added on a line of its own."""
    assert ar.columns(F(23), "*", F(7)) == ["3 * 7 = 21", "2 * 7 = 14", "14 + 2 = 16"]
    assert ar.columns(F(7), "*", F(23)) == ["7 * 3 = 21", "7 * 2 = 14", "14 + 2 = 16"]
    assert ar.columns(F(20), "*", F(5)) == ["0 * 5 = 0", "2 * 5 = 10"]
    assert ar.columns(F(6), "*", F(7)) == [] and ar.columns(F(12), "*", F(13)) == []  # a fact; two long factors
    assert ar.columns(F(56), "/", F(7)) == []
    assert ar.solution(("*", -14, 6, False)).splitlines() == [
        "-14 * 6", "4 * 6 = 24", "1 * 6 = 6", "6 + 2 = 8", "14 * 6 = 84", "-14 * 6 = -84"]


def test_the_times_table_is_a_level_one_fact_and_one_step_stories_multiply_and_share():
    rng = random.Random("times")
    trees = [ar.draw_tree(rng, 1) for _ in range(1000)]
    table = [t for t in trees if t[0] == "*"]
    assert 0.2 < len(table) / len(trees) < 0.4 and all(2 <= x <= 9 for t in table for x in t[1:3])
    quotients = [t for t in (ar.draw_tree(rng, 2) for _ in range(1000)) if t[0] == "/"]
    assert quotients and all(t[1] % t[2] == 0 and 2 <= t[2] <= 9 and t[1] // t[2] <= 9 for t in quotients)
    said = [ar.arithmetic_problem(rng, 1)[0] for _ in range(1000)]
    assert {s for q in said for s in "*x×" if f" {s} " in q} == set("*x×")  # products as people type them
    for level in (1, 2):
        stories = [ar.story_problem(rng, level) for _ in range(600)]
        ops = [t[0] for _, t in stories]
        assert 0.2 < (ops.count("*") + ops.count("/")) / len(ops) < 0.4 and ops.count("/") > 30
        for q, t in stories:
            assert ar.value(t).denominator == 1 and ar.value(t) >= 0, q
            if t[0] == "*":
                assert min(t[1], t[2]) <= 9 and max(t[1], t[2]) <= (9 if level == 1 else 99), q


def test_signed_operations_are_first_done_on_magnitudes():
    """Every signed step is preceded by the same work on numbers >= 0: the unsigned facts, then the sign."""
    def steps(t):
        return ar.solution(t).splitlines()[1:]

    assert steps(("-", 4, 9, False)) == ["9 - 4 = 5", "4 - 9 = -5"]
    assert steps(("-", -5, 7, False)) == ["5 + 7 = 12", "-5 - 7 = -12"]
    assert steps(("-", 8, -5, False)) == ["8 + 5 = 13", "8 - (-5) = 13"]
    assert steps(("+", -3, 3, False)) == ["3 - 3 = 0", "-3 + 3 = 0"]
    assert steps(("*", -3, 4, False)) == ["3 * 4 = 12", "-3 * 4 = -12"]
    assert steps(("-", 37, 52, False)) == ["12 - 7 = 5", "4 - 3 = 1", "52 - 37 = 15", "37 - 52 = -15"]
    assert ar.magnitudes(F(9), "-", F(4)) is None and ar.magnitudes(F(2), "+", F(7)) is None
    rng = random.Random("magnitudes")
    for _ in range(300):  # every operand of a helper line is >= 0, and a difference is bigger minus smaller
        a, b, op = F(rng.randint(-99, 99)), F(rng.randint(-99, 99)), rng.choice("+-*")
        plain = ar.magnitudes(a, op, b)
        if plain is not None:
            x, hop, y = plain
            assert x >= 0 and y >= 0 and (hop != "-" or x >= y)
            assert abs(ar._apply(op, a, b)) == ar._apply(hop, x, y)


def test_a_negative_second_number_is_asked_in_every_way_people_write_it_and_restated_in_brackets():
    """ "7 + (-9)", "7 + -9" and "7 plus -9" all ask for one reply, whose first line is always "7 + (-9)"; the
    phrasings that count or step along the number line ("count back -2 from 6") are not used for one."""
    rng = random.Random("signs")
    said = {}
    for level in (2, 3, 5):
        for _ in range(1500):
            q, t = ar.arithmetic_problem(rng, level)
            if "(-" in ar.expression(t):
                said[q] = t
    bare = [q for q in said if re.search(r"[-+] -\d", q)]
    bracketed = [q for q in said if re.search(r"[-+] \(-\d", q)]
    worded = [q for q in said if re.search(r"(plus|minus|and|from|by|to) -\d", q)]
    assert len(bare) > 40 and len(bracketed) > 40 and len(worded) > 20
    assert any(isinstance(t[1], tuple) for t in said.values())  # also inside the longer level-5 forms
    for q, t in said.items():
        assert ar.solution(t).splitlines()[0] == ar.expression(t) and "(-" in ar.expression(t), q
        assert not any(w in q for w in ar.STEPPING), q


def test_symbols_are_also_typed_without_spaces_and_restated_with_them():
    """ "47+36", "(3+1)*3" and "7+-9" as people type them: about a sixth of the symbolic questions, each answered
    with the same first line as its spaced twin ("47 + 36")."""
    rng = random.Random("compact")
    symbolic = compact = 0
    for level in (1, 2, 3, 4, 5):
        for _ in range(600):
            q, t = ar.arithmetic_problem(rng, level)
            e = ar.expression(t)
            if not isinstance(t, tuple) or not re.search(r"\d [-+*/] [-\d(]", e):
                continue
            tight = re.sub(r" ([-+*/]) ", r"\1", e)
            forms = {tight, tight.replace("*", "x"), tight.replace("*", "×").replace("/", "÷"),
                     ar._BRACKETED_NEGATIVE.sub(r"\1", tight)}
            if any(f in q for f in forms):
                compact += 1
                assert ar.solution(t).splitlines()[0].startswith(e) and " = " not in q, q
            symbolic += any(f in q for f in forms) or e in q or ar._BRACKETED_NEGATIVE.sub(r"\1", e) in q
    assert 0.1 < compact / symbolic < 0.25, (compact, symbolic)


def test_other_families_show_their_steps_too():
    p = make_problem("percent", random.Random(1), 4)  # "A shirt costs $50 ... 50% off": three operations
    assert [line for line in p.solution.splitlines() if line.count(" ") == 4] == [
        "50 * 50 = 2500", "2500 / 100 = 25", "10 - 5 = 5", "4 - 2 = 2", "50 - 25 = 25"]
    check_steps(p.solution, p.record()["answer"])


def test_levels_cover_the_forms():
    def sample(level, n=300):
        rng = random.Random(f"forms:{level}")
        return [ar.draw_tree(rng, level) for _ in range(n)]

    def leaves(t):
        return [t] if not isinstance(t, tuple) else leaves(t[1]) + leaves(t[2])

    one = sample(1)
    assert all(0 <= x <= 9 for t in one for x in leaves(t)) and all(ar.value(t) >= 0 for t in one)
    two = sample(2)
    assert any(x >= 10 for t in two for x in leaves(t)) and any(ar.value(t) < 0 for t in two)
    signed = [t for t in two if min(leaves(t)) < 0 or ar.value(t) < 0]     # the one-digit signed facts
    assert all(abs(x) <= 9 for t in signed for x in leaves(t)) and 0.1 < len(signed) / len(two) < 0.35
    rng = random.Random("pairs")
    pairs = [ar._signed_pair(rng) for _ in range(2000)]                       # every shape, equal operands too
    assert all(abs(x) <= 9 for t in pairs for x in leaves(t)) and all(ar.value(t) < 0 or min(leaves(t)) < 0
                                                                     for t in pairs)
    three = [ar.expression(t) for t in sample(3)]
    assert any("(" in e for e in three) and any(e.startswith("-") or "(-" in e for e in three)
    assert any(re.search(r"\d{3}", e) for e in three) and any("*" in e for e in three) and any("/" in e for e in three)
    four = sample(4)
    assert {len(leaves(t)) for t in four} >= {3, 4, 5}


def test_phrasings_are_many_and_keep_the_numbers():
    rng = random.Random(0)
    questions = {}
    for _ in range(2000):
        q, t = ar.arithmetic_problem(rng, 2)
        questions[template(q)] = (q, t)
    assert len(questions) >= 40  # dozens of sentence patterns at one level
    for q, t in questions.values():  # every operand of the expression is said in the question
        numbers = [int(x) for x in re.findall(r"\d+", q)]
        assert sorted(numbers) == sorted(abs(int(x)) for x in re.findall(r"\d+", ar.expression(t))), q


def test_half_the_adding_and_taking_away_stories_are_told_from_parts_in_many_shapes():
    """`composed_story` tells a +/- story with its numbers in the expression's order, in hundreds of sentence
    patterns (the templates alone give ~20 per level); "left" is asked only after something was taken away."""
    rng = random.Random(0)
    stories = [ar.story_problem(rng, 3) for _ in range(3000)]
    adding = [(q, t) for q, t in stories if not set(ar.expression(t)) & set("*/")]
    templates = {re.sub(r"\b(" + "|".join(ar.THINGS) + r")\b", "T", template(q)) for q, _ in adding}
    templated = {template(s[0].format(n="P", a=1, b=1, c=1)) for s in ar.STORIES}
    composed = [(q, t) for q, t in adding if template(q) not in templated]
    assert 0.35 < len(composed) / len(adding) < 0.65
    assert len(templates) >= 300
    for q, t in composed:  # the numbers are said in the order the expression uses them
        assert [int(x) for x in re.findall(r"\d+", q)] == [abs(int(x)) for x in re.findall(r"\d+", ar.expression(t))], q
    for shape in ("a+b", "a+b+c", "a-c+b"):  # the last step adds: nothing is "left"
        for seed in range(200):
            q = ar.composed_story(random.Random(seed), shape, 7, 5, 3)
            assert not re.search(r"\b(left|remain)\b", q), q


def test_about_a_third_of_the_questions_come_framed_in_words_no_chat_prompt_opens_with():
    rng = random.Random(1)
    questions = [ar.arithmetic_problem(rng, 2)[0] for _ in range(1000)]
    framed = [q for q in questions if q.startswith(tuple(ar.PREAMBLES)) or q.endswith(tuple(ar.SUFFIXES))]
    assert 0.25 < len(framed) / len(questions) < 0.45
    assert {p for q in framed for p in ar.PREAMBLES if q.startswith(p)} == set(ar.PREAMBLES)
    words = " ".join(ar.PREAMBLES + ar.SUFFIXES).lower()
    assert not any(w in words for w in ("hello", "hi!", "thank", "good morning", "please"))


def test_some_questions_ask_for_the_form_of_the_answer_in_words_instar_eval_does_not_use():
    from instar.train.rewards import INSTRUCTION

    rng = random.Random(2)
    questions = [ar.arithmetic_problem(rng, level)[0] for level in (2, 3) for _ in range(1500)]
    suffixed = [q for q in questions if q.endswith(tuple(ar.SUFFIXES + ar.FORM_REQUESTS))]
    asked = [q for q in suffixed if q.endswith(tuple(ar.FORM_REQUESTS))]
    assert 0.2 < len(asked) / len(suffixed) < 0.45
    assert not any(INSTRUCTION in q for q in questions)  # the forms yardstick's "instructed" stays unseen


def test_negative_results_never_get_counting_phrasings():
    rng = random.Random(5)
    for _ in range(500):
        q, t = ar.arithmetic_problem(rng, 3)
        if ar.value(t) < 0:
            assert "left" not in q and "difference" not in q, q


# --- the SFT math set ----------------------------------------------------------------------------------------
def test_sft_math_set_mixes_levels_excludes_held_out_and_ends_in_the_answer_line():
    held = {r["question"] for r in heldout_problems(200, ["arithmetic", "story"], 1)}
    records = math_sft_records(1000, 0, ["arithmetic", "story"], "", exclude=held)
    assert 900 <= len(records) <= 1000  # level 1 runs short of distinct problems, the rest fill up
    asked = [r["messages"][0]["content"] for r in records]
    assert len(set(asked)) == len(asked) and not set(asked) & held
    for r in records[:200]:
        reply = r["messages"][1]["content"]
        assert extract_answer(reply) is not None and reply.splitlines()[0] != reply.splitlines()[-1]
    assert abs(sum(LEVEL_WEIGHTS.values()) - 1) < 1e-9
    with_instruction = math_sft_records(5, 0, ["arithmetic"], "Show steps.")
    assert all(r["messages"][0]["content"].endswith(" Show steps.") for r in with_instruction)


# --- the prompt form travels with the run --------------------------------------------------------------------
def test_eval_asks_a_run_the_way_it_was_trained(tmp_path):
    from instar.train.evaluate import math_prompt_form
    from instar.train.rewards import INSTRUCTION, save_prompt_form

    def run(name, config):
        d = tmp_path / "pipe" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"config": config}))
        return d

    pre = run("pretrain", {"model": "scratch"})
    sft = run("sft", {"model": str(pre)})
    grpo = run("grpo", {"model": str(sft), "instruction": "Think, then answer."})
    assert math_prompt_form(grpo) == "Think, then answer."      # its own config
    assert math_prompt_form(sft) == INSTRUCTION                  # nothing kept: the default
    save_prompt_form(tmp_path / "pipe", "")
    assert math_prompt_form(sft) == ""                           # the pipeline's record, beside the stage runs
    assert math_prompt_form(tmp_path / "elsewhere") == INSTRUCTION


def test_tokenizer_splits_numbers_into_digits():
    from instar.train.tokenizer import train_tokenizer

    tok = train_tokenizer(["I have 1234 apples and 56 pears. 1234 1234 1234 56 56 56."] * 40, vocab_size=300)
    pieces = [p.replace("Ġ", "") for p in tok.tokenize("Add 1234 and 56.")]
    assert [p for p in pieces if p.isdigit()] == ["1", "2", "3", "4", "5", "6"]
    assert tok.decode(tok("23 + 48 = 71")["input_ids"]) == "23 + 48 = 71"


# --- the teacher rewords, instar keeps the numbers ---------------------------------------------------------------
def test_rephrase_keeps_numbers_and_answer_and_rejects_changed_numbers(store):
    from instar.generate.backends import FakeBackend
    from instar.generate.pipeline import GenerateConfig, generate
    from instar.generate.rephrase import numbers

    def reword(messages):  # a scripted teacher: good rewrites, except it garbles every third item's numbers
        question = messages[-1]["content"].split("Question: ", 1)[1].split("\n")[0]
        calls.append(question)
        if len(calls) % 3 == 0:
            question = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), question, count=1)
        return json.dumps({"question": "Here is a puzzle for you: " + question})

    calls = []
    result = generate(store, GenerateConfig(kind="math", count=6, source="rephrase"), FakeBackend(reword))
    assert result.accepted == 6 and result.reasons.get("rephrase: numbers changed", 0) >= 2
    for r in store.records("math"):
        assert r["question"].startswith("Here is a puzzle for you: ")
        original = r["question"].removeprefix("Here is a puzzle for you: ")
        assert original in calls and r["verified_by"] == "procedural"
        check_steps(r["solution"], r["answer"])  # answer and steps are instar's, for the original numbers
    assert numbers("It is -4 degrees, then 1,200 and 3.5.") == [-4, 1200, 3.5]


def test_grpo_mixed_batches_span_levels_and_never_hold_out_problems():
    from instar.train.grpo import Config, Problems

    cfg = Config(families=["arithmetic", "story"], batch_size=16, mixed_levels=0.5, eval_problems=200)
    problems = Problems(cfg, store=None)
    held = {r["question"] for r in problems.heldout}
    levels = []
    for step in range(20):
        batch = problems.batch(step, 2)
        assert len(batch) == 16 and not held & {r["question"] for r in batch}
        assert batch == problems.batch(step, 2)  # a pure function of the step: exact resume
        assert {r["difficulty"] for r in batch[:8]} == {2}
        levels += [r["difficulty"] for r in batch[8:]]
    assert set(levels) == {1, 2, 3, 4, 5}


def test_the_reasoning_gym_yardstick_is_right_and_apart_from_training():
    """reasoning-gym's 200 problems: every answer recomputed from its expression by the safe evaluator, none of them
    a question a training generator emits, all refused by the math SFT set, readable by `instar eval --data`."""
    from instar import evalsets
    from instar.datasets.jsonl import read_records

    rows = evalsets.reasoning_gym()
    assert len(rows) == 200 and len({r["question"] for r in rows}) == 200
    for r in rows:
        assert safe_eval(r["solution"]) == parse_number(r["answer"]), r
    assert {r["family"] for r in rows} == {"rg_simple", "rg_natural", "rg_products", "rg_chain", "rg_three_digit"}
    assert not every_generated_question() & {r["question"] for r in rows}
    assert {r["question"] for r in rows} <= external_questions()
    kind, records = read_records(str(evalsets.path("reasoning_gym")))
    assert kind == "math" and len(records) == 200


def test_the_forms_yardstick_is_the_hand_written_set_written_other_ways():
    """`forms.jsonl` is what `bench/evalset_forms.py` writes now (no stale copy), every answer recomputes, and no
    training generator asks one of its questions."""
    import importlib.util

    from instar import evalsets
    from instar.train.rewards import INSTRUCTION

    bench = Path(__file__).resolve().parent.parent / "bench" / "evalset_forms.py"
    spec = importlib.util.spec_from_file_location("evalset_forms", bench)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = [json.loads(line) for line in evalsets.path("forms").read_text().splitlines()]
    assert rows == script.rows()
    counts = {f: sum(r["family"] == f for r in rows) for f in ("unspaced", "words", "instructed")}
    assert counts == {"unspaced": 109, "words": 41, "instructed": 93}
    for r in rows:
        assert safe_eval(r["solution"]) == parse_number(r["answer"]), r
        if r["family"] == "unspaced":
            assert not re.search(r"\d [-+*/] [-\d(]", r["question"]) and re.search(r"\d[-+*/][-\d(]", r["question"])
        if r["family"] == "words":
            assert not re.search(r"\d", r["question"]), r
        if r["family"] == "instructed":
            assert r["question"].endswith(" " + INSTRUCTION)
    assert not every_generated_question() & {r["question"] for r in rows}
    assert {r["question"] for r in rows} <= external_questions()


def test_the_external_score_asks_both_sets(monkeypatch):
    """`external_arithmetic` (the stages' "what generalises" math rows) scores the hand-written set and the
    reasoning-gym one: a few rows of each, a tiny random model, 4 new tokens."""
    from train_fixtures import tiny_model, tiny_tokenizer

    from instar import evalsets
    from instar.train import evaluate

    asked = []
    real = evaluate.evaluate_math
    monkeypatch.setattr(evaluate, "EXTERNAL_MATH_TOKENS", 4)
    monkeypatch.setattr(evaluate, "evaluate_math", lambda m, tok, rows, *a: asked.append(len(rows)) or real(m, tok, rows, *a))
    monkeypatch.setattr(evalsets, "arithmetic", lambda: external()[:5])
    monkeypatch.setattr(evalsets, "reasoning_gym", lambda: evalsets._rows.__wrapped__("reasoning_gym")[:3])
    tok = tiny_tokenizer()
    values = evaluate.external_arithmetic(tiny_model(tok), tok)
    assert asked == [5, 3] and {"ext_math_acc", "ext_math_format", "ext_rg_acc"} <= set(values)
    assert set(values) <= {"ext_math_acc", "ext_math_format", "ext_rg_acc", "ext_math_steps"}  # steps: if any written
    assert all(0.0 <= v <= 1.0 for v in values.values())


def test_math_scores_count_the_worked_steps_that_are_right(monkeypatch):
    """`step_accuracy` (and the external rows' `ext_math_steps`): the share of checked worked-step results that
    are right over all replies, whatever their final answers; absent when no reply has a step."""
    from types import SimpleNamespace

    import torch

    from instar.train import evaluate

    replies = ["4 + 8 = 12\n2 + 2 = 5\nAnswer: 125", "7 - 3 = 4\nAnswer: 4", "Answer: 9"]
    fake = SimpleNamespace(texts=replies)
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: fake)
    monkeypatch.setattr(evaluate, "stopped", lambda gen, tok: torch.ones(len(gen.texts), dtype=torch.bool))
    monkeypatch.setattr(evaluate, "render_chat", lambda *a, **k: ([0], [0]))
    rows = [{"question": "q", "answer": a} for a in ("125", "4", "9")]
    out = evaluate.evaluate_math(None, None, rows)
    assert out["accuracy"] == 1.0 and out["step_accuracy"] == 2 / 3
    fake.texts = ["Answer: 1", "Answer: 4", "Answer: 9"]
    assert "step_accuracy" not in evaluate.evaluate_math(None, None, rows)


def test_the_packaged_yardstick_reads_as_math_records():
    from instar import evalsets
    from instar.datasets.jsonl import read_records

    kind, records = read_records(str(evalsets.path("arithmetic")))
    assert kind == "math" and len(records) == len(external())


def test_report_card_shows_the_external_rows_and_the_teacher_reference(store, tmp_path):
    import io

    from rich.console import Console

    from instar.datasets import runs
    from instar.report_card import report

    pid = runs.start_run(store, kind="pipeline", stage="pipeline", config={}, out_dir=str(tmp_path))
    rid = runs.start_run(store, kind="train", stage="grpo", config={}, out_dir=str(tmp_path / "grpo"), parent_id=pid)
    start, end = {"accuracy": 0.05, "ext_math_acc": 0.0612, "ext_math_format": 0.99}, {"accuracy": 0.11,
                                                                                       "ext_math_acc": 0.0791,
                                                                                       "ext_math_format": 1.0}
    runs.finish_run(store, rid, summary={"stage": "grpo", "run_id": rid, "config": {}, "data": {}, "start": start,
                                         "end": end})
    runs.finish_run(store, pid, summary={"stages": ["grpo"]})
    con = Console(file=io.StringIO(), width=220, color_system=None)
    report(store, pid, con, html_out=tmp_path / "card.html")
    text = con.file.getvalue()
    assert "external arithmetic: accuracy" in text and "0.0612" in text and "0.0791" in text
    assert "reference, external arithmetic: the embedded teacher" in text
    assert "reference, external arithmetic" in (tmp_path / "card.html").read_text()


def test_eval_help_names_every_packaged_yardstick():
    from typer.testing import CliRunner

    from instar import evalsets
    from instar.cli import app

    result = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert all(name in result.output for name in evalsets.EVALSETS), result.output
