"""Synthetic data with verifiers, and model-generated data filtered by them.

Every task is a prompt whose answer a program can check. A completion shows its work as short
steps "lhs=rhs" (each computable from a few digits) and ends with "#### answer" (GSM8K's
convention), so one verifier serves every stage: the answer is right and no written step is wrong.
Data made by a model is only as good as its filter (rejection sampling, as in STaR and RFT):

    keep y ~ pi(. | x)  iff  verify(x, y)    =>   kept y ~ pi(y | x, y correct)
    J(A, B)    = |A n B| / |A u B|              over character n-grams: near-duplicate when >= tau
    distinct-n = |unique n-grams| / |n-grams|   over all completions: diversity (Li et al. 2016)

Training on a model's own UNFILTERED samples shrinks diversity round after round (model collapse).
Cobbe et al. 2021 (GSM8K, "#### answer"); Zelikman et al. 2022 (STaR); Yuan et al. 2023 (RFT);
Broder 1997 and Lee et al. 2022 (near-duplicate removal); Shumailov et al. 2024 (model collapse).

A second task family swaps the verifier, and with it the capability RL teaches: Countdown, as in
TinyZero (Pan et al. 2025). The prompt gives a target and allowed numbers; the completion ends with
'#### <expression>', which must use only those numbers (each at most once) and evaluate to the target
(tasks.expression_hits_target). Targets are drawn only among the values a brute-force search reaches,
and its shortest expression is the demonstration, so every row is solvable by construction:

    reach(S) = S  u  { a op b : a in reach(A), b in reach(S - A), A a non-empty proper part of S }

A third family asks for code: program synthesis from examples. The prompt shows a few input-output pairs of a
small function on an integer or a list of integers ('f(3) = 10; f(5) = 26; ...'); the completion ends with
'#### <program>', a Python expression in x ('x*x+1', '[v for v in x if v > 4]'), and the row keeps hidden
tests the prompt does not show. lib/interpreter.py runs the program (never eval); the reward is the share of
hidden tests passed, held-out accuracy asks for all of them (tasks.program_score, tasks.verify).

    python synth.py                                   # data/*.jsonl in seconds; prints counts, examples
    python synth.py --mix worked=1 --n-sft 10000      # all worked demonstrations, a bigger file
    python synth.py --from-model runs/sft/model.pt    # sample, verify, dedup, balance -> data/sft_model.jsonl
    python synth.py --families countdown              # data/countdown_*.jsonl: the Countdown task
    python synth.py --families program                # data/program_*.jsonl: programs checked by hidden tests
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import ast
import contextlib
import functools
import itertools
import json
import math
import os
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import torch

import model as M
from lib import checkpoints, cli, interpreter, rundir, stages, tasks, tokenizer

FAMILIES = ("add", "sub", "mul", "word")                  # answers checked as '#### number'
COUNTDOWN = "countdown"                                    # answers checked as '#### expression'
PROGRAM = "program"                                        # answers checked by running '#### program' on hidden tests
STYLES = ("worked", "bare", "noisy")
PREF_KINDS = ("bare", "bare_wrong", "wrong_answer", "off_by_one", "wrong_step", "bad_format")  # rejected kinds
DIAGNOSTIC_KINDS = ("length_only", "format_only")          # both correct: probes for reward shortcuts
MAX_DIFFICULTY = 6


@dataclass
class Args:
    out_dir: str = "data"                    # folder for the JSONL files and synth_config.json
    seed: int = 0                            # one seed for every draw: same seed, same files
    families: str = "add,sub,mul"           # task families (add, sub, mul, word), or countdown or program alone
    n_sft: int = 8000                        # demonstrations in sft_train.jsonl (exactly this many)
    mix: str = "worked=0.4,bare=0.6"         # style shares of the demonstrations: worked|bare|noisy
    sft_difficulty: str = "3-4"              # difficulty range of the demonstrations (LO-HI)
    n_sft_test: int = 200                    # held-out demonstrations in sft_test.jsonl (eval loss)
    test_mix: str = "worked=1"               # style shares of sft_test.jsonl (the behaviour we want)
    rl_difficulty: str = "3-4"               # difficulty range of RL prompts (answers only, no solutions)
    n_rl: int = 5000                         # prompts in rl_train.jsonl
    test_difficulty: str = "3-4"             # difficulty range of the held-out prompts rl_test.jsonl
    n_test: int = 500                        # prompts in rl_test.jsonl: the accuracy every stage reports
    pref_difficulty: str = "3-4"             # difficulty range of the preference pairs
    n_prefs: int = 2000                      # pairs in prefs_train.jsonl
    n_prefs_test: int = 300                  # pairs of the trained kinds (--pref-mix) in prefs_test.jsonl
    pref_mix: str = "bare=0.4,bare_wrong=0.3,bad_format=0.3"  # kinds of rejected completion trained on (PREF_KINDS)
    n_diagnostic: int = 100                  # prefs_test pairs per probe: length_only, format_only, each kind not in --pref-mix
    n_examples: int = 1                      # examples printed per file
    # -- model-generated data: rejection sampling (--from-model) --------------------------------------
    from_model: str = ""                     # checkpoint to sample from; "" = write the synthetic files
    system_prompt: str = ""                  # a system turn before every prompt sampled on ("" = the checkpoint's own)
    prompts: str = "data/rl_train.jsonl"     # prompt/answer JSONL (or GSM8K question/answer) to sample on
    n_prompts: int = 128                     # prompts drawn from --prompts
    k: int = 4                               # completions sampled per prompt
    temperature: float = 1.0                 # sampling temperature (0 = greedy)
    max_new_tokens: int = tasks.MAX_NEW_TOKENS   # generation limit per completion
    batch_size: int = 256                    # completions per generate() call
    keep_bare: bool = False                  # also keep correct answers that show no steps
    ngram: int = 3                           # character n-gram size of the near-duplicate test
    jaccard: float = 0.8                     # tau: completions of one prompt with J >= tau are duplicates
    filter: bool = True                      # verify, dedup, balance; --no-filter writes EVERY sample
    out: str = "data/sft_model.jsonl"        # the SFT file of sampled rows
    summary: str = ""                        # JSON of counts, pass rates, distinct-n ("" = --out's stem + .summary.json)
    device: str = "auto"                     # auto|cpu|cuda
    threads: int = 0                         # torch CPU threads of --from-model sampling (0 = torch's default)


# ----------------------------------------------------------------------------------------------
# 1. Task families: digit-level algorithms that write their steps (and can make one mistake)
# ----------------------------------------------------------------------------------------------

@dataclass
class Problem:
    prompt: str        # the question, ending in "\n"
    answer: int
    family: str        # add | sub | mul | word
    difficulty: int
    operands: tuple    # what the family's step writer needs: (a, b) or (start, ops)


def digits(n: int) -> list[int]:
    """Decimal digits, least significant first: 357 -> [7, 5, 3]."""
    return [int(c) for c in reversed(str(n))]


def off(wrong, k: int) -> int:
    """The error injected into step k: wrong = (step index, delta) or None."""
    return wrong[1] if wrong is not None and wrong[0] == k else 0


def assemble(columns: list[int]) -> int:
    """Read the answer off the column results s_k: the last column whole, the others' last digit.

    answer = s_{n-1} 10^{n-1} + sum_{k<n-1} (s_k mod 10) 10^k
    With carries c_{k+1} = s_k // 10 this equals sum_k s_k 10^k - sum_k c_k 10^k, so an error of
    delta in one column k moves the answer by exactly delta 10^k: a wrong step always shows."""
    *low, last = columns
    return last * 10 ** len(low) + sum((s % 10) * 10 ** k for k, s in enumerate(low))


def add_steps(a: int, b: int, wrong=None):
    """Column addition: s_k = a_k + b_k + c_k, carry c_{k+1} = s_k // 10.
    357+486 -> ["7+6=13", "5+8+1=14", "3+4+1=8"], 843.  wrong=(k, delta): step k's result is off by
    delta and carried through (the later steps are right given it). -> (step lines, final answer)"""
    A, B = digits(a), digits(b)
    n = max(len(A), len(B))
    A, B = A + [0] * (n - len(A)), B + [0] * (n - len(B))
    lines, columns, carry = [], [], 0
    for k in range(n):
        s = A[k] + B[k] + carry + off(wrong, k)
        lines.append(f"{A[k]}+{B[k]}" + (f"+{carry}" if carry else "") + f"={s}")
        columns.append(s)
        carry = s // 10
    return lines, assemble(columns)


def sub_steps(a: int, b: int, wrong=None):
    """Column subtraction (a >= b) with borrows: borrow from the next column when a_k - b_k - c_k < 0,
    r_k = a_k + 10 * borrow_k - b_k - c_k.  357-186 -> ["7-6=1", "15-8=7", "3-1-1=1"], 171.
    The borrow depends on the digits only, so a wrong r_k changes the answer by delta 10^k."""
    A, B = digits(a), digits(b)
    B = B + [0] * (len(A) - len(B))
    lines, result, borrow_in = [], 0, 0
    for k in range(len(A)):
        borrow = 1 if A[k] - B[k] - borrow_in < 0 else 0
        top = A[k] + 10 * borrow
        r = top - B[k] - borrow_in + off(wrong, k)
        lines.append(f"{top}-{B[k]}" + ("-1" if borrow_in else "") + f"={r}")
        result += r * 10 ** k
        borrow_in = borrow
    return lines, result


def mul_steps(a: int, b: int, wrong=None):
    """Column (convolution) multiplication: s_k = sum_{i+j=k} a_i b_j + c_k, carry c_{k+1} = s_k // 10.
    47*38 -> ["7*8=56", "7*3+4*8+5=58", "4*3+5=17"], 1786. Each step: a few one-digit products."""
    A, B = digits(a), digits(b)
    lines, columns, carry = [], [], 0
    for k in range(len(A) + len(B) - 1):
        pairs = [(A[i], B[k - i]) for i in range(len(A)) if 0 <= k - i < len(B)]
        s = sum(x * y for x, y in pairs) + carry + off(wrong, k)
        lines.append("+".join(f"{x}*{y}" for x, y in pairs) + (f"+{carry}" if carry else "") + f"={s}")
        columns.append(s)
        carry = s // 10
    return lines, assemble(columns)


def word_steps(start: int, ops, wrong=None):
    """One step per sentence of the story: value_{j+1} = value_j op_j n_j.
    (12, [("+", 7), ("-", 5)]) -> ["12+7=19", "19-5=14"], 14."""
    value, lines = start, []
    for k, (op, n) in enumerate(ops):
        new = {"+": value + n, "-": value - n, "*": value * n}[op] + off(wrong, k)
        lines.append(f"{value}{op}{n}={new}")
        value = new
    return lines, value


def n_digit(rng: random.Random, n: int) -> int:
    """A uniform n-digit number (0-9 for n = 1)."""
    return rng.randrange(10) if n == 1 else rng.randrange(10 ** (n - 1), 10 ** n)


def mul_shape(d: int) -> tuple[int, int]:
    """Digits of the two factors at difficulty d: d+1 digits in all, 1x1, 2x1, 2x2, 3x2, 3x3, ..."""
    nb = (d + 1) // 2
    return d + 1 - nb, nb


def draw_add(rng, d):
    """Difficulty d: two d-digit numbers, d column steps."""
    a, b = n_digit(rng, d), n_digit(rng, d)
    return Problem(f"{a}+{b}=?\n", a + b, "add", d, (a, b))


def draw_sub(rng, d):
    """Difficulty d: two d-digit numbers, the larger first (answers are never negative)."""
    a, b = sorted((n_digit(rng, d), n_digit(rng, d)), reverse=True)
    return Problem(f"{a}-{b}=?\n", a - b, "sub", d, (a, b))


def draw_mul(rng, d):
    """Difficulty d: an na-digit times an nb-digit number, na + nb = d + 1 (see mul_shape)."""
    na, nb = mul_shape(d)
    a, b = n_digit(rng, na), n_digit(rng, nb)
    return Problem(f"{a}*{b}=?\n", a * b, "mul", d, (a, b))


NAMES = (("Ann", "She"), ("Bob", "He"), ("Eve", "She"), ("Sam", "He"), ("Kim", "She"), ("Tom", "He"),
         ("Zoe", "She"), ("Max", "He"))
ITEMS = ("apples", "pens", "cards", "coins", "eggs", "books", "shells", "stamps")
SENTENCES = {"+": ("buys {n} more", "finds {n} more", "gets {n} more"),
             "-": ("gives away {n}", "loses {n}", "sells {n}"),
             "*": ("doubles them",)}


def draw_word(rng, d):
    """Difficulty d: a story with d operations, one sentence and one step each. Steps stay local:
    add or take away 1-9, double only up to 20, so every step is a 2-digit +- 1-digit or a small double."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    start = value = rng.randint(2, 20)
    ops, sentences = [], []
    for _ in range(d):
        op = rng.choice(["+"] + (["-"] if value > 0 else []) + (["*"] if 0 < value <= 20 else []))
        n = 2 if op == "*" else rng.randint(1, min(value, 9) if op == "-" else 9)
        value = {"+": value + n, "-": value - n, "*": value * n}[op]
        ops.append((op, n))
        sentences.append(f"{pronoun} " + rng.choice(SENTENCES[op]).format(n=n) + ".")
    prompt = f"{name} has {start} {item}. " + " ".join(sentences) + f" How many {item} now?\n"
    return Problem(prompt, value, "word", d, (start, tuple(ops)))


