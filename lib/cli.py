"""The command line every stage shares: options from a dataclass, their checks, and one-line errors.

    @dataclass
    class Args:
        lr: float = 3e-4          # peak learning rate       <- the comment is the --help text

    def main(argv=None):
        args = cli.parse_args(Args, argv)
        cli.check_options(args, positive=("lr",))
        ...

    if __name__ == "__main__":
        cli.run(main)             # bad input (a UserError) or Ctrl-C: one line on stderr, never a traceback

Also the --device and --seed helpers, and the finite checks a training step makes before it updates.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import math
import os
import random
import re
import signal
import sys
import threading
import tokenize
import traceback
import typing

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# Errors a user sees as one line
# ----------------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad input from the user (a path, a line of a file, an argument): printed as one line by `run`."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated or not ours; the message names the path."""


class NonFiniteError(UserError, ArithmeticError):
    """A loss, gradient or weight that is NaN or infinite: training stops before it reaches a checkpoint."""


# ----------------------------------------------------------------------------------------------
# Options from a dataclass
# ----------------------------------------------------------------------------------------------

def field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field in a dataclass's source: the help text of its option."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        name = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
                name = tok.string
            elif tok.type == tokenize.COMMENT and name is not None:
                comments[name] = tok.string.lstrip("# ").strip()
            elif tok.type in (tokenize.NEWLINE, tokenize.NL):
                name = None
    return comments


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2): `error: argument --lr: 'nan' is not a finite number`."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def finite_float(text: str) -> float:
    """argparse type for float options: a number, never NaN or infinity."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_args(cls, argv=None, description: str | None = None, defaults: dict | None = None):
    """An argparse CLI from a dataclass: --field-name for each field, its trailing comment as help,
    its default shown; bools become --flag / --no-flag; floats must be finite. `defaults` replaces
    field defaults (a resumed run's saved arguments); an option on the command line still wins.
    Returns an instance of `cls` (whose __post_init__ may check the values further)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    defaults = defaults or {}
    if description is None:
        main_doc = sys.modules["__main__"].__doc__
        description = main_doc if main_doc and cls.__module__ == "__main__" else cls.__doc__
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = defaults.get(f.name, default)
        help_text = comments.get(f.name, "").replace("%", "%%")     # argparse %-formats help text
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_text} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, type={float: finite_float, int: int}.get(kind, str),
                                default=default, metavar=kind.__name__.upper() if hasattr(kind, "__name__") else "X",
                                help=f"{help_text} (default: {default})")
    try:
        return cls(**vars(parser.parse_args(argv)))
    except (TypeError, ValueError) as e:     # a __post_init__ check that raised a plain error
        raise UserError(str(e)) from None


