"""Self-training on a model's own unfiltered samples: model collapse, measured round by round.

A model is fine-tuned on what it generated itself, with no verifier in between, then sampled again:

    D_r          = {(x, y) : x in prompts, y ~ pi_r(. | x)}        every sample kept, right or wrong
    pi_{r+1}     = SFT(pi_r, D_r)                                  sft.py --init pi_r --data D_r
    distinct-n   = |unique n-grams| / |n-grams|  over D_r's completions (Li et al. 2016)

Each round learns the previous model's own distribution, its mistakes and its most likely phrasings
included, so the tails of the distribution thin out round after round: model collapse (Shumailov et
al. 2024, "AI models collapse when trained on recursively generated data"). The table shows what each
round's samples look like (distinct-n, share that the verifier accepts) and the greedy held-out
accuracy of each checkpoint. Rejection sampling (synth.py --from-model without --no-filter; STaR,
RFT) is the filtered alternative: it keeps only verified, deduplicated samples.

The stages run as subprocesses and talk through files, as the pipeline does: synth.py samples from
each checkpoint (`--no-filter`) into runs/self_train/samples<r>/ (samples.jsonl, summary.json with the
sampled pass rate and distinct-n), sft.py fine-tunes on them into runs/self_train/sft<r+1>/ (model.pt
and metrics.jsonl, whose eval rows hold the greedy held-out accuracy of its starting checkpoint, at
step 0, and of its result). The table is read back from those files.

    python experiments/self_training.py                      # 3 rounds from runs/sft/model.pt
    python experiments/self_training.py --rounds 5 --sft-steps 200
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
    init: str = "runs/sft/model.pt"          # round 0's checkpoint (made by sft.py when this default is missing)
    rounds: int = 3                          # R: rounds of sample -> fine-tune on every sample, unfiltered
    prompts: str = "data/rl_train.jsonl"     # prompt/answer JSONL sampled on each round (synth.py --prompts)
    n_prompts: int = 128                     # prompts drawn from --prompts (the same ones every round)
    k: int = 4                               # completions sampled per prompt
    temperature: float = 1.0                 # sampling temperature
    max_new_tokens: int = tasks.MAX_NEW_TOKENS   # generation limit per sampled completion
    sft_steps: int = 100                     # sft.py --max-steps per round
    test_data: str = "data/sft_test.jsonl"   # sft.py --test-data: demonstrations for its eval loss
    eval_data: str = "data/rl_test.jsonl"    # held-out prompts: greedy accuracy of every checkpoint
    n_eval: int = 200                        # held-out prompts evaluated (0 = all)
    out: str = "runs/self_train"             # samples<r>/ and sft<r>/ per round, results.json
    seed: int = 0                            # seeds the prompt draw, the sampling and each sft.py run
    device: str = "auto"                     # auto|cpu|cuda, for every stage
    threads: int = 0                         # sft.py --threads (0 = torch's default)


def check_args(args: Args) -> None:
    """Every option before anything runs or is written: one line, exit 2."""
    cli.check_options(args, seed=("seed",), non_negative=("temperature",))
    cli.require_at_least(args, 1, "rounds", "n_prompts", "k", "max_new_tokens", "sft_steps")
    cli.require_at_least(args, 0, "n_eval", "threads")
    cli.check_choices(args, device=("auto", "cpu", "cuda"))
    if 0 < args.temperature < 1e-6:          # as synth.py: logits / T would overflow float32
        raise cli.UserError(f"--temperature must be 0 (greedy) or >= 1e-06, got {args.temperature}")
    for name in ("init", "prompts", "test_data", "eval_data", "out"):
        if not getattr(args, name):
            raise cli.UserError(f"--{name.replace('_', '-')}: a path is needed")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out}: exists and is not a folder")


# ----------------------------------------------------------------------------------------------
# The stages' command lines, built from their own Args fields (tests parse each with its parser)
# ----------------------------------------------------------------------------------------------

def data_command() -> list[str]:
    """synth.py with its defaults: makes data/*.jsonl when a default input file is missing."""
    return stages.stage_command("synth.py")


def start_command() -> list[str]:
    """sft.py with its defaults: makes the default --init (runs/sft/model.pt) when it is missing."""
    return stages.stage_command("sft.py")


def sample_command(args: Args, checkpoint: str, folder: str) -> list[str]:
    """synth.py --from-model: k samples per prompt from `checkpoint`, EVERY one written (--no-filter), with a
    summary JSON of the sampled pass rate and distinct-n."""
    return stages.stage_command("synth.py", from_model=checkpoint, prompts=args.prompts, n_prompts=args.n_prompts,
                                k=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens, filter=False,
                                out=os.path.join(folder, "samples.jsonl"), summary=os.path.join(folder, "summary.json"),
                                seed=args.seed, device=args.device)


def sft_command(args: Args, checkpoint: str, data: str, run_dir: str) -> list[str]:
    """sft.py --init `checkpoint` on the unfiltered samples `data`, for --sft-steps updates; it evaluates
    the held-out prompts at step 0 (its starting checkpoint) and at its end, and at no time in between."""
    return stages.stage_command("sft.py", init=checkpoint, data=data, test_data=args.test_data, eval_data=args.eval_data,
                                out=run_dir, max_steps=args.sft_steps, time_budget=0.0, eval_every=args.sft_steps,
                                eval_minutes=0.0, n_eval=args.n_eval, seed=args.seed, device=args.device,
                                threads=args.threads)


# ----------------------------------------------------------------------------------------------
# Reading the stages' files back
# ----------------------------------------------------------------------------------------------

def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise cli.UserError(f"{path}: cannot read the stage's output ({e})") from None


def sample_stats(folder: str) -> dict:
    """synth.py's summary.json -> the sampled pass rate and distinct-1/2/3 of every sample."""
    summary = read_json(os.path.join(folder, "summary.json"))
    distinct = summary["distinct_n"]["samples"]
    return {"sampled_pass": summary["sampled_pass"], "rows": summary["counts"]["written"],
            **{f"distinct_{n}": distinct[n - 1] for n in (1, 2, 3)}}


def heldout_accuracy(run_dir: str) -> tuple[float, float]:
    """sft.py's metrics.jsonl -> (greedy held-out accuracy at step 0 = its --init, at its end)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    evals = [r for r in tasks.read_jsonl(path) if r.get("kind") == "eval" and "eval_accuracy" in r]
    if not evals or evals[0].get("step") != 0:
        raise cli.UserError(f"{path}: no held-out evaluation at step 0 (the round's starting checkpoint)")
    return evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]


# ----------------------------------------------------------------------------------------------
# The loop: sample from pi_r, fine-tune on every sample, repeat
# ----------------------------------------------------------------------------------------------

def self_train(args: Args) -> list[dict]:
    """R rounds; R + 1 table rows, one per checkpoint pi_0 .. pi_R: held-out accuracy, the sampled pass rate
    and distinct-n of its samples. Round r samples pi_r into samples<r>/ and, for r < R, trains pi_{r+1} on
    them in sft<r+1>/, whose step-0 and final evals are the held-out accuracy of pi_r and pi_{r+1}."""
    checkpoint, table, accuracy = args.init, [], {}
    for r in range(args.rounds + 1):
        samples_dir = os.path.join(args.out, f"samples{r}")
        stages.run_stage(sample_command(args, checkpoint, samples_dir))
        table.append({"round": r, "checkpoint": checkpoint, **sample_stats(samples_dir)})
        if r == args.rounds:
            break
        run_dir = os.path.join(args.out, f"sft{r + 1}")
        stages.run_stage(sft_command(args, checkpoint, os.path.join(samples_dir, "samples.jsonl"), run_dir))
        accuracy[r], accuracy[r + 1] = heldout_accuracy(run_dir)
        checkpoint = os.path.join(run_dir, "model.pt")
    return [{**row, "heldout_acc": accuracy[row["round"]]} for row in table]


def report(table: list[dict]) -> None:
    print("round  held-out acc  sampled pass  distinct-1  distinct-2  distinct-3")
    for row in table:
        print(f"{row['round']:5d}  {100 * row['heldout_acc']:11.1f}%  {100 * row['sampled_pass']:11.1f}%  "
              f"{row['distinct_1']:10.3f}  {row['distinct_2']:10.3f}  {row['distinct_3']:10.3f}")


def main(argv=None) -> list[dict]:
    args = cli.parse_args(Args, argv)
    check_args(args)
    defaults = Args()
    stages.ensure_inputs(*((getattr(args, name), getattr(defaults, name), data_command())     # before anything is written
                           for name in ("prompts", "test_data", "eval_data")), (args.init, defaults.init, start_command()))
    if not os.path.isfile(args.init):
        raise cli.UserError(f"--init {args.init}: not a checkpoint file")
    rundir.claim_run_dir(args.out)                  # one experiment per folder; each stage claims its own subfolder
    table = self_train(args)
    with rundir.atomic_write(os.path.join(args.out, "results.json")) as f:
        json.dump({"args": asdict(args), "rounds": table}, f, indent=2)
    report(table)
    print(f"{args.out}/results.json; samples<r>/ and sft<r>/ hold each round's files")
    return table


if __name__ == "__main__":
    cli.run(main)
