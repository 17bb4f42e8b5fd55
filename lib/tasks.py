"""Tasks: the verifiers that reward and evaluate completions, and the data files they come in.

A completion ends with its final answer after '#### ' (GSM8K's convention), so a real GSM8K file works with
the same reward code. verify(text, row) is the one verifier every stage uses: a final answer equal to the
row's (numbers by value); for a Countdown row, an expression over the given numbers that hits its
target; for a program-synthesis row, a program that passes every one of its hidden tests (program_score gives
the share passed, lib/interpreter.py runs the program). evaluate() is the held-out protocol every stage reports.

Data is JSONL in TRL's formats ({"prompt", "completion"}, {"prompt", "answer"}, ...) or GSM8K's own
{"question", "answer"}; every problem in a file is a UserError naming file:line.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import time

import numpy as np
import torch

import model as M
from lib import cli, interpreter, rundir, tokenizer


NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
# A final number as GSM8K's evaluators read it: a sign, a currency sign (either order), thousands commas, a
# decimal part; whatever follows (a trailing period, "dollars") is not part of it. ASCII digits only.
FINAL_NUMBER = re.compile(r"\s*(?P<sign>[+-]?)\s*[$€£]?\s*(?P<sign2>[+-]?)(?P<digits>[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text: str) -> str | None:
    """The answer after the LAST '####': a number ("#### $1,234.", "#### -$5", "#### +7 apples" give
    "1234", "-5", "7"), else the first whitespace-separated token without commas or a trailing period."""
    at = text.rfind("####")
    if at < 0:
        return None
    number = FINAL_NUMBER.match(text, at + 4)
    if number and not (number["sign"] and number["sign2"]):
        sign = "-" if "-" in number["sign"] + number["sign2"] else ""
        return sign + number["digits"].replace(",", "")
    rest = text[at + 4:].split()
    return rest[0].replace(",", "").rstrip(".") if rest else None


def is_correct(completion: str, answer) -> bool:
    """Does the completion's final answer equal `answer`? Numbers compare by value ("12.0" == "12")."""
    pred, gold = extract_answer(completion), str(answer).replace(",", "").strip()
    if pred is None:
        return False
    if NUMBER.match(pred) and NUMBER.match(gold):
        return float(pred) == float(gold)
    return pred == gold


ARITH_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
             ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
             ast.Pow: lambda a, b: a ** b}
ARITH_MAX_CHARS, ARITH_MAX_DEPTH, ARITH_MAX_ABS = 200, 32, 10 ** 60


