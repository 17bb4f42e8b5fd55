"""Tests of lib/tasks.py: the verifiers, evaluate, and the JSONL readers and writers.

Oracles: hand-made cases, each answer worked out by hand (extract_answer, is_correct, final_answer, verify,
completion_style, step_lines, arith's error reasons and its documented bounds at their edges, fit_prompts' edges
and its one printed line); Python's own operators on the same expression tree (arith), and exact integers and
Fractions for its power guard; a watchdog (hostile expressions are refused quickly) and arbitrary extreme
expressions (only the documented error); for the Countdown verifier, every expression tree on up to 3 leaves
valued with Fractions as it is built (no parser involved) and exact products; counts done by hand over a stub
generate's script (evaluate's accuracy, pass@k, truncation, mean length and styles; a chat tokenizer's own stop
and pad ids) and a tiny model's own greedy and seeded sampled completions (M.generate alone); a brute-force
filter (fit_prompts); and json itself (write_jsonl round trips); a malformed file's error names file:line.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tasks.py
"""
from __future__ import annotations

import io
import math
import operator
import os
import sys
from collections import Counter
from fractions import Fraction
from itertools import product

import numpy as np
import pytest
import tiktoken
import torch
from hypothesis import assume, given, settings, strategies as st

import model as M
from lib import cli, tasks, tokenizer
from helpers import ENC, EOT, PAD, tiny_model, watchdog

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Verifier: #### answers, safe arithmetic, completion styles
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,answer", [
    ("#### 42", "42"), ("#### 1,234", "1234"), ("so 3+4=7\n#### 7", "7"), ("#### -5", "-5"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("#### 1\nmore\n#### 2.5.", "2.5"), ("no answer here", None), ("####   ", None), ("####12 apples", "12"),
    ("#### X", "X"), ("#### (B).", "(B)"),             # a non-numeric answer: only a trailing '.' is dropped
])
def test_extract_answer(text, answer):
    assert tasks.extract_answer(text) == answer


@pytest.mark.parametrize("completion,answer,ok", [
    ("#### 42", 42, True), ("#### 42", "42", True), ("#### 42.0", "42", True), ("#### 1,234", "1234", True),
    ("#### 1234", "1,234", True), ("#### 41", "42", False), ("42", "42", False), ("#### -3", -3, True),
    ("#### 4 2", "42", False), ("#### 0.5", "0.50", True),
    ("#### B", "B", True), ("#### B", "C", False),       # not numbers: compared as text
    ("#### seven", 7, False), ("#### 7", "seven", False),  # a number and a word: unequal, never a float() of a word
])
def test_is_correct(completion, answer, ok):
    assert tasks.is_correct(completion, answer) is ok


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
       "//": operator.floordiv, "%": operator.mod}


leaves = st.one_of(st.integers(0, 999).map(lambda n: (str(n), n)),
                   st.integers(0, 99).map(lambda n: (f"{n / 4}", n / 4)))


def extend(children):
    binary = st.tuples(children, st.sampled_from(sorted(OPS)), children).map(
        lambda t: (f"({t[0][0]} {t[1]} {t[2][0]})", ("op", t[1], t[0][1], t[2][1])))
    power = st.tuples(children, st.integers(0, 3)).map(lambda t: (f"({t[0][0]})**{t[1]}", ("pow", t[0][1], t[1])))
    negate = children.map(lambda c: (f"(-{c[0]})", ("neg", c[1])))
    return st.one_of(binary, power, negate)


expressions = st.recursive(leaves, extend, max_leaves=8)


def python_value(tree):
    """The reference: Python's own operators on the expression tree (no parsing involved)."""
    if not isinstance(tree, tuple):
        return tree
    if tree[0] == "neg":
        return -python_value(tree[1])
    if tree[0] == "pow":
        return python_value(tree[1]) ** tree[2]
    a, b = python_value(tree[2]), python_value(tree[3])
    result = OPS[tree[1]](a, b)
    if abs(result) > 1e40:
        raise OverflowError
    return result


@given(expr=expressions)
def test_arith_agrees_with_python_arithmetic(expr):
    text, tree = expr
    assume(len(text) <= 200)
    try:
        expected = python_value(tree)
    except ZeroDivisionError:
        with pytest.raises(ValueError):
            tasks.arith(text)
        return
    except OverflowError:
        assume(False)
    assume(abs(expected) < 1e40)
    got = tasks.arith(text)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("expr", [
    "x", "x + 1", "__import__('os')", "abs(-1)", "(1).real", "'a' * 3", "[1, 2]", "1 if 1 else 2", "lambda: 1",
    "True + 1", "1j", "1 < 2", "9**9**9", "2**10000", "10**100", "1e400", "99**99", "(2**200) * (2**200)",
    "(" * 100 + "1" + ")" * 100, "-" * 150 + "1", "1+" * 99 + "1", "1" * 500, "1+1" * 100, "1/0", "5 // 0",
    "5 % 0", "0**-1", "1; 2", "", "import os", "x = 1",
])
def test_arith_rejects_everything_else_quickly(expr):
    with watchdog(5), pytest.raises(ValueError):
        tasks.arith(expr)


def test_arith_returns_a_real_number():
    """arith's contract is int | float; a negative base to a fractional power is complex in Python."""
    try:
        value = tasks.arith("(-8) ** 0.5")
    except ValueError:
        return
    assert isinstance(value, (int, float)), (
        f"BUG (requests_model.md #2): arith('(-8) ** 0.5') returned {value!r} (complex), not a ValueError")


