"""Tests for experiments/ffn_variants.py: the matched widths against the closed-form parameter counts (2Ch,
3Ch_g, E 3C h_e + CE), the active/total split of MoE, the schedule's closed form, the held-out loss against
F.cross_entropy on the whole set at once, the expert loads, the verdict's rule, and a tiny end-to-end run."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from lib import cli, tasks
import synth as S
from helpers import load_experiment

E = load_experiment("ffn_variants")


@pytest.fixture
def one_thread():
    """The tiny runs pass --threads 1 (tiny matmuls on a busy machine are faster on one thread); the
    session's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_data(folder):
    for name, offset in (("train", 0), ("test", 50)):
        tasks.write_jsonl(str(folder / f"{name}.jsonl"), [{"prompt": f"{a}*{b}=?\n", "completion": f"#### {a * b}"}
                                                          for a in range(offset, offset + 30) for b in range(3)])
    return folder


def tiny_argv(tmp_path, *extra):
    data = tiny_data(tmp_path)
    return ["--data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"), "--out", str(tmp_path / "ffn"),
            "--variants", "swiglu,relu,moe", "--n-embd", "16", "--n-head", "2", "--base-hidden", "64", "--seq-len", "16",
            "--batch-size", "4", "--steps", "3", "--lrs", "0.001,0.01", "--seeds", "0,1", "--eval-rows", "8",
            "--device", "cpu", *extra]


@given(C=st.sampled_from([16, 32, 48, 64, 96]), n_expert=st.integers(2, 8), data=st.data())
def test_matched_widths_give_the_closed_form_parameter_counts(C, n_expert, data):
    top_k = data.draw(st.integers(1, n_expert))
    h = 4 * C
    args = E.Args(n_layer=1, n_embd=C, n_head=4, base_hidden=h, n_expert=n_expert, moe_top_k=top_k)
    dense = 2 * C * h                                                      # W1 (C x h) and W2 (h x C)
    for variant in E.VARIANTS:
        model = E.make_model(args, variant, 258, seed=0, device="cpu")
        width = E.matched_width(variant, h, n_expert, top_k)
        total, active = E.ffn_params(model)
        assert model.config.ffn_width == width
        if variant in E.PLAIN:
            assert total == active == 2 * C * width == dense
        elif variant in E.GATED:
            assert total == active == 3 * C * width and abs(total - dense) <= 3 * C   # rounding of 2h/3 only
        else:
            assert total == n_expert * 3 * C * width + C * n_expert                  # experts + router
            assert active == top_k * 3 * C * width + C * n_expert
            matched = active if variant == "moe" else total                          # equal compute / params
            others = n_expert * C + 3 * C * (top_k if variant == "moe" else n_expert)
            assert abs(matched - dense) <= others