def arith(expr: str):
    """Evaluate + - * / // % ** and parentheses on numbers, by walking the `ast` (never eval).
    Bounded: at most 200 characters, nesting 32, |values| <= 1e60, |exponents| <= 256 (checked before computing:
    an integer power then has at most about 15,400 digits, and a result past 1e60 is refused after it).
    Anything else (syntax, names, calls, overflow, division by zero) raises ValueError with the reason,
    and nothing else is ever raised."""
    if not isinstance(expr, str) or len(expr) > ARITH_MAX_CHARS:
        raise ValueError(f"expression longer than {ARITH_MAX_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an arithmetic expression ({type(e).__name__})") from None

    def check(value):
        if not isinstance(value, (int, float)):   # e.g. (-8) ** 0.5 is complex
            raise ValueError(f"not a real number: {value!r}")
        if isinstance(value, float) and not math.isfinite(value) or abs(value) > ARITH_MAX_ABS:
            raise ValueError("value out of range")
        return value

    def walk(node, depth):
        if depth > ARITH_MAX_DEPTH:
            raise ValueError("expression nested too deeply")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return check(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = walk(node.operand, depth + 1)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in ARITH_OPS:
            a, b = walk(node.left, depth + 1), walk(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                if abs(b) > 256:
                    raise ValueError("exponent too large")
                if a == 0 and b < 0:
                    raise ValueError("division by zero")
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
                raise ValueError("division by zero")
            try:
                return check(ARITH_OPS[type(node.op)](a, b))
            except OverflowError:   # float results past ~1.8e308, e.g. 0.01 ** -200
                raise ValueError("value out of range") from None
        raise ValueError(f"unsupported syntax: {type(node).__name__}")

    return walk(tree.body, 0)


def final_expression(text: str) -> str | None:
    """The whole rest of the line after the LAST '####' (an expression may hold spaces), or None."""
    at = text.rfind("####")
    if at < 0:
        return None
    line = text[at + 4:].split("\n", 1)[0].strip()
    return line or None


def expression_numbers(expr: str) -> list:
    """The number literals of an arithmetic expression, in order (a unary minus is an operator, not part
    of the literal). Raises ValueError where arith would."""
    arith(expr)                                       # the same bounds and the same accepted syntax
    tree = ast.parse(expr.strip(), mode="eval")
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]


def expression_hits_target(text: str, numbers, target) -> bool:
    """Countdown (as in TinyZero): does the completion's final '#### <expression>' use only the allowed
    numbers, each at most as often as it is given, and evaluate to the target? Anything that does not
    parse, uses another number, or misses the target is False; this function never raises."""
    expr = final_expression(text)
    if expr is None:
        return False
    try:
        used, value = expression_numbers(expr), arith(expr)
        goal = float(target)
    except (ValueError, TypeError):
        return False
    try:
        pool = list(numbers)
    except TypeError:
        return False
    for number in used:
        if number not in pool:                     # 2 == 2.0, so "2.0" uses an allowed 2
            return False
        pool.remove(number)
    return math.isclose(value, goal, rel_tol=0.0, abs_tol=1e-9)


def program_score(text: str, row: dict) -> float:
    """Program synthesis: the share of the row's hidden "tests" ([[input, output], ...], never shown in the
    prompt) that the completion's final '#### <program>' passes, the program run on each input by
    lib/interpreter.py (never Python's eval). Partial credit: 3 of 8 tests passed is 0.375; no program, a
    program the interpreter refuses, or a row with no tests is 0. Never raises."""
    program, tests = final_expression(text), row.get("tests") or []
    return 0.0 if program is None else interpreter.share_passed(program, tests)


def verify(text: str, row: dict) -> bool:
    """The task's own verifier for a prompt row: a Countdown row (it lists its "numbers") is solved by an
    expression that hits its "answer"; a program-synthesis row (it holds hidden "tests") by a program that
    passes every test; any other row by a final answer equal to its "answer"."""
    if "tests" in row:
        return program_score(text, row) == 1.0
    if "numbers" in row:
        return expression_hits_target(text, row["numbers"], row["answer"])
    return is_correct(text, row["answer"])


def step_lines(text: str) -> list[tuple[str, str]]:
    """The worked steps before the '####' line: lines 'lhs=rhs' with an integer rhs -> [(lhs, rhs)]."""
    body = text[:text.rfind("####")] if "####" in text else text
    steps = []
    for line in body.splitlines():
        lhs, eq, rhs = line.rpartition("=")
        if eq and re.fullmatch(r"\s*-?\d+\s*", rhs) and lhs.strip():
            steps.append((lhs.strip(), rhs.strip()))
    return steps


def completion_style(text: str) -> str:
    """'no_answer' (no #### answer), 'bare' (an answer with no steps), 'wrong_step' (a step whose
    left side does not evaluate to its right side) or 'worked' (at least one step, all correct)."""
    if extract_answer(text) is None:
        return "no_answer"
    steps = step_lines(text)
    if not steps:
        return "bare"
    for lhs, rhs in steps:
        try:
            if arith(lhs) != int(rhs):
                return "wrong_step"
        except ValueError:
            return "wrong_step"
    return "worked"


def difficulty_order(item) -> tuple:
    """Sort key of a (difficulty, ...) pair: numbers in order, then labels (a row without one is "all")."""
    label = item[0]
    number = isinstance(label, (int, float)) and not isinstance(label, bool)
    return (not number, label if number else str(label))


MAX_NEW_TOKENS = 96   # the completion length limit every stage samples and evaluates with, by default


@torch.no_grad()
def evaluate(model, enc, rows, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0, samples: int = 1,
             batch_size: int = 256, generator=None) -> dict:
    """Held-out accuracy on {"prompt", "answer"[, "difficulty"]} rows, the one protocol every stage reports.

    Greedy (temperature 0, samples 1) or `samples` sampled completions per prompt. Returns
      accuracy      mean correctness over all completions, with stderr = sqrt(p (1 - p) / n)
      pass_at_k     share of prompts with at least one correct completion among the `samples`
      per_difficulty {difficulty: accuracy};  styles {worked|bare|wrong_step|no_answer: share}
      mean_length   new tokens per completion;  truncated: share cut by max_new_tokens
      completions   the decoded texts (prompt-major: samples consecutive completions per prompt)."""
    prompts = [tokenizer.encode_prompt(enc, r["prompt"]) for r in rows for _ in range(samples)]
    expanded = [r for r in rows for _ in range(samples)]
    texts, lengths, truncated = [], [], []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        gen = M.generate(model, prompts[start:start + batch_size], max_new_tokens, temperature=temperature,
                         stop_ids=tokenizer.stop_ids(enc), pad_id=tokenizer.pad_id(enc), generator=generator)
        texts += [tokenizer.decode(enc, row) for row in gen.tokens.tolist()]
        lengths += gen.lengths.tolist()
        truncated += (~gen.finished).tolist()
        seconds = time.perf_counter() - started
        if seconds > 10 and len(texts) < len(prompts):           # a real model on a CPU: minutes, so say so
            print(f"  evaluating: {len(texts)}/{len(prompts)} completions in {seconds:.0f} s", flush=True)
    correct = np.array([verify(text, row) for text, row in zip(texts, expanded)], dtype=float)
    per_prompt = correct.reshape(len(rows), samples)
    p, n = float(correct.mean()), len(correct)
    by_difficulty = {}
    for r, c in zip(rows, per_prompt.mean(1)):
        by_difficulty.setdefault(r.get("difficulty", "all"), []).append(c)
    styles = [completion_style(t) for t in texts]
    return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / n), "n": n,
            "pass_at_k": float(per_prompt.max(1).mean()),
            "per_difficulty": {k: float(np.mean(v)) for k, v in sorted(by_difficulty.items(), key=difficulty_order)},
            "styles": {s: styles.count(s) / n for s in ("worked", "bare", "wrong_step", "no_answer")},
            "mean_length": float(np.mean(lengths)), "truncated": float(np.mean(truncated)),
            "completions": texts}


