"""experiments/overoptimization.py: best-of-n's KL against brute force on small categoricals, the best-of-n
estimator against enumeration of every subset, the fits against synthetic curves with known alpha and beta,
the peaks against a dense grid, every stage command parsed by its target's own parser, and a tiny end-to-end
run that produces the table."""
import itertools
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import model as M
from lib import checkpoints, cli, tasks, tokenizer
import ppo
import reward
import sft
from helpers import load_experiment


X = load_experiment("overoptimization")


# ---- best-of-n: the KL closed form and the estimator ---------------------------------------------------

def brute_force_best_of_n(p, n):
    """The distribution of the best of n i.i.d. draws from a categorical p whose outcomes are ranked by index
    (outcome k beats every j < k), by enumerating all K^n tuples of draws."""
    dist = np.zeros(len(p))
    for draws in itertools.product(range(len(p)), repeat=n):
        dist[max(draws)] += np.prod([p[k] for k in draws])
    return dist


def kl(q, p):
    return float(sum(qk * math.log(qk / pk) for qk, pk in zip(q, p) if qk > 0))


@given(weights=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=5), n=st.integers(1, 4))
def test_best_of_n_kl_closed_form_bounds_the_brute_force_kl_on_a_small_categorical(weights, n):
    """On a categorical, ties make best-of-n move LESS than log n - (n-1)/n (Beirami et al. 2024); the
    brute force also checks the order-statistic formula P(best = k) = F_k^n - F_{k-1}^n."""
    p = np.array(weights) / sum(weights)
    dist = brute_force_best_of_n(p, n)
    cdf = np.cumsum(p)
    assert np.allclose(dist, cdf ** n - np.concatenate([[0.0], cdf[:-1]]) ** n, atol=1e-12)
    assert kl(dist, p) <= X.kl_best_of_n(n) + 1e-12


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_best_of_n_kl_closed_form_is_the_limit_of_finer_categoricals(n):
    """As the categorical's outcomes become many and each unlikely (no ties in the limit), the brute-force
    KL of best-of-n (order statistics of K equally likely outcomes) converges to log n - (n - 1) / n."""
    gaps = []
    for outcomes in (16, 256, 4096):
        cdf = np.arange(1, outcomes + 1) / outcomes
        dist = cdf ** n - np.concatenate([[0.0], cdf[:-1]]) ** n
        gaps.append(X.kl_best_of_n(n) - kl(dist, np.full(outcomes, 1 / outcomes)))
    assert all(gap >= -1e-12 for gap in gaps)
    assert gaps[-1] < 2e-3 and (n == 1 or gaps[0] > gaps[1] > gaps[2])


def test_best_of_n_kl_matches_a_monte_carlo_estimate():
    """Brute force with continuous scores: draw n uniforms, keep the max, estimate E_bon[log pi_bon / pi]
    with pi_bon's density estimated by a histogram of 200,000 simulated best-of-n draws."""
    rng = np.random.default_rng(0)
    for n in (2, 8):
        best = rng.random((200_000, n)).max(1)
        density, _ = np.histogram(best, bins=200, range=(0, 1), density=True)
        estimate = float(np.mean(np.log(density[np.minimum((best * 200).astype(int), 199)])))
        assert estimate == pytest.approx(X.kl_best_of_n(n), abs=0.02)


@given(seed=st.integers(0, 10 ** 6), n_samples=st.integers(1, 7), data=st.data())
def test_best_of_n_estimator_equals_the_mean_over_every_subset(seed, n_samples, data):
    n = data.draw(st.integers(1, n_samples))
    rng = random.Random(seed)
    proxy = np.array([[rng.gauss(0, 1) for _ in range(n_samples)] for _ in range(3)])
    values = np.array([[rng.random() for _ in range(n_samples)] for _ in range(3)])
    expected = np.mean([np.mean([values[p][max(subset, key=lambda i: proxy[p][i])]
                                 for subset in itertools.combinations(range(n_samples), n)]) for p in range(3)])
    assert X.best_of_n_value(proxy, values, n) == pytest.approx(expected, abs=1e-12)
    assert X.best_of_n_weights(n_samples, n).sum() == pytest.approx(1.0, abs=1e-12)


