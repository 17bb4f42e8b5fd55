"""Tests for experiments/countdown.py: every command line it builds is parsed (and checked) by the target
stage's own parser; both tasks' GRPO runs share every setting but the data, the reward and the folder; the
table is what the runs' summaries hold; and one tiny run goes through synth.py and grpo.py (with its control)
for real, as subprocesses."""
import json
import os

import pytest
import torch

import grpo
import model as M
from lib import checkpoints, cli, tasks, tokenizer
import sft
import synth as S
from helpers import load_experiment

E = load_experiment("countdown")

CASES = [E.Args(), E.Args(out="o", data_dir="d", difficulty="2-4", n_sft=50, n_sft_test=5, n_rl=7, n_test=9,
                          mix="worked=1,bare=1", start="", sft_steps=7, grpo_steps=3, prompts_per_step=4,
                          group_size=2, max_new_tokens=12, n_eval=5, pass_k=2, headline=False, headline_init="h.pt",
                          headline_data="hd.jsonl", headline_eval_data="he.jsonl", headline_sft_data="hs.jsonl",
                          headline_sft_test_data="ht.jsonl", seed=3, device="cpu", threads=1)]


@pytest.mark.parametrize("args", CASES)
def test_every_command_parses_with_the_target_stages_own_parser(args):
    data = E.countdown_data_command(args)
    assert data[0] == "synth.py"
    parsed = cli.parse_args(S.Args, data[1:])
    S.check_args(parsed)                                       # synth.py's own checks accept the values
    assert S.parse_families(parsed.families) == [S.COUNTDOWN] and parsed.out_dir == args.data_dir
    names = S.file_names([S.COUNTDOWN])
    for split in ("sft_train", "sft_test", "rl_train", "rl_test"):   # the files the other stages read
        assert E.countdown_file(args, split) == os.path.join(parsed.out_dir, names[split])
    for name in ("n_sft", "n_sft_test", "n_rl", "n_test", "mix", "seed"):
        assert getattr(parsed, name) == getattr(args, name), name
    assert parsed.sft_difficulty == parsed.rl_difficulty == parsed.test_difficulty == args.difficulty

    start = cli.parse_args(sft.Args, E.start_command(args)[1:])
    assert E.start_command(args)[0] == "sft.py" and start.init == ""          # from scratch
    assert (start.data, start.test_data, start.eval_data) == tuple(
        E.countdown_file(args, s) for s in ("sft_train", "sft_test", "rl_test"))
    assert (start.out, start.max_steps, start.time_budget) == (os.path.join(args.out, "sft"), args.sft_steps, 0.0)
    assert os.path.join(start.out, "model.pt") == E.start_path(args) and (start.eval_minutes, start.eval_every) == (0, 0)
    for name in ("max_new_tokens", "n_eval", "seed", "device", "threads"):
        assert getattr(start, name) == getattr(args, name), name

    runs = {}
    for task, command in (("countdown", E.countdown_grpo_command(args)), ("headline", E.headline_grpo_command(args))):
        assert command[0] == "grpo.py"
        runs[task] = cli.parse_args(grpo.Args, command[1:])
        grpo.check_args(runs[task])
        assert runs[task].out == os.path.join(args.out, task) and runs[task].control
    countdown, headline = runs["countdown"], runs["headline"]
    assert grpo.parse_reward_weights(countdown.rewards) == {"expression": 1.0}
    assert grpo.parse_reward_weights(headline.rewards) == {"correct": 1.0}
    assert (countdown.init, countdown.data, countdown.eval_data, countdown.sft_data, countdown.sft_test_data) == (
        E.start_path(args), *(E.countdown_file(args, s) for s in ("rl_train", "rl_test", "sft_train", "sft_test")))
    assert (headline.init, headline.data, headline.eval_data, headline.sft_data, headline.sft_test_data) == (
        args.headline_init, args.headline_data, args.headline_eval_data, args.headline_sft_data,
        args.headline_sft_test_data)
    differ = {"init", "data", "eval_data", "sft_data", "sft_test_data", "rewards", "out"}
    same = [f for f in vars(countdown) if f not in differ]
    assert [getattr(countdown, f) for f in same] == [getattr(headline, f) for f in same]   # one GRPO, two rewards
    assert (countdown.max_steps, countdown.time_budget, countdown.prompts_per_step, countdown.group_size) == (
        args.grpo_steps, 0.0, args.prompts_per_step, args.group_size)

    assert cli.parse_args(S.Args, E.headline_data_command()[1:]) == S.Args()
    assert cli.parse_args(sft.Args, E.headline_start_command(args)[1:]) == sft.Args(threads=args.threads)


