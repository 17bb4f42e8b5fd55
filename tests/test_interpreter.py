"""Tests of lib/interpreter.py, the restricted interpreter that runs the program-synthesis task's answers.

Oracles: Python itself. Each program is drawn from the whitelist's grammar as a pair (source text, Python
function), the function composed from ordinary Python operations node by node as the text is written, so
Python computes the program without any eval, exec or compile; the documented bounds enter that oracle as
math (|n| >= 2**64 is refused; a ** b with |a| >= 2 and b > 64 is at least 2**65), never as the interpreter's
code. Hand-written cases compare with a Python lambda of the same text. Hostile sources (deep nesting,
9**9**9, [0]*10**9, range(10**12), attributes, imports, lambdas, strings, floats, random text) are refused or
answered under a watchdog and a clock, and only ProgramError is ever raised. Partial credit is checked
against the share of hidden tests counted by hand.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_interpreter.py
"""
import operator
import string
import time
from collections import namedtuple

import pytest
from hypothesis import given, settings, strategies as st

import grpo
from lib import interpreter as I, tasks
from helpers import watchdog

Program = namedtuple("Program", "source function")      # function(scope: {name: value}) -> Python's value
REFUSED = "refused"
LIMIT = 2 ** 64


class OutOfBounds(Exception):
    """The oracle's documented refusals: an integer with |n| >= 2**64, a list longer than 10,000, a float."""


def bounded(value):
    if isinstance(value, list) and len(value) > 10_000 or isinstance(value, int) and abs(value) >= LIMIT:
        raise OutOfBounds(value)
    return value


def python_power(a, b):
    """a ** b, or the refusal the bounds predict: b < 0 gives a float; |a| >= 2 and b > 64 gives >= 2**65."""
    if b < 0 or abs(a) >= 2 and b > 64:
        raise OutOfBounds("power")
    return bounded(a ** b)


def python_repeat(items, times):
    if times > 10_000:
        raise OutOfBounds("repeat")
    return bounded(items * times)


ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}
ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
VARIABLES = ("v", "w", "x")      # comprehension variables; "x" shadows the argument, as Python allows


# ----------------------------------------------------------------------------------------------
# The grammar, as (source, Python function) pairs
# ----------------------------------------------------------------------------------------------

def constant(n):
    return Program(str(n) if n >= 0 else f"({n})", lambda scope: n)


def name(identifier):
    return Program(identifier, lambda scope: scope[identifier])


def binary(symbol, a, b):
    if symbol == "**":
        return Program(f"({a.source} ** {b.source})", lambda s: python_power(a.function(s), b.function(s)))
    return Program(f"({a.source} {symbol} {b.source})",
                   lambda s: bounded(ARITHMETIC[symbol](a.function(s), b.function(s))))


def compare(symbol, a, b):
    return Program(f"({a.source} {symbol} {b.source})", lambda s: ORDER[symbol](a.function(s), b.function(s)))


def chain(first, second, a, b, c):
    """a < b <= c: Python's chain, b evaluated once, c only when the first link holds."""
    def function(s):
        left, middle = a.function(s), b.function(s)
        return ORDER[first](left, middle) and ORDER[second](middle, c.function(s))
    return Program(f"({a.source} {first} {b.source} {second} {c.source})", function)


def call(builtin, python, *args, bound=False):
    wrap = bounded if bound else (lambda value: value)
    return Program(f"{builtin}({', '.join(a.source for a in args)})",
                   lambda s: wrap(python(*(a.function(s) for a in args))))


def ranges(n):
    return Program(f"range({n.source})", lambda s: range(n.function(s)))


INT_NODES = ("+ -", "*", "// %", "**", "negate", "not", "compare", "compare lists", "order lists", "in", "chain",
             "if else", "and", "or", "abs", "min max of two", "of a list", "index")
LIST_NODES = ("literal", "concatenate", "repeat", "repeat left", "sorted", "slice", "comprehension")


