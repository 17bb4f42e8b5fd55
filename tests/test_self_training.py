"""Tests for experiments/self_training.py: every command line it builds is parsed by the target stage's own
parser (no stand-in scripts that accept any flag), and one round runs for real (synth.py and sft.py as
subprocesses, on a tiny model), checked against the files the stages wrote."""
import json
import os

import pytest
import torch

import model as M
from lib import checkpoints, cli, tasks, tokenizer
import sft
import synth as S
from helpers import load_experiment

E = load_experiment("self_training")


def small_data(tmp_path):
    """A small data/ folder from synth.py's default mode (seconds)."""
    S.main(["--out-dir", str(tmp_path / "data"), "--n-sft", "120", "--n-sft-test", "20", "--n-rl", "60", "--n-test",
            "40", "--n-prefs", "60", "--n-prefs-test", "30", "--n-diagnostic", "10", "--n-examples", "0"])
    return tmp_path / "data"


def tiny_checkpoint(path):
    torch.manual_seed(0)
    checkpoints.save(str(path), M.GPT(M.Config(n_layer=1, n_head=2, n_kv_head=2, n_embd=32)), tokenizer.get_tokenizer("bytes"))
    return str(path)


CASES = [E.Args(), E.Args(init="a/b.pt", rounds=1, prompts="p.jsonl", n_prompts=3, k=2, temperature=0.0,
                          max_new_tokens=5, sft_steps=7, test_data="t.jsonl", eval_data="e.jsonl", n_eval=0,
                          out="o", seed=4, device="cpu", threads=1)]


@pytest.mark.parametrize("args", CASES)
def test_every_command_parses_with_the_target_stages_own_parser(args):
    sample = E.sample_command(args, "ckpt.pt", os.path.join("o", "samples0"))
    assert sample[0] == "synth.py"
    parsed = cli.parse_args(S.Args, sample[1:])
    S.check_args(parsed)                                   # and synth.py's own checks accept the values
    assert (parsed.from_model, parsed.filter) == ("ckpt.pt", False)
    assert parsed.out == os.path.join("o", "samples0", "samples.jsonl")
    assert parsed.summary == os.path.join("o", "samples0", "summary.json")
    for name in ("prompts", "n_prompts", "k", "temperature", "max_new_tokens", "seed", "device"):
        assert getattr(parsed, name) == getattr(args, name), name

    train = E.sft_command(args, "ckpt.pt", "samples.jsonl", "run")
    assert train[0] == "sft.py"
    parsed = cli.parse_args(sft.Args, train[1:])
    assert (parsed.init, parsed.data, parsed.out, parsed.max_steps, parsed.time_budget) == \
        ("ckpt.pt", "samples.jsonl", "run", args.sft_steps, 0.0)
    assert (parsed.eval_every, parsed.eval_minutes) == (args.sft_steps, 0.0)   # evals at step 0 and the end only
    for name in ("test_data", "eval_data", "n_eval", "seed", "device", "threads"):
        assert getattr(parsed, name) == getattr(args, name), name

    assert cli.parse_args(sft.Args, E.start_command()[1:]) == sft.Args() and E.start_command()[0] == "sft.py"
    assert cli.parse_args(S.Args, E.data_command()[1:]) == S.Args() and E.data_command()[0] == "synth.py"


def test_defaults_come_from_model_py_and_help_lists_every_option(capsys):
    assert E.Args().max_new_tokens == tasks.MAX_NEW_TOKENS
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(E.Args, ["--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(f"--{name.replace('_', '-')}" in shown for name in vars(E.Args()))


@pytest.mark.parametrize("bad, names", [(["--rounds", "0"], "--rounds"), (["--seed", "-1"], "--seed"),
                                        (["--temperature", "-1"], "--temperature"), (["--n-eval", "-1"], "--n-eval"),
                                        (["--sft-steps", "0"], "--sft-steps"), (["--device", "tpu"], "--device"),
                                        (["--temperature", "1e-9"], "--temperature"),
                                        (["--init", "missing.pt"], "missing.pt"), (["--k", "x"], "--k")])
def test_a_bad_option_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, bad, names):
    data = small_data(tmp_path)
    argv = ["--init", tiny_checkpoint(tmp_path / "tiny.pt"), "--prompts", str(data / "rl_train.jsonl"),
            "--test-data", str(data / "sft_test.jsonl"), "--eval-data", str(data / "rl_test.jsonl"),
            "--out", str(tmp_path / "self"), *bad]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: E.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and names in err, err
    assert not (tmp_path / "self").exists()


def test_one_round_for_real_trains_on_every_unfiltered_sample_and_reports_what_the_files_hold(tmp_path, capsys):
    data = small_data(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "self"
    n_prompts, k, n_eval = 4, 2, 4
    table = E.main(["--init", ckpt, "--rounds", "1", "--prompts", str(data / "rl_train.jsonl"), "--n-prompts",
                    str(n_prompts), "--k", str(k), "--max-new-tokens", "6", "--sft-steps", "2", "--test-data",
                    str(data / "sft_test.jsonl"), "--eval-data", str(data / "rl_test.jsonl"), "--n-eval", str(n_eval),
                    "--out", str(out), "--device", "cpu", "--threads", "1"])
    assert [r["round"] for r in table] == [0, 1]
    prompts = {r["prompt"]: r["answer"] for r in tasks.read_jsonl(str(data / "rl_train.jsonl"))}
    for r, row in enumerate(table):
        samples = tasks.read_jsonl(str(out / f"samples{r}" / "samples.jsonl"))
        assert len(samples) == n_prompts * k                 # every sample, unfiltered: n_prompts * k rows
        assert all("prompt" in s and "completion" in s and prompts[s["prompt"]] == s["answer"] for s in samples)
        assert not all(S.verify(s["completion"], s["answer"]) for s in samples)   # a random model: wrong rows kept
        texts = [s["completion"] for s in samples]           # the table is what the samples file holds
        assert all(abs(row[f"distinct_{n}"] - S.distinct_n(texts, n)) < 1e-12 for n in (1, 2, 3))
        assert row["sampled_pass"] == sum(s["finished"] and S.verify(s["completion"], s["answer"])
                                          for s in samples) / len(samples)
        assert 0 <= row["heldout_acc"] <= 1 and 0 <= row["distinct_2"] <= 1
        assert abs(row["heldout_acc"] * n_eval - round(row["heldout_acc"] * n_eval)) < 1e-9   # a share of 4 prompts
    round1 = json.loads((out / "sft1" / "args.json").read_text())
    assert (round1["init"], round1["data"]) == (ckpt, str(out / "samples0" / "samples.jsonl"))  # pi_1 = SFT(pi_0, D_0)
    sampled_from = json.loads((out / "samples1" / "summary.json").read_text())["args"]["from_model"]
    assert sampled_from == str(out / "sft1" / "model.pt") == table[1]["checkpoint"]             # D_1 ~ pi_1
    before, after = checkpoints.load(ckpt)[0].state_dict(), checkpoints.load(sampled_from)[0].state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)                 # pi_1 was trained
    assert json.loads((out / "results.json").read_text())["rounds"] == table
    shown = capsys.readouterr().out
    assert "round  held-out acc  sampled pass  distinct-1  distinct-2  distinct-3" in shown
