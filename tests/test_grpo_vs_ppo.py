"""experiments/grpo_vs_ppo.py: both arms run as subprocesses of their own stage file with the same start,
prompts, completions per step and budget; the table is read from each run's own files."""
import json

from lib import cli, tasks
import grpo
import ppo
from test_grpo import tiny_setup
from helpers import load_experiment


def tiny_argv(tmp):
    return ["--init", str(tmp / "start.pt"), "--data", str(tmp / "rl.jsonl"), "--eval-data", str(tmp / "rl.jsonl"),
            "--out", str(tmp / "cmp"), "--seeds", "0", "--prompts-per-step", "8", "--group-size", "8",
            "--max-new-tokens", "8", "--time-budget", "0", "--max-steps", "2", "--n-eval", "8",
            "--n-eval-during", "8", "--eval-minutes", "100", "--no-png", "--device", "cpu"]


def test_both_arms_get_the_same_inputs_and_parse_with_their_own_parsers(tmp_path):
    experiment = load_experiment("grpo_vs_ppo")
    args = cli.parse_args(experiment.Args, tiny_argv(tmp_path))
    grpo_args = cli.parse_args(grpo.Args, experiment.grpo_command(args, 0)[1:])
    ppo_args = cli.parse_args(ppo.Args, experiment.ppo_command(args, 0)[1:])
    for name in ("init", "data", "eval_data", "temperature", "max_new_tokens", "time_budget", "max_steps", "seed",
                 "threads", "control"):
        assert getattr(grpo_args, name) == getattr(ppo_args, name), name
    assert grpo_args.prompts_per_step * grpo_args.group_size == ppo_args.completions_per_step
    assert ppo_args.reward == "verifier" and not grpo_args.control and not ppo_args.control   # neither runs an SFT control


def test_tiny_comparison_produces_the_table_with_both_rows(tmp_path):
    tmp = tiny_setup(tmp_path)
    table = load_experiment("grpo_vs_ppo").main(tiny_argv(tmp))
    text = open(tmp / "cmp" / "comparison.md").read()
    assert "| GRPO |" in text and "| PPO |" in text
    for algo in ("grpo", "ppo"):
        summary = json.load(open(tmp / "cmp" / "seed0" / algo / "summary.json"))
        assert summary["sec_per_step"] > 0 and summary["peak_mem_mb"] > 0
        assert all(summary["time_split"][k] > 0 for k in ("gen_s", "score_s", "update_s"))
        rows = tasks.read_jsonl(str(tmp / "cmp" / "seed0" / algo / "metrics.jsonl"))
        train = [r for r in rows if r.get("kind") == "train"]
        assert len(train) == 2 and all(r["completions"] == 64 for r in train)
    assert table["grpo"]["params_by_role"]["value"] == 0 and table["ppo"]["params_by_role"]["value"] > 0