def type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({str: "a string", int: "an integer", float: "a number", list: "a list",
                        dict: "an object"}.get(t, t.__name__) for t in types)


def jsonl_objects(path: str):
    """Yield (line number, object) for each non-blank line of a JSONL file. Anything unreadable (a missing
    file, a directory, bytes that are not UTF-8, bad JSON, nesting or a number too big to parse, a line
    that is not an object) is a UserError naming file:line."""
    if os.path.isdir(path):
        raise cli.UserError(f"{path}: is a directory, not a JSONL file")
    if not os.path.isfile(path):
        raise cli.UserError(f"{path}: no such file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise cli.UserError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise cli.UserError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise cli.UserError(f"{where}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise cli.UserError(f"{where}: JSON nested too deeply") from None
            except ValueError as e:      # e.g. an integer of more than 4300 digits
                raise cli.UserError(f"{where}: unreadable JSON value ({str(e).splitlines()[0][:80]})") from None
            if not isinstance(row, dict):
                raise cli.UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def check_row(row: dict, schema, where: str) -> None:
    """`schema`: the keys the row needs, or {key: type or (types)} to check each value's type too
    (bool is never a number). A missing key or a wrong type is a UserError naming `where`."""
    types = schema if isinstance(schema, dict) else dict.fromkeys(schema)
    missing = [k for k in types if k not in row]
    if missing:
        raise cli.UserError(f"{where}: missing key(s) {', '.join(missing)}")
    for key, want in types.items():
        if want is not None and (not isinstance(row[key], want) or isinstance(row[key], bool)):
            raise cli.UserError(f"{where}: '{key}' must be {type_names(want)}, got {type(row[key]).__name__}")


def read_jsonl(path: str, schema=()) -> list[dict]:
    """Read a JSONL file of objects, each checked against `schema` (check_row) before any row is used.
    Every problem, an empty file included, is a UserError naming file:line (jsonl_objects)."""
    rows = []
    for number, row in jsonl_objects(path):
        check_row(row, schema, f"{path}:{number}")
        rows.append(row)
    if not rows:
        raise cli.UserError(f"{path}: empty, no rows")
    return rows


def final_answer(answer) -> str:
    """An answer field as the verifier compares it: a number as text, or, for a GSM8K-style worked
    solution ('... #### 72'), the final answer after its last '####' (extract_answer)."""
    text = str(answer)
    if "####" in text:
        return extract_answer(text) or ""
    return text.replace(",", "").strip()


def check_tests(tests, where: str) -> None:
    """A program-synthesis row's hidden "tests": a non-empty list of [input, output] pairs, each side an integer
    or a list of integers that the interpreter accepts as a value (|n| < 2**64, at most 10,000 items), so that
    some program can pass every test. Anything else is a UserError naming `where` and the first bad test."""
    if not isinstance(tests, list) or not tests:
        raise cli.UserError(f"{where}: 'tests' must be a non-empty list of [input, output] pairs")
    for index, test in enumerate(tests):
        try:
            if not isinstance(test, list) or len(test) != 2:
                raise interpreter.ProgramError("not a pair")
            for value in test:
                interpreter.checked_argument(value)
        except interpreter.ProgramError:
            raise cli.UserError(f"{where}: 'tests'[{index}] must be an [input, output] pair of integers or lists of "
                                f"integers (|n| < 2**64, at most {interpreter.MAX_LIST} items)") from None


def read_prompts(path: str) -> list[dict]:
    """RL / evaluation prompts: rows {"prompt": str, "answer": str or number} (TRL's format), or GSM8K's own
    {"question", "answer"} where the answer is a worked solution ending in '#### n'. Every row comes back
    with "prompt" and "answer" (the final answer, as text) beside its other keys; an answer with no final
    answer is an error naming its line, never a silent 0 reward. A program-synthesis row also holds its hidden
    "tests" (check_tests); its answer is the reference program, as text, and the tests, not it, are checked."""
    rows = []
    for number, row in jsonl_objects(path):
        where = f"{path}:{number}"
        key = "prompt" if "prompt" in row else "question"
        check_row(row, {key: str, "answer": (str, int, float)}, where)
        if "numbers" in row:              # a Countdown row: the numbers its expression may use
            check_row(row, {"numbers": list}, where)
            if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in row["numbers"]):
                raise cli.UserError(f"{where}: 'numbers' must be a list of numbers")
        if "tests" in row:                # a program-synthesis row: its hidden tests decide, not its answer's text
            check_tests(row["tests"], where)
            rows.append({**row, "prompt": row[key], "answer": str(row["answer"]).strip()})
            continue
        if key == "question" and "####" not in str(row["answer"]):
            raise cli.UserError(f"{where}: a GSM8K answer must end with '#### <final answer>'; this one has no '####'")
        answer = final_answer(row["answer"])
        if not answer:
            raise cli.UserError(f"{where}: 'answer' holds no final answer")
        if len(answer.split()) > 1:               # extract_answer reads one token: this could never be matched
            raise cli.UserError(f"{where}: 'answer' {answer[:60]!r} is not a final answer: give a number or one "
                                "word, or a worked solution ending in '#### <final answer>'")
        rows.append({**row, "prompt": row[key], "answer": answer})
    if not rows:
        raise cli.UserError(f"{path}: empty, no rows")
    return rows