@pytest.mark.parametrize("expr,reason", [
    ("1" * 201, "expression longer than 200 characters"),
    ("1 +", "not an arithmetic expression (SyntaxError)"),
    ("x + 1", "unsupported syntax: Name"),
    ("abs(-1)", "unsupported syntax: Call"),
    ("-" * 33 + "1", "expression nested too deeply"),
    ("1e400", "value out of range"),                     # the literal is inf
    ("1e308 * 10", "value out of range"),                # a float result past the largest float is inf
    ("0.01 ** -200", "value out of range"),              # Python raises OverflowError for this power
    ("2 ** 300", "exponent too large"),
    ("1 / 0", "division by zero"), ("5 // 0", "division by zero"), ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("(-8) ** 0.5", f"not a real number: {(-8) ** 0.5!r}"),
])
def test_arith_errors_say_their_reason(expr, reason):
    """The docstring's promise: a refused expression raises ValueError with the reason (the message is what a
    user reads); each case's reason worked out by hand."""
    with pytest.raises(ValueError) as info:
        tasks.arith(expr)
    assert str(info.value) == reason


def nested(shape: str, depth: int) -> tuple[str, int]:
    """An expression whose deepest number sits `depth` operators below the root, and its value worked out by
    hand: a chain of unary minuses, a left-leaning sum 1+1+...+1, a right-leaning sum 1+(1+(...))."""
    if shape == "unary":
        return "-" * depth + "1", (-1) ** depth
    if shape == "left":
        return "1+" * depth + "1", depth + 1
    return "1+(" * (depth - 1) + "1+1" + ")" * (depth - 1), depth + 1


@pytest.mark.parametrize("shape", ["unary", "left", "right"])
def test_arith_accepts_nesting_32_and_refuses_33(shape):
    """The documented bound 'nesting 32', counted in operators from the root, down either operand or a unary."""
    text, value = nested(shape, 32)
    assert tasks.arith(text) == value
    with pytest.raises(ValueError, match="nested too deeply"):
        tasks.arith(nested(shape, 33)[0])


def test_arith_accepts_200_characters_and_values_up_to_1e60_and_refuses_one_more():
    """The documented bounds at their edges: 200 characters (parentheses add no nesting), |value| <= 1e60."""
    assert tasks.arith("(" * 99 + "12" + ")" * 99) == 12                    # 200 characters
    with pytest.raises(ValueError, match="longer than 200"):
        tasks.arith("(" * 99 + "123" + ")" * 99)
    assert tasks.arith("1" + "0" * 60) == 10 ** 60
    assert tasks.arith("-1" + "0" * 60) == -10 ** 60
    for over in ("1" + "0" * 60 + "+1", "-1" + "0" * 60 + "-1", "10" + "0" * 60):
        with pytest.raises(ValueError, match="value out of range"):
            tasks.arith(over)


@given(value=st.integers(-10 ** 6, 10 ** 6) | st.floats(-1e6, 1e6, allow_nan=False))
def test_arith_unary_plus_is_the_identity_and_minus_the_negation(value):
    text = repr(value)
    assert tasks.arith(f"+{text}") == value and tasks.arith(f"+({text})") == value
    assert tasks.arith(f"-({text})") == -value and tasks.arith(f"+-({text})") == -value


def test_arith_powers_are_pythons_own_up_to_the_exponent_and_value_bounds():
    """Brute force over bases and exponents around both bounds, each case's fate worked out with Python's own
    a ** b (exact for integers): an exponent above 256 in magnitude is refused before computing ('exponent too
    large'), 0 to a negative power is 'division by zero', a power past 1e60 (or past a float's range) is 'value
    out of range', and every other power is Python's a ** b exactly, of the same type: 1 ** 200, 2 ** 126,
    10 ** -61 and (-1) ** 256 included."""
    exponents = [*range(0, 64), 77, 78, 99, 100, 110, 111, 125, 126, 150, 151, 199, 200, 255, 256, 257, 300,
                 -1, -2, -3, -60, -61, -256, -257]
    bases = [*range(-12, 13), 99, 100, -99, 10 ** 30, 2 * 10 ** 30, 0.5, -0.5, 1.5, 2.5, 0.1]
    n_exact = n_refused = n_past = 0
    for a, b in product(bases, exponents):
        text = f"({a}) ** ({b})"
        if abs(b) > 256 or a == 0 and b < 0:
            with pytest.raises(ValueError) as info:
                tasks.arith(text)
            assert str(info.value) == ("exponent too large" if abs(b) > 256 else "division by zero"), text
            n_refused += 1
            continue
        try:
            value = a ** b
        except OverflowError:            # a float power past ~1.8e308
            value = math.inf
        if abs(value) > 10 ** 60:
            with pytest.raises(ValueError) as info:
                tasks.arith(text)
            assert str(info.value) == "value out of range", text
            n_past += 1
        else:
            assert tasks.arith(text) == value and type(tasks.arith(text)) is type(value), text
            n_exact += 1
    assert n_exact > 1000 and n_refused > 100 and n_past > 500
    for text, value in (("1 ** 200", 1), ("2 ** 126", 2 ** 126), ("(-1) ** 256", 1), ("10 ** 60", 10 ** 60)):
        assert tasks.arith(text) == value


@pytest.mark.parametrize("text,style", [
    ("3+4=7\n#### 7", "worked"),
    ("We add.\n12*3=36\n36-6=30\n#### 30", "worked"),
    ("#### 7", "bare"),
    ("Just guess.\n#### 7", "bare"),
    ("3+4=8\n#### 8", "wrong_step"),
    ("2*3=6\n6+1=8\n#### 8", "wrong_step"),
    ("import os=0\n#### 0", "wrong_step"),
    ("3+4=7", "no_answer"),
    ("", "no_answer"),
])
def test_completion_style_classifies_constructed_cases(text, style):
    assert tasks.completion_style(text) == style


def test_step_lines_reads_only_lines_before_the_answer():
    assert tasks.step_lines("a\n3+4=7\n10 - 3 = 7\nx=y\n#### 7\n1+1=2") == [("3+4", "7"), ("10 - 3", "7")]


def test_a_step_line_is_split_at_its_last_equals_sign():
    """'lhs=rhs' with an integer rhs: only the text after the LAST '=' can be that integer, so a line with two
    '=' is a step whose lhs holds the first one (and a line whose last '=' is not followed by an integer is none)."""
    assert tasks.step_lines("x = 2+3 = 5\n#### 5") == [("x = 2+3", "5")]
    assert tasks.step_lines("5 = 2+3\n#### 5") == []