# ---- the paper's functional forms: fits and peaks --------------------------------------------------------

@given(alpha=st.floats(0.01, 2.0), beta=st.floats(-1.0, 1.0), form=st.sampled_from(["bon", "rl"]),
       noise=st.floats(0, 1e-3), seed=st.integers(0, 1000))
def test_the_fit_recovers_known_alpha_and_beta_from_synthetic_points(alpha, beta, form, noise, seed):
    rng = np.random.default_rng(seed)
    d = np.sort(rng.uniform(0.05, 3.0, 12))
    f = d if form == "bon" else np.log(d)
    gold = d * (alpha - beta * f) + noise * rng.standard_normal(len(d))
    fitted_alpha, fitted_beta = X.fit_gold(d.tolist(), gold.tolist(), form)
    tolerance = 1e-8 + 50 * noise          # the least-squares error is a few noise units on 12 points
    assert fitted_alpha == pytest.approx(alpha, abs=tolerance)
    assert fitted_beta == pytest.approx(beta, abs=tolerance)


@given(alpha=st.floats(0.01, 2.0), beta=st.floats(0.05, 2.0), form=st.sampled_from(["bon", "rl"]))
def test_the_peak_is_the_maximum_of_the_fitted_curve_on_a_dense_grid(alpha, beta, form):
    d_star, gold_star = X.peak(alpha, beta, form)
    grid = np.linspace(1e-6, 3 * d_star, 200_001)
    curve = X.gold_curve(grid, alpha, beta, form)
    assert grid[np.argmax(curve)] == pytest.approx(d_star, rel=1e-3, abs=1e-4)
    assert curve.max() == pytest.approx(gold_star, rel=1e-6, abs=1e-9)
    assert X.peak(alpha, -beta, form) is None      # beta <= 0: rising everywhere, no peak


@given(alpha=st.floats(-2.0, 2.0).filter(lambda a: abs(a) > 1e-3), beta=st.floats(-2.0, 0.0),
       form=st.sampled_from(["bon", "rl"]), max_d=st.floats(0.5, 8.0))
def test_a_fit_without_a_peak_is_called_rising_or_falling_as_the_curve_itself_moves(alpha, beta, form, max_d):
    """The trend named for a peakless fit (beta <= 0) is that of the fitted curve's own values on a dense grid
    (finite differences), not of the slope formula it is computed from."""
    grid = np.linspace(max_d / 64, max_d, 20_001)
    steps = np.diff(X.gold_curve(grid, alpha, beta, form))
    trend = X.no_peak_trend(alpha, beta, form, max_d)
    if (steps > 0).all():
        assert trend == "rising"
    elif (steps < 0).all():
        assert trend == "falling"
    else:
        assert trend == "falling, then rising" and steps[0] < 0 < steps[-1]


# ---- the stages: every command parses with its target's own parser -------------------------------------

def test_every_command_parses_with_its_targets_parser_and_names_the_experiments_paths(tmp_path):
    args = cli.parse_args(X.Args, ["--out", str(tmp_path / "oo"), "--init", "start.pt", "--betas", "0,0.5"])
    rm_args = cli.parse_args(reward.Args, X.reward_command(args)[1:])
    assert X.reward_command(args)[0] == "reward.py"
    assert (rm_args.init, rm_args.data, rm_args.test_data, rm_args.out, rm_args.epochs, rm_args.time_budget) == (
        "start.pt", args.prefs, args.prefs_test, str(tmp_path / "oo" / "rm"), args.rm_epochs, args.rm_time_budget)
    for beta in (0.0, 0.5):
        command = X.ppo_command(args, beta, "rm.pt")
        parsed = cli.parse_args(ppo.Args, command[1:])
        assert command[0] == "ppo.py"
        assert (parsed.init, parsed.reward, parsed.reward_model, parsed.beta, parsed.lr, parsed.n_eval_during) == (
            "start.pt", "rm", "rm.pt", beta, args.lr, args.n_points)
        assert parsed.out == X.run_folder(args, beta) and not parsed.control and parsed.kl_target == 0
    synth = pytest.importorskip("synth")
    data = cli.parse_args(synth.Args, X.data_command()[1:])
    assert X.data_command()[0] == "synth.py"
    assert os.path.join(data.out_dir, "rl_test.jsonl") == X.Args().eval_data
    assert os.path.join(data.out_dir, "prefs_train.jsonl") == X.Args().prefs
    start = cli.parse_args(sft.Args, X.start_command()[1:])
    assert X.start_command()[0] == "sft.py" and os.path.join(start.out, "model.pt") == X.Args().init