@st.composite
def int_programs(draw, depth, ints, lists):
    """Programs whose value is an int (or a bool, where Python makes one) over the names in scope; each node
    kind is drawn uniformly, then its parts one level shallower."""
    kind = draw(st.sampled_from(("constant",) + ("name",) * bool(ints) + INT_NODES * (depth > 0)))
    a = lambda: draw(int_programs(depth - 1, ints, lists))
    items = lambda: draw(list_programs(depth - 1, ints, lists))
    walkable = lambda: draw(st.one_of(list_programs(depth - 1, ints, lists), iterables(depth - 1, ints, lists)))
    pick = lambda options: draw(st.sampled_from(list(options)))
    if kind == "constant":
        return constant(draw(st.integers(-3, 9)))
    if kind == "name":
        return name(pick(ints))
    if kind in ("+ -", "*", "// %", "**"):
        return binary(pick(kind.split()), a(), a())
    if kind == "negate":
        p = a()
        return Program(f"(-{p.source})", lambda s: bounded(-p.function(s)))
    if kind == "not":
        p = a()
        return Program(f"(not {p.source})", lambda s: not p.function(s))
    if kind == "compare":
        return compare(pick(ORDER), a(), a())
    if kind == "compare lists":
        return compare(pick(["==", "!="]), items(), items())
    if kind == "order lists":
        return compare(pick(["<", "<=", ">", ">="]), items(), items())
    if kind == "in":
        op, p, q = pick(["in", "not in"]), a(), walkable()
        return Program(f"({p.source} {op} {q.source})", lambda s: (p.function(s) in q.function(s)) == (op == "in"))
    if kind == "chain":
        return chain(pick(ORDER), pick(ORDER), a(), a(), a())
    if kind == "if else":
        p, q, r = a(), a(), a()
        return Program(f"({p.source} if {q.source} else {r.source})",
                       lambda s: p.function(s) if q.function(s) else r.function(s))
    if kind in ("and", "or"):
        p, q = a(), a()
        if kind == "and":
            return Program(f"({p.source} and {q.source})", lambda s: p.function(s) and q.function(s))
        return Program(f"({p.source} or {q.source})", lambda s: p.function(s) or q.function(s))
    if kind == "abs":
        return call("abs", abs, a())
    if kind == "min max of two":
        f = pick(["min", "max"])
        return call(f, {"min": min, "max": max}[f], a(), a())
    if kind == "of a list":
        f = pick(["len", "sum", "min", "max"])
        return call(f, {"len": len, "sum": sum, "min": min, "max": max}[f], walkable(), bound=True)
    p, i = items(), a()                                                   # index
    return Program(f"({p.source}[{i.source}])", lambda s: p.function(s)[i.function(s)])


def iterables(depth, ints, lists):
    """A range over a small count (so that Python's oracle stays quick): range(n) or range(len(xs))."""
    return st.one_of(st.integers(0, 6).map(constant).map(ranges),
                     list_programs(depth, ints, lists).map(lambda p: ranges(call("len", len, p))))


@st.composite
def list_programs(draw, depth, ints, lists):
    """Programs whose value is a list of ints over the names in scope."""
    kind = draw(st.sampled_from(("literal",) + ("name",) * bool(lists) + LIST_NODES * (depth > 0)))
    a = lambda: draw(int_programs(depth - 1, ints, lists))
    items = lambda: draw(list_programs(depth - 1, ints, lists))
    if kind == "literal":
        elements = st.integers(0, 9).map(constant) if depth == 0 else int_programs(depth - 1, ints, lists)
        return literal(draw(st.lists(elements, max_size=3)))
    if kind == "name":
        return name(draw(st.sampled_from(lists)))
    if kind == "concatenate":
        p, q = items(), items()
        return Program(f"({p.source} + {q.source})", lambda s: bounded(p.function(s) + q.function(s)))
    if kind in ("repeat", "repeat left"):
        p, k = items(), constant(draw(st.integers(-1, 3)))
        text = f"({p.source} * {k.source})" if kind == "repeat" else f"({k.source} * {p.source})"
        return Program(text, lambda s: python_repeat(p.function(s), k.function(s)))
    if kind == "sorted":
        return call("sorted", sorted, draw(st.one_of(list_programs(depth - 1, ints, lists),
                                                      iterables(depth - 1, ints, lists))))
    if kind == "slice":
        part = lambda: draw(st.none() | int_programs(depth - 1, ints, lists))
        return sliced(items(), part(), part(), part())
    return draw(comprehensions(depth, ints, lists))