addends = st.tuples(st.integers(0, 99), st.integers(0, 99))


@given(before=st.lists(addends, max_size=3), between=st.lists(addends, max_size=3),
       after=st.lists(addends, min_size=1, max_size=3), answered=st.booleans())
def test_step_lines_are_the_equations_before_the_last_answer_line(before, between, after, answered):
    """Built from hand-made equations 'a+b=c': with '####' lines, exactly the steps above the LAST one count
    (those between two answers too; none after the last); with none, every line counts, the last one whole."""
    def lines(pairs):
        return [f"{a}+{b}={a + b}" for a, b in pairs]
    if answered:
        text = "\n".join(lines(before) + ["#### 1"] + lines(between) + ["#### 2"] + lines(after))
        expected = before + between
    else:
        text, expected = "\n".join(lines(before + after)), before + after
    assert tasks.step_lines(text) == [(f"{a}+{b}", str(a + b)) for a, b in expected]


@pytest.mark.parametrize("answer,final", [
    (5, "5"), (1234, "1234"), ("1,234", "1234"), (" 1,234,567 ", "1234567"), ("12.5", "12.5"),
    ("3+4=7\n#### 1,072", "1072"), ("#### 7\n#### 8.", "8"), ("work\n####", ""),
])
def test_final_answer_is_the_answer_text_without_commas_or_the_number_after_the_last_marker(answer, final):
    assert tasks.final_answer(answer) == final


# ----------------------------------------------------------------------------------------------
# Verifier on bad input: arithmetic that overflows, arbitrary text
# ----------------------------------------------------------------------------------------------

extreme_numbers = st.sampled_from(["0", "1", "-1", "0.01", "1e-300", "1e300", "1e308", "9" * 60, "0.5", "2",
                                   "10", "256", "3.5", "1e-5", "123456789"])


extreme_trees = st.recursive(extreme_numbers, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), inner).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
    inner.map(lambda x: f"-{x}")), max_leaves=8)


@given(expr=extreme_trees)
def test_arith_raises_only_its_documented_error_on_extreme_constants(expr):
    """Arbitrary expression trees with extreme constants (overflow, underflow, huge powers, division by
    tiny numbers) give a real number or ValueError: never OverflowError, ZeroDivisionError or anything else."""
    try:
        value = tasks.arith(expr)
    except ValueError:
        return
    assert isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= tasks.ARITH_MAX_ABS


@given(text=st.text(max_size=80) | st.sampled_from(["0.01**-200=1\n#### 1", "1e308*10=0\n#### 0", "(-8)**0.5=0\n#### 0"]))
def test_completion_style_never_raises_on_arbitrary_text(text):
    assert tasks.completion_style(text) in ("worked", "bare", "wrong_step", "no_answer")


# ----------------------------------------------------------------------------------------------
# evaluate: the shared held-out protocol
# ----------------------------------------------------------------------------------------------

@settings(max_examples=10)
@given(table=st.lists(st.lists(st.sampled_from(["right", "wrong", "none", "long"]), min_size=3, max_size=3),
                      min_size=1, max_size=5),
       samples=st.integers(1, 3), batch_size=st.integers(1, 4))
def test_evaluate_counts_accuracy_and_pass_at_k_against_brute_force(table, samples, batch_size):
    """A stub generate returns scripted completions per (prompt, sample); evaluate's numbers must equal
    the counts done by hand over the script."""
    rows = [{"prompt": f"Q{i}: ", "answer": str(10 + i), "difficulty": i % 2} for i in range(len(table))]
    script = {f"Q{i}: ": [kinds[s] for s in range(samples)] for i, kinds in enumerate(table)}
    texts = {"right": lambda a: f"1+1=2\n#### {a}", "wrong": lambda a: f"#### {int(a) + 1}",
             "none": lambda a: "I do not know", "long": lambda a: "1+1=3\n#### " + a}
    seen = {}

    def stub_generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                      stop_ids=(EOT,), pad_id=PAD, generator=None):
        outs, finished = [], []
        for p in prompts:
            prompt = tokenizer.decode(ENC, p)
            s = seen.get(prompt, 0)
            seen[prompt] = s + 1
            kind = script[prompt][s]
            ids = tokenizer.encode(ENC, texts[kind](str(10 + int(prompt[1:-2]))))
            finished.append(kind != "long")
            outs.append(ids + [EOT] if kind != "long" else ids)
        N = max(len(o) for o in outs)
        tokens = torch.full((len(outs), N), pad_id)
        for i, o in enumerate(outs):
            tokens[i, :len(o)] = torch.tensor(o)
        return M.Generation(tokens, torch.zeros(tokens.shape), torch.tensor([len(o) for o in outs]),
                            torch.tensor(finished))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "generate", stub_generate)
        result = tasks.evaluate(None, ENC, rows, max_new_tokens=64, temperature=1.0 if samples > 1 else 0.0,
                                samples=samples, batch_size=batch_size)
    kinds = [k for r in rows for k in script[r["prompt"]]]
    good = [k in ("right", "long") for k in kinds]
    n = len(kinds)
    assert result["n"] == n and result["accuracy"] == pytest.approx(sum(good) / n)
    p = sum(good) / n
    assert result["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    assert result["pass_at_k"] == pytest.approx(
        sum(any(k in ("right", "long") for k in script[r["prompt"]]) for r in rows) / len(rows))
    assert result["truncated"] == pytest.approx(kinds.count("long") / n)
    new_tokens = [len(tokenizer.encode(ENC, texts[k](str(10 + i)))) + (k != "long")   # the end-of-text token
                  for i, r in enumerate(rows) for k in script[r["prompt"]]]
    assert result["mean_length"] == pytest.approx(sum(new_tokens) / n)
    assert result["styles"]["no_answer"] == pytest.approx(kinds.count("none") / n)
    assert result["styles"]["wrong_step"] == pytest.approx(kinds.count("long") / n)
    assert result["styles"]["bare"] == pytest.approx(kinds.count("wrong") / n)
    assert result["styles"]["worked"] == pytest.approx(kinds.count("right") / n)
    for d in (0, 1):
        mine = [g for r in rows if r["difficulty"] == d for g in
                [k in ("right", "long") for k in script[r["prompt"]]]]
        if mine:
            assert result["per_difficulty"][d] == pytest.approx(sum(mine) / len(mine))
    assert len(result["completions"]) == n


