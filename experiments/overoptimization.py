"""Reward-model overoptimization: the proxy keeps rising, the gold reward peaks and falls.

Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization", Figure 1, on this
project's RLHF pipeline. The PROXY reward is the learned reward model (reward.py); the GOLD reward is
the one the proxy was meant to stand for, the verifier (1 if the final answer is right). As a policy
is optimised against the proxy it moves away from its start, measured by

    d = sqrt(KL(pi || pi_init))

and the paper's functional forms for the gold reward (relative to the start's) are

    best-of-n:  R(d) = d (alpha - beta d)          peak at d* = alpha / (2 beta),      R* = alpha^2 / (4 beta)
    RL (PPO):   R(d) = d (alpha - beta log d)      peak at d* = exp(alpha / beta - 1), R* = beta d*

Best-of-n (sample n completions from the start, keep the one the proxy scores highest) moves by
exactly KL_bon(n) = log n - (n - 1) / n (for distinct continuous scores; an upper bound otherwise), so
its d needs no estimate. PPO's d is estimated from one sample per held-out prompt at every eval
(ppo.py logs eval_kl, eval_proxy and eval_gold in its metrics.jsonl).

The stages run as subprocesses and talk through files: reward.py trains the proxy into OUT/rm/ (unless
--reward-model names one), ppo.py optimises against it at each KL penalty beta in --betas into
OUT/ppo_beta<b>/, and their metrics.jsonl are read back. Best-of-n runs here, in this process (it is
sampling and scoring, no training): checkpoints.load + model.generate from the start, the reward head read
from the reward checkpoint's meta, where reward.py saves it. The fitted curves, their peaks and a text
plot are printed; OUT/overoptimization.json holds every point, OUT/overoptimization.png the plot
when matplotlib is installed.

    python experiments/overoptimization.py                   # reward model, 3 PPO runs, best-of-n
    python experiments/overoptimization.py --betas 0,0.05 --time-budget 2
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402  (the project root is on the path only now)
from lib import checkpoints, cli, rundir, stages, tasks, tokenizer  # noqa: E402  (the project root is on the path only now)


@dataclass
class Args:
    init: str = "runs/sft/model.pt"          # pi_init: the SFT start of every arm (built by sft.py if this default is missing)
    reward_model: str = ""                   # proxy reward model checkpoint; "" = train one with reward.py into OUT/rm
    prefs: str = "data/prefs_train.jsonl"    # reward.py --data: preference pairs for the proxy
    prefs_test: str = "data/prefs_test.jsonl"  # reward.py --test-data
    rm_epochs: int = 2                       # reward.py --epochs
    rm_time_budget: float = 0.0              # reward.py --time-budget (minutes; 0 = no limit: --rm-epochs decide)
    data: str = "data/rl_train.jsonl"        # PPO's training prompts
    eval_data: str = "data/rl_test.jsonl"    # held-out prompts: every point of every arm is measured on them
    out: str = "runs/overoptimization"       # rm/, ppo_beta<b>/, bon/, overoptimization.json/.md/.png
    betas: str = "0,0.05,0.5"                # PPO's KL penalties: none, small (ppo.py's default), large
    lr: float = 3e-5                         # PPO's policy learning rate (ppo.py's default)
    time_budget: float = 0.0                 # training minutes of each PPO run (0 = steps only)
    max_steps: int = 80                      # steps of each PPO run (twice ppo.py's default; 0 = time budget only)
    eval_minutes: float = 0.5                # training minutes between PPO's evals (one point each)
    n_points: int = 200                      # held-out prompts per point (one sample each; best-of-n: N each)
    bon_n: str = "1,2,4,8,16,32,64"          # best-of-n sizes; N = the largest is sampled per prompt
    max_new_tokens: int = tasks.MAX_NEW_TOKENS   # completion length limit everywhere
    temperature: float = 1.0                 # sampling temperature of pi (PPO's and best-of-n's)
    png: bool = True                         # write a PNG plot when matplotlib is installed
    device: str = "auto"                     # auto | cpu | cuda
    threads: int = 0                         # torch CPU threads here and in PPO's runs (0 = torch's default)
    seed: int = 0                            # seeds every stage and the best-of-n samples


def parse_numbers(text: str, name: str, kind=float) -> list:
    """'0,0.02,0.2' -> [0.0, 0.02, 0.2]; a typo is one line naming the option."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise cli.UserError(f"--{name} {text!r}: give comma-separated numbers") from None
    if not values or len(set(values)) != len(values):
        raise cli.UserError(f"--{name} {text!r}: give at least one value, each once")
    return values