def test_the_headline_defaults_are_the_pipelines_own():
    d, g = E.Args(), grpo.Args()
    assert (d.headline_init, d.headline_data, d.headline_eval_data, d.headline_sft_data, d.headline_sft_test_data) == \
        (g.init, g.data, g.eval_data, g.sft_data, g.sft_test_data)
    assert d.headline_init == os.path.join(sft.Args().out, "model.pt") and d.max_new_tokens == tasks.MAX_NEW_TOKENS
    assert E.countdown_file(d, "rl_test") == os.path.join(S.Args().out_dir, "countdown_rl_test.jsonl")


def summary(start, grpo_acc, control):
    row = lambda acc: {"greedy": acc, "stderr": 0.01, "n": 100, "sampled": acc / 2, "pass_at_k": acc * 1.5,
                       "mean_length": 12.0}
    return {"start": row(start), "grpo": row(grpo_acc), "control": row(control), "train_minutes": 2.5}


def test_the_table_holds_what_the_summaries_hold():
    rows = E.table_rows("Countdown", summary(0.1, 0.3, 0.15)) + E.table_rows("headline", summary(0.5, 0.6, 0.52))
    assert [(r["task"], r["row"]) for r in rows] == [(t, label) for t in ("Countdown", "headline")
                                                     for label, _ in E.ROWS]
    assert [r["minutes"] for r in rows[:3]] == [0.0, 2.5, 2.5]
    table = E.format_table(rows, pass_k=4)
    assert "| Countdown | GRPO | 30.0 ± 1.0 | 15.0 | 45.0 | 12.0 | 2.5 |" in table
    assert E.gains("Countdown", summary(0.1, 0.3, 0.15)) == \
        "Countdown: GRPO vs its start +20.0 points, vs the equal-time SFT control +15.0 points"


def tiny_checkpoint(path):
    torch.manual_seed(0)
    checkpoints.save(str(path), M.GPT(M.Config(n_layer=1, n_head=2, n_kv_head=2, n_embd=32)), tokenizer.get_tokenizer("bytes"))
    return str(path)


def tiny_argv(tmp_path, *extra):
    return ["--out", str(tmp_path / "cd"), "--data-dir", str(tmp_path / "data"), "--difficulty", "3",
            "--n-sft", "20", "--n-sft-test", "4", "--n-rl", "8", "--n-test", "6", "--start",
            tiny_checkpoint(tmp_path / "tiny.pt"), "--grpo-steps", "1", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "6", "--n-eval", "4", "--pass-k", "1", "--no-headline", "--device", "cpu",
            "--threads", "1", *extra]


def test_a_tiny_run_for_real_trains_on_countdown_with_the_expression_reward(tmp_path, capsys):
    rows = E.main(tiny_argv(tmp_path))
    assert [(r["task"], r["row"]) for r in rows] == [("Countdown (expression=1)", label) for label, _ in E.ROWS]
    prompts = tasks.read_jsonl(str(tmp_path / "data" / "countdown_rl_train.jsonl"))
    assert len(prompts) == 8 and all(r["family"] == "countdown" and len(r["numbers"]) == 3 for r in prompts)
    run = tmp_path / "cd" / "countdown"
    saved = json.loads((run / "args.json").read_text())
    assert saved["rewards"] == "expression=1" and saved["init"] == str(tmp_path / "tiny.pt")
    assert json.loads((run / "control" / "args.json").read_text())["init"] == str(tmp_path / "tiny.pt")
    result = json.loads((run / "summary.json").read_text())
    assert rows[1]["greedy"] == result["grpo"]["greedy"] and rows[2]["greedy"] == result["control"]["greedy"]
    assert result["start"]["n"] == 4                          # --n-eval held-out Countdown prompts
    assert not (tmp_path / "cd" / "sft").exists()             # --start given: no SFT start trained
    shown = capsys.readouterr().out
    assert "| Countdown (expression=1) | GRPO |" in shown and "Countdown (expression=1): GRPO vs its start" in shown
    assert json.loads((tmp_path / "cd" / "results.json").read_text())["rows"] == rows


@pytest.mark.parametrize("bad, names", [(["--difficulty", "5"], "--difficulty"), (["--difficulty", "x"], "--difficulty"),
                                        (["--difficulty", "4-3"], "--difficulty"), (["--group-size", "1"], "--group-size"),
                                        (["--sft-steps", "0"], "--sft-steps"), (["--seed", "-1"], "--seed"),
                                        (["--start", "missing.pt"], "missing.pt"), (["--device", "tpu"], "--device"),
                                        (["--n-test", "0"], "--n-test")])
def test_a_bad_option_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, bad, names):
    argv = tiny_argv(tmp_path, *bad)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: E.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and names in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(E.Args, ["--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(f"--{n.replace('_', '-')}" in shown for n in vars(E.Args()))