def test_evaluate_reports_rows_with_and_without_a_difficulty_numbers_first_then_labels():
    """A file where only some rows name a difficulty (the others count under "all"), or name it by a word, is
    reported in one order, numbers ascending then labels, not refused by sorting an int beside a str."""
    rows = [{"prompt": "1+2=", "answer": "3", "difficulty": 10}, {"prompt": "2+2=", "answer": "4", "difficulty": 2},
            {"prompt": "5+5=", "answer": "10"}, {"prompt": "6+6=", "answer": "12", "difficulty": "hard"}]
    report = tasks.evaluate(tiny_model(), ENC, rows, max_new_tokens=4)
    assert list(report["per_difficulty"]) == [2, 10, "all", "hard"]
    assert all(0.0 <= accuracy <= 1.0 for accuracy in report["per_difficulty"].values())


def test_evaluate_on_a_tiny_model_matches_its_own_greedy_completions():
    """With a real (untrained) model: evaluate's completions are the greedy continuations of each
    prompt alone, and a row whose answer is set to its own extracted answer would count as correct."""
    model = tiny_model(seed=15)
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "#### ", "answer": "0"}]
    result = tasks.evaluate(model, ENC, rows, max_new_tokens=6, batch_size=2)
    for row, text in zip(rows, result["completions"]):
        alone = M.generate(model, [tokenizer.encode(ENC, row["prompt"])], 6, temperature=0.0)
        assert text == tokenizer.decode(ENC, alone.tokens[0])
    expected = np.mean([tasks.is_correct(t, r["answer"]) for t, r in zip(result["completions"], rows)])
    assert result["accuracy"] == expected and 0 <= result["truncated"] <= 1
    assert result["per_difficulty"] == {"all": expected}          # rows without a difficulty are reported as 'all'


def test_a_long_evaluation_prints_its_progress_and_a_short_one_prints_nothing(monkeypatch, capsys):
    """A real model on a CPU evaluates for minutes: after 10 s each batch but the last prints how far it got."""
    model, rows = tiny_model(seed=15), [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    tasks.evaluate(model, ENC, rows, max_new_tokens=2, batch_size=2)
    assert capsys.readouterr().out == ""
    clock = iter(range(0, 1000, 11))                     # every reading of the clock 11 s after the last
    monkeypatch.setattr(tasks.time, "perf_counter", lambda: next(clock))
    tasks.evaluate(model, ENC, rows, max_new_tokens=2, batch_size=2)
    assert capsys.readouterr().out.splitlines() == ["  evaluating: 2/5 completions in 11 s",
                                                    "  evaluating: 4/5 completions in 22 s"]


def test_evaluate_samples_with_the_callers_generator():
    """Sampled completions come from the generator passed in, not the global RNG: evaluate's completions are the
    model's own samples under that seed (M.generate called alone), whatever the global seed, and another seed
    samples other completions (so the comparison can tell them apart)."""
    model = tiny_model(seed=16)
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "9*9=", "answer": "81"}]

    def sampled(seed, global_seed):
        torch.manual_seed(global_seed)
        return tasks.evaluate(model, ENC, rows, max_new_tokens=8, temperature=1.0, samples=2,
                              generator=torch.Generator().manual_seed(seed))["completions"]
    alone = M.generate(model, [tokenizer.encode(ENC, r["prompt"]) for r in rows for _ in range(2)], 8, temperature=1.0,
                       generator=torch.Generator().manual_seed(3))
    assert sampled(3, global_seed=0) == sampled(3, global_seed=1) == [tokenizer.decode(ENC, t) for t in alone.tokens]
    assert sampled(4, global_seed=0) != sampled(3, global_seed=0)


def chat_bytes_tokenizer():
    """The byte-level tokenizer with ChatML turns, its ids placed so that they differ from generate's defaults
    (stop at 256, pad 257): <|endoftext|> 256, <|im_start|> 257, <|im_end|> 258, <|pad|> 259."""
    enc = tiktoken.Encoding(name="bytes-chatml", pat_str=tokenizer.SPLIT_PATTERN,
                            mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258,
                                            "<|pad|>": 259})
    return tokenizer.set_chat_format(enc, "auto")


def test_evaluate_stops_at_the_tokenizers_end_of_turn_and_pads_with_its_pad_id():
    """A stub generate that keeps generate's contract (a row ends at its first stop id, shorter rows are filled
    with pad_id) scripts each answer, then <|im_end|>, then text a model may babble after its turn. With a chat
    tokenizer whose ids are not generate's defaults, the completions must be exactly the answers, all finished."""
    enc = chat_bytes_tokenizer()
    answers = {"Q1": "2+2=4\n#### 4", "Q22": "#### 22"}
    rows = [{"prompt": p, "answer": a.split()[-1]} for p, a in answers.items()]

    def stub_generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                      stop_ids=(EOT,), pad_id=PAD, generator=None):
        outs = []
        for p in prompts:
            question = tokenizer.decode(enc, p).split("user\n")[1].split("\n")[0]   # the prompt inside its turn
            script = tokenizer.encode(enc, answers[question]) + [258] + tokenizer.encode(enc, "babble #### 5") + [256]
            outs.append(script[:min(i for i, t in enumerate(script) if t in stop_ids) + 1])
        N = max(map(len, outs))
        tokens = torch.tensor([o + [pad_id] * (N - len(o)) for o in outs])
        return M.Generation(tokens, torch.zeros(tokens.shape), torch.tensor([len(o) for o in outs]),
                            torch.ones(len(outs), dtype=torch.bool))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "generate", stub_generate)
        result = tasks.evaluate(None, enc, rows, max_new_tokens=64)
    assert result["completions"] == list(answers.values())
    assert result["accuracy"] == 1.0 and result["truncated"] == 0.0
    assert result["mean_length"] == np.mean([len(a) + 1 for a in answers.values()])   # bytes, and <|im_end|>