# -- Countdown (TinyZero): reach a target with the allowed numbers ------------------------------

COUNTDOWN_NUMBERS = range(1, 10)       # the allowed numbers are digits 1-9 (repeats allowed)
COUNTDOWN_MAX_TARGET = 99              # targets 1-99
COUNTDOWN_DIFFICULTIES = (2, 3, 4)     # difficulty d: d numbers are given


@dataclass(frozen=True)
class Expression:
    """A solver's expression: its value, its text, its precedence (3 atom, 2 for * /, 1 for + -) and the
    steps that compute it, one 'a op b=c' line per operation in evaluation order."""
    value: int
    text: str
    precedence: int
    steps: tuple


OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
              "/": lambda a, b: a // b}                   # / only where it is exact (the solver checks)


def combine(a: Expression, op: str, b: Expression) -> Expression:
    """a op b with only the parentheses the precedence needs: a-(b+c), (a+b)*c, a/(b*c)."""
    value = OPERATIONS[op](a.value, b.value)
    precedence = 1 if op in "+-" else 2
    left = f"({a.text})" if a.precedence < precedence else a.text
    right = f"({b.text})" if b.precedence < precedence or (op in "-/" and b.precedence == precedence) else b.text
    return Expression(value, left + op + right, precedence, a.steps + b.steps + (f"{a.value}{op}{b.value}={value}",))


def better(a: Expression, b: Expression | None) -> bool:
    """The solver keeps, per value, the shortest text (then the first in order): a canonical answer."""
    return b is None or (len(a.text), a.text) < (len(b.text), b.text)


