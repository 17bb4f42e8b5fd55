"""GRPO vs PPO on one task: what removing the value head changes, measured side by side.

PPO (ppo.py) learns a value model V(s_t) and turns rewards into per-token advantages with GAE;
GRPO (grpo.py) drops the value model and uses each completion's standing in its group of G samples:

    PPO:   A_t = sum_l (gamma lam)^l delta_{t+l},  delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
    GRPO:  A_i = (r_i - mean_j r_j) / (std_j r_j + eps)   for every token of completion i

Both arms run the same way, as subprocesses of their own stage file, from the same SFT start, on
the same prompts, with the same completions per step, temperature, reward (the verifier: 1 if the
`#### answer` is right) and budget. The table is read from each run's own summary.json and
metrics.jsonl: held-out accuracy, minutes to reach PPO's final accuracy, seconds per step and its
split, peak memory and the parameters each method holds. Shao et al. 2024 (GRPO); Schulman et al.
2017 (PPO) and 2016 (GAE).

    python experiments/grpo_vs_ppo.py                    # 3 seeds x (GRPO + PPO), 1 minute each, ~7 minutes
    python experiments/grpo_vs_ppo.py --seeds 0 --max-steps 50
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import cli, rundir, stages, tasks  # noqa: E402  (the project root is on the path only now)


@dataclass
class Args:
    init: str = "runs/sft/model.pt"        # SFT start of both arms (built by sft.py if this default is missing)
    data: str = "data/rl_train.jsonl"      # RL prompts of both arms
    eval_data: str = "data/rl_test.jsonl"  # held-out prompts of both arms
    out: str = "runs/grpo_vs_ppo"          # folder: seed<S>/grpo, seed<S>/ppo, comparison.md, comparison.json
    seeds: str = "0,1,2"                   # comma-separated seeds; each runs both arms
    prompts_per_step: int = 8              # GRPO prompts per step; PPO samples prompts_per_step * group_size
    group_size: int = 8                    # GRPO completions per prompt
    temperature: float = 1.0               # sampling temperature of both arms
    max_new_tokens: int = tasks.MAX_NEW_TOKENS # completion length limit of both arms
    time_budget: float = 1.0               # training minutes of each arm (0 = steps only)
    max_steps: int = 0                     # training steps of each arm (0 = time budget only)
    n_eval: int = 200                      # held-out prompts in each arm's final eval
    n_eval_during: int = 200               # held-out prompts in each arm's periodic evals
    eval_minutes: float = 0.5              # training minutes between periodic evals
    png: bool = True                       # write a PNG plot when matplotlib is installed
    device: str = "auto"                   # auto | cpu | cuda
    threads: int = 0                       # torch CPU threads of both arms (0 = torch's default)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise cli.UserError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(not 0 <= s < 2 ** 32 for s in seeds):
        raise cli.UserError(f"--seeds {text!r}: give at least one seed, each in [0, 2**32)")
    return seeds


def check_args(args) -> None:
    parse_seeds(args.seeds)
    cli.check_options(args, positive=("prompts_per_step", "max_new_tokens", "n_eval", "n_eval_during", "eval_minutes"),
                      non_negative=("temperature", "threads"))
    cli.require_at_least(args, 2, "group_size")
    cli.check_budget(args)
    cli.get_device(args.device)


def grpo_command(args, seed: int) -> list:
    """GRPO alone (no control), on the shared start, prompts and budget."""
    return stages.stage_command("grpo.py", init=args.init, data=args.data, eval_data=args.eval_data,
                                out=os.path.join(args.out, f"seed{seed}", "grpo"), prompts_per_step=args.prompts_per_step,
                                group_size=args.group_size, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, time_budget=args.time_budget, max_steps=args.max_steps,
                                n_eval=args.n_eval, n_eval_during=args.n_eval_during, eval_minutes=args.eval_minutes,
                                control=False, png=False, seed=seed, device=args.device, threads=args.threads)


def ppo_command(args, seed: int) -> list:
    """PPO with the verifier as its reward, on the same start, prompts, completions per step, budget and threads
    (no control: the comparison is GRPO vs PPO)."""
    return stages.stage_command("ppo.py", reward="verifier", init=args.init, data=args.data, eval_data=args.eval_data,
                                out=os.path.join(args.out, f"seed{seed}", "ppo"),
                                completions_per_step=args.prompts_per_step * args.group_size, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, time_budget=args.time_budget, max_steps=args.max_steps,
                                n_eval=args.n_eval, n_eval_during=args.n_eval_during, eval_minutes=args.eval_minutes,
                                control=False, seed=seed, device=args.device, threads=args.threads)


def read_run(run_dir: str) -> tuple[dict, list]:
    """A finished run's summary.json and the eval rows of its metrics.jsonl (train_minutes, eval_accuracy)."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    evals = [r for r in tasks.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("kind") == "eval"]
    return summary, evals


