"""Swap the reward, swap the capability: the same GRPO code learns Countdown from another verifier.

GRPO's loss never looks at the task; the task lives in the reward. Every other run of this project
rewards `#### <number>` equal to the answer. Here the reward is Countdown's (as in TinyZero): the prompt
gives a target and allowed numbers, and the completion's final `#### <expression>` earns 1 when it
uses only those numbers, each at most once, and evaluates to the target (tasks.expression_hits_target,
evaluated by the safe tasks.arith, never eval):

    r(x, y) = 1[ numbers(expr(y)) is a sub-multiset of allowed(x)  and  arith(expr(y)) = target(x) ]
    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)        over a group of G samples (Shao et al. 2024)

The stages run as subprocesses and talk through files, as the pipeline does:
  1. synth.py --families countdown     Countdown prompts with a brute-force solver's demonstrations
                                       (data/countdown_*.jsonl)
  2. sft.py                            a Countdown start, from scratch, on those demonstrations
  3. grpo.py --rewards expression=1    GRPO from that start, then grpo.py's own equal-time control:
                                       SFT continued from the byte-identical start for the same minutes
  4. grpo.py --rewards correct=1       the headline task (digit arithmetic, `#### number`) with the same
                                       GRPO settings, from the pipeline's own SFT start (runs/sft/model.pt)
The table is read from each grpo.py run's summary.json: start, GRPO and control on both tasks.
TinyZero (Pan et al. 2025); GRPO: Shao et al. 2024 (DeepSeekMath).

    python experiments/countdown.py                          # both tasks, ~20 min on 2 free CPU cores
    python experiments/countdown.py --no-headline --grpo-steps 120 --seed 1
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import json
import os
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib import cli, rundir, stages, tasks  # noqa: E402  (the project root is on sys.path only from the line above)


@dataclass
class Args:
    out: str = "runs/countdown"            # sft/ (the Countdown start), countdown/ and headline/ (grpo.py runs)
    data_dir: str = "data"                 # where synth.py writes countdown_*.jsonl
    difficulty: str = "3"                  # how many numbers a prompt gives (synth.py range LO-HI, within 2-4)
    n_sft: int = 2000                      # Countdown demonstrations (solver-written, steps then expression)
    n_sft_test: int = 100                  # held-out demonstrations (SFT eval loss)
    n_rl: int = 200                        # Countdown RL prompts
    n_test: int = 200                      # held-out Countdown prompts (every row of the table)
    mix: str = "worked=1"                  # demonstration styles (synth.py --mix): worked shows the steps
    start: str = ""                        # a Countdown SFT checkpoint to start from ("" = train one into OUT/sft)
    sft_steps: int = 600                   # sft.py --max-steps of the Countdown start (a step budget: same seed, same start)
    grpo_steps: int = 60                   # grpo.py --max-steps of each task; its control gets the same minutes
    prompts_per_step: int = 16             # grpo.py --prompts-per-step
    group_size: int = 8                    # grpo.py --group-size
    max_new_tokens: int = tasks.MAX_NEW_TOKENS # completion length limit of every stage
    n_eval: int = 200                      # held-out prompts in each grpo.py table
    pass_k: int = 4                        # samples per prompt for sampled accuracy and pass@k
    headline: bool = True                  # also run the headline task with the same GRPO settings
    headline_init: str = "runs/sft/model.pt"       # the headline SFT start (sft.py builds this default when missing)
    headline_data: str = "data/rl_train.jsonl"     # headline RL prompts (synth.py builds the defaults)
    headline_eval_data: str = "data/rl_test.jsonl" # headline held-out prompts
    headline_sft_data: str = "data/sft_train.jsonl"      # headline control's demonstrations
    headline_sft_test_data: str = "data/sft_test.jsonl"  # headline control's eval-loss demonstrations
    seed: int = 0                          # seeds the data, the start and every GRPO run
    device: str = "auto"                   # auto | cpu | cuda, for every stage
    threads: int = 0                       # torch CPU threads of every stage (0 = torch's default)


def countdown_file(args: Args, split: str) -> str:
    """synth.py's Countdown files: OUT_DIR/countdown_<split>.jsonl."""
    return os.path.join(args.data_dir, f"countdown_{split}.jsonl")