def literal(elements):
    return Program("[" + ", ".join(e.source for e in elements) + "]",
                   lambda s: [e.function(s) for e in elements])


def sliced(items, lower, upper, step):
    parts = [p.source if p else "" for p in (lower, upper, step)]
    value = lambda p, s: p.function(s) if p else None
    return Program(f"({items.source}[{parts[0]}:{parts[1]}:{parts[2]}])",
                   lambda s: items.function(s)[value(lower, s):value(upper, s):value(step, s)])


@st.composite
def comprehensions(draw, depth, ints, lists):
    """[e for v in xs if c] or [e for v in xs if c for w in ys if d], Python's own comprehension computing it."""
    clauses = []
    for _ in range(draw(st.integers(1, 2))):
        variable = draw(st.sampled_from(VARIABLES))
        iterable = draw(st.one_of(list_programs(depth - 1, ints, lists), iterables(depth - 1, ints, lists)))
        ints, lists = tuple(sorted({*ints, variable})), tuple(n for n in lists if n != variable)
        clauses.append((variable, iterable, draw(st.none() | int_programs(depth - 1, ints, lists))))
    element = draw(int_programs(depth - 1, ints, lists))
    text = "".join(f" for {v} in {it.source}" + (f" if {c.source}" if c else "") for v, it, c in clauses)
    holds = lambda condition, scope: condition is None or condition.function(scope)
    if len(clauses) == 1:
        (v, it, c), = clauses
        function = lambda s: bounded([element.function(inner) for item in it.function(s)
                                      for inner in [{**s, v: item}] if holds(c, inner)])
    else:
        (v, it, c), (w, it2, c2) = clauses
        function = lambda s: bounded([element.function(inner2) for item in it.function(s)
                                      for inner in [{**s, v: item}] if holds(c, inner)
                                      for item2 in it2.function(inner)
                                      for inner2 in [{**inner, w: item2}] if holds(c2, inner2)])
    return Program(f"[{element.source}{text}]", function)


@st.composite
def programs_with_arguments(draw, depth=3):
    if draw(st.booleans()):
        argument, scope = draw(st.integers(-9, 9)), (("x",), ())
    else:
        argument, scope = draw(st.lists(st.integers(-9, 9), max_size=5)), ((), ("x",))
    grammar = int_programs(depth, *scope) if draw(st.booleans()) else list_programs(depth, *scope)
    return draw(grammar), argument


def same(got, expected) -> bool:
    """Equal values of the same types all the way down (True is not 1, [True] is not [1])."""
    if type(got) is not type(expected):
        return False
    if isinstance(got, list):
        return len(got) == len(expected) and all(map(same, got, expected))
    return got == expected


def outcome(run):
    try:
        return run()
    except I.ProgramError:
        return REFUSED


# ----------------------------------------------------------------------------------------------
# 1. An answer is Python's value; a refusal is where Python raises or a documented bound is passed
# ----------------------------------------------------------------------------------------------

@settings(max_examples=300)
@given(case=programs_with_arguments())
def test_an_answered_program_has_pythons_value_and_a_refusal_is_where_python_fails_or_a_bound_is_passed(case):
    program, argument = case
    try:
        expected = program.function({"x": argument})
    except (ZeroDivisionError, IndexError, ValueError, OutOfBounds):   # min([]), a zero slice step, the bounds
        expected = REFUSED
    got = outcome(lambda: I.run(program.source, argument, max_steps=10 ** 7))  # the step budget is tested below
    if len(program.source) > I.MAX_SOURCE_CHARS:
        assert got == REFUSED
    else:
        assert same(got, expected), (program.source, argument, got, expected)


