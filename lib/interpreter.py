"""A restricted interpreter: the executor of the program-synthesis task, so a program never meets Python's eval.

A completion's program is one Python expression in one argument `x` (an integer, or a list of integers):
`x*x+1`, `[v for v in x if v > 4]`, `sum([v for v in x if v % 2 == 0])`. `ast.parse(source, mode="eval")`
reads it, every node is checked against a whitelist, and the tree is evaluated by walking it here, so a
program can do only what this file implements, and only so much of it:

    nodes     int constants; x and comprehension variables; + - * // % ** ; unary - and `not`;
              < <= > >= == != in, not in (chains too); and, or; `a if c else b`; list literals;
              [e for v in xs if c ...] (any number of for and if clauses); xs[i] and xs[a:b:c] of a list;
              calls of len, sum, min, max, abs, sorted, range, positional arguments only
    values    int (and bool, where Python makes one: a comparison, `not`), a list of them, a range
    bounds    source <= 500 characters; tree depth <= 50; <= 20,000 steps (one per node evaluated or loop
              turn, plus the length of every list an operation walks or builds); |n| < 2**64 after every
              operation, a ** b checked BEFORE it is computed (b >= 0, and b <= 64 unless |a| <= 1: 9**9**9
              is refused at once); a list holds at most 10,000 integers (never a list or a range), checked
              before it is built ([0] * 10**9 and range(10**12) are refused at once)

What it leaves out, on purpose: floats (/), strings, attributes, keywords, lambdas, assignment (:=), `is`,
nested lists, dicts, sets, generators, and every other builtin (reversed: use xs[::-1]).

Every refusal, whatever its cause (syntax, a name or a node off the whitelist, a bound, or an error Python
itself would raise: division by zero, an index out of range, a type mismatch), is a ProgramError carrying
the reason; nothing else is ever raised. Where a program is answered, the answer is Python's own value of
the same expression (tests/test_interpreter.py checks it against Python computing the same program).
"""
from __future__ import annotations

import ast
import warnings

MAX_SOURCE_CHARS = 500
MAX_DEPTH = 50
MAX_STEPS = 20_000
MAX_INT = 2 ** 64               # every integer n satisfies |n| < MAX_INT
MAX_POWER = 64                  # a ** b with |a| >= 2 needs b <= 64 (2**65 > MAX_INT anyway)
MAX_LIST = 10_000
ARGUMENT = "x"

BINARY_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}
COMPARISONS = {ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b,
               ast.GtE: lambda a, b: a >= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
               ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
BUILTINS = ("len", "sum", "min", "max", "abs", "sorted", "range")
ALLOWED_NODES = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Store, ast.BinOp, *BINARY_OPERATORS,
                 ast.UnaryOp, ast.USub, ast.Not, ast.BoolOp, ast.And, ast.Or, ast.Compare, *COMPARISONS, ast.IfExp,
                 ast.List, ast.ListComp, ast.comprehension, ast.Subscript, ast.Slice, ast.Call)


class ProgramError(Exception):
    """The one refusal: the program is not run, or not to the end. str(error) is the reason."""


# ----------------------------------------------------------------------------------------------
# Reading a program: parse, then check every node against the whitelist (nothing is run yet)
# ----------------------------------------------------------------------------------------------

def parse_program(source: str) -> ast.Expression:
    """The checked tree of a program's source, or a ProgramError: too long, not an expression (ast.parse's own
    SyntaxError, or its RecursionError / MemoryError on a hostile nesting), a node off the whitelist, too deep."""
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS:
        raise ProgramError(f"the program must be text of at most {MAX_SOURCE_CHARS} characters")
    try:
        with warnings.catch_warnings():          # e.g. "'int' object is not callable": refused below, not printed
            warnings.simplefilter("ignore")
            tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as e:
        raise ProgramError(f"not a Python expression ({type(e).__name__})") from None
    check_tree(tree)
    return tree