@functools.lru_cache(maxsize=None)
def countdown_solutions(numbers: tuple) -> dict:
    """Brute force over every expression on a sub-multiset of `numbers` with + - * / whose intermediate
    values are positive integers (a - b only when a > b, a / b only when b divides a): -> {value: the
    shortest Expression that reaches it, among those that use the fewest numbers}.

    Dynamic programming over subsets (by bit mask): reach(S) combines reach(A) and reach(S \\ A) over every
    split of S into two non-empty parts, so each value needs one representative per subset, not every
    expression. A restricted search is still a proof: each value it finds has an expression the verifier
    accepts, so a target drawn from it is solvable."""
    n = len(numbers)
    reach = {1 << i: {x: Expression(x, str(x), 3, ())} for i, x in enumerate(numbers)}
    for mask in range(1, 1 << n):
        if mask & (mask - 1) == 0:
            continue
        found = {}
        low = mask & -mask
        part = (mask - 1) & mask
        while part:                                            # every split {A, B} once: A holds the lowest bit
            if part & low:
                for a, b in itertools.product(reach[part].values(), reach[mask ^ part].values()):
                    big, small = (a, b) if a.value >= b.value else (b, a)
                    candidates = [combine(a, "+", b), combine(a, "*", b)]
                    if big.value > small.value:
                        candidates.append(combine(big, "-", small))
                    if big.value % small.value == 0:
                        candidates.append(combine(big, "/", small))
                    for expression in candidates:
                        if better(expression, found.get(expression.value)):
                            found[expression.value] = expression
            part = (part - 1) & mask
        reach[mask] = found
    solutions = {}
    for mask in sorted(reach, key=lambda m: (bin(m).count("1"), m)):   # fewest numbers first
        for value, expression in reach[mask].items():
            if value not in solutions or (bin(mask).count("1") == len(solutions[value].steps) + 1
                                          and better(expression, solutions[value])):
                solutions[value] = expression
    return solutions


def countdown_targets(numbers: tuple) -> list[int]:
    """The targets a prompt may ask for: reachable, 1..99, and not one of the given numbers (that would
    be solved by copying it)."""
    return sorted(v for v in countdown_solutions(numbers) if 1 <= v <= COUNTDOWN_MAX_TARGET and v not in numbers)


def countdown_prompt(numbers, target: int) -> str:
    return f"Make {target} from {' '.join(map(str, numbers))}\n"


def draw_countdown(rng, d):
    """Difficulty d: d digits (sorted), and a target drawn uniformly among the solvable ones. Digits that
    reach only one target (1 1 and 1 2) are drawn again: a noisy demonstration needs a second one."""
    while True:
        numbers = tuple(sorted(rng.choice(COUNTDOWN_NUMBERS) for _ in range(d)))
        targets = countdown_targets(numbers)
        if len(targets) >= 2:
            target = rng.choice(targets)
            return Problem(countdown_prompt(numbers, target), target, COUNTDOWN, d, numbers)


def countdown_steps(numbers: tuple, target: int):
    """The solver's steps and expression for `target`: -> (step lines, expression text)."""
    expression = countdown_solutions(numbers)[target]
    return list(expression.steps), expression.text


@functools.lru_cache(maxsize=None)
def countdown_space_size(d: int) -> int:
    """Distinct Countdown prompts at difficulty d: sum over multisets of d digits of their targets (those
    with at least two, as draw_countdown draws them)."""
    if d not in COUNTDOWN_DIFFICULTIES:
        return 0
    counts = (len(countdown_targets(numbers))
              for numbers in itertools.combinations_with_replacement(COUNTDOWN_NUMBERS, d))
    return sum(count for count in counts if count >= 2)


def countdown_demonstration(problem: Problem, style: str) -> str:
    """worked: the solver's steps, then '#### expression'; bare: only '#### expression'; noisy: a careless
    annotator's answer, the worked solution of the nearest OTHER target of these numbers (a near miss)."""
    numbers, target = problem.operands, problem.answer
    if style == "noisy":
        target = min((v for v in countdown_targets(numbers) if v != target), key=lambda v: (abs(v - target), v))
    lines, expression = countdown_steps(numbers, target)
    return format_completion(lines, expression) if style != "bare" else f"#### {expression}"


# -- Program synthesis: a function from a few examples, checked on hidden tests ----------------------

# (difficulty, argument, template). The difficulty is the template's complexity: its number of operations
# (binary operators, comparisons, calls, subscripts, comprehensions; program_operations counts them). The
# constants are drawn: a in 2..5, b in -9..9 but not 0, c in -5..5, t (a threshold) in 1..8, r (a parity) 0..1.
PROGRAM_TEMPLATES = (
    (1, "int", "x+{b}"), (1, "int", "{a}*x"), (1, "int", "max(x, {c})"), (1, "int", "min(x, {c})"),
    (1, "list", "sum(x)"), (1, "list", "max(x)"), (1, "list", "sorted(x)"), (1, "list", "x[::-1]"),
    (2, "int", "{a}*x+{b}"), (2, "int", "x*x+{b}"), (2, "int", "x*(x+{b})"), (2, "int", "abs(x+{b})"),
    (2, "list", "[v for v in x if v > {t}]"), (2, "list", "[{a}*v for v in x]"),
    (3, "int", "{a}*x*x+{b}"), (3, "int", "max({a}*x+{b}, {c})"), (3, "list", "max(x)-min(x)"),
    (3, "list", "[v for v in x if v % 2 == {r}]"), (3, "list", "sum([v for v in x if v > {t}])"),
    (3, "list", "len([v for v in x if v > {t}])"), (3, "list", "[{a}*v+{b} for v in x]"),
    (4, "int", "{a}*x*x+{b}*x"), (4, "list", "sum([v for v in x if v % 2 == {r}])"),
    (4, "list", "len([v for v in x if v % 2 == {r}])"), (4, "list", "[v*v+{b} for v in x if v > {t}]"),
    (4, "list", "sum([{a}*v for v in x if v > {t}])"),
    (5, "int", "{a}*x*x+{b}*x+{c}"),
)
PROGRAM_SHOWN, PROGRAM_HIDDEN = 4, 8        # examples in the prompt; hidden tests in the row
PROGRAM_INTS = range(-9, 10)                # an integer argument; a list argument: 1-4 digits 0-9 (so that a
                                            # prompt fits 160 bytes: a context of 256 less 96 for the completion)


def program_operations(program: str) -> int:
    """The difficulty of a program: binary operators, comparisons, calls, subscripts and comprehensions."""
    kinds = (ast.BinOp, ast.Call, ast.Subscript, ast.ListComp)
    return sum(len(node.ops) if isinstance(node, ast.Compare) else isinstance(node, kinds)
               for node in ast.walk(interpreter.parse_program(program)))


def draw_program_text(rng, template: str) -> str:
    """The template with its constants drawn, '+-' written '-' (x+-3 is x-3)."""
    constants = {"a": rng.randint(2, 5), "b": rng.choice([b for b in range(-9, 10) if b]), "c": rng.randint(-5, 5),
                 "t": rng.randint(1, 8), "r": rng.randint(0, 1)}
    return template.format(**constants).replace("+-", "-")


def draw_program_argument(rng, kind: str):
    return rng.choice(PROGRAM_INTS) if kind == "int" else [rng.randrange(10) for _ in range(rng.randint(1, 4))]


def program_prompt(examples) -> str:
    """'f(3) = 10; f(5) = 26; f(0) = 1; f(-2) = 5. f(x) = ?' and a newline."""
    return "; ".join(f"f({argument}) = {output}" for argument, output in examples) + ". f(x) = ?\n"


def draw_program(rng, d):
    """Difficulty d: a template of d operations with drawn constants, PROGRAM_SHOWN + PROGRAM_HIDDEN distinct
    arguments, the outputs computed by lib/interpreter.py (the executor that later checks the answers); drawn
    again when the shown outputs are all equal (a constant would fit them). operands: (program, shown, hidden)."""
    while True:
        _, kind, template = rng.choice([t for t in PROGRAM_TEMPLATES if t[0] == d])
        program, arguments = draw_program_text(rng, template), {}
        while len(arguments) < PROGRAM_SHOWN + PROGRAM_HIDDEN:
            argument = draw_program_argument(rng, kind)
            arguments.setdefault(str(argument), argument)
        tree = interpreter.parse_program(program)
        tests = [[argument, interpreter.run(tree, argument)] for argument in arguments.values()]
        shown, hidden = tests[:PROGRAM_SHOWN], tests[PROGRAM_SHOWN:]
        if len({str(output) for _, output in shown}) > 1:
            return Problem(program_prompt(shown), program, PROGRAM, d, (program, shown, hidden))