# ----------------------------------------------------------------------------------------------
# JSONL files: readers, writers, and errors that name file:line
# ----------------------------------------------------------------------------------------------

def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"\n')
    with pytest.raises(cli.UserError, match=f"{path}:3"):
        tasks.read_jsonl(str(path))
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(cli.UserError, match=f"{path}:2.*answer"):
        tasks.read_jsonl(str(path), ("prompt", "answer"))
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(cli.UserError, match=f"{path}:2"):
        tasks.read_jsonl(str(path))
    path.write_text("\n")
    with pytest.raises(cli.UserError, match=str(path)):
        tasks.read_jsonl(str(path))
    with pytest.raises(cli.UserError, match="missing.jsonl"):
        tasks.read_jsonl(str(tmp_path / "missing.jsonl"))


json_values = st.one_of(st.text(), st.integers(-10 ** 9, 10 ** 9), st.booleans(), st.none())


@given(rows=st.lists(st.dictionaries(st.text(max_size=5), json_values, min_size=1, max_size=4), min_size=1, max_size=5))
def test_write_jsonl_round_trips_atomically(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("jsonl")
    path = str(folder / "out.jsonl")
    tasks.write_jsonl(path, rows)
    assert os.listdir(folder) == ["out.jsonl"]
    assert tasks.read_jsonl(path) == rows


@pytest.mark.parametrize("content, where, what", [
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff\xfe"}\n', ":2", "UTF-8"),
    (b'{"prompt": "a", "answer": "1"}\n' + b"[" * 100_000 + b"\n", ":2", "nested"),
    (b'{"prompt": "a", "answer": ' + b"9" * 5000 + b"}\n", ":1", "JSON"),
    (b'{"prompt": 3, "answer": "1"}\n', ":1", "'prompt' must be a string"),
    (b'{"prompt": "a", "answer": true}\n', ":1", "'answer' must be"),
    (b'{"prompt": "a", "answer": [1]}\n', ":1", "'answer' must be"),
])
def test_read_jsonl_reports_hostile_lines_as_file_and_line(tmp_path, content, where, what):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(cli.UserError) as info:
        tasks.read_jsonl(str(path), {"prompt": str, "answer": (str, int, float)})
    message = str(info.value)
    assert message.startswith(f"{path}{where}:") and what in message and "\n" not in message


def test_read_jsonl_names_a_directory_as_a_directory(tmp_path):
    with pytest.raises(cli.UserError, match="is a directory"):
        tasks.read_jsonl(str(tmp_path))


def test_read_prompts_accepts_gsm8k_rows_and_reduces_worked_answers(tmp_path):
    """GSM8K's own format and a rename-only file both give the number after the last ####, so the reference
    solution itself is rewarded (is_correct) instead of silently scoring 0."""
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 1,072"
    path = tmp_path / "gsm8k.jsonl"
    tasks.write_jsonl(str(path), [{"question": "How many?", "answer": solution}, {"prompt": "Renamed?", "answer": solution},
                                  {"prompt": "Plain", "answer": 5}])
    rows = tasks.read_prompts(str(path))
    assert [r["prompt"] for r in rows] == ["How many?", "Renamed?", "Plain"]
    assert [r["answer"] for r in rows] == ["1072", "1072", "5"]
    assert all(tasks.is_correct(solution, r["answer"]) for r in rows[:2])
    tasks.write_jsonl(str(tmp_path / "bad.jsonl"), [{"question": "q", "answer": "1+1=2\n####  "}])
    with pytest.raises(cli.UserError, match=r"bad.jsonl:1: 'answer' holds no final answer"):
        tasks.read_prompts(str(tmp_path / "bad.jsonl"))


def test_read_demonstrations_takes_gsm8k_answers_as_completions(tmp_path):
    path = tmp_path / "demos.jsonl"
    tasks.write_jsonl(str(path), [{"question": "q1", "answer": "1+1=2\n#### 2"}, {"prompt": "p", "completion": "c"}])
    rows = tasks.read_demonstrations(str(path))
    assert [(r["prompt"], r["completion"]) for r in rows] == [("q1", "1+1=2\n#### 2"), ("p", "c")]
    tasks.write_jsonl(str(path), [{"prompt": "p", "completion": 7}])
    with pytest.raises(cli.UserError, match=r"demos.jsonl:1: 'completion' must be a string"):
        tasks.read_demonstrations(str(path))


@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=20), new_tokens=st.integers(1, 30))
def test_fit_prompts_keeps_exactly_the_prompts_that_leave_room(lengths, new_tokens):
    rows = [{"prompt": "x" * n, "answer": "1"} for n in lengths]
    block = 40
    expected = [r for r in rows if 0 < len(r["prompt"]) and len(r["prompt"]) + new_tokens <= block]  # bytes = tokens
    if not expected:
        with pytest.raises(cli.UserError, match="no prompt fits"):
            tasks.fit_prompts(rows, ENC, block, new_tokens, "p.jsonl")
        return
    assert tasks.fit_prompts(rows, ENC, block, new_tokens, "p.jsonl") == expected