@given(steps=st.integers(2, 400), lr=st.floats(1e-5, 1.0))
def test_the_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth(steps, lr):
    warmup = max(1, steps // 10)
    values = [E.lr_at(s, steps, lr) for s in range(steps)]
    assert values[warmup - 1] == pytest.approx(lr) and values[0] == pytest.approx(lr / warmup)
    assert all(a >= b - 1e-15 for a, b in zip(values[warmup - 1:], values[warmup:]))    # non-increasing
    if steps - 1 > warmup:
        assert values[-1] == pytest.approx(0.1 * lr)
        middle = warmup + (steps - 1 - warmup) / 2
        if middle == int(middle):
            assert values[int(middle)] == pytest.approx(0.55 * lr)                     # cos(pi/2) = 0


@pytest.mark.parametrize("variant", ["relu", "moe"])
def test_held_out_loss_is_the_mean_over_every_token_and_expert_loads_sum_to_one(variant):
    args = E.Args(n_layer=2, n_embd=16, n_head=2, base_hidden=64, seq_len=8)
    model = E.make_model(args, variant, 258, seed=0, device="cpu")
    rows = torch.randint(0, 258, (70, 9), generator=torch.Generator().manual_seed(0))   # more than one batch of 64
    measured = E.evaluate(model, rows, 0, "cpu")
    with torch.no_grad():
        logits = model(rows[:, :-1])
        expected = F.cross_entropy(logits.reshape(-1, 258), rows[:, 1:].reshape(-1)).item()
    assert measured["loss"] == pytest.approx(expected, rel=1e-5)
    if variant == "moe":
        assert len(measured["expert_load"]) == 2
        assert all(sum(layer) == pytest.approx(1.0) and len(layer) == args.n_expert for layer in measured["expert_load"])
    else:
        assert measured["expert_load"] == []
    assert E.evaluate(model, rows, 0, "cpu")["loss"] == measured["loss"]             # the hooks were removed


def rows_for(values: dict) -> list[dict]:
    return [{"variant": v, "test_loss": E.mean_std(losses)} for v, losses in values.items()]


def test_the_verdict_says_what_the_numbers_say():
    wins = E.verdict_line(rows_for({"swiglu": [1.0, 1.01, 0.99], "relu": [1.2, 1.21, 1.19]}), 3)
    loses = E.verdict_line(rows_for({"geglu": [1.2, 1.21, 1.19], "gelu": [1.0, 1.01, 0.99]}), 3)
    tie = E.verdict_line(rows_for({"swiglu": [1.0, 1.1, 0.9], "relu": [1.01, 1.11, 0.91]}), 3)
    assert "yes: gated wins" in wins and "no: the plain FFN wins" in loses and "not resolved" in tie
    assert "+0.2000 nats" in wins                                      # plain - gated, best of each
    assert "run at least one of each" in E.verdict_line(rows_for({"swiglu": [1.0, 1.1]}), 2)


def test_tiny_run_prints_the_table_and_runs_each_variant_at_its_chosen_rate(tmp_path, capsys, one_thread):
    result = E.main(tiny_argv(tmp_path, "--threads", "1"))
    assert len(result["sweep"]) == 3 * 2 and len(result["runs"]) == 3 * 2
    for row in result["rows"]:
        tuned = [r for r in result["sweep"] if r["variant"] == row["variant"]]
        assert row["lr"] == min(tuned, key=lambda r: r["val_loss"])["lr"]        # picked by validation loss
        mine = [r for r in result["runs"] if r["variant"] == row["variant"]]
        assert {r["lr"] for r in mine} == {row["lr"]} and {r["seed"] for r in mine} == {0, 1}
        losses = [r["test_loss"] for r in mine]
        assert row["test_loss"][0] == pytest.approx(sum(losses) / 2)
        assert row["test_loss"][1] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    moe = next(r for r in result["rows"] if r["variant"] == "moe")
    assert moe["ffn_active"] < moe["ffn_params"] and moe["max_expert_load"] is not None
    shown = capsys.readouterr().out
    assert "| swiglu |" in shown and "| moe |" in shown and "Do gated FFNs win" in shown
    saved = json.loads((tmp_path / "ffn" / "results.json").read_text())
    assert saved["verdict"] == result["verdict"] and (tmp_path / "ffn" / "results.md").exists()


@pytest.mark.parametrize("bad, names", [(["--variants", "swiglu,lstm"], "--variants"), (["--lrs", "0.1,-1"], "--lrs"),
                                        (["--lrs", "x"], "--lrs"), (["--seeds", "0,0"], "--seeds"),
                                        (["--moe-top-k", "5"], "--moe-top-k"), (["--steps", "0"], "--steps"),
                                        (["--tune-seed", "-1"], "--tune-seed"), (["--base-hidden", "2"], "--base-hidden"),
                                        (["--weight-decay", "nan"], "--weight-decay"),
                                        (["--test-data", "missing.jsonl"], "missing.jsonl")])
def test_a_bad_option_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, bad, names):
    argv = tiny_argv(tmp_path, *bad)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: E.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and names in err and "Traceback" not in err, err
    assert not (tmp_path / "ffn").exists()


def test_the_data_command_parses_with_synths_parser_and_help_lists_every_option(capsys):
    command = E.data_command()
    assert command[0] == "synth.py" and cli.parse_args(S.Args, command[1:]) == S.Args()
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(E.Args, ["--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(f"--{n.replace('_', '-')}" in shown for n in vars(E.Args()))