def program_space_size(d: int) -> int:
    """Distinct program prompts at difficulty d: 0 where no template has d operations, else more than any
    split asks for (the arguments alone give 19^4 or 10^4 prompts per template and constants)."""
    return 10 ** 12 if any(t[0] == d for t in PROGRAM_TEMPLATES) else 0


def program_worked_lines(program: str, shown) -> list[str]:
    """One step per shown example, the program with the argument written in: '3*(-2)+1=-5', where that is
    arithmetic tasks.arith can check (integer programs without calls); none otherwise."""
    lines = []
    for argument, output in shown:
        if not isinstance(argument, int):
            return []
        step = re.sub(r"\bx\b", f"({argument})" if argument < 0 else str(argument), program)
        try:
            if tasks.arith(step) != output:
                return []
        except ValueError:
            return []
        lines.append(f"{step}={output}")
    return lines


def program_near_miss(program: str, hidden) -> str:
    """A careless annotator's program: one constant moved by 1, the first such that fails a hidden test;
    failing that, the program plus 1 (or plus [0], for a list), which fails every test."""
    for match in re.finditer(r"\d+", program):
        for delta in (1, -1):
            number = int(match[0]) + delta
            if number >= 0:
                candidate = program[:match.start()] + str(number) + program[match.end():]
                if interpreter.share_passed(candidate, hidden) < 1:
                    return candidate
    return f"({program})+" + ("[0]" if isinstance(hidden[0][1], list) else "1")


def program_demonstration(problem: Problem, style: str) -> str:
    """worked: the program checked on the shown examples where arithmetic can show it (else as bare), then
    '#### program'; bare: only '#### program'; noisy: a near miss that fails a hidden test (program_near_miss)."""
    program, shown, hidden = problem.operands
    if style == "noisy":
        return f"#### {program_near_miss(program, hidden)}"
    lines = program_worked_lines(program, shown) if style == "worked" else []
    return format_completion(lines, program)


def program_row(problem: Problem) -> dict:
    """An RL / held-out row: the reference program as the answer, the hidden tests, the shown examples."""
    program, shown, hidden = problem.operands
    return {"prompt": problem.prompt, "answer": program, "tests": hidden, "examples": shown,
            "family": PROGRAM, "difficulty": problem.difficulty}


def program_sft_row(problem: Problem, style: str) -> dict:
    return {**program_row(problem), "completion": program_demonstration(problem, style), "style": style}


DRAW = {"add": draw_add, "sub": draw_sub, "mul": draw_mul, "word": draw_word, COUNTDOWN: draw_countdown,
        PROGRAM: draw_program}
STEP_WRITERS = {"add": add_steps, "sub": sub_steps, "mul": mul_steps, "word": word_steps}


def space_size(family: str, d: int) -> int:
    """How many distinct prompts the family can draw at difficulty d (word problems: unlimited)."""
    count = lambda n: 10 if n == 1 else 9 * 10 ** (n - 1)   # n-digit numbers
    if family == COUNTDOWN:
        return countdown_space_size(d)
    if family == PROGRAM:
        return program_space_size(d)
    if family == "add":
        return count(d) ** 2
    if family == "sub":
        return count(d) * (count(d) + 1) // 2                 # unordered pairs a >= b
    if family == "mul":
        na, nb = mul_shape(d)
        return count(na) * count(nb)
    return 10 ** 12


def worked_steps(problem: Problem, wrong=None):
    """-> (step lines, final answer) of the family's algorithm, optionally with one wrong step."""
    return STEP_WRITERS[problem.family](*problem.operands, wrong=wrong)


def verify(completion: str, answer, numbers=None, tests=None) -> bool:
    """The verifier of every family and every stage: the final answer after '####' equals the answer
    (tasks.is_correct) or, for a Countdown row (its allowed `numbers` given), the final expression uses
    only those numbers and hits the answer (tasks.expression_hits_target), or, for a program row (its hidden
    `tests` given), the program passes every test (lib/interpreter.py); and no written step is
    arithmetically wrong (tasks.completion_style)."""
    row = {"answer": answer, **({} if numbers is None else {"numbers": numbers}),
           **({} if tests is None else {"tests": tests})}
    return tasks.verify(completion, row) and tasks.completion_style(completion) != "wrong_step"


def verify_row(completion: str, row: dict) -> bool:
    """verify() of a prompt row: its answer, and its Countdown numbers or program tests where it has them."""
    return verify(completion, row["answer"], row.get("numbers"), row.get("tests"))


# ----------------------------------------------------------------------------------------------
# 2. Demonstration styles and preference pairs
# ----------------------------------------------------------------------------------------------

def format_completion(lines: list[str], answer) -> str:
    return "\n".join([*lines, f"#### {answer}"])


def step_results(lines: list[str]) -> list[int]:
    return [int(line.rpartition("=")[2]) for line in lines]


def noisy_completion(problem: Problem, rng: random.Random) -> str:
    """A worked solution with exactly one wrong step (its result off by one), carried through, so the
    final answer is wrong: a careless annotator. The step is uniform; the sign is random where both keep
    every result a valid one (non-negative, a single digit for subtraction)."""
    n_steps = len(worked_steps(problem)[0])
    for k in rng.sample(range(n_steps), n_steps):
        for delta in rng.sample((-1, 1), 2):
            lines, answer = worked_steps(problem, wrong=(k, delta))
            results = step_results(lines)
            if min(results) >= 0 and (problem.family != "sub" or max(results) <= 9) and answer != problem.answer:
                return format_completion(lines, answer)
    raise AssertionError(f"no valid wrong step for {problem.prompt!r}")  # unreachable: +1 or -1 always fits


def demonstration(problem: Problem, style: str, rng: random.Random) -> str:
    """worked: the steps and the answer; bare: only '#### answer' (a shortcut a small model cannot
    execute on hard problems); noisy: the steps with one wrong step carried through."""
    if problem.family == COUNTDOWN:
        return countdown_demonstration(problem, style)
    if style == "worked":
        lines, answer = worked_steps(problem)
        return format_completion(lines, answer)
    if style == "bare":
        return f"#### {problem.answer}"
    return noisy_completion(problem, rng)


def spaced(line: str) -> str:
    """'7+6=13' -> '7 + 6 = 13': the same step in another format."""
    return re.sub(r"\s*([-+*=])\s*", r" \1 ", line).strip()


def wrong_number(answer: int, rng: random.Random) -> int:
    """A wrong answer of the same number of digits, drawn uniformly (never `answer` itself)."""
    n = len(str(answer))
    while (wrong := n_digit(rng, n)) == answer:
        pass
    return wrong


def rejected_completion(problem: Problem, kind: str, rng: random.Random) -> str:
    """The second completion of a pair; `chosen` is always the worked, correct one.
    bare:         the right answer with no work, '#### answer' (the shortcut: strategy, not outcome)
    bare_wrong:   a wrong answer with no work (same digit count)
    wrong_answer: correct steps, then a wrong final answer of the same digit count (does not match the steps)
    off_by_one:   correct steps, final answer +-1          wrong_step: one wrong step carried through
    bad_format:   correct steps, the answer without '####'
    length_only:  (diagnostic, correct) one step written twice: longer, nothing else changes
    format_only:  (diagnostic, correct) spaces around the operators: other format, same content"""
    lines, answer = worked_steps(problem)
    if kind == "bare":
        return f"#### {answer}"
    if kind == "bare_wrong":
        return f"#### {wrong_number(answer, rng)}"
    if kind == "wrong_answer":
        return format_completion(lines, wrong_number(answer, rng))
    if kind == "off_by_one":
        return format_completion(lines, answer + (rng.choice((-1, 1)) if answer > 0 else 1))
    if kind == "wrong_step":
        return noisy_completion(problem, rng)
    if kind == "bad_format":
        final = rng.choice((f"{answer}", f"answer: {answer}", f"The answer is {answer}"))
        return "\n".join([*lines, final])
    if kind == "length_only":
        k = rng.randrange(len(lines))
        return format_completion(lines[:k + 1] + lines[k:], answer)
    if kind == "format_only":
        return format_completion([spaced(line) for line in lines], answer)
    raise ValueError(f"unknown preference kind {kind!r}")