def check_tree(tree: ast.Expression) -> None:
    """Every node is of an allowed type and within MAX_DEPTH of the root (walked with a stack, not recursion)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProgramError(f"nested deeper than {MAX_DEPTH}")
        check_node(node)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def check_node(node: ast.AST) -> None:
    """One node's own rule: an allowed type; a constant is an int; a call names a builtin with positional
    arguments; a comprehension binds one plain name, synchronously."""
    if not isinstance(node, ALLOWED_NODES):
        raise ProgramError(f"{type(node).__name__} is not allowed")
    if isinstance(node, ast.Constant) and type(node.value) is not int:
        raise ProgramError(f"only integer constants, not {type(node.value).__name__}")
    if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name) or node.func.id not in BUILTINS
                                       or node.keywords):
        raise ProgramError(f"calls only {', '.join(BUILTINS)}, with positional arguments")
    if isinstance(node, ast.comprehension) and (not isinstance(node.target, ast.Name) or node.is_async):
        raise ProgramError("a comprehension binds one name: [e for v in xs]")


# ----------------------------------------------------------------------------------------------
# Values: the bounds every operation checks
# ----------------------------------------------------------------------------------------------

def is_int(value) -> bool:
    return isinstance(value, int)              # bool too, as in Python: True + 1 == 2


def checked_int(value: int) -> int:
    """|n| < 2**64, or a refusal."""
    if abs(value) >= MAX_INT:
        raise ProgramError("integer out of range (|n| >= 2**64)")
    return value


def checked_list(value: list) -> list:
    """At most MAX_LIST integers, each in range, or a refusal."""
    if len(value) > MAX_LIST:
        raise ProgramError(f"list longer than {MAX_LIST}")
    for item in value:
        if not is_int(item):
            raise ProgramError(f"a list holds integers only, not {type(item).__name__}")
        checked_int(item)
    return value


def checked_argument(argument):
    """The argument x: an int or a list of ints, within the bounds (a bool is not an argument)."""
    if type(argument) is int:
        return checked_int(argument)
    if type(argument) is list and all(type(item) is int for item in argument):
        return checked_list(list(argument))
    raise ProgramError(f"the argument must be an integer or a list of integers, not {type(argument).__name__}")


def iterable(value, what: str):
    """A list or a range, the things a comprehension, len, sum, min, max, sorted and `in` walk."""
    if not isinstance(value, (list, range)):
        raise ProgramError(f"{what} needs a list or a range, not {type(value).__name__}")
    return value


def truth(value) -> bool:
    """Python's truth: an int is true unless 0, a list or range unless empty."""
    return bool(value)


# ----------------------------------------------------------------------------------------------
# Running a program: a tree walk with a step budget
# ----------------------------------------------------------------------------------------------