def test_fit_prompts_keeps_a_prompt_that_fills_the_context_exactly_and_skips_one_token_more_or_an_empty_one():
    """Hand-worked edges, block 40 with 10 new tokens: bytes are tokens, so a 30-byte prompt fills the context
    exactly and is kept, 31 bytes are skipped, and so is an empty prompt; a 1-byte prompt is kept. With ChatML
    turns, a prompt of n bytes takes n + 19 tokens (<|im_start|> 'user\\n' (5) ... <|im_end|> '\\n' <|im_start|>
    'assistant\\n' (10)), so 11 bytes fill it exactly."""
    rows = [{"prompt": "x" * n, "answer": "1"} for n in (30, 31, 0, 1)]
    assert tasks.fit_prompts(rows, ENC, 40, 10, "p.jsonl", verbose=False) == [rows[0], rows[3]]
    chat = [{"prompt": "x" * n, "answer": "1"} for n in (11, 12, 0)]
    assert tasks.fit_prompts(chat, chat_bytes_tokenizer(), 40, 10, "p.jsonl", verbose=False) == [chat[0]]
    with pytest.raises(cli.UserError) as info:
        tasks.fit_prompts([rows[1], rows[2]], ENC, 40, 10, "p.jsonl", verbose=False)
    assert str(info.value) == "p.jsonl: no prompt fits the context of 40 tokens with 10 new tokens"


class FlushRecorder(io.StringIO):
    """A stdout that remembers what had been flushed: what a log file piped from a long run shows at once."""
    flushed = ""

    def flush(self):
        super().flush()
        self.flushed = self.getvalue()


@pytest.mark.parametrize("verbose", [None, True, False])
def test_fit_prompts_says_how_many_it_skipped_in_one_flushed_line_only_when_it_skips(monkeypatch, verbose):
    """verbose by default: one line, flushed at once, counting the skipped prompts (2 of 5, worked out by hand);
    nothing when every prompt fits, nothing with verbose=False."""
    rows = [{"prompt": "x" * n, "answer": "1"} for n in (5, 31, 30, 0, 2)]
    out = FlushRecorder()
    monkeypatch.setattr(sys, "stdout", out)
    options = {} if verbose is None else {"verbose": verbose}
    assert tasks.fit_prompts(rows, ENC, 40, 10, "p.jsonl", **options) == [rows[0], rows[2], rows[4]]
    line = ("p.jsonl: skipped 2 of 5 prompts longer than the context (40 tokens, 10 of them kept for the "
            "completion) or empty\n")
    assert out.getvalue() == out.flushed == ("" if verbose is False else line)
    out.truncate(0)
    assert tasks.fit_prompts([rows[0], rows[4]], ENC, 40, 10, "p.jsonl", **options) == [rows[0], rows[4]]
    assert out.getvalue() == ""


# ----------------------------------------------------------------------------------------------
# The Countdown verifier: an expression over the allowed numbers that hits the target
# ----------------------------------------------------------------------------------------------

COUNTDOWN_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: a / b if b != 0 else None}


def countdown_expressions(pool, max_leaves):
    """Every expression tree on up to max_leaves leaves drawn from `pool` (repeats allowed), with + - * /
    and unary minus on a leaf, fully parenthesised. -> [(text, leaves, exact value or None if it divides by
    zero)], the value computed with Fractions as the tree is built (no parser involved)."""
    by_size = {1: [(str(x), (x,), Fraction(x)) for x in pool] + [(f"(-{x})", (x,), Fraction(-x)) for x in pool]}
    for size in range(2, max_leaves + 1):
        trees = []
        for left_size in range(1, size):
            for (lt, ll, lv), (rt, rl, rv) in product(by_size[left_size], by_size[size - left_size]):
                for op, f in COUNTDOWN_OPS.items():
                    value = None if lv is None or rv is None else f(lv, rv)
                    trees.append((f"({lt}{op}{rt})", ll + rl, value))
        by_size[size] = trees
    return [tree for size in sorted(by_size) for tree in by_size[size]]


def sub_multiset(used, allowed) -> bool:
    return not Counter(used) - Counter(allowed)


def test_the_verifier_accepts_exactly_the_expressions_that_hit_the_target_with_the_allowed_numbers():
    """Brute force: every tree on up to 3 leaves from {2, 3} (with unary minus) against allowed numbers that
    hold each at most twice, and targets its own value, a near miss and 6; the verifier's answer must be the
    independent one (used numbers a sub-multiset of the allowed ones, exact value equal to the target)."""
    n_accepted = n_checked = 0
    for text, leaves, value in countdown_expressions((2, 3), 3):
        for numbers in ([2, 2, 3], [2, 3], [3, 3], [2]):
            for target in {value if value is not None else Fraction(0), (value or 0) + Fraction(1, 3), Fraction(6)}:
                expected = value is not None and sub_multiset(leaves, numbers) and value == target
                got = tasks.expression_hits_target(f"7*8=56\n#### {text}", numbers, float(target))
                assert got == expected, (text, numbers, target, value)
                n_accepted += got
                n_checked += 1
    assert 100 < n_accepted < n_checked - 100                    # the brute force exercised both answers


@given(numbers=st.lists(st.integers(1, 9), min_size=2, max_size=3), op=st.sampled_from("+-*"), spaced=st.booleans())
def test_a_correct_expression_passes_in_any_spacing_and_a_number_used_twice_fails(numbers, op, spaced):
    a, b = numbers[:2]
    text = f"{a} {op} {b}" if spaced else f"{a}{op}{b}"
    target = COUNTDOWN_OPS[op](a, b)
    assert tasks.expression_hits_target(f"#### {text}", numbers, target)
    assert tasks.expression_hits_target(f"steps\n#### {text}\nanything after the line", numbers, target)
    assert not tasks.expression_hits_target(f"#### {text}", numbers, target + 1)
    twice = f"{a}{op}{a}"                                        # a used twice but given once
    assert tasks.expression_hits_target(f"#### {twice}", numbers, COUNTDOWN_OPS[op](a, a)) == (numbers.count(a) >= 2)


HOSTILE = ["__import__('os').system('echo pwned')", "open('/etc/passwd').read()", "3 if 1 else 4", "[3][0]",
           "(lambda: 3)()", "3; 4", "x", "2**3**4**5", "9**9**9**9", "1e400", "10**61", "2**-10000", "(" * 500 + "3",
           "1" * 300, "3 + " * 100 + "3", "True", "3 == 3", "~3", "3 @ 3", "'3'", "3j", "٣", "1/0", "0**-1",
           "3 % 0", "", "#### ####", "\x00", "4\n3"]