def check_args(args: Args) -> None:
    """Every option before anything runs or is written: one line, exit 2. The synth options are parsed
    here as synth.py parses them, so a bad range fails before any stage starts."""
    cli.check_options(args, seed=("seed",))
    cli.require_at_least(args, 1, "sft_steps", "n_sft", "n_sft_test", "n_rl", "n_test", "grpo_steps", "prompts_per_step",
                         "max_new_tokens", "n_eval", "pass_k")
    cli.require_at_least(args, 2, "group_size")
    cli.require_at_least(args, 0, "threads")
    cli.check_choices(args, device=("auto", "cpu", "cuda"))
    parts = args.difficulty.split("-")
    if not all(p.strip().isdigit() for p in parts) or len(parts) > 2 or \
            not 2 <= int(parts[0]) <= int(parts[-1]) <= 4:
        raise cli.UserError(f"--difficulty {args.difficulty!r}: expected LO-HI (or one number) within 2-4")
    for name in ("out", "data_dir", *(["headline_init", "headline_data", "headline_eval_data", "headline_sft_data",
                                       "headline_sft_test_data"] if args.headline else [])):
        if not getattr(args, name):
            raise cli.UserError(f"--{name.replace('_', '-')}: a path is needed")
    if args.start and not os.path.isfile(args.start):
        raise cli.UserError(f"--start {args.start}: no such checkpoint file")
    for name in ("out", "data_dir"):
        path = getattr(args, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise cli.UserError(f"--{name.replace('_', '-')} {path}: exists and is not a folder")


# ----------------------------------------------------------------------------------------------
# The stages' command lines, built from their own Args fields (tests parse each with its parser)
# ----------------------------------------------------------------------------------------------

def countdown_data_command(args: Args) -> list[str]:
    """synth.py --families countdown: solvable prompts and solver demonstrations, in their own files."""
    return stages.stage_command("synth.py", families="countdown", out_dir=args.data_dir, seed=args.seed,
                                n_sft=args.n_sft, n_sft_test=args.n_sft_test, n_rl=args.n_rl, n_test=args.n_test,
                                sft_difficulty=args.difficulty, rl_difficulty=args.difficulty,
                                test_difficulty=args.difficulty, mix=args.mix, test_mix="worked=1", n_examples=1)


def start_command(args: Args) -> list[str]:
    """sft.py from scratch on the Countdown demonstrations, for a fixed number of updates (so a seed gives one
    checkpoint), evaluated once at its end: the start of the Countdown GRPO run."""
    return stages.stage_command("sft.py", data=countdown_file(args, "sft_train"), test_data=countdown_file(args, "sft_test"),
                                eval_data=countdown_file(args, "rl_test"), out=os.path.join(args.out, "sft"),
                                max_steps=args.sft_steps, time_budget=0.0, eval_minutes=0.0, n_eval=args.n_eval,
                                max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device,
                                threads=args.threads)


def start_path(args: Args) -> str:
    return args.start or os.path.join(args.out, "sft", "model.pt")


def grpo_settings(args: Args) -> dict:
    """What both tasks' GRPO runs share: the loss, the budget, the evaluation, the control."""
    return dict(max_steps=args.grpo_steps, time_budget=0.0, prompts_per_step=args.prompts_per_step,
                group_size=args.group_size, max_new_tokens=args.max_new_tokens, n_eval=args.n_eval,
                n_eval_during=args.n_eval, pass_k=args.pass_k, control=True, png=False, seed=args.seed,
                device=args.device, threads=args.threads)


def countdown_grpo_command(args: Args) -> list[str]:
    """grpo.py with the Countdown verifier as its reward, and its equal-time SFT control on the
    Countdown demonstrations."""
    return stages.stage_command("grpo.py", init=start_path(args), data=countdown_file(args, "rl_train"),
                                eval_data=countdown_file(args, "rl_test"), sft_data=countdown_file(args, "sft_train"),
                                sft_test_data=countdown_file(args, "sft_test"), rewards="expression=1",
                                out=os.path.join(args.out, "countdown"), **grpo_settings(args))


def headline_data_command() -> list[str]:
    """synth.py with its defaults: the headline task's data/*.jsonl when a default file is missing."""
    return stages.stage_command("synth.py")


def headline_start_command(args: Args) -> list[str]:
    """sft.py with its defaults: the pipeline's SFT start runs/sft/model.pt when it is missing."""
    return stages.stage_command("sft.py", threads=args.threads)


def headline_grpo_command(args: Args) -> list[str]:
    """grpo.py on the headline task (`#### number`, reward correct=1), with the same settings."""
    return stages.stage_command("grpo.py", init=args.headline_init, data=args.headline_data,
                                eval_data=args.headline_eval_data, sft_data=args.headline_sft_data,
                                sft_test_data=args.headline_sft_test_data, rewards="correct=1",
                                out=os.path.join(args.out, "headline"), **grpo_settings(args))


# ----------------------------------------------------------------------------------------------
# Reading the runs back, and the table
# ----------------------------------------------------------------------------------------------

def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise cli.UserError(f"{path}: cannot read the GRPO run's summary ({e})") from None


ROWS = (("SFT start", "start"), ("GRPO", "grpo"), ("more SFT (control)", "control"))


def table_rows(task: str, summary: dict) -> list[dict]:
    """start, GRPO, control of one task: greedy accuracy with its standard error, sampled accuracy, pass@k."""
    rows = []
    for label, key in ROWS:
        r = summary.get(key)
        if r:
            rows.append({"task": task, "row": label, "greedy": r["greedy"], "stderr": r["stderr"], "n": r["n"],
                         "sampled": r.get("sampled"), "pass_at_k": r.get("pass_at_k"),
                         "mean_length": r["mean_length"],
                         "minutes": 0.0 if key == "start" else summary["train_minutes"]})
    return rows


def format_table(rows: list[dict], pass_k: int) -> str:
    head = ["task (reward)", "model", "greedy acc %", "sampled acc %", f"pass@{pass_k} %", "mean length", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    percent = lambda v: "—" if v is None else f"{100 * v:.1f}"
    for r in rows:
        cells = [r["task"], r["row"], f"{100 * r['greedy']:.1f} ± {100 * r['stderr']:.1f}", percent(r["sampled"]),
                 percent(r["pass_at_k"]), f"{r['mean_length']:.1f}", f"{r['minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gains(task: str, summary: dict) -> str:
    grpo, start, control = summary["grpo"]["greedy"], summary["start"]["greedy"], summary.get("control", {})
    line = f"{task}: GRPO vs its start {100 * (grpo - start):+.1f} points"
    if control:
        line += f", vs the equal-time SFT control {100 * (grpo - control['greedy']):+.1f} points"
    return line


TASKS = (("Countdown (expression=1)", "countdown"), ("headline arithmetic (correct=1)", "headline"))


def main(argv=None) -> list[dict]:
    args = cli.parse_args(Args, argv)
    check_args(args)
    defaults = Args()
    if args.headline:                                  # the headline's inputs first: built only if missing
        stages.ensure_inputs(*((getattr(args, name), getattr(defaults, name), headline_data_command()) for name in (
                 "headline_data", "headline_eval_data", "headline_sft_data", "headline_sft_test_data")),
                             (args.headline_init, defaults.headline_init, headline_start_command(args)))
    rundir.claim_run_dir(args.out)                          # one experiment per folder; each stage claims its own
    stages.run_stage(countdown_data_command(args))
    if not args.start:
        stages.run_stage(start_command(args))
    stages.run_stage(countdown_grpo_command(args))
    if args.headline:
        stages.run_stage(headline_grpo_command(args))
    summaries = {key: read_summary(os.path.join(args.out, key)) for _, key in TASKS
                 if key == "countdown" or args.headline}
    rows = [row for task, key in TASKS if key in summaries for row in table_rows(task, summaries[key])]
    table = format_table(rows, args.pass_k)
    lines = [gains(task, summaries[key]) for task, key in TASKS if key in summaries]
    header = (f"The same grpo.py, {args.grpo_steps} steps of {args.prompts_per_step} prompts x {args.group_size} "
              f"samples, two verifiers; greedy accuracy ± standard error on each task's held-out prompts "
              f"({args.n_eval} at most), sampled at temperature 1 with {args.pass_k} samples. The control is SFT "
              f"continued from the same start for GRPO's minutes.")
    with rundir.atomic_write(os.path.join(args.out, "results.json")) as f:
        json.dump({"args": asdict(args), "rows": rows, "gains": lines}, f, indent=1)
    with rundir.atomic_write(os.path.join(args.out, "results.md")) as f:
        f.write(header + "\n\n" + table + "\n\n" + "\n".join(lines) + "\n")
    print()
    print(header)
    print(table)
    print("\n".join(lines))
    print(f"{args.out}/results.json, results.md; each grpo.py run's files in {args.out}/<task>/")
    return rows


if __name__ == "__main__":
    cli.run(main)