class Evaluation:
    """One run of one program: the step counter, and a method per kind of node."""

    def __init__(self, max_steps: int = MAX_STEPS):
        self.steps, self.max_steps = 0, max_steps

    def charge(self, steps: int) -> None:
        self.steps += steps
        if self.steps > self.max_steps:
            raise ProgramError(f"more than {self.max_steps} steps")

    def value(self, node: ast.AST, scope: dict):
        """The value of a node with the names in `scope` bound (x, and the comprehension variables)."""
        self.charge(1)
        if isinstance(node, ast.Constant):
            return checked_int(node.value)
        if isinstance(node, ast.Name):
            if node.id not in scope:
                raise ProgramError(f"unknown name {node.id!r}")
            return scope[node.id]
        if isinstance(node, ast.BinOp):
            return self.binary(type(node.op), self.value(node.left, scope), self.value(node.right, scope))
        if isinstance(node, ast.UnaryOp):
            operand = self.value(node.operand, scope)
            if isinstance(node.op, ast.Not):
                return not truth(operand)
            if not is_int(operand):
                raise ProgramError(f"unary - needs an integer, not {type(operand).__name__}")
            return checked_int(-operand)
        if isinstance(node, ast.BoolOp):
            return self.boolean(node, scope)
        if isinstance(node, ast.Compare):
            return self.comparison(node, scope)
        if isinstance(node, ast.IfExp):
            return self.value(node.body if truth(self.value(node.test, scope)) else node.orelse, scope)
        if isinstance(node, ast.List):
            return checked_list([self.value(element, scope) for element in node.elts])
        if isinstance(node, ast.ListComp):
            results = []
            self.comprehension(node, 0, scope, results)
            return results
        if isinstance(node, ast.Subscript):
            return self.subscript(node, scope)
        if isinstance(node, ast.Call):
            return self.call(node, scope)
        raise ProgramError(f"{type(node).__name__} is not allowed")

    def binary(self, op, a, b):
        """a op b on integers; list + list and list * n (n * list); anything else is refused, and every
        bound is checked before the result is built."""
        if is_int(a) and is_int(b):
            if op is ast.Add:
                return checked_int(a + b)
            if op is ast.Sub:
                return checked_int(a - b)
            if op is ast.Mult:
                return checked_int(a * b)
            if op in (ast.FloorDiv, ast.Mod):
                if b == 0:
                    raise ProgramError("division by zero")
                return checked_int(a // b if op is ast.FloorDiv else a % b)
            if op is ast.Pow:
                if b < 0:
                    raise ProgramError("a negative exponent (the result would be a float)")
                if abs(a) >= 2 and b > MAX_POWER:           # |a| ** b >= 2 ** 65: refused before computing
                    raise ProgramError("integer out of range (|n| >= 2**64)")
                return checked_int(a ** b)
        if op is ast.Add and isinstance(a, list) and isinstance(b, list):
            return self.built_list(len(a) + len(b), lambda: a + b)
        if op is ast.Mult and (isinstance(a, list) and is_int(b) or is_int(a) and isinstance(b, list)):
            items, times = (a, b) if isinstance(a, list) else (b, a)
            if times > MAX_LIST:
                raise ProgramError(f"a list repeated more than {MAX_LIST} times")
            return self.built_list(len(items) * max(times, 0), lambda: items * times)
        raise ProgramError(f"{BINARY_OPERATORS[op]} is not defined on {type(a).__name__} and {type(b).__name__}")

    def built_list(self, length: int, build):
        """A new list of `length` items, refused before `build()` makes it when it would be too long."""
        if length > MAX_LIST:
            raise ProgramError(f"list longer than {MAX_LIST}")
        self.charge(length)
        return build()

    def boolean(self, node: ast.BoolOp, scope: dict):
        """Python's and / or: the first operand that decides (false for and, true for or), else the last."""
        for operand in node.values[:-1]:
            value = self.value(operand, scope)
            if truth(value) == isinstance(node.op, ast.Or):
                return value
        return self.value(node.values[-1], scope)

    def comparison(self, node: ast.Compare, scope: dict):
        """a < b < c is (a < b) and (b < c) with b evaluated once, stopping at the first false link.
        Order (< <= > >=) compares int with int or list with list; == and != anything; `in` needs a list
        or a range on its right."""
        left = self.value(node.left, scope)
        for op, right_node in zip(node.ops, node.comparators):
            right = self.value(right_node, scope)
            if isinstance(op, (ast.In, ast.NotIn)):
                self.charge(len(iterable(right, "in")))
            elif isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)) and not (
                    is_int(left) and is_int(right) or isinstance(left, list) and isinstance(right, list)):
                raise ProgramError(f"cannot order {type(left).__name__} and {type(right).__name__}")
            if isinstance(left, list) and isinstance(right, list):
                self.charge(min(len(left), len(right)))
            if not COMPARISONS[type(op)](left, right):
                return False
            left = right
        return True

    def comprehension(self, node: ast.ListComp, index: int, scope: dict, results: list) -> None:
        """[elt for v1 in xs1 if c1 ... for v2 in xs2 ...]: nested loops, each iterable evaluated in the scope
        of the loops around it (the first in the enclosing scope, as Python does), the ifs in order."""
        if index == len(node.generators):
            element = self.value(node.elt, scope)
            if not is_int(element):
                raise ProgramError(f"a list holds integers only, not {type(element).__name__}")
            if len(results) >= MAX_LIST:
                raise ProgramError(f"list longer than {MAX_LIST}")
            results.append(element)
            return
        clause = node.generators[index]
        for item in iterable(self.value(clause.iter, scope), "a comprehension"):
            self.charge(1)
            inner = {**scope, clause.target.id: item}
            if all(truth(self.value(condition, inner)) for condition in clause.ifs):
                self.comprehension(node, index + 1, inner, results)

    def subscript(self, node: ast.Subscript, scope: dict):
        """xs[i] (negative i counts from the end) or xs[a:b:c] (each part optional), on a list only."""
        items = self.value(node.value, scope)
        if not isinstance(items, list):
            raise ProgramError(f"only a list can be subscripted, not {type(items).__name__}")
        if isinstance(node.slice, ast.Slice):
            parts = [None if part is None else self.value(part, scope)
                     for part in (node.slice.lower, node.slice.upper, node.slice.step)]
            if not all(part is None or is_int(part) for part in parts):
                raise ProgramError("slice bounds must be integers")
            if parts[2] == 0:
                raise ProgramError("slice step cannot be zero")
            result = items[slice(*parts)]
            self.charge(len(result))
            return result
        index = self.value(node.slice, scope)
        if not is_int(index):
            raise ProgramError(f"a list index must be an integer, not {type(index).__name__}")
        if not -len(items) <= index < len(items):
            raise ProgramError("list index out of range")
        return items[index]

    def call(self, node: ast.Call, scope: dict):
        """The builtins, with Python's meaning; the argument types and counts Python would accept, narrowed."""
        name = node.func.id
        if name in scope:                      # rebound by a comprehension: an integer, which cannot be called
            raise ProgramError(f"{name!r} is a variable here, not a function")
        args = [self.value(arg, scope) for arg in node.args]
        if name == "range":
            return self.make_range(args)
        if name == "abs":
            if len(args) != 1 or not is_int(args[0]):
                raise ProgramError("abs takes one integer")
            return checked_int(abs(args[0]))
        if name in ("min", "max") and len(args) >= 2:
            if not all(is_int(arg) for arg in args):
                raise ProgramError(f"{name} of several arguments takes integers")
            return (min if name == "min" else max)(args)
        if len(args) != 1:
            raise ProgramError(f"{name} takes one list")
        items = iterable(args[0], name)
        self.charge(len(items))
        if name == "len":
            return len(items)
        if name == "sum":
            return checked_int(sum(items))
        if name == "sorted":
            return sorted(items)
        if not items:
            raise ProgramError(f"{name} of an empty list")
        return min(items) if name == "min" else max(items)

    def make_range(self, args: list) -> range:
        """range(stop), range(start, stop) or range(start, stop, step): integers, step not 0, at most MAX_LIST
        elements (its length computed, never its elements)."""
        if not 1 <= len(args) <= 3 or not all(is_int(arg) for arg in args):
            raise ProgramError("range takes one to three integers")
        if len(args) == 3 and args[2] == 0:
            raise ProgramError("range step cannot be zero")
        numbers = range(*args)
        try:
            length = len(numbers)
        except OverflowError:                  # longer than sys.maxsize
            length = MAX_LIST + 1
        if length > MAX_LIST:
            raise ProgramError(f"range longer than {MAX_LIST}")
        return numbers