def test_bad_options_are_one_line_errors_before_anything_runs(tmp_path):
    for argv, flag in ((["--betas", "0,x"], "--betas"), (["--betas", "-1"], "--betas"), (["--bon-n", "0,2"], "--bon-n"),
                       (["--n-points", "0"], "--n-points"), (["--lr", "0"], "--lr"), (["--seed", "-1"], "--seed")):
        with pytest.raises(cli.UserError, match=flag):
            X.main(["--out", str(tmp_path / "oo"), "--init", str(tmp_path / "missing.pt"), *argv])
    assert not (tmp_path / "oo").exists()


# ---- a tiny end-to-end run --------------------------------------------------------------------------------

def write_tiny_inputs(folder):
    torch.manual_seed(0)
    enc = tokenizer.get_tokenizer("bytes")
    policy = M.GPT(M.Config(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    checkpoints.save(str(folder / "start.pt"), policy, enc)
    rng = random.Random(0)
    rows = [{"prompt": f"{a}+{b}=?\n", "answer": str(a + b)}
            for a, b in ((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(32))]
    tasks.write_jsonl(str(folder / "rl.jsonl"), rows)
    pairs = [{"prompt": row["prompt"], "chosen": f"1+2=3\n#### {row['answer']}", "rejected": f"#### {row['answer']}",
              "kind": "bare"} for row in rows]
    tasks.write_jsonl(str(folder / "prefs.jsonl"), pairs)


def test_a_tiny_run_produces_its_table_fits_and_points(tmp_path):
    write_tiny_inputs(tmp_path)
    out = tmp_path / "oo"
    result = X.main(["--init", str(tmp_path / "start.pt"), "--prefs", str(tmp_path / "prefs.jsonl"),
                     "--prefs-test", str(tmp_path / "prefs.jsonl"), "--rm-epochs", "1", "--rm-time-budget", "0",
                     "--data", str(tmp_path / "rl.jsonl"), "--eval-data", str(tmp_path / "rl.jsonl"),
                     "--out", str(out), "--betas", "0,0.1", "--lr", "1e-3", "--time-budget", "0", "--max-steps", "2",
                     "--eval-minutes", "1e-6", "--n-points", "8", "--bon-n", "1,2,4", "--max-new-tokens", "6",
                     "--no-png", "--device", "cpu", "--threads", "1"])
    text = (out / "overoptimization.md").read_text()
    for arm in ("beta 0", "beta 0.1", "best-of-n"):
        assert f"| {arm} |" in text, arm
    assert "Fitted gold curves" in text and "gold (verifier accuracy, %) against d" in text
    saved = json.loads((out / "overoptimization.json").read_text())
    assert saved["series"] == json.loads(json.dumps(result["series"]))
    for beta in ("0", "0.1"):
        points = saved["series"][f"beta {beta}"]
        assert len(points["kl"]) == 3 and points["steps"] == [0, 1, 2]        # an eval after every step
        assert points["kl"][0] == pytest.approx(0.0, abs=1e-5)               # the start is pi_init itself
        assert all(0 <= g <= 1 for g in points["gold"])
    bon = saved["series"]["best-of-n"]
    assert bon["n"] == [1, 2, 4] and bon["kl"] == [X.kl_best_of_n(n) for n in (1, 2, 4)]
    assert bon["proxy"][0] <= bon["proxy"][1] <= bon["proxy"][2]             # best-of-n raises the proxy
    assert set(saved["fits"]) == {"beta 0", "beta 0.1", "best-of-n", "RL (all betas)"}
    assert (out / "rm" / "model.pt").exists()
