"""experiments/rl_from_instruct.py: one grpo.py run per seed makes GRPO and its three controls from the same start;
the SFT arm trains on the prompts' final answers alone; the table is read from each arm's own records."""
import json
import os

import pytest

from lib import checkpoints, cli, rundir, tasks
import grpo
import synth
from test_grpo import tiny_setup
from helpers import load_experiment


def gsm8k_files(tmp):
    """The tiny task's prompts in GSM8K's own format: a question and a worked answer ending in '#### n'."""
    rows = tasks.read_jsonl(str(tmp / "rl.jsonl"))
    gsm8k = [{"question": r["prompt"], "answer": f"{r['prompt'].split('=')[0]} makes {r['answer']}.\n#### {r['answer']}"}
             for r in rows]
    tasks.write_jsonl(str(tmp / "train.jsonl"), gsm8k[:80])
    tasks.write_jsonl(str(tmp / "test.jsonl"), gsm8k[80:])


def tiny_argv(tmp, *extra):
    return ["--init", str(tmp / "start.pt"), "--system-prompt", "", "--data", str(tmp / "train.jsonl"),
            "--eval-data", str(tmp / "test.jsonl"), "--out", str(tmp / "exp"), "--seeds", "0",
            "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6", "--max-steps", "2",
            "--n-eval", "8", "--pass-k", "1", "--lr", "1e-3", "--control-lr", "1e-3", "--device", "cpu", *extra]


def test_the_sft_arm_trains_on_each_prompt_s_final_answer_alone(tmp_path):
    tmp = tiny_setup(tmp_path)
    gsm8k_files(tmp)
    load_experiment("rl_from_instruct").write_answers(str(tmp / "train.jsonl"), str(tmp / "answers.jsonl"))
    prompts, answers = tasks.read_prompts(str(tmp / "train.jsonl")), tasks.read_demonstrations(str(tmp / "answers.jsonl"))
    assert [a["prompt"] for a in answers] == [p["prompt"] for p in prompts]
    for prompt, answer in zip(prompts, answers):
        assert answer["completion"] == f"#### {prompt['answer']}"           # no worked solution left
        assert tasks.verify(answer["completion"], prompt)                     # the reward accepts it


def test_the_seed_command_runs_every_arm_from_the_same_start_and_parses(tmp_path):
    experiment = load_experiment("rl_from_instruct")
    args = cli.parse_args(experiment.Args, tiny_argv(tmp_path))
    data = {"prompts": "p.jsonl", "eval": "e.jsonl", "answers": "a.jsonl", "eval_answers": "ea.jsonl"}
    run = cli.parse_args(grpo.Args, experiment.grpo_command(args, 3, data)[1:])
    assert (run.init, run.data, run.eval_data, run.sft_data, run.sft_test_data) == \
        (args.init, "p.jsonl", "e.jsonl", "a.jsonl", "ea.jsonl")
    assert set(grpo.parse_controls(run.controls)) == {"sft", "rft", "random"} and run.control and not run.fresh_start
    assert (run.seed, run.system_prompt, run.lr, run.control_lr) == (3, "", args.lr, args.control_lr)
    task = cli.parse_args(synth.Args, experiment.task_command(args)[1:])        # the synthetic task, by synth.py's parser
    assert (task.families, task.rl_difficulty, task.test_difficulty) == (args.families, args.difficulty, args.difficulty)
    assert (task.n_rl, task.n_test, task.out_dir) == (args.n_rl, args.n_eval, str(tmp_path / "exp" / "data"))


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,x"], "--seeds"), (["--seeds", "1,1"], "--seeds"), (["--group-size", "1"], "--group-size"),
    (["--data", "a.jsonl"], "--data and --eval-data go together"), (["--dtype", "fp8"], "--dtype"),
])
def test_bad_options_are_one_line_before_anything_runs(tmp_path, argv, message):
    experiment = load_experiment("rl_from_instruct")
    with pytest.raises(cli.UserError, match=message):
        experiment.check_args(cli.parse_args(experiment.Args, ["--out", str(tmp_path / "exp"), *argv]))
    assert not (tmp_path / "exp").exists()


def test_a_bad_named_file_is_one_line_before_the_output_folder_exists(tmp_path):
    tmp = tiny_setup(tmp_path)
    gsm8k_files(tmp)
    (tmp / "bad.jsonl").write_text('{"question": "1+1=?", "answer": "2"}\n')        # a GSM8K answer with no '####'
    (tmp / "bad.gguf").write_bytes(bytes(range(256)) * 4)                              # not a model
    experiment = load_experiment("rl_from_instruct")
    for argv, message in ((["--eval-data", str(tmp / "bad.jsonl")], r"bad.jsonl:1: a GSM8K answer must end with"),
                          (["--data", str(tmp / "none.jsonl")], r"none.jsonl: no such file"),
                          (["--report"], r"exp: no such folder"),
                          (["--init", str(tmp / "bad.gguf")], r"bad.gguf: not a GGUF file")):
        with pytest.raises(cli.UserError, match=message):
            experiment.main(tiny_argv(tmp, *argv))
        assert not (tmp / "exp").exists()


