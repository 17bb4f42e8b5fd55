"""The stages' links: every command line one file builds for another is parsed by the target's own parser.

Stages talk through files and through command lines (a missing default input is built by running the stage
upstream; grpo.py runs its equal-time control with sft.py; the experiments run whole stages). A command
line that the target no longer accepts fails only at run time, minutes into a run: this file parses every
one of them with the target's own `cli.parse_args(target.Args, ...)` and checks that the values arrive, and
it checks by reading the source that no file builds a command any other way."""
import ast
import importlib
import os

import pytest

from lib import cli
import grpo
import sft
import synth
from helpers import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parsed(command):
    """The target stage's Args, parsed by its own parser from a command line built for it."""
    target = importlib.import_module(command[0][:-3])
    return cli.parse_args(target.Args, command[1:])


def test_grpo_control_arrives_as_sft_continued_for_the_same_minutes():
    args = grpo.Args(init="a.pt", sft_data="demos.jsonl", sft_test_data="demos_test.jsonl", eval_data="held.jsonl",
                     out="runs/x", seed=3, threads=1, max_new_tokens=77, device="cpu")
    control = parsed(grpo.control_command(args, 2.5, {}))
    assert (control.init, control.data, control.test_data, control.eval_data) == ("a.pt", "demos.jsonl",
                                                                                  "demos_test.jsonl", "held.jsonl")
    assert (control.time_budget, control.max_steps) == (2.5, 0)       # equal time, no step cap
    assert (control.out, control.seed, control.threads, control.max_new_tokens, control.device) == \
        (os.path.join("runs/x", "control"), 3, 1, 77, "cpu")
    assert control.n_eval == args.n_eval_during and control.eval_minutes == args.eval_minutes


def test_grpo_builds_its_start_and_data_with_the_upstream_defaults():
    assert parsed(grpo.data_command()) == synth.Args()
    assert parsed(grpo.start_command(grpo.Args(threads=2))) == sft.Args(threads=2)
    fresh = grpo.Args(fresh_start=True, seed=5, init=os.path.join("runs/g", "sft", "model.pt"))
    start = parsed(grpo.start_command(fresh))
    assert (start.seed, start.out) == (5, os.path.join("runs/g", "sft")) and start.max_steps == sft.Args().max_steps
    assert grpo.Args().init == os.path.join(sft.Args().out, "model.pt")       # grpo's default start is sft's output
    written = {os.path.join(synth.Args().out_dir, f"{name}.jsonl") for name in synth.DATA_FILES}
    for name in ("data", "eval_data", "sft_data", "sft_test_data"):            # and its data are synth's outputs
        assert getattr(grpo.Args(), name) in written, name


def test_sft_builds_its_data_with_synth():
    assert parsed(sft.synth_command()) == synth.Args()
    assert parsed(synth.dataset_command("d")).out_dir == "d"


def test_grpo_vs_ppo_arms_parse_with_their_own_parsers():
    E = load_experiment("grpo_vs_ppo")
    args = cli.parse_args(E.Args, ["--seeds", "4", "--max-steps", "3", "--time-budget", "0"])
    g, p = parsed(E.grpo_command(args, 4)), parsed(E.ppo_command(args, 4))
    assert (g.seed, p.seed, g.max_steps, p.max_steps, g.control, p.control, p.reward) == (4, 4, 3, 3, False, False,
                                                                                          "verifier")


def test_self_training_commands_parse_with_their_own_parsers():
    E = load_experiment("self_training")
    args = cli.parse_args(E.Args, [])
    assert parsed(E.sample_command(args, "c.pt", "o")).from_model == "c.pt"
    assert parsed(E.sft_command(args, "c.pt", "d.jsonl", "r")).init == "c.pt"
    assert parsed(E.data_command()) == synth.Args() and parsed(E.start_command()) == sft.Args()


def stage_calls(path):
    """(function name, line) of every call that runs or builds another stage's command line in a file."""
    tree = ast.parse(open(path).read())
    found = []
    for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("stage_command", "run_stage", "ensure_input"):
                found.append((function.name, node.func.attr, node.lineno, node))
    return found


SOURCES = [name for name in sorted(os.listdir(ROOT)) if name.endswith(".py") and name != "model.py"] + \
          [os.path.join("experiments", name) for name in sorted(os.listdir(os.path.join(ROOT, "experiments")))
           if name.endswith(".py")]


@pytest.mark.parametrize("source", SOURCES)
def test_every_command_line_is_built_by_a_command_function(source):
    """A command line for another stage is built only inside a function named *_command (which the tests
    above parse); run_stage and ensure_input take such a function's result, never a list typed in place."""
    for function, call, line, node in stage_calls(os.path.join(ROOT, source)):
        if call == "stage_command":
            assert function.endswith("_command"), f"{source}:{line}: stage_command outside a *_command function"
        else:
            command = node.args[-1] if node.args else None
            assert not isinstance(command, (ast.List, ast.Tuple)), \
                f"{source}:{line}: {call} with a hand-typed command line; build it in a *_command function"


NAMED_BUT_MISSING = {   # script, its arguments: every other input is a default that is missing, so it would be made
    "sft --init": ("sft.py", ["--init", "typo.pt"], "typo.pt"),
    "grpo --init": ("grpo.py", ["--init", "typo.pt"], "typo.pt"),
    "grpo --sft-test-data": ("grpo.py", ["--sft-test-data", "typo.jsonl"], "typo.jsonl"),
    "ppo --reward-model": ("ppo.py", ["--reward", "rm", "--reward-model", "typo.pt"], "typo.pt"),
    "reward --test-data": ("reward.py", ["--test-data", "typo.jsonl"], "typo.jsonl"),
    "self_training --init": ("experiments/self_training.py", ["--init", "typo.pt"], "typo.pt"),
    "rl_from_instruct --init": ("experiments/rl_from_instruct.py", ["--init", "typo.gguf"], "typo.gguf"),
}


def test_a_malformed_named_prompt_file_fails_before_an_sft_start_is_made(tmp_path):
    """python grpo.py --data bad.jsonl in an empty folder: synth.py makes the default eval prompts (seconds),
    then the bad line is one error naming file:line, before sft.py would train a start for minutes."""
    from badinput import run_script_cases
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=?\\n", "answer": "2"}\n{not json\n')
    status, err = run_script_cases("grpo.py", {"bad": (str(tmp_path), ["--data", "bad.jsonl"])})["bad"]
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: bad.jsonl:2: not valid JSON"), lines[-3:]
    assert not (tmp_path / "runs").exists()


def test_a_missing_named_input_fails_before_any_missing_default_is_made(tmp_path):
    """Stages make their missing DEFAULT inputs by running the stages upstream (synth.py, then sft.py: minutes).
    An input the user named and mistyped must fail at once, as one line naming it, in a folder left empty;
    not after data and an SFT start were made for nothing."""
    from badinput import run_script_cases
    by_script = {}
    for name, (script, argv, path) in NAMED_BUT_MISSING.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        by_script.setdefault(script, {})[name] = (str(folder), argv)
    for script, cases in by_script.items():
        for name, (status, err) in run_script_cases(script, cases).items():
            lines = err.strip().splitlines()
            assert status == 2 and lines == [f"error: {NAMED_BUT_MISSING[name][2]}: no such file"], (name, lines[-3:])
            assert not os.listdir(cases[name][0]), (name, os.listdir(cases[name][0]))