@pytest.mark.parametrize("expression", HOSTILE)
def test_the_verifier_rejects_hostile_expressions_without_raising(expression):
    assert tasks.expression_hits_target(f"#### {expression}", [3, 4], 3) is False
    final = tasks.final_expression(f"#### {expression}")
    if final is not None and final != "4":                        # "4\n3": a valid 4 that misses the target
        with pytest.raises(ValueError):                          # arith's documented error, and no other
            tasks.arith(final)


def test_the_verifier_needs_a_final_expression_and_a_numeric_target():
    assert not tasks.expression_hits_target("3+4", [3, 4], 7)                       # no '####'
    assert not tasks.expression_hits_target("#### 3+4", [3, 4], "seven")            # a target that is no number
    assert tasks.expression_hits_target("#### 3+4", [3, 4], "7")                    # the answer as text (JSONL rows)
    assert tasks.expression_hits_target("#### 3.0+4", [3, 4], 7)                    # 3.0 is the allowed 3
    assert not tasks.expression_hits_target("#### 3+4 #### 3", [3, 4], 7)          # the LAST '####' counts


@pytest.mark.parametrize("text,numbers,target,hit", [
    ("####12*2", [12, 2], 24, True),                               # no space after the marker
    ("#### 12 * 2  ", [12, 2], 24, True),                          # spaces around the expression
    ("#### 3+4\nthen 5\nand 6", [3, 4], 7, True),                  # the line ends the expression, however many follow
    ("#### 3+4\n\n", [3, 4], 7, True),
    ("#### 1/10*3", [1, 10, 3], 0.3, True),                        # 0.30000000000000004: a float's rounding is a hit
    ("#### 3+4", None, 7, False), ("#### 3+4", 7, 7, False),       # numbers that are no list: a miss, never a raise
    ("#### 3+4", (3, 4), 7, True),                                 # any iterable of numbers
    ("#### 3+4", [4, 3], 7.0, True),                               # order of the numbers and a float target
])
def test_the_verifier_on_hand_worked_cases(text, numbers, target, hit):
    assert tasks.expression_hits_target(text, numbers, target) is hit


@given(a=st.integers(1, 10 ** 6), b=st.integers(1, 10 ** 6), miss=st.sampled_from([-1, 1]))
def test_the_verifier_counts_a_miss_by_one_as_a_miss_at_any_size(a, b, miss):
    """a*b <= 1e12 is exact in a float: the target is hit exactly, and a target off by one is missed however
    large it is (the tolerance is absolute, 1e-9, not relative)."""
    assert tasks.expression_hits_target(f"#### {a}*{b}", [a, b], a * b)
    assert not tasks.expression_hits_target(f"#### {a}*{b}", [a, b], a * b + miss)


@pytest.mark.parametrize("text,row,solved", [
    ("#### 3+4", {"prompt": "Use 3 4 to make 7", "answer": "7", "numbers": [3, 4]}, True),
    ("#### 7", {"prompt": "Use 3 4 to make 7", "answer": "7", "numbers": [3, 4]}, False),   # 7 is not given
    ("#### 4+4", {"prompt": "Use 3 4 to make 8", "answer": "8", "numbers": [3, 4]}, False),  # 4 given once
    ("#### 3+4", {"prompt": "3+4=", "answer": "7"}, False),                                 # not the answer 7
    ("#### 7", {"prompt": "3+4=", "answer": "7"}, True),
    ("2+5=7\n#### 7.0", {"prompt": "2+5=", "answer": 7, "difficulty": 1}, True),
])
def test_verify_solves_a_countdown_row_by_its_expression_and_any_other_row_by_its_answer(text, row, solved):
    """The one verifier every stage uses: a row that lists "numbers" is a Countdown row (an expression over them
    that hits "answer"), any other row is checked by its final answer; each case worked out by hand."""
    assert tasks.verify(text, row) is solved


# ----------------------------------------------------------------------------------------------
# GSM8K's final answers: what its evaluators accept, against a plain reference parser
# ----------------------------------------------------------------------------------------------

def reference_final_number(text: str):
    """A plain character scan, independent of extract_answer's regex: after the last '####', spaces, at most
    one sign (before or after a currency sign $ € £), then ASCII digits and commas, then '.digits'. The value
    as a float, or None where no number starts there."""
    at = text.rfind("####")
    if at < 0:
        return None
    chars, i, signs = text[at + 4:], 0, []
    def skip_spaces():
        nonlocal i
        while i < len(chars) and chars[i].isspace():
            i += 1
    skip_spaces()
    if i < len(chars) and chars[i] in "+-":
        signs.append(chars[i]); i += 1
    skip_spaces()
    if i < len(chars) and chars[i] in "$€£":
        i += 1
    skip_spaces()
    if i < len(chars) and chars[i] in "+-":
        signs.append(chars[i]); i += 1
    if len(signs) > 1 or i >= len(chars) or chars[i] not in "0123456789":
        return None
    whole = ""
    while i < len(chars) and (chars[i] in "0123456789,"):
        whole += chars[i] if chars[i] != "," else ""
        i += 1
    fraction = ""
    if i + 1 < len(chars) and chars[i] == "." and chars[i + 1] in "0123456789":
        i += 1
        while i < len(chars) and chars[i] in "0123456789":
            fraction += chars[i]; i += 1
    value = float(whole + ("." + fraction if fraction else ""))
    return -value if signs == ["-"] else value


def with_commas(n: int) -> str:
    return f"{n:,}"