# ----------------------------------------------------------------------------------------------
# 3. Splits: exact style counts, even allocation over (family, difficulty), disjoint prompts
# ----------------------------------------------------------------------------------------------

def exact_counts(n: int, shares: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding: counts sum to n and |count - n * share| < 1 for every key."""
    raw = {key: n * share for key, share in shares.items()}
    counts = {key: math.floor(value) for key, value in raw.items()}
    by_remainder = sorted(raw, key=lambda key: raw[key] - counts[key], reverse=True)
    for key in by_remainder[:n - sum(counts.values())]:
        counts[key] += 1
    return counts


def shuffled_labels(rng: random.Random, n: int, shares: dict[str, float]) -> list[str]:
    labels = [key for key, count in exact_counts(n, shares).items() for _ in range(count)]
    rng.shuffle(labels)
    return labels


def allocate(n: int, capacities: list[int]) -> list[int]:
    """Split n items over cells as evenly as possible, no cell above its capacity (water-filling):
    sum = n, count_i <= capacity_i, and a cell below its capacity holds at least max_j count_j - 1."""
    if n > sum(capacities):
        raise ValueError(f"{n} items do not fit in capacity {sum(capacities)}")
    counts, remaining = [0] * len(capacities), n
    while remaining > 0:
        open_cells = [i for i, cap in enumerate(capacities) if counts[i] < cap]
        share = max(1, remaining // len(open_cells))
        for i in open_cells:
            take = min(share, capacities[i] - counts[i], remaining)
            counts[i] += take
            remaining -= take
            if remaining == 0:
                break
    return counts


def draw_split(rng: random.Random, n: int, families, difficulties, taken: set, used: Counter, name: str):
    """n problems spread evenly over (family, difficulty) cells, none with a prompt in `taken`
    (the prompts of every split drawn before): splits are disjoint by construction."""
    cells = [(family, d) for family in families for d in difficulties]
    capacities = [space_size(family, d) - used[(family, d)] for family, d in cells]
    if n > sum(capacities):
        raise cli.UserError(f"{name}: only {sum(capacities)} unused distinct prompts in families "
                            f"{','.join(families)} at difficulties {difficulties[0]}-{difficulties[-1]}, "
                            f"{n} asked; widen the range or ask for fewer")
    problems = []
    for (family, d), count in zip(cells, allocate(n, capacities)):
        misses, limit = 0, 50 * min(space_size(family, d), 10 ** 5)
        while count > 0:
            problem = DRAW[family](rng, d)
            if problem.prompt in taken:
                misses += 1
                if misses > limit:  # only if space_size were wrong; a guard against looping forever
                    raise RuntimeError(f"{name}: cannot find unused {family} prompts at difficulty {d}")
                continue
            taken.add(problem.prompt)
            used[(family, d)] += 1
            problems.append(problem)
            count -= 1
    rng.shuffle(problems)
    return problems


def allowed_numbers(problem: Problem) -> dict:
    """A Countdown row lists its allowed numbers (tasks.verify knows the task by this key)."""
    return {"numbers": list(problem.operands)} if problem.family == COUNTDOWN else {}


def sft_row(problem: Problem, style: str, rng: random.Random) -> dict:
    return {"prompt": problem.prompt, "completion": demonstration(problem, style, rng), "answer": str(problem.answer),
            **allowed_numbers(problem), "family": problem.family, "difficulty": problem.difficulty, "style": style}


def rl_row(problem: Problem) -> dict:
    return {"prompt": problem.prompt, "answer": str(problem.answer), **allowed_numbers(problem),
            "family": problem.family, "difficulty": problem.difficulty}


def pref_row(problem: Problem, kind: str, rng: random.Random) -> dict:
    return {"prompt": problem.prompt, "chosen": demonstration(problem, "worked", rng),
            "rejected": rejected_completion(problem, kind, rng), "kind": kind, "answer": str(problem.answer),
            "family": problem.family, "difficulty": problem.difficulty}


def build_dataset(args: Args) -> dict[str, list[dict]]:
    """All six files, in memory (Countdown: the four SFT and RL files; it has no preference pairs). The
    held-out splits are drawn first, so when a small cell (1-digit sums have only 100 prompts) runs out,
    it is the training splits that get fewer of it."""
    families = parse_families(args.families)
    if families == [PROGRAM]:
        return build_program_dataset(args)
    mix, test_mix = parse_mix(args.mix, STYLES, "mix"), parse_mix(args.test_mix, STYLES, "test-mix")
    pref_mix = parse_mix(args.pref_mix, PREF_KINDS, "pref-mix")
    sft_d, rl_d = parse_range(args.sft_difficulty, "sft-difficulty"), parse_range(args.rl_difficulty, "rl-difficulty")
    test_d = parse_range(args.test_difficulty, "test-difficulty")
    pref_d = parse_range(args.pref_difficulty, "pref-difficulty")
    rng, taken, used = random.Random(args.seed), set(), Counter()
    split = lambda n, ds, name: draw_split(rng, n, families, ds, taken, used, name)
    rl_test = split(args.n_test, test_d, "rl_test.jsonl (--n-test, --test-difficulty)")
    sft_test = split(args.n_sft_test, sft_d, "sft_test.jsonl (--n-sft-test, --sft-difficulty)")
    if families == [COUNTDOWN]:
        sft_train = split(args.n_sft, sft_d, "sft_train.jsonl (--n-sft, --sft-difficulty)")
        rl_train = split(args.n_rl, rl_d, "rl_train.jsonl (--n-rl, --rl-difficulty)")
        return {"sft_train": [sft_row(p, s, rng) for p, s in zip(sft_train, shuffled_labels(rng, args.n_sft, mix))],
                "sft_test": [sft_row(p, s, rng) for p, s in zip(sft_test, shuffled_labels(rng, args.n_sft_test,
                                                                                             test_mix))],
                "rl_train": [rl_row(p) for p in rl_train], "rl_test": [rl_row(p) for p in rl_test]}
    prefs_test = split(args.n_prefs_test + len(DIAGNOSTIC_KINDS) * args.n_diagnostic, pref_d,
                       "prefs_test.jsonl (--n-prefs-test, --n-diagnostic, --pref-difficulty)")
    sft_train = split(args.n_sft, sft_d, "sft_train.jsonl (--n-sft, --sft-difficulty)")
    prefs_train = split(args.n_prefs, pref_d, "prefs_train.jsonl (--n-prefs, --pref-difficulty)")
    rl_train = split(args.n_rl, rl_d, "rl_train.jsonl (--n-rl, --rl-difficulty)")
    test_kinds = shuffled_labels(rng, args.n_prefs_test, pref_mix) + \
        [kind for kind in DIAGNOSTIC_KINDS for _ in range(args.n_diagnostic)]
    # Probes: n_diagnostic held-out pairs of each kind NOT trained on (what the reward model did not learn).
    # Drawn last, with their own generator, so that they change no other file.
    probe_kinds = [kind for kind in PREF_KINDS if not pref_mix.get(kind)]
    probe_rng = random.Random(f"pref probes {args.seed}")
    probes = draw_split(probe_rng, len(probe_kinds) * args.n_diagnostic, families, pref_d, taken, used,
                        "prefs_test.jsonl probes (--n-diagnostic, --pref-difficulty)")
    probe_labels = [kind for kind in probe_kinds for _ in range(args.n_diagnostic)]
    return {
        "sft_train": [sft_row(p, s, rng) for p, s in zip(sft_train, shuffled_labels(rng, args.n_sft, mix))],
        "sft_test": [sft_row(p, s, rng) for p, s in zip(sft_test, shuffled_labels(rng, args.n_sft_test, test_mix))],
        "prefs_train": [pref_row(p, k, rng) for p, k in zip(prefs_train, shuffled_labels(rng, args.n_prefs, pref_mix))],
        "prefs_test": [pref_row(p, k, rng) for p, k in zip(prefs_test, test_kinds)]
                      + [pref_row(p, k, probe_rng) for p, k in zip(probes, probe_labels)],
        "rl_train": [rl_row(p) for p in rl_train],
        "rl_test": [rl_row(p) for p in rl_test],
    }


def build_program_dataset(args: Args) -> dict[str, list[dict]]:
    """The program task's four files, as Countdown's (build_dataset): held-out prompts drawn first, every split
    disjoint from the others by prompt; SFT rows in the --mix styles, RL rows with their hidden tests."""
    mix, test_mix = parse_mix(args.mix, STYLES, "mix"), parse_mix(args.test_mix, STYLES, "test-mix")
    rng, taken, used = random.Random(args.seed), set(), Counter()

    def split(n: int, flag: str, name: str) -> list[Problem]:
        difficulties = parse_range(getattr(args, flag), flag.replace("_", "-"))
        return draw_split(rng, n, [PROGRAM], difficulties, taken, used, name)

    rl_test = split(args.n_test, "test_difficulty", "rl_test.jsonl (--n-test, --test-difficulty)")
    sft_test = split(args.n_sft_test, "sft_difficulty", "sft_test.jsonl (--n-sft-test, --sft-difficulty)")
    sft_train = split(args.n_sft, "sft_difficulty", "sft_train.jsonl (--n-sft, --sft-difficulty)")
    rl_train = split(args.n_rl, "rl_difficulty", "rl_train.jsonl (--n-rl, --rl-difficulty)")
    sft_styles, sft_test_styles = shuffled_labels(rng, args.n_sft, mix), shuffled_labels(rng, args.n_sft_test, test_mix)
    return {"sft_train": [program_sft_row(p, s) for p, s in zip(sft_train, sft_styles)],
            "sft_test": [program_sft_row(p, s) for p, s in zip(sft_test, sft_test_styles)],
            "rl_train": [program_row(p) for p in rl_train], "rl_test": [program_row(p) for p in rl_test]}


# ----------------------------------------------------------------------------------------------
# 4. Filtering model data: exact and near duplicates, diversity, balance
# ----------------------------------------------------------------------------------------------

def char_ngrams(text: str, n: int) -> set[str]:
    """The set of character n-grams ('shingles'); a text shorter than n is its own single shingle."""
    return {text[i:i + n] for i in range(len(text) - n + 1)} or {text}


def jaccard(a: set, b: set) -> float:
    """J(A, B) = |A n B| / |A u B|  (1 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def dedup(texts: list[str], n: int = 3, threshold: float = 0.8) -> list[int]:
    """Indices of the texts to keep, first occurrence wins: exact duplicates by hash, then near
    duplicates by brute-force Jaccard over character n-grams (O(N^2); MinHash makes it O(N) at scale)."""
    kept, kept_shingles, seen = [], [], set()
    for i, text in enumerate(texts):
        if text in seen:
            continue
        shingles = char_ngrams(text, n)
        if any(jaccard(shingles, other) >= threshold for other in kept_shingles):
            continue
        seen.add(text)
        kept.append(i)
        kept_shingles.append(shingles)
    return kept


def tokens_of(text: str) -> list[str]:
    """Numbers, words and single symbols: '7+6=13' -> ['7', '+', '6', '=', '13']."""
    return re.findall(r"\d+|[A-Za-z]+|\S", text)


def distinct_n(texts: list[str], n: int) -> float:
    """distinct-n (Li et al. 2016): unique n-grams / all n-grams, over the tokens of every text."""
    grams = [tuple(tokens[i:i + n]) for tokens in map(tokens_of, texts) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def balance_by_difficulty(rows: list[dict], rng: random.Random) -> list[dict]:
    """Down-sample every difficulty to at most an equal share of the total, so the easy problems
    (which pass most often) do not crowd out the hard ones; scarce difficulties keep all they have."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["difficulty"]].append(row)
    cap = math.ceil(len(rows) / max(len(groups), 1))
    return [row for d in sorted(groups) for row in (groups[d] if len(groups[d]) <= cap else rng.sample(groups[d], cap))]


def row_numbers(row: dict) -> dict:
    """A Countdown prompt row's allowed numbers, carried into the rows made from it."""
    return {"numbers": row["numbers"]} if "numbers" in row else {}


def filter_samples(rows: list[dict], samples: list[tuple], args: Args, rng: random.Random):
    """Rejection sampling: samples = (row index, completion, finished) -> (kept SFT rows, counts).
    Keep a sample iff it ended on its own, verify() accepts it and it shows its work (or --keep-bare);
    then drop exact and near duplicates among each prompt's kept completions; then balance."""
    by_prompt = defaultdict(list)
    for i, text, finished in samples:
        style = tasks.completion_style(text)
        if finished and verify_row(text, rows[i]) and (style == "worked" or args.keep_bare):
            by_prompt[i].append((text, style))
    verified, unique = sum(map(len, by_prompt.values())), []
    for i, items in by_prompt.items():
        for j in dedup([text for text, _ in items], args.ngram, args.jaccard):
            text, style = items[j]
            unique.append({"prompt": rows[i]["prompt"], "completion": text, "answer": str(rows[i]["answer"]),
                           **row_numbers(rows[i]), "family": rows[i].get("family", ""), "difficulty": rows[i].get("difficulty", 0),
                           "style": style, "source": "model"})
    kept = balance_by_difficulty(unique, rng)
    return kept, {"sampled": len(samples), "verified": verified, "deduplicated": len(unique), "kept": len(kept)}


# ----------------------------------------------------------------------------------------------
# 5. Sampling from a model: rejection sampling (STaR / RFT), or every sample (--no-filter)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_completions(policy, enc, prompts: list[str], k: int, temperature: float, max_new_tokens: int,
                       batch_size: int, generator=None) -> tuple[list[tuple[int, str, bool]], int]:
    """k completions per prompt with model.generate, batch_size sequences per call.
    -> ([(prompt index, completion text, finished)], completion tokens sampled); finished=False: cut by
    max_new_tokens."""
    jobs = [i for i in range(len(prompts)) for _ in range(k)]
    encoded = [tokenizer.encode_prompt(enc, p) for p in prompts]          # in the checkpoint's chat format
    samples, n_tokens = [], 0
    for start in range(0, len(jobs), batch_size):
        idx = jobs[start:start + batch_size]
        room = policy.config.block_size - max(len(encoded[i]) for i in idx)
        gen = M.generate(policy, [encoded[i] for i in idx], max(1, min(max_new_tokens, room)),
                         temperature=temperature, stop_ids=tokenizer.stop_ids(enc), pad_id=tokenizer.pad_id(enc),
                         generator=generator)
        n_tokens += int(gen.lengths.sum())
        for row, i in enumerate(idx):
            text = tokenizer.decode(enc, gen.tokens[row, :int(gen.lengths[row])].tolist())
            samples.append((i, text, bool(gen.finished[row])))
    return samples, n_tokens


def pass_rates(rows: list[dict], samples) -> dict:
    """Share of samples that verify(), per difficulty."""
    hits = defaultdict(list)
    for i, text, finished in samples:
        hits[rows[i].get("difficulty", 0)].append(finished and verify_row(text, rows[i]))
    return {d: sum(v) / len(v) for d, v in sorted(hits.items())}


def diversity(texts) -> list[float]:
    """[distinct-1, distinct-2, distinct-3] of a list of completions."""
    return [distinct_n(texts, n) for n in (1, 2, 3)]


def unfiltered_rows(rows: list[dict], samples) -> list[dict]:
    """--no-filter: EVERY sample as an SFT row, unverified, truncated ones included: what a model trained on
    its own raw outputs sees (the model-collapse arm of experiments/self_training.py)."""
    return [{"prompt": rows[i]["prompt"], "completion": text, "answer": str(rows[i]["answer"]),
             **row_numbers(rows[i]), "family": rows[i].get("family", ""), "difficulty": rows[i].get("difficulty", 0),
             "style": tasks.completion_style(text), "source": "model_unfiltered", "finished": finished}
            for i, text, finished in samples]


def dataset_command(out_dir: str) -> list[str]:
    """This file in its default mode: writes the synthetic files, e.g. a missing default --prompts file."""
    return stages.stage_command("synth.py", out_dir=out_dir)


def read_sampling_prompts(args: Args, enc, block_size: int, rng: random.Random) -> list[dict]:
    """--prompts rows (tasks.read_prompts: {"prompt", "answer"} or GSM8K {"question", "answer"}), the optional
    labels "family" (text) and "difficulty" (an integer) and a Countdown row's "numbers" (a list of numbers)
    checked by line; prompts that leave no room for
    --max-new-tokens in the context are skipped (tasks.fit_prompts); then --n-prompts of them at random.
    A missing DEFAULT --prompts file is made by this file's default mode (stages.ensure_input)."""
    default = Args().prompts
    path = stages.ensure_input(args.prompts, default, dataset_command(os.path.dirname(default)))
    rows = tasks.read_prompts(path)
    for number, row in tasks.jsonl_objects(path):
        tasks.check_row(row, {key: kind for key, kind in (("family", str), ("difficulty", int), ("numbers", list))
                              if key in row}, f"{path}:{number}")
        if any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in row.get("numbers", ())):
            raise cli.UserError(f"{path}:{number}: 'numbers' must be a list of numbers")
    rows = tasks.fit_prompts(rows, enc, block_size, args.max_new_tokens, path)
    return rng.sample(rows, args.n_prompts) if args.n_prompts < len(rows) else rows


def from_model(args: Args) -> dict:
    """Rejection sampling (STaR / RFT): sample k per prompt, verify, dedup, balance; write --out and its
    summary as one set (neither when no sample passes). With --no-filter, --out holds every sample and the
    summary still counts what the filter would have kept. -> the summary (counts, pass rates, distinct-n)."""
    device, rng = cli.get_device(args.device), random.Random(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy, enc, _ = checkpoints.load(args.from_model, device)           # inputs first: a bad one writes nothing
    if args.system_prompt:
        tokenizer.set_system_prompt(enc, args.system_prompt)
    rows = read_sampling_prompts(args, enc, policy.config.block_size, rng)
    summary_file = summary_path(args)
    claim_folders(args.out, summary_file)                      # a second writer is refused before sampling
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.time()
    samples, sampled_tokens = sample_completions(policy, enc, [r["prompt"] for r in rows], args.k, args.temperature,
                                 args.max_new_tokens, args.batch_size, generator)
    seconds = time.time() - t0
    kept, counts = filter_samples(rows, samples, args, rng)
    written = kept if args.filter else unfiltered_rows(rows, samples)
    counts["written"] = len(written)
    texts = [text for _, text, _ in samples]
    summary = {"args": asdict(args), "seconds": seconds, "sampled_tokens": sampled_tokens, "counts": counts, "pass_rate": pass_rates(rows, samples),
               "sampled_pass": sum(finished and verify_row(text, rows[i])
                                   for i, text, finished in samples)
               / len(samples),
               "distinct_n": {"samples": diversity(texts), "written": diversity([r["completion"] for r in written])}}
    if written:                                                # nothing to write: the previous set stays whole
        write_file_set({args.out: jsonl_text(written), summary_file: json.dumps(summary, indent=2)})
    kept_per_d = Counter(r["difficulty"] for r in kept)
    shown = lambda values: " / ".join(f"{v:.3f}" for v in values)
    print(f"sampled {len(samples)} completions ({len(rows)} prompts x {args.k}, T={args.temperature}) "
          f"from {args.from_model} in {seconds:.1f} s")
    print("difficulty  pass rate  kept")
    for d, rate in summary["pass_rate"].items():
        print(f"{d:>10}  {100 * rate:8.1f}%  {kept_per_d[d]:4d}")
    print(f"yield: {counts['kept']}/{counts['sampled']} = {100 * counts['kept'] / counts['sampled']:.1f}% "
          f"(verified {counts['verified']}, after dedup {counts['deduplicated']}, after balance {counts['kept']})")
    print(f"distinct-1/2/3 of completions: all samples {shown(summary['distinct_n']['samples'])} | "
          f"written {shown(summary['distinct_n']['written'])}")
    what = "verified, deduplicated, balanced" if args.filter else "every sample, unfiltered (--no-filter)"
    print(f"wrote {args.out} ({len(written)} rows: {what}) and {summary_file}" if written else
          f"no sample passed the verifier; {args.out} and {summary_file} not written")
    return summary


# ----------------------------------------------------------------------------------------------
# 6. Writing a set of files: one writer per folder, every file complete or none
# ----------------------------------------------------------------------------------------------

def claim_folders(*paths: str) -> None:
    """Claim the folder of each output (rundir.claim_run_dir, no lock file left in it): one writer per folder,
    so two runs never mix their files; a second writer gets a one-line error before it writes anything."""
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
        try:
            rundir.claim_run_dir(folder, lock_file=False)
        except OSError as e:
            raise cli.UserError(f"{folder}: cannot write here ({e.strerror})") from None


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_file_set(contents: dict[str, str]) -> None:
    """Write {path: text} as ONE set. Each file goes to its temporary name (rundir.atomic_write) and only when
    every one is complete are they renamed into place. A run that fails or is killed while writing leaves
    the previous set untouched, never a mix of two runs (held-out prompts of one seed beside the training
    prompts of another); its temporary files are deleted, or cleaned up by the next writer if it was killed."""
    path = ""
    try:
        with contextlib.ExitStack() as renames:                # on exit: every rename, after every write
            for path, text in contents.items():
                temp = renames.enter_context(rundir.atomic_write(path))
                temp.write(text)
                temp.flush()                                   # complete on disk before the first rename
    except OSError as e:
        raise cli.UserError(f"{e.filename or path}: cannot write ({e.strerror})") from None


# ----------------------------------------------------------------------------------------------
# 7. Options, the report, main
# ----------------------------------------------------------------------------------------------

def parse_range(text: str, name: str) -> list[int]:
    """'1-3' -> [1, 2, 3]; '2' -> [2]."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    lo, hi = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, -1)
    if not 1 <= lo <= hi <= MAX_DIFFICULTY:
        raise cli.UserError(f"--{name} {text!r}: expected LO-HI with 1 <= LO <= HI <= {MAX_DIFFICULTY}")
    return list(range(lo, hi + 1))


def parse_mix(text: str, allowed, name: str) -> dict[str, float]:
    """'worked=0.4,bare=0.4,noisy=0.2' -> shares normalised to sum to 1."""
    shares = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        try:
            shares[key.strip()] = float(value)
        except ValueError:
            shares[key.strip()] = -1.0
        if not eq or key.strip() not in allowed or not 0 <= shares[key.strip()] < math.inf:
            raise cli.UserError(f"--{name} {text!r}: expected KEY=SHARE pairs, KEY in {', '.join(allowed)}, SHARE >= 0")
    total = sum(shares.values())
    if total <= 0:
        raise cli.UserError(f"--{name} {text!r}: the shares sum to 0")
    return {key: value / total for key, value in shares.items()}


def parse_families(text: str) -> list[str]:
    families = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in families if f not in (*FAMILIES, COUNTDOWN, PROGRAM)]
    if not families or unknown:
        raise cli.UserError(f"--families {text!r}: choose from {', '.join(FAMILIES)}, or {COUNTDOWN} or {PROGRAM} "
                            "alone")
    for task in (COUNTDOWN, PROGRAM):
        if task in families and len(set(families)) > 1:
            raise cli.UserError(f"--families {text!r}: {task} is a task of its own (another verifier, its own "
                                f"files); give it alone")
    return families


def file_names(families: list[str]) -> dict[str, str]:
    """The files of a dataset: {split: file name}. Countdown's and the program task's carry a prefix, so they sit
    beside the headline task's in one folder (data/countdown_rl_train.jsonl) and a run never mixes two tasks."""
    if families in ([COUNTDOWN], [PROGRAM]):
        task = families[0]
        return {**{name: f"{task}_{name}.jsonl" for name in ("sft_train", "sft_test", "rl_train", "rl_test")},
                "config": f"{task}_config.json"}
    return {**{name: f"{name}.jsonl" for name in DATA_FILES}, "config": "synth_config.json"}


def summarize(files: dict[str, list[dict]]) -> dict:
    """Counts per file: total, per difficulty, per family, per style (SFT) or kind (preferences)."""
    summary = {}
    for name, rows in files.items():
        label = "style" if name.startswith("sft") else "kind" if name.startswith("prefs") else None
        texts = [r.get("completion", r.get("chosen", "")) for r in rows]
        summary[name] = {"rows": len(rows),
                         "difficulty": dict(sorted(Counter(r["difficulty"] for r in rows).items())),
                         "family": {f: c for f in (*FAMILIES, COUNTDOWN, PROGRAM)
                                    if (c := sum(r["family"] == f for r in rows))},
                         **({label: {k: c for k in (*STYLES, *PREF_KINDS, *DIAGNOSTIC_KINDS)
                                     if (c := sum(r[label] == k for r in rows))}} if label else {}),
                         "max_bytes": max(len((r["prompt"] + t).encode()) for r, t in zip(rows, texts)) if rows else 0,
                         "mean_completion_bytes": round(sum(map(len, texts)) / max(len(rows), 1), 1)}
    return summary


def show(text: str) -> str:
    return text.replace("\n", " | ")


DATA_FILES = ("sft_train", "sft_test", "prefs_train", "prefs_test", "rl_train", "rl_test")
MIN_TEMPERATURE = 1e-6    # below it, logits / T overflow float32 for large logits; T = 0 is greedy


def summary_path(args: Args) -> str:
    """Where --from-model writes its summary JSON: --summary, or --out with .summary.json for its extension."""
    return args.summary or os.path.splitext(args.out)[0] + ".summary.json"


def check_output(path: str, flag: str, folder: bool = False) -> None:
    """An output we can create: a file path that is not a folder (or a folder path that is not a file),
    under no existing file posing as a folder."""
    if not path:
        raise cli.UserError(f"--{flag}: a path is needed")
    target = os.path.abspath(path)
    if folder and os.path.exists(target) and not os.path.isdir(target):
        raise cli.UserError(f"--{flag} {path}: exists and is not a folder")
    if not folder and os.path.isdir(target):
        raise cli.UserError(f"--{flag} {path}: is a folder, not a file")
    parent = target if folder else os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise cli.UserError(f"--{flag} {path}: {parent} is not a folder")


def check_args(args: Args) -> None:
    """Every option, before anything is read or written (a bad value: one line, exit 2, no file): sizes, the
    seed, the temperature and the Jaccard threshold, the families, style and kind mixes and difficulty ranges
    (parsed here, so a typo fails before any file is touched), the device and the output paths."""
    cli.check_options(args, seed=("seed",), non_negative=("temperature", "threads"), probability=("jaccard",))
    cli.require_at_least(args, 1, "n_sft", "n_sft_test", "n_rl", "n_test", "n_prefs", "n_prefs_test", "n_prompts", "k",
                         "max_new_tokens", "batch_size", "ngram")
    cli.require_at_least(args, 0, "n_diagnostic", "n_examples")
    if 0 < args.temperature < MIN_TEMPERATURE:
        raise cli.UserError(f"--temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {args.temperature}")
    parse_families(args.families)
    for name, allowed in (("mix", STYLES), ("test_mix", STYLES), ("pref_mix", PREF_KINDS)):
        parse_mix(getattr(args, name), allowed, name.replace("_", "-"))
    for name in ("sft_difficulty", "rl_difficulty", "test_difficulty", "pref_difficulty"):
        parse_range(getattr(args, name), name.replace("_", "-"))
    cli.check_choices(args, device=("auto", "cpu", "cuda"))
    if args.from_model:
        if not args.prompts:
            raise cli.UserError("--prompts: a prompt/answer JSONL file is needed with --from-model")
        check_output(args.out, "out")
        check_output(summary_path(args), "summary")
        if os.path.abspath(summary_path(args)) == os.path.abspath(args.out):
            raise cli.UserError(f"--summary {args.summary}: the same file as --out")
    else:
        check_output(args.out_dir, "out-dir", folder=True)
        for name in file_names(parse_families(args.families)).values():
            if os.path.isdir(os.path.join(args.out_dir, name)):
                raise cli.UserError(f"--out-dir {args.out_dir}: {name} there is a folder, not a file")


def write_dataset(args: Args) -> dict:
    """The synthetic files: built in memory, then the folder claimed, then all seven written as one set."""
    t0 = time.time()
    files = build_dataset(args)
    summary = summarize(files)
    names = file_names(parse_families(args.families))
    claim_folders(os.path.join(args.out_dir, names["config"]))
    write_file_set({**{os.path.join(args.out_dir, names[name]): jsonl_text(rows) for name, rows in files.items()},
                    os.path.join(args.out_dir, names["config"]):
                        json.dumps({"args": asdict(args), "counts": summary}, indent=2)})
    print(f"wrote {len(files)} files to {args.out_dir}/ in {time.time() - t0:.1f} s (seed {args.seed})")
    width = max(len(names[name]) for name in summary)
    print(f"{'file':{width}s} {'rows':>5s}  {'by difficulty':30s} by style / kind")
    for name, s in summary.items():
        by_d = " ".join(f"{d}:{c}" for d, c in s["difficulty"].items())
        by_label = " ".join(f"{k}:{c}" for k, c in s.get("style", s.get("kind", {})).items())
        print(f"{names[name]:{width}s} {s['rows']:5d}  {by_d:30s} {by_label}")
    print("families: " + ", ".join(f"{name} {' '.join(f'{f}:{c}' for f, c in s['family'].items())}"
                                   for name, s in summary.items() if name in ("sft_train", "rl_test")))
    print("longest prompt+completion: " + ", ".join(f"{name} {s['max_bytes']} B" for name, s in summary.items())
          + " (context 256)")
    print("mean completion: " + ", ".join(f"{name} {s['mean_completion_bytes']} B"
                                          for name, s in summary.items() if not name.startswith("rl")))
    rng = random.Random(args.seed)
    for name, rows in files.items():
        for row in rng.sample(rows, min(args.n_examples, len(rows))):
            extra = {k: v for k, v in row.items() if k in ("style", "kind", "difficulty", "family")}
            body = (f"-> {show(row['completion'])}" if "completion" in row else
                    f"chosen: {show(row['chosen'])}  rejected: {show(row['rejected'])}" if "chosen" in row else
                    f"answer {row['answer']}")
            print(f"  {name}: {show(row['prompt'])}{body}  {extra}")
    return {"files": files, "summary": summary}


def main(argv=None):
    args = cli.parse_args(Args, argv)
    check_args(args)                         # every option first: a bad one writes nothing
    return from_model(args) if args.from_model else write_dataset(args)


if __name__ == "__main__":
    cli.run(main)