HAND_WRITTEN = [   # (source, the same text as a Python lambda, argument)
    ("x*x+1", lambda x: x*x+1, 3), ("3*x-4", lambda x: 3*x-4, -2), ("-x ** 2", lambda x: -x ** 2, 3),
    ("(-x) ** 2", lambda x: (-x) ** 2, 3), ("7 // -2", lambda x: 7 // -2, 0), ("-7 % 3", lambda x: -7 % 3, 0),
    ("2 ** 63", lambda x: 2 ** 63, 0), ("(-2) ** 63", lambda x: (-2) ** 63, 0), ("1 ** 99999", lambda x: 1 ** 99999, 0),
    ("1 < x < 5", lambda x: 1 < x < 5, 3), ("1 < x < 5", lambda x: 1 < x < 5, 5), ("x and 0", lambda x: x and 0, 4),
    ("x or [9]", lambda x: x or [9], []), ("not x", lambda x: not x, []),
    ("x if x > 0 else -x", lambda x: x if x > 0 else -x, -4), ("abs(x-10)", lambda x: abs(x-10), 3),
    ("max(x, 3)", lambda x: max(x, 3), 1), ("min(x)", lambda x: min(x), [4, 2, 7]),
    ("max(x) - min(x)", lambda x: max(x) - min(x), [3, 9, 2]),
    ("[v for v in x if v > 4]", lambda x: [v for v in x if v > 4], [3, 8, 1, 5]),
    ("sum([v for v in x if v % 2 == 0])", lambda x: sum([v for v in x if v % 2 == 0]), [1, 2, 4, 7]),
    ("len([v for v in x if v % 2 == 1])", lambda x: len([v for v in x if v % 2 == 1]), [1, 2, 5]),
    ("[x for x in x]", lambda x: [x for x in x], [1, 2]),
    ("[v*w for v in x for w in x if v < w]", lambda x: [v*w for v in x for w in x if v < w], [1, 2, 3]),
    ("[v for v in range(x) if v % 3]", lambda x: [v for v in range(x) if v % 3], 8),
    ("[v > 1 for v in x]", lambda x: [v > 1 for v in x], [1, 2]), ("sum(range(x))", lambda x: sum(range(x)), 10),
    ("x[::-1]", lambda x: x[::-1], [1, 2, 3]), ("x[-1]", lambda x: x[-1], [1, 2, 3]),
    ("sorted(x)[1:3]", lambda x: sorted(x)[1:3], [5, 1, 4, 2]), ("x[1:] < x", lambda x: x[1:] < x, [2, 1]),
    ("x * 2 + [0]", lambda x: x * 2 + [0], [1, 2]), ("2 * x", lambda x: 2 * x, [7]),
    ("len(x) in x", lambda x: len(x) in x, [3, 1, 2]), ("x == sorted(x)", lambda x: x == sorted(x), [1, 2, 2]),
    ("range(3) == range(0, 3)", lambda x: range(3) == range(0, 3), 0),
]


@pytest.mark.parametrize("source, python, argument", HAND_WRITTEN, ids=[c[0] for c in HAND_WRITTEN])
def test_hand_written_programs_equal_the_same_text_as_a_python_lambda(source, python, argument):
    assert same(I.run(source, argument), python(argument))


# ----------------------------------------------------------------------------------------------
# 2. Hostile programs: refused quickly, and nothing but ProgramError ever comes out
# ----------------------------------------------------------------------------------------------

HOSTILE = [
    "(" * 10 ** 5, "9**9**9", "10**10**10", "2**64", "-(2**63)*2", "2**-1", "[0]*10**9", "10**9*[0]", "[1]*10001",
    "range(10**12)", "range(0, 2**64-1)", "len(range(2**63))", "range(1, 2, 0)", "x[::0]",
    "[0 for a in range(10**4) for b in range(10**4)]", "sum([a*b for a in range(9999) for b in range(9999)])",
    "[[0]*10000 for a in range(10000)]", "[x, [x]]", "sorted(range(10000)) == sorted(range(10000))",
    "x.__class__", "[].__class__.__base__.__subclasses__()", "__import__('os')", "import os", "x; import os",
    "eval('1')", "exec('1')", "compile('1', '', 'eval')", "open('/etc/passwd')", "print(1)", "getattr(x, 'y')",
    "lambda: 1", "(y := 1)", "f'{x}'", "'abc'", "b'abc'", "1.5", "1e9", "1j", "1/2", "x // 0", "x % 0", "x ** -1",
    "True", "None", "...", "y", "{1: 2}", "{1}", "(1, 2)", "x[1, 2]", "(v for v in x)", "[v async for v in x]",
    "[a for (a, b) in x]", "sorted(x, reverse=1)", "max(*x)", "len(x=1)", "min([])", "x[10]", "5(3)", "x(1)",
    "-" * 499 + "1", "(" * 240 + "1" + ")" * 240, "1" + "+1" * 249, "x" + "[0]" * 160, "not " * 124 + "1",
    "[" * 200 + "]" * 200, "\x00", "\ud800", "", "   ", "x\nx", "# comment", "x if x else", "*x",
]


@pytest.mark.parametrize("source", HOSTILE, ids=[repr(source[:24]) for source in HOSTILE])
@pytest.mark.parametrize("argument", [7, [1, 2, 3]])
def test_a_hostile_program_is_refused_quickly_with_a_program_error(source, argument):
    with watchdog(5):
        started = time.perf_counter()
        with pytest.raises(I.ProgramError):
            I.run(source, argument)
        assert time.perf_counter() - started < 1.0


def test_a_huge_power_is_refused_before_it_is_computed():
    """9**9**9 has 370 million digits: refused in microseconds, not computed and then refused."""
    started = time.perf_counter()
    for _ in range(100):
        assert outcome(lambda: I.run("9**9**9", 1)) == REFUSED
        assert outcome(lambda: I.run("x ** x ** x", 9)) == REFUSED
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("source", ["-" * 10 ** 5 + "1", "1" + "+1" * 10 ** 5, "(" * 10 ** 5 + ")" * 10 ** 5,
                                    "x" + "[0]" * 10 ** 5, "not " * 10 ** 5 + "1"],
                         ids=["minus", "plus", "parentheses", "subscripts", "not"])
def test_the_parsers_own_recursion_and_memory_errors_are_refusals(monkeypatch, source):
    """With the length limit lifted, ast.parse itself fails on these (MemoryError, RecursionError, SyntaxError):
    each is a ProgramError, and the interpreter stays usable."""
    monkeypatch.setattr(I, "MAX_SOURCE_CHARS", 10 ** 7)
    with watchdog(20):
        assert outcome(lambda: I.run(source, 1)) == REFUSED
    assert I.run("x+1", 1) == 2


def test_the_step_budget_refuses_a_long_loop_and_passes_a_short_one():
    loop = "[a for a in range(200) for b in range(200) if b < 0]"   # 40,000 turns, each a step and a test
    assert outcome(lambda: I.run(loop, 0)) == REFUSED
    assert I.run(loop, 0, max_steps=10 ** 6) == [a for a in range(200) for b in range(200) if b < 0]
    assert outcome(lambda: I.run("x+1", 0, max_steps=2)) == REFUSED and I.run("x+1", 0, max_steps=3) == 1


TOKENS = ["x", "v", "w", "0", "1", "2", "9", "64", "10**18", "9**9", "2**63", "-", "+", "*", "//", "%", "**", "(",
          ")", "[", "]", ",", ":", "<", "==", ">=", "in", "not", "and", "or", "if", "else", "for", "len", "sum", "min",
          "max", "abs", "sorted", "range", ".", "__class__", "lambda", "'", "1.5", "=", ":="]


def within_bounds(value) -> bool:
    if isinstance(value, int):
        return abs(value) < LIMIT
    if isinstance(value, list):
        return len(value) <= 10_000 and all(isinstance(v, int) and abs(v) < LIMIT for v in value)
    return isinstance(value, range) and len(value) <= 10_000


def assert_answers_or_refuses(source, argument):
    with watchdog(5):
        started = time.perf_counter()
        try:
            value = I.run(source, argument)
        except I.ProgramError as e:
            assert str(e)                       # a reason, one line
        else:
            assert within_bounds(value), (source, value)
        assert time.perf_counter() - started < 1.0


ARGUMENTS = st.integers(-10 ** 6, 10 ** 6) | st.lists(st.integers(-9, 9), max_size=12)


@settings(max_examples=300)
@given(words=st.lists(st.sampled_from(TOKENS), min_size=1, max_size=40), argument=ARGUMENTS)
def test_token_soup_is_answered_within_the_bounds_or_refused(words, argument):
    assert_answers_or_refuses(" ".join(words), argument)


@settings(max_examples=100)
@given(text=st.text(max_size=600) | st.text(string.printable, max_size=80)
       | st.binary(max_size=200).map(lambda b: b.decode("latin-1")), argument=ARGUMENTS)
def test_random_text_is_answered_within_the_bounds_or_refused(text, argument):
    assert_answers_or_refuses(text, argument)


@settings(max_examples=100)
@given(case=programs_with_arguments(depth=4), big=st.integers(-2 ** 70, 2 ** 70))
def test_grammar_programs_with_huge_constants_are_answered_within_the_bounds_or_refused(case, big):
    program, _ = case
    assert_answers_or_refuses(program.source.replace("9", str(big)), big if big % 2 else [big, -big])


@pytest.mark.parametrize("argument", [True, 1.5, "x", None, [1, [2]], [True], 2 ** 64, [0] * 10001, (1, 2)])
def test_an_argument_off_the_domain_is_refused(argument):
    assert outcome(lambda: I.run("x", argument)) == REFUSED


# ----------------------------------------------------------------------------------------------
# 3. Partial credit: the share of hidden tests passed
# ----------------------------------------------------------------------------------------------

TRUE_PROGRAMS = [("3*x+1", lambda x: 3 * x + 1, "int"), ("x*x-2", lambda x: x * x - 2, "int"),
                 ("max(x, 4)", lambda x: max(x, 4), "int"),
                 ("[v for v in x if v > 4]", lambda x: [v for v in x if v > 4], "list"),
                 ("sum([v for v in x if v % 2 == 0])", lambda x: sum(v for v in x if v % 2 == 0), "list")]


@st.composite
def partly_known_programs(draw):
    """A true program, 4 shown examples and n hidden tests; and a program that knows the shown inputs and k of
    the hidden ones (by equality), and is wrong elsewhere (its output + 1, or + [0] for a list output)."""
    source, python, kind = draw(st.sampled_from(TRUE_PROGRAMS))
    values = st.integers(-20, 20) if kind == "int" else st.lists(st.integers(0, 9), max_size=5)
    n = draw(st.integers(2, 8))
    arguments = draw(st.lists(values, min_size=4 + n, max_size=4 + n, unique_by=str))
    shown, hidden = [[a, python(a)] for a in arguments[:4]], [[a, python(a)] for a in arguments[4:]]
    k = draw(st.integers(0, n - 1))
    known = " or ".join(f"x == {a}" for a in arguments[:4 + k])
    wrong = "+[0]" if isinstance(python(arguments[0]), list) else "+1"
    return source, f"({source}) if {known} else ({source}){wrong}", shown, hidden, k


@settings(max_examples=50)
@given(case=partly_known_programs())
def test_a_program_that_fits_the_examples_but_not_every_hidden_test_gets_the_share_it_passes(case):
    true_program, partial, shown, hidden, k = case
    assert all(same(I.run(partial, argument), output) for argument, output in shown)   # fits what the prompt shows
    row = {"prompt": "...", "answer": true_program, "tests": hidden}
    text = f"f(x) fits the examples\n#### {partial}"
    score = tasks.program_score(text, row)
    assert score == k / len(hidden) and (0 < score < 1 if k else score == 0)
    assert grpo.REWARDS["program"](text, row, 20, False, grpo.Args()) == score
    assert not tasks.verify(text, row)                          # held-out accuracy: every test, or nothing
    assert tasks.program_score(f"#### {true_program}", row) == 1.0 and tasks.verify(f"#### {true_program}", row)


def test_no_program_or_a_refused_program_or_no_tests_scores_zero():
    row = {"prompt": "...", "answer": "x+1", "tests": [[1, 2], [5, 6]]}
    assert tasks.program_score("x+1", row) == 0.0                          # no '####'
    assert tasks.program_score("#### x+", row) == 0.0                      # does not parse
    assert tasks.program_score("#### __import__('os')", row) == 0.0        # off the whitelist
    assert tasks.program_score("#### x+1", {"tests": []}) == 0.0
    assert tasks.program_score("#### x+1", {}) == 0.0
    assert tasks.program_score("#### 2 if x == 1 else 0", row) == 0.5
    assert tasks.program_score("#### x > 0", {"tests": [[1, 1]]}) == 0.0   # True is not 1: outputs match as JSON