def read_demonstrations(path: str) -> list[dict]:
    """SFT demonstrations: rows {"prompt": str, "completion": str} (TRL's format), or GSM8K's own
    {"question", "answer"}, whose worked answer is the completion."""
    rows = []
    for number, row in jsonl_objects(path):
        if "prompt" in row or "completion" in row or "question" not in row:
            check_row(row, {"prompt": str, "completion": str}, f"{path}:{number}")
            rows.append(row)
        else:
            check_row(row, {"question": str, "answer": str}, f"{path}:{number}")
            if extract_answer(row["answer"]) is None:
                raise cli.UserError(f"{path}:{number}: a GSM8K answer must end with '#### <final answer>'")
            rows.append({**row, "prompt": row["question"], "completion": row["answer"]})
    if not rows:
        raise cli.UserError(f"{path}: empty, no rows")
    return rows


def fit_prompts(rows: list[dict], enc, block_size: int, max_new_tokens: int, path: str,
                verbose: bool = True) -> list[dict]:
    """The rows whose prompt leaves room for max_new_tokens in the context (prompt + completion <=
    block_size); the others are skipped and counted in one printed line (verbose: say it on rank 0 only).
    None left is a UserError."""
    kept = [r for r in rows if 0 < len(tokenizer.encode(enc, r["prompt"])) and
            len(tokenizer.encode_prompt(enc, r["prompt"])) + max_new_tokens <= block_size]
    if verbose and len(kept) < len(rows):
        print(f"{path}: skipped {len(rows) - len(kept)} of {len(rows)} prompts longer than the context "
              f"({block_size} tokens, {max_new_tokens} of them kept for the completion) or empty", flush=True)
    if not kept:
        raise cli.UserError(f"{path}: no prompt fits the context of {block_size} tokens with {max_new_tokens} new tokens")
    return kept


def write_jsonl(path: str, rows) -> None:
    """Write rows atomically (temporary file, then rename): readers never see half a file."""
    with rundir.atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