def parse_betas(text: str) -> list[float]:
    betas = parse_numbers(text, "betas")
    if not all(0 <= beta <= 1e6 for beta in betas):
        raise cli.UserError(f"--betas {text!r}: each KL penalty must be in [0, 1e6]")
    return betas


def parse_bon(text: str) -> list[int]:
    sizes = sorted(parse_numbers(text, "bon-n", int))
    if sizes[0] < 1 or sizes[-1] > 4096:
        raise cli.UserError(f"--bon-n {text!r}: each n must be in [1, 4096]")
    return sizes


def check_args(args) -> None:
    """Every option, before anything runs or is written: one line, exit 2."""
    parse_betas(args.betas)
    parse_bon(args.bon_n)
    cli.check_options(args, positive=("lr", "eval_minutes", "temperature"), probability=("lr",), seed=("seed",),
                      non_negative=("rm_time_budget", "time_budget"))
    cli.require_at_least(args, 1, "rm_epochs", "n_points", "max_new_tokens")
    cli.require_at_least(args, 0, "max_steps", "threads")
    cli.require_at_most(args, 10 ** 6, "rm_epochs", "n_points", "max_new_tokens", "max_steps", "threads")
    cli.require_at_most(args, 1e6, "rm_time_budget", "time_budget", "eval_minutes", "temperature")
    cli.check_budget(args)
    cli.check_choices(args, device=("auto", "cpu", "cuda"))
    for name in ("init", "prefs", "prefs_test", "data", "eval_data", "out"):
        if not getattr(args, name).strip():
            raise cli.UserError(f"--{name.replace('_', '-')}: the path is empty")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out}: exists and is not a folder")


# ---------------------------------------------------------------------------------------------
# The math: best-of-n's KL, its unbiased estimator, the paper's functional forms and their peaks
# ---------------------------------------------------------------------------------------------