def run(program, argument, max_steps: int = MAX_STEPS):
    """The value of a program (its source, or the tree parse_program made) with x = argument: an int, a bool,
    a list of ints or a range, exactly Python's value; or a ProgramError (running out of stack or memory
    included)."""
    tree = parse_program(program) if isinstance(program, str) else program
    try:
        return Evaluation(max_steps).value(tree.body, {ARGUMENT: checked_argument(argument)})
    except (RecursionError, MemoryError) as e:
        raise ProgramError(f"out of resources ({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------------
# Scoring against tests
# ----------------------------------------------------------------------------------------------

def same_value(result, expected) -> bool:
    """Equal as the JSON a test holds: an int equals the same int (a bool is not an int here), a list the list
    of the same ints in the same order."""
    if type(expected) is list:
        return (type(result) is list and len(result) == len(expected)
                and all(type(r) is int and r == e for r, e in zip(result, expected)))
    return type(result) is int and result == expected


def passes(tree: ast.Expression, test) -> bool:
    """Does the program map the test's input to its output? A refusal fails the test."""
    argument, expected = test
    try:
        return same_value(run(tree, argument), expected)
    except ProgramError:
        return False


def share_passed(source: str, tests) -> float:
    """passed / len(tests), the partial credit of a program on [[input, output], ...]; a program that does
    not parse passes none. 0 when there are no tests."""
    if not tests:
        return 0.0
    try:
        tree = parse_program(source)
    except ProgramError:
        return 0.0
    return sum(passes(tree, test) for test in tests) / len(tests)
