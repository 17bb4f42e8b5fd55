"""Tests of lib/tasks.py: the verifiers, evaluate, and the JSONL readers and writers.

Oracles: hand-made cases (extract_answer, is_correct, completion_style, step_lines), Python's own operators
on the same expression tree (arith), a watchdog (hostile expressions are refused quickly) and arbitrary
extreme expressions (only the documented error), counts done by hand over a stub generate's script (evaluate's
accuracy, pass@k, truncation and styles) and a tiny model's own greedy completions, a brute-force filter
(fit_prompts), and json itself (write_jsonl round trips); a malformed file's error names file:line.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tasks.py
"""
from __future__ import annotations

import math
import operator
import os

import numpy as np
import pytest
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
])
def test_extract_answer(text, answer):
    assert tasks.extract_answer(text) == answer


@pytest.mark.parametrize("completion,answer,ok", [
    ("#### 42", 42, True), ("#### 42", "42", True), ("#### 42.0", "42", True), ("#### 1,234", "1234", True),
    ("#### 1234", "1,234", True), ("#### 41", "42", False), ("42", "42", False), ("#### -3", -3, True),
    ("#### 4 2", "42", False), ("#### 0.5", "0.50", True),
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