def kl_best_of_n(n: int) -> float:
    """KL(pi_bon || pi) = log n - (n - 1) / n for best-of-n with distinct continuous scores.

    With U = F(score) uniform, the kept sample has density n u^(n-1): KL = E[log n + (n - 1) log U_max]
    = log n + (n - 1) * integral_0^1 n u^(n-1) log u du = log n - (n - 1) / n. Stiennon et al. 2020;
    Gao et al. 2022 (Appendix); an upper bound when scores can tie (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def best_of_n_weights(n_samples: int, n: int) -> np.ndarray:
    """w_i = C(i - 1, n - 1) / C(N, n), i = 1..N: the probability that the i-th LOWEST of N scored samples is
    the highest of a uniformly random n-subset. sum_i w_i y_(i) is then the exact expectation, over all
    n-subsets of the N samples, of the y of the subset's best: an unbiased best-of-n estimate from one
    set of N >= n samples (Nakano et al. 2021; Gao et al. 2022)."""
    total = math.comb(n_samples, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, n_samples + 1)])


def best_of_n_value(proxy: np.ndarray, values: np.ndarray, n: int) -> float:
    """E[values of the proxy's argmax among n of the N samples], averaged over prompts.
    proxy, values (P, N) -> float. Ties in the proxy are broken by position (stable sort)."""
    order = np.argsort(proxy, axis=1, kind="stable")                            # (P, N) ascending proxy
    ranked = np.take_along_axis(values, order, axis=1)                          # (P, N)
    return float((ranked @ best_of_n_weights(proxy.shape[1], n)).mean())


def fit_gold(d, gold, form: str) -> tuple[float, float]:
    """Least squares fit of gold(d) = d (alpha - beta f(d)), f(d) = d (best-of-n, form "bon") or log d (RL,
    form "rl"): linear in (alpha, beta) with features [d, -d f(d)] and no intercept (R(0) = 0; d log d -> 0).
    d, gold: sequences (gold relative to the start's) -> (alpha, beta)."""
    d = np.asarray(d, dtype=float)
    gold = np.asarray(gold, dtype=float)
    f = d if form == "bon" else np.log(np.where(d > 0, d, 1.0))
    features = np.stack([d, -d * f], axis=1)                                     # (K, 2)
    (alpha, beta), *_ = np.linalg.lstsq(features, gold, rcond=None)
    return float(alpha), float(beta)


def gold_curve(d, alpha: float, beta: float, form: str):
    """R(d) = d (alpha - beta d) (bon) or d (alpha - beta log d) (rl); R(0) = 0."""
    d = np.asarray(d, dtype=float)
    f = d if form == "bon" else np.log(np.where(d > 0, d, 1.0))
    return d * (alpha - beta * f)


def slope(d: float, alpha: float, beta: float, form: str) -> float:
    """dR/dd of the fitted gold curve: bon alpha - 2 beta d; rl alpha - beta (log d + 1)."""
    return alpha - 2 * beta * d if form == "bon" else alpha - beta * (math.log(d) + 1)


def no_peak_trend(alpha: float, beta: float, form: str, max_d: float) -> str:
    """What a fit without a peak does over the measured range [max_d / 64, max_d]: rising, falling (the best gold
    is the start's), or falling then rising (a minimum). Without a peak beta <= 0, so the slope never decreases
    with d (bon: -2 beta >= 0; rl: -beta / d >= 0), and its signs at the two ends of the range decide."""
    first, last = (slope(d, alpha, beta, form) > 0 for d in (max_d / 64, max_d))
    return "rising" if first else "falling" if not last else "falling, then rising"


def peak(alpha: float, beta: float, form: str):
    """(d*, R*) where dR/dd = 0 is a maximum, or None when beta <= 0 (then dR/dd only grows with d: no maximum).
    bon: alpha - 2 beta d = 0; rl: alpha - beta log d - beta = 0."""
    if beta <= 0:
        return None
    d_star = alpha / (2 * beta) if form == "bon" else math.exp(min(alpha / beta - 1, 700.0))
    return d_star, float(gold_curve([d_star], alpha, beta, form)[0])


# ---------------------------------------------------------------------------------------------
# The stages: commands built from each target's own Args field names
# ---------------------------------------------------------------------------------------------

def data_command() -> list[str]:
    """synth.py on its defaults: every default data file (prompts and preference pairs)."""
    return stages.stage_command("synth.py", out_dir=os.path.dirname(Args().eval_data))


def start_command() -> list[str]:
    """sft.py on its defaults: the SFT start, Args().init."""
    return stages.stage_command("sft.py", out=os.path.dirname(Args().init))


def reward_command(args) -> list[str]:
    """reward.py: the proxy reward model, trained from the start's body on the preference pairs."""
    return stages.stage_command("reward.py", data=args.prefs, test_data=args.prefs_test, init=args.init,
                                out=os.path.join(args.out, "rm"), epochs=args.rm_epochs, time_budget=args.rm_time_budget,
                                seed=args.seed, device=args.device)


def ppo_command(args, beta: float, reward_model: str) -> list[str]:
    """ppo.py against the proxy at one KL penalty; its evals log KL to the start, proxy and gold on the first
    n_points held-out prompts; no control and a small final table (the curve is what is read)."""
    return stages.stage_command("ppo.py", init=args.init, reward="rm", reward_model=reward_model, data=args.data,
                                eval_data=args.eval_data, out=run_folder(args, beta), beta=beta, lr=args.lr,
                                time_budget=args.time_budget, max_steps=args.max_steps, eval_minutes=args.eval_minutes,
                                n_eval=args.n_points, n_eval_during=args.n_points, pass_k=1,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, control=False,
                                seed=args.seed, device=args.device, threads=args.threads)


def run_folder(args, beta: float) -> str:
    return os.path.join(args.out, f"ppo_beta{beta:g}")


def read_rl_points(run_dir: str) -> dict:
    """A PPO run's eval rows -> {"minutes", "kl", "proxy", "gold", "accuracy"} lists (one entry per eval)."""
    evals = [row for row in tasks.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
             if row.get("kind") == "eval" and row.get("eval_kl") is not None]
    if not evals:
        raise cli.UserError(f"{run_dir}/metrics.jsonl: no eval row with eval_kl (a ppo.py older than this script?)")
    return {"minutes": [row["train_minutes"] for row in evals], "kl": [row["eval_kl"] for row in evals],
            "proxy": [row["eval_proxy"] for row in evals], "gold": [row["eval_gold"] for row in evals],
            "accuracy": [row["eval_accuracy"] for row in evals], "steps": [row["step"] for row in evals]}


# ---------------------------------------------------------------------------------------------
# Best-of-n: N samples per prompt from the start, scored by the proxy (reward head) and the verifier
# ---------------------------------------------------------------------------------------------

def load_reward_head(path: str, device):
    """reward.py's checkpoint -> (body, head): the body is a model.GPT, the head the Linear(n_embd, 1) whose
    weights reward.py saves in the checkpoint's meta as {"weight": (1, C), "bias": (1,)}."""
    body, enc, ckpt = checkpoints.load(path, device=device)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    head = meta.get("reward_head") if isinstance(meta, dict) else None
    width = body.config.n_embd
    if (not isinstance(head, dict) or not torch.is_tensor(head.get("weight")) or not torch.is_tensor(head.get("bias"))
            or tuple(head["weight"].shape) != (1, width) or tuple(head["bias"].shape) != (1,)):
        raise cli.UserError(f"{path}: not a reward model checkpoint (reward.py saves reward_head in its meta)")
    linear = torch.nn.Linear(width, 1).to(device)
    linear.load_state_dict({"weight": head["weight"], "bias": head["bias"]})
    return body.eval(), linear.eval(), enc


@torch.no_grad()
def proxy_scores(body, head, sequences, pad: int, device, batch_size: int = 256) -> np.ndarray:
    """R(x, y) = head(h_L[last real token]) of right-padded prompt ++ completion (++ EOS when it ended),
    as reward.py and ppo.py read it. sequences: token lists -> (len,) float array."""
    scores = []
    for start in range(0, len(sequences), batch_size):
        tokens, mask = M.padded_batch(sequences[start:start + batch_size], pad, "right", device)
        with M.autocast(device):
            hidden = body.hidden(tokens)                                        # (b, T, C)
        last = hidden[torch.arange(len(tokens), device=device), mask.sum(-1) - 1]   # (b, C)
        scores.append(head(last.float()).squeeze(-1).cpu())
    return torch.cat(scores).numpy()


@torch.no_grad()
def sample_best_of_n(args, reward_model: str, rows, n_samples: int, device) -> dict:
    """N samples per prompt from pi_init at the training temperature -> {"proxy", "gold"} arrays (P, N)."""
    policy, enc, _ = checkpoints.load(args.init, device=device)
    body, head, reward_enc = load_reward_head(reward_model, device)
    if reward_enc.name != enc.name:
        raise cli.UserError(f"{reward_model}: tokenizer {reward_enc.name!r} differs from the start's {enc.name!r}")
    policy.eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    prompts = [tokenizer.encode_prompt(enc, row["prompt"]) for row in rows for _ in range(n_samples)]
    answers = [row["answer"] for row in rows for _ in range(n_samples)]
    sequences, texts = [], []
    for start in range(0, len(prompts), 256):
        batch = prompts[start:start + 256]
        gen = M.generate(policy, batch, args.max_new_tokens, temperature=args.temperature, stop_ids=tokenizer.stop_ids(enc),
                         pad_id=tokenizer.pad_id(enc), generator=generator)
        for prompt, tokens, length in zip(batch, gen.tokens.tolist(), gen.lengths.tolist()):
            sequences.append(prompt + tokens[:length])                  # the EOS is kept when the row ended
            texts.append(tokenizer.decode(enc, tokens[:length]))
    proxy = proxy_scores(body, head, sequences, tokenizer.pad_id(enc), device)
    gold = np.array([float(tasks.is_correct(text, answer)) for text, answer in zip(texts, answers)])
    return {"proxy": proxy.reshape(len(rows), n_samples), "gold": gold.reshape(len(rows), n_samples)}


def best_of_n_points(samples: dict, sizes: list[int]) -> dict:
    """Each n -> d = sqrt(KL_bon(n)), and the expected proxy and gold of best-of-n (unbiased, from N samples)."""
    return {"n": sizes, "kl": [kl_best_of_n(n) for n in sizes],
            "proxy": [best_of_n_value(samples["proxy"], samples["proxy"], n) for n in sizes],
            "gold": [best_of_n_value(samples["proxy"], samples["gold"], n) for n in sizes]}


# ---------------------------------------------------------------------------------------------
# The report: fits, peaks, a text plot (always) and a PNG (with matplotlib)
# ---------------------------------------------------------------------------------------------

def analyse(series: dict) -> dict:
    """Per arm: d = sqrt(max(KL, 0)), gold relative to the arm's first point, the fitted (alpha, beta) of the
    paper's form and its peak; the RL arms are also fitted together (one curve: the KL penalty only decides
    how far along it a run gets, Gao et al. section 3.6)."""
    fits = {}
    pooled_d, pooled_gold = [], []
    for name, points in series.items():
        form = "bon" if name == "best-of-n" else "rl"
        d = [math.sqrt(max(kl, 0.0)) for kl in points["kl"]]
        gold = [g - points["gold"][0] for g in points["gold"]]
        alpha, beta = fit_gold(d, gold, form)
        measured = int(np.argmax(points["gold"]))
        fits[name] = {"form": form, "alpha": alpha, "beta": beta, "peak": peak(alpha, beta, form), "d": d,
                      "gold0": points["gold"][0], "max_d": max(d),
                      "measured_peak": {"d": d[measured], "gold": points["gold"][measured]}}
        if form == "rl":
            pooled_d += d
            pooled_gold += gold
    if pooled_d:
        alpha, beta = fit_gold(pooled_d, pooled_gold, "rl")
        gold0 = float(np.mean([fits[name]["gold0"] for name in series if name != "best-of-n"]))
        fits["RL (all betas)"] = {"form": "rl", "alpha": alpha, "beta": beta, "peak": peak(alpha, beta, "rl"),
                                  "gold0": gold0, "max_d": max(pooled_d)}
    return fits


def describe_fit(name: str, fit: dict) -> str:
    shape = "d (alpha - beta d)" if fit["form"] == "bon" else "d (alpha - beta log d)"
    line = (f"{name:<16} gold - {100 * fit['gold0']:.1f}% = {shape}, alpha {fit['alpha']:+.4f}, "
            f"beta {fit['beta']:+.4f}")
    if fit["peak"] is None:
        trend = no_peak_trend(fit["alpha"], fit["beta"], fit["form"], fit["max_d"])
        return line + f": no peak ({trend} over the measured d <= {fit['max_d']:.2f})"
    d_star, gain = fit["peak"]
    where = "inside" if d_star <= fit["max_d"] else "beyond"
    return (line + f": peak at d* = {d_star:.2f} (KL {d_star ** 2:.2f} nats), gold {100 * (fit['gold0'] + gain):.1f}% "
            f"({where} the measured range, d <= {fit['max_d']:.2f})")


def ascii_chart(series: dict, key: str, fits: dict | None = None, width: int = 60, height: int = 14) -> str:
    """A text scatter of `key` (proxy or gold) against d for every arm, one letter per arm, with the fitted
    gold curves drawn as dots; the y axis is labelled with its range."""
    marks = {}
    points = []
    for index, (name, values) in enumerate(series.items()):
        mark = "B" if name == "best-of-n" else "0123456789"[index % 10] if name.startswith("beta") else "*"
        marks[name] = mark
        d = [math.sqrt(max(kl, 0.0)) for kl in values["kl"]]
        points += [(x, y, mark) for x, y in zip(d, values[key]) if y is not None]
    if not points:
        return ""
    x_max = max(x for x, _, _ in points) or 1.0
    curves = []
    if fits:
        for name, fit in fits.items():
            if name in series:
                xs = np.linspace(0, max(fit["max_d"], 1e-9), width)
                curves += [(x, fit["gold0"] + y, ".") for x, y in zip(xs, gold_curve(xs, fit["alpha"], fit["beta"],
                                                                                    fit["form"]))]
    y_values = [y for _, y, _ in points + curves]
    y_min, y_max = min(y_values), max(y_values)
    if y_max - y_min < 1e-12:                   # one level: centre it in a unit-high window
        y_min, y_max = y_min - 0.5 / (100 if key == "gold" else 1), y_max + 0.5 / (100 if key == "gold" else 1)
    span = y_max - y_min
    grid = [[" "] * width for _ in range(height)]
    for x, y, mark in curves + points:          # points drawn last, over the curves
        column = min(width - 1, int(x / x_max * (width - 1)))
        row = height - 1 - min(height - 1, int((y - y_min) / span * (height - 1)))
        if mark == "." and grid[row][column] != " ":
            continue
        grid[row][column] = mark
    scale = 100 if key == "gold" else 1
    lines = [f"{key} ({'verifier accuracy, %' if key == 'gold' else 'reward model score'}) against d = sqrt(KL):"]
    for row_index, row in enumerate(grid):
        label = y_max - span * row_index / (height - 1)
        lines.append(f"{scale * label:8.2f} |" + "".join(row))
    lines.append(" " * 9 + "+" + "-" * width)
    lines.append(" " * 9 + f"0{' ' * (width - 12)}d = {x_max:.2f}")
    lines.append("         " + "   ".join(f"{mark} {name}" for name, mark in marks.items())
                 + ("   . fitted" if fits else ""))
    return "\n".join(lines)


def format_table(series: dict, fits: dict) -> str:
    lines = ["| arm | points | d at end | proxy: start -> end | gold: start -> end | measured gold peak (d) | "
             "fit alpha | fit beta | fitted peak d* (gold*) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, values in series.items():
        fit = fits[name]
        if fit["peak"] is None:
            fitted = f"none ({no_peak_trend(fit['alpha'], fit['beta'], fit['form'], fit['max_d'])})"
        else:
            fitted = f"{fit['peak'][0]:.2f} ({100 * (fit['gold0'] + fit['peak'][1]):.1f}%)"
        lines.append(f"| {name} | {len(values['kl'])} | {fit['d'][-1]:.2f} | {values['proxy'][0]:+.2f} -> "
                     f"{values['proxy'][-1]:+.2f} | {100 * values['gold'][0]:.1f}% -> {100 * values['gold'][-1]:.1f}% | "
                     f"{100 * fit['measured_peak']['gold']:.1f}% ({fit['measured_peak']['d']:.2f}) | "
                     f"{fit['alpha']:+.4f} | {fit['beta']:+.4f} | {fitted} |")
    return "\n".join(lines)


def plot_png(series: dict, fits: dict, path: str) -> None:
    """proxy and gold against d, one panel each, with the fitted gold curves (matplotlib, imported here only)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG; `pip install matplotlib` for one)")
        return
    fig, (ax_proxy, ax_gold) = plt.subplots(1, 2, figsize=(10, 4))
    for index, (name, values) in enumerate(series.items()):
        color = f"C{index}"
        d = [math.sqrt(max(kl, 0.0)) for kl in values["kl"]]
        ax_proxy.plot(d, values["proxy"], "o-", color=color, label=name)
        ax_gold.plot(d, [100 * g for g in values["gold"]], "o", color=color, label=name)
        fit = fits[name]
        xs = np.linspace(0, max(fit["max_d"], 1e-9), 100)
        ax_gold.plot(xs, 100 * (fit["gold0"] + gold_curve(xs, fit["alpha"], fit["beta"], fit["form"])), "--",
                     color=color)
    ax_proxy.set_ylabel("proxy: reward model score")
    ax_gold.set_ylabel("gold: verifier accuracy (%)")
    for ax in (ax_proxy, ax_gold):
        ax.set_xlabel("d = sqrt(KL(pi || pi_init))")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


def main(argv=None) -> dict:
    args = cli.parse_args(Args, argv)
    check_args(args)
    betas, sizes = parse_betas(args.betas), parse_bon(args.bon_n)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = cli.get_device(args.device)
    stages.ensure_inputs((args.init, Args().init, start_command()), (args.eval_data, Args().eval_data, data_command()))
    start, enc, _ = checkpoints.load(args.init)
    rows = tasks.fit_prompts(tasks.read_prompts(args.eval_data), enc, start.config.block_size, args.max_new_tokens,
                             args.eval_data)[:args.n_points]
    rundir.claim_run_dir(args.out)
    reward_model = args.reward_model
    if not reward_model:
        stages.run_stage(reward_command(args))
        reward_model = os.path.join(args.out, "rm", "model.pt")
    series = {}
    for beta in betas:
        stages.run_stage(ppo_command(args, beta, reward_model))
        series[f"beta {beta:g}"] = read_rl_points(run_folder(args, beta))
    print(f"best-of-n: {sizes[-1]} samples for each of {len(rows)} held-out prompts from {args.init}", flush=True)
    samples = sample_best_of_n(args, reward_model, rows, sizes[-1], device)
    series["best-of-n"] = best_of_n_points(samples, sizes)
    fits = analyse(series)

    table = format_table(series, fits)
    report = [f"Reward-model overoptimization: proxy = {reward_model}, gold = the verifier, start {args.init}, "
              f"{len(rows)} held-out prompts per point (PPO: one sample each; best-of-n: {sizes[-1]} each).",
              table, "", "Fitted gold curves (Gao et al. 2022; gold relative to each arm's start):",
              *[describe_fit(name, fit) for name, fit in fits.items()], "",
              ascii_chart(series, "proxy"), "", ascii_chart(series, "gold", fits), ""]
    for name, values in series.items():
        report.append(f"{name:<10} proxy {rundir.sparkline(values['proxy'])}  gold {rundir.sparkline(values['gold'])}  "
                      f"d {math.sqrt(max(values['kl'][0], 0)):.2f} -> {math.sqrt(max(values['kl'][-1], 0)):.2f}")
    text = "\n".join(report)
    print(text)
    result = {"args": asdict(args), "reward_model": reward_model, "series": series,
              "fits": {name: {key: value for key, value in fit.items()} for name, fit in fits.items()}}
    with rundir.atomic_write(os.path.join(args.out, "overoptimization.json")) as f:
        json.dump(result, f, indent=1)
    with rundir.atomic_write(os.path.join(args.out, "overoptimization.md")) as f:
        f.write(text + "\n")
    if args.png:
        plot_png(series, fits, os.path.join(args.out, "overoptimization.png"))
    return result


if __name__ == "__main__":
    cli.run(main)