def test_tiny_run_on_a_gsm8k_file_reads_every_arm_from_its_own_records(tmp_path):
    tmp = tiny_setup(tmp_path)
    gsm8k_files(tmp)
    experiment = load_experiment("rl_from_instruct")
    done = experiment.main(tiny_argv(tmp))
    run = tmp / "exp" / "seed0"
    summary = json.load(open(run / "summary.json"))
    arms = done[0]["arms"]
    table = open(tmp / "exp" / "results.md").read()
    for _, label in experiment.ARMS:
        assert f"| {label} |" in table
    # every arm started from the same file, the one named, whose bytes GRPO hashed
    assert done[0]["init_sha256"] == rundir.sha256(str(tmp / "start.pt"))
    for arm in ("control", "random"):
        assert json.load(open(run / arm / "args.json"))["init"] == str(tmp / "start.pt")
    # the SFT arm trained on the final answers, and was evaluated on the GSM8K test prompts
    assert json.load(open(run / "control" / "args.json"))["data"] == str(tmp / "exp" / "data" / "answers_train.jsonl")
    assert summary["start"]["n"] == 8
    # minutes: each arm's own record (a checkpoint's train_seconds, a run's summary)
    control_seconds = checkpoints.load(str(run / "control" / "model.pt"))[2]["meta"]["train_seconds"]
    assert arms["control"]["minutes"] == pytest.approx(control_seconds / 60)
    assert arms["grpo"]["minutes"] == summary["train_minutes"]
    assert arms["random"]["minutes"] == json.load(open(run / "random" / "summary.json"))["train_minutes"]
    # tokens: 2 steps x 4 prompts x 4 samples, each completion 1 to 6 tokens (dropped groups were sampled too)
    train_rows = [r for r in tasks.read_jsonl(str(run / "metrics.jsonl")) if r.get("kind") == "train"]
    assert 32 <= sum(r["sampled_tokens"] for r in train_rows) == summary["sampled_tokens"] <= 32 * 6
    assert arms["grpo"]["sampled_tps"] == pytest.approx(summary["sampled_tokens"] / (60 * summary["train_minutes"]))
    assert arms["start"]["sampled_tps"] == arms["control"]["sampled_tps"] == 0.0 and arms["control"]["trained_tps"] > 0
    # the same command again, on the same files, reads the finished seed instead of running it; --report only reads
    record = json.load(open(tmp / "exp" / "seed0.inputs.json"))
    assert record["command"][0] == "grpo.py" and record["sha256"] == {
        path: rundir.sha256(path) for path in (str(tmp / "start.pt"), str(tmp / "train.jsonl"), str(tmp / "test.jsonl"),
                                               str(tmp / "exp" / "data" / "answers_train.jsonl"),
                                               str(tmp / "exp" / "data" / "answers_test.jsonl"))}
    before = os.path.getmtime(run / "summary.json")
    assert experiment.main(tiny_argv(tmp))[0]["arms"] == arms
    assert experiment.main(tiny_argv(tmp, "--report"))[0]["arms"] == arms
    assert os.path.getmtime(run / "summary.json") == before
    with pytest.raises(cli.UserError, match="no finished seed"):
        experiment.main(tiny_argv(tmp, "--report", "--seeds", "7"))


def test_the_verdict_needs_ten_points_and_two_standard_errors_over_every_control():
    verdict = load_experiment("rl_from_instruct").verdict
    arm = lambda greedy, stderr=0.02: {"greedy": greedy, "stderr": stderr}
    arms = {"start": arm(0.10), "grpo": arm(0.40), "control": arm(0.30), "rft": arm(0.30), "random": arm(0.05)}
    result = verdict(arms)
    assert result["won"] and result["leads"]["control"] == pytest.approx(0.10 / (0.02 * 2 ** 0.5))
    assert not verdict({**arms, "rft": arm(0.35)})["won"]           # 0.05 / 0.028 = 1.8 standard errors
    assert not verdict({**arms, "start": arm(0.31)})["won"]         # +9 points
    assert verdict({**arms, "grpo": arm(0.0, 0.0), "control": arm(0.0, 0.0)})["leads"]["control"] == 0.0   # a tie is 0