def minutes_to_reach(evals: list, target: float):
    """First training minute at which held-out accuracy reached `target` (None if it never did)."""
    return next((r["train_minutes"] for r in evals if r["eval_accuracy"] >= target - 1e-9), None)


def mean(values) -> float:
    return sum(values) / len(values)


def compare(runs: dict, seeds: list) -> dict:
    """Per algorithm: final accuracies, minutes to PPO's mean final accuracy, cost per step, memory, params."""
    ppo_final = mean([summary["final_accuracy"] for summary, _ in runs["ppo"]])
    table = {}
    for algo in ("grpo", "ppo"):
        summaries = [summary for summary, _ in runs[algo]]
        table[algo] = {
            "final": [s["final_accuracy"] for s in summaries],
            "reach_minutes": [minutes_to_reach(evals, ppo_final) for _, evals in runs[algo]],
            "sec_per_step": mean([s["sec_per_step"] for s in summaries]),
            "time_split": {k: mean([s["time_split"].get(k, 0.0) for s in summaries])
                           for k in ("gen_s", "score_s", "adv_s", "update_s")},
            "peak_mem_mb": mean([s["peak_mem_mb"] for s in summaries]),
            "params_by_role": summaries[0]["params_by_role"],
            "curves": [([r["train_minutes"] for r in evals], [r["eval_accuracy"] for r in evals])
                       for _, evals in runs[algo]]}
    return table


def format_report(table: dict, args, seeds: list) -> str:
    lines = [f"GRPO vs PPO on {args.data}: start {args.init}, {args.prompts_per_step * args.group_size} completions "
             f"per step, temperature {args.temperature}, budget {args.max_steps or '-'} steps / "
             f"{args.time_budget or '-'} min, seeds {seeds}",
             "| | held-out acc (mean ± spread) | per seed | min to reach PPO's final acc | s/step | "
             "gen / score / adv / update s | peak mem MB | params in memory (policy/ref/value/reward) |",
             "|---|---|---|---|---|---|---|---|"]
    for algo in ("grpo", "ppo"):
        row = table[algo]
        finals, roles, split = row["final"], row["params_by_role"], row["time_split"]
        reached = [f"{m:.1f}" if m is not None else "never" for m in row["reach_minutes"]]
        lines.append(f"| {algo.upper()} | {100 * mean(finals):.1f} ± {100 * (max(finals) - min(finals)) / 2:.1f} | "
                     f"{' / '.join(f'{100 * a:.1f}' for a in finals)} | {' / '.join(reached)} | "
                     f"{row['sec_per_step']:.2f} | {' / '.join(f'{split[k]:.2f}' for k in split)} | "
                     f"{row['peak_mem_mb']:.0f} | {sum(roles.values()) / 1e6:.2f} M "
                     f"({' / '.join(f'{roles.get(k, 0) / 1e6:.2f}' for k in ('policy', 'reference', 'value', 'reward'))}) |")
    g, p = table["grpo"], table["ppo"]
    lines.append(f"GRPO / PPO: seconds per step {g['sec_per_step'] / p['sec_per_step']:.2f}x, peak memory "
                 f"{g['peak_mem_mb'] / p['peak_mem_mb']:.2f}x, parameters in memory "
                 f"{sum(g['params_by_role'].values()) / sum(p['params_by_role'].values()):.2f}x")
    for algo in ("grpo", "ppo"):
        for seed, (_, accuracy) in zip(seeds, table[algo]["curves"]):
            lines.append(f"{algo.upper():4s} seed {seed} held-out accuracy: {rundir.sparkline(accuracy)} "
                         f"({100 * accuracy[0]:.1f}% -> {100 * accuracy[-1]:.1f}%)")
    return "\n".join(lines)


def plot(table: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, color in (("grpo", "C0"), ("ppo", "C3")):
        for i, (minutes, accuracy) in enumerate(table[algo]["curves"]):
            ax.plot(minutes, [100 * a for a in accuracy], "o-", color=color, alpha=0.7,
                    label=algo.upper() if i == 0 else None)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


def main(argv=None) -> dict:
    args = cli.parse_args(Args, argv)
    check_args(args)
    seeds = parse_seeds(args.seeds)
    rundir.claim_run_dir(args.out)
    runs = {"grpo": [], "ppo": []}
    for seed in seeds:
        for algo, command in (("grpo", grpo_command(args, seed)), ("ppo", ppo_command(args, seed))):
            stages.run_stage(command)
            runs[algo].append(read_run(os.path.join(args.out, f"seed{seed}", algo)))
    table = compare(runs, seeds)
    report = format_report(table, args, seeds)
    print(report)
    with rundir.atomic_write(os.path.join(args.out, "comparison.md")) as f:
        f.write(report + "\n")
    with rundir.atomic_write(os.path.join(args.out, "comparison.json")) as f:
        json.dump(table, f, indent=1)
    if args.png:
        plot(table, os.path.join(args.out, "grpo_vs_ppo.png"))
    return table


if __name__ == "__main__":
    cli.run(main)