def resume_args(cls, saved: dict, argv=None, quiet=("resume",)):
    """The arguments of a resumed run: the run's saved ones, except the options given again on this
    command line, each announced with one line. Unknown saved keys (an older version) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    base = {k: v for k, v in saved.items() if k in names}
    args = parse_args(cls, argv, defaults=base)
    for name in sorted(base):
        if name not in quiet and getattr(args, name) != base[name]:
            print(f"--{name.replace('_', '-')} {getattr(args, name)} given: overrides the saved {base[name]}")
    return args


# ----------------------------------------------------------------------------------------------
# Option checks: call them before anything is read or written
# ----------------------------------------------------------------------------------------------

# One rule per kind of option value; nan fails every one of them (every comparison with nan is False).
OPTION_RULES = {
    "positive": (lambda v: v > 0, "> 0"),
    "non_negative": (lambda v: v >= 0, ">= 0"),
    "probability": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "open_unit": (lambda v: 0 < v < 1, "in (0, 1)"),
    "unit_interval": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    "temperature": (lambda v: v == 0 or 1e-6 <= v < 1e6, "0 (greedy) or in [1e-6, 1e6)"),   # z / tau stays finite
}


def check_options(args, **rules) -> None:
    """check_options(args, positive=("lr", "batch_size"), probability=("top_p",), ...): each named option
    must satisfy its rule (OPTION_RULES); the first that does not is a UserError naming its flag.
    Call it before anything is written."""
    for kind, names in rules.items():
        test, text = OPTION_RULES[kind]
        for name in names:
            value = getattr(args, name)
            if not test(value):
                raise UserError(f"--{name.replace('_', '-')} must be {text}, got {value}")


def check_choices(args, **choices) -> None:
    """check_choices(args, scale=("group", "batch", "none")): each option must be one of its choices."""
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: choose one of {', '.join(allowed)}")


def require_at_least(args, minimum: int, *names: str) -> None:
    """Each named option must be >= minimum; the first that is not is a UserError naming its flag."""
    for name in names:
        if not getattr(args, name) >= minimum:
            raise UserError(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(args, name)}")


def require_at_most(args, maximum, *names: str) -> None:
    """Each named option must be <= maximum (a bound that keeps a run from overflowing or never ending)."""
    for name in names:
        if not getattr(args, name) <= maximum:
            raise UserError(f"--{name.replace('_', '-')} must be <= {maximum:g}, got {getattr(args, name)}")


def check_budget(args) -> None:
    """A training run needs an end: --max-steps N or --time-budget MINUTES (either > 0)."""
    check_options(args, non_negative=("max_steps", "time_budget"))
    if args.max_steps <= 0 and args.time_budget <= 0:
        raise UserError("set a budget: --max-steps N or --time-budget MINUTES (both are 0)")


def check_fsdp(args) -> None:
    """sft.py's and grpo.py's --fsdp: it needs torchrun with 2 or more processes, and not --compile-train."""
    world = os.environ.get("WORLD_SIZE", "1")
    if args.fsdp and not (re.fullmatch(r"[0-9]+", world) and int(world) >= 2):
        raise UserError(f"--fsdp shards the model over processes (WORLD_SIZE={world!r}): "
                        "run under torchrun --nproc_per_node N (N >= 2)")
    if args.compile_train and args.fsdp:
        raise UserError("--compile-train with --fsdp is not supported: compile the blocks or shard them, not both")


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------

def run(main) -> None:
    """Run main() as a command: how it ends is at most one line on stderr, and a traceback only for a bug.

        main() returns                        exit status 0
        UserError (bad input)                 "error: <message>", status 2
        KeyboardInterrupt (Ctrl-C, SIGINT)    "interrupted", status 130 (128 + SIGINT, the shell's convention)
        SystemExit                            what the interpreter does with it (sft.py's Ctrl-C: 130)
        another BaseException                 "error: <type>: <first line>", status 1: tiktoken's Rust panic
          (not an Exception)                  (pyo3's PanicException), GeneratorExit, ...
        an Exception (a bug)                  its traceback, status 1

    A Ctrl-C leaves the run folder whole: a stage saves what it can (sft.py's loop) and every file is
    written atomically (lib/rundir.py); a temporary file that a second Ctrl-C strands is deleted by the
    next write of that file, and the folder's lock ends with the process.
    SIGINT at SIG_DFL (a script's setting while its imports load, so that Ctrl-C then ends it at once,
    silently, with nothing written) raises KeyboardInterrupt while main() runs, and is SIG_DFL again after.

    One of torchrun's ranks (WORLD_SIZE > 1) leaves with os._exit once main() is done, after flushing
    stdout and stderr: it skips the interpreter's shutdown. A gloo worker thread can still be dropping
    a finished collective whose tensors belong to Python objects; taking the GIL while the interpreter
    shuts down stops that thread with a forced unwind, which aborts the process (SIGABRT, "terminate
    called without an active exception": an SFT run on two ranks in CI, once). Whatever a stage writes
    is closed and renamed into place before main() returns, so nothing is lost."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    a_rank = re.fullmatch(r"[0-9]+", world_size) is not None and int(world_size) > 1
    start_up_sigint = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    try:
        if start_up_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            main()
        finally:
            if start_up_sigint:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
        status = 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    except SystemExit as e:  # sys.exit(n) or sys.exit("message"): the status the interpreter would give
        if not a_rank:
            raise
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception:  # a bug: the traceback the interpreter would print
        if not a_rank:
            raise
        traceback.print_exc()
        status = 1
    except BaseException as e:  # not an Exception (tiktoken's panic, GeneratorExit): one line, not a traceback
        print(f"error: {type(e).__name__}" + (f": {str(e).splitlines()[0][:200]}" if str(e).strip() else ""),
              file=sys.stderr)
        status = 1
    if a_rank:
        exit_without_shutdown(status)
    if status:
        sys.exit(status)


def exit_without_shutdown(status: int) -> None:
    """Flush stdout and stderr, then end this process at once (os._exit): no atexit handlers, no interpreter
    shutdown. For a process that joined a gloo process group (see run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# ----------------------------------------------------------------------------------------------
# Device, precision, seeds, and the finite checks of a training step
# ----------------------------------------------------------------------------------------------

def get_device(name: str = "auto") -> torch.device:
    """auto (CUDA when present) | cpu | cuda | cuda:N; anything else, or CUDA where there is none, is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device {name}: choose auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}   # --dtype: the weights' own precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold a NaN or an infinity."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(where: str, **values) -> None:
    """Each value (a number or a tensor) must be finite; else NonFiniteError naming `where` and the value.
    Call it on the loss and the gradient norm BEFORE optimizer.step(), so the weights stay finite."""
    for name, value in values.items():
        value = value.detach() if torch.is_tensor(value) else value
        finite = bool(torch.isfinite(value).all()) if torch.is_tensor(value) else math.isfinite(float(value))
        if not finite:
            shown = float(value) if not torch.is_tensor(value) or value.numel() == 1 else "not finite"
            raise NonFiniteError(f"{where}: {name} is {shown}; stopped before the update, so no saved "
                                 "checkpoint holds it (a smaller --lr, or --grad-clip, usually helps)")


# The largest |w| a training run may reach. Trained models stay far below it: SmolLM2-135M-Instruct's largest
# weight is 9.25 (blocks.27.ffn.w1 of its Q4_1 GGUF, as checkpoints.load reads it), and a model built here
# starts near 0.02 (matrices) and 1 (norm gains). A weight past 1e4, 1000x that, is a run that has diverged (a
# far too large --lr or --weight-decay): still finite, so checkpoints.save would write it, but every forward
# pass through it is garbage, and fp16 (max 65504) overflows on its first product.
MAX_WEIGHT = 1e4

# The largest learning rate a training script accepts. The Adam family moves each weight by about lr per step
# whatever the scale of the gradient (the first step by exactly lr * sign(g)), so lr is in the weights' own
# units: transformers train at 1e-5..1e-2, and an lr of 1 already moves every weight by more than its size.
# It also keeps Adam's step size lr / (1 - beta1^t) inside float32: --lr 1e308 overflowed it (a RuntimeError
# inside addcdiv_, a traceback).
MAX_LR = 1.0


def check_weights(where: str, *modules) -> None:
    """Every floating-point parameter of the modules must be finite with |w| <= MAX_WEIGHT; else
    NonFiniteError naming `where`, the tensor and its largest |w|. Call it after each optimizer.step(), so a run
    stops at the update that made its weights absurd and no checkpoint is ever written with them.

    Cost: one max |w| per tensor, a pass over the weights and one host sync: 2 ms for sft.py's default model
    on one CPU core, against ~800 ms for one of its micro-batches, so every step can afford it. Under FSDP each
    process holds shards (DTensor): it reads its own and the largest is all-reduced, so every process calls
    it and all stop together."""
    named = [(name, param) for module in modules for name, param in module.named_parameters()
             if param.is_floating_point() and param.numel()]
    if not named:
        return
    local = [param.to_local() if hasattr(param, "to_local") else param for _, param in named]   # FSDP: own shard
    zero = torch.zeros((), device=local[0].device)
    largest = torch.stack([shard.detach().abs().amax().float() if shard.numel() else zero for shard in local])
    largest = largest.nan_to_num(nan=math.inf, posinf=math.inf)            # NaN counts as the largest
    if any(hasattr(param, "to_local") for _, param in named):
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    worst = int(largest.argmax())
    value = float(largest[worst])
    if not value <= MAX_WEIGHT:
        state = ("holds NaN or inf" if math.isinf(value)
                 else f"reached |w| = {value:.6g}, past cli.MAX_WEIGHT = {MAX_WEIGHT:g}")
        raise NonFiniteError(f"{where}: weight {named[worst][0]} {state}; stopped, so no saved "
                             "checkpoint holds it (a smaller --lr or --weight-decay usually helps)")