answers_as_written = st.builds(
    lambda before, spaces, sign, currency, sign_after, number, commas, fraction, after: (
        before + "####" + spaces + sign + currency + sign_after + (with_commas(number) if commas else str(number))
        + fraction + after),
    before=st.sampled_from(["", "so 3+4=7\n", "#### 9\n", "The total is 18 dollars.\n"]),
    spaces=st.sampled_from(["", " ", "  ", "\n "]), sign=st.sampled_from(["", "-", "+"]),
    currency=st.sampled_from(["", "$", "€", "£", "$ "]), sign_after=st.sampled_from(["", "-"]),
    number=st.integers(0, 10**7), commas=st.booleans(), fraction=st.sampled_from(["", ".5", ".25", ".0"]),
    after=st.sampled_from(["", ".", " dollars", "%", ".\n", " apples.", ",", "\nThat is all."]))


@given(text=answers_as_written, gold=st.integers(-10**7, 10**7))
def test_final_numbers_are_read_as_gsm8k_evaluators_read_them(text, gold):
    """A sign, a currency sign, thousands commas and a trailing period or word: is_correct agrees with a plain
    reference parser (the number's value equals the gold one), and the parsed value is the written one."""
    reference = reference_final_number(text)
    assert tasks.is_correct(text, gold) == (reference is not None and reference == gold)
    if reference is not None:
        assert float(tasks.extract_answer(text)) == reference
        assert tasks.is_correct(text, str(int(reference)) if reference.is_integer() else str(reference))


@pytest.mark.parametrize("text,gold", [("#### $18", 18), ("#### $18.", 18), ("#### -$5", -5), ("#### $-5", -5),
                                       ("#### 1,234.50.", "1234.5"), ("#### +7 apples", 7), ("#### €3", 3)])
def test_gsm8k_answer_forms_are_rewarded(text, gold):
    assert tasks.is_correct(text, gold)


@pytest.mark.parametrize("row,message", [
    ({"question": "How many?", "answer": "She had 18 apples."}, "has no '####'"),
    ({"question": "How many?", "answer": 18}, "has no '####'"),
    ({"prompt": "How many?", "answer": "She had 18 apples."}, "is not a final answer"),
])
def test_a_row_with_no_final_answer_is_refused_naming_its_line(tmp_path, row, message):
    """A GSM8K row whose answer lacks '####' would make its whole text the gold answer, which nothing can ever
    match: an error naming file:line instead of a prompt that can never be rewarded."""
    path = tmp_path / "gsm8k.jsonl"
    tasks.write_jsonl(str(path), [{"question": "ok?", "answer": "1+1=2\n#### 2"}, row])
    with pytest.raises(cli.UserError, match=f"gsm8k.jsonl:2: .*{message}"):
        tasks.read_prompts(str(path))
    tasks.write_jsonl(str(path), [{"question": "q", "answer": "no marker"}])
    with pytest.raises(cli.UserError, match=r"gsm8k.jsonl:1: a GSM8K answer must end"):
        tasks.read_demonstrations(str(path))


# ----------------------------------------------------------------------------------------------
# Program synthesis rows: hidden "tests" read and checked, verify asks for every test
# ----------------------------------------------------------------------------------------------

def test_read_prompts_keeps_a_program_rows_tests_and_its_program_answer(tmp_path):
    """A program row's answer is the reference program (spaces and all, never cut to one token) and its hidden
    tests come through unchanged, so verify and program_score see them."""
    path = tmp_path / "program.jsonl"
    row = {"prompt": "f([3, 8]) = [8]. f(x) = ?\n", "answer": "[v for v in x if v > 4]",
           "tests": [[[1, 9], [9]], [[5], [5]], [[], []]]}
    tasks.write_jsonl(str(path), [row, {"prompt": "f(1) = 2. f(x) = ?\n", "answer": "x+1", "tests": [[4, 5]]}])
    read = tasks.read_prompts(str(path))
    assert read[0]["answer"] == row["answer"] and read[0]["tests"] == row["tests"] and read[1]["tests"] == [[4, 5]]
    assert tasks.verify(f"#### {row['answer']}", read[0]) and not tasks.verify("#### [v for v in x if v > 5]", read[0])
    assert tasks.program_score("#### [v for v in x if v > 5]", read[0]) == 2 / 3      # [5] -> [] is wrong


@pytest.mark.parametrize("tests, index", [
    (5, None), ([], None), ("[[1, 2]]", None), ([[1]], 0), ([[1, 2, 3]], 0), ([[1, 2], [1, "a"]], 1), ([[1, True]], 0),
    ([[[1, [2]], 3]], 0), ([[2 ** 64, 1]], 0), ([[1.5, 1]], 0), ([[None, 1]], 0), ([{"in": 1, "out": 2}], 0),
    ([[[0] * 10001, 1]], 0)])
def test_read_prompts_refuses_malformed_tests_naming_file_line_and_the_test(tmp_path, tests, index):
    path = tmp_path / "program.jsonl"
    tasks.write_jsonl(str(path), [{"prompt": "p", "answer": "x", "tests": [[1, 1]]},
                                  {"prompt": "q", "answer": "x", "tests": tests}])
    where = "'tests'" if index is None else rf"'tests'\[{index}\]"
    with pytest.raises(cli.UserError, match=rf"program.jsonl:2: {where}"):
        tasks.read_prompts(str(path))


@pytest.mark.parametrize("text, row, solved", [
    ("#### x*x+1", {"answer": "x*x+1", "tests": [[0, 1], [2, 5], [-3, 10]]}, True),
    ("#### x+1", {"answer": "x*x+1", "tests": [[0, 1], [2, 5], [-3, 10]]}, False),          # 1 of 3
    ("#### 1+x*x\nmore", {"answer": "x*x+1", "tests": [[0, 1], [2, 5]]}, True),        # another program, same function
    ("#### x*x+1", {"answer": "x*x+1", "numbers": [1], "tests": [[3, 10]]}, True),          # tests decide first
    ("#### 10", {"answer": "10", "tests": [[3, 10]]}, True),                                # a constant program
    ("#### import os", {"answer": "x", "tests": [[1, 1]]}, False),
])
def test_verify_solves_a_program_row_only_by_passing_every_hidden_test(text, row, solved):
    assert tasks.verify(text, row) == solved
    assert (tasks.program_score(text, row) == 1.0) == solved
