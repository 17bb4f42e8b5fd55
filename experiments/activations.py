"""Activations: without a nonlinearity, depth is one matrix; with one, a network can compute what no
linear map can. And the choice of nonlinearity sets how gradients flow back.

A stack of L feed-forward layers with the identity in place of the activation collapses:

    h_L = W2_L W1_L ( ... W2_1 W1_1 h_0 ) = P h_0,        P = W2_L W1_L ... W2_1 W1_1

(with biases an affine map P h_0 + c), so it computes nothing one matrix cannot. The task here needs more:
the parity of two tokens, y = (a + b) mod 2 (XOR of their low bits). A linear stack fed the two token
embeddings gives logits f(a) + g(b), and no such additive function beats chance on parity: the
cross-entropy's minimum over all of them is ln 2 (the loss is convex and symmetric under flipping one
token's parity, so its minimum sits at f = g = 0). One nonlinearity between two matrices is enough.

Backpropagation multiplies the gradient by act'(z) at every layer; for pre-activations z ~ N(0, 1)

    ReLU   max(0, z)        E[act'] = 1/2      E[act'^2] = 1/2     (Nair & Hinton 2010)
    GELU   z Phi(z)         E[act'] = 1/2      E[act'^2] ~ 0.46    (Hendrycks & Gimpel 2016)
    SiLU   z sigma(z)       E[act'] = 1/2      E[act'^2] ~ 0.37    (Elfwing et al. 2018; "Swish", Ramachandran 2017)
    ReLU^2 max(0, z)^2      E[act'] = 2/sqrt(2 pi)   E[act'^2] = 2  (So et al. 2021, Primer)

E[act'^2] is the factor by which one layer scales the gradient's variance (the reason for He et al.
2015's init). ReLU and ReLU^2 have act' = 0 for z < 0: a unit whose pre-activation is negative on every
input is dead, it outputs 0 and never gets a gradient again (Lu et al. 2019, "Dying ReLU").

    python experiments/activations.py                 # 5 activations x 3 seeds, seconds
    python experiments/activations.py --lr 0.03 --steps 2000
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lib import cli, rundir  # noqa: E402  (the project root is on sys.path only from the line above)


@dataclass
class Args:
    activations: str = "linear,relu,gelu,silu,relu2"   # comma-separated, from: linear relu gelu silu relu2
    vocab: int = 16                # V (even): tokens a, b in 0..V-1; V^2 pairs, label (a + b) mod 2
    held_out: int = 4              # K: pairs with (a//2 + b//2) mod K = 0 are held out (a share 1/K)
    embd: int = 16                 # token embedding width; the stack's input is [E(a), E(b)]
    hidden: int = 64               # FFN inner width
    layers: int = 2                # FFN layers in the stack, h <- W2 act(W1 h), no residual
    steps: int = 600               # full-batch AdamW steps
    lr: float = 0.01               # AdamW learning rate
    weight_decay: float = 0.1      # AdamW decoupled weight decay on matrices and embeddings (never biases)
    seeds: str = "0,1,2"           # comma-separated seeds: each trains every activation
    out: str = "runs/activations"  # results.json and results.md
    threads: int = 0               # torch CPU threads (0 = torch's default)


# ----------------------------------------------------------------------------------------------
# The activations and their derivatives
# ----------------------------------------------------------------------------------------------

ACTIVATIONS = {
    "linear": lambda z: z,                       # no nonlinearity: the stack collapses to one matrix
    "relu": F.relu,
    "gelu": F.gelu,                              # exact GELU, z * Phi(z)
    "silu": F.silu,                              # z * sigmoid(z)
    "relu2": lambda z: F.relu(z).square(),
}
ZERO_BELOW = ("relu", "relu2")                   # act'(z) = 0 for z < 0: these units can die


def derivative(name: str, z):
    """act'(z), by autograd (no hand-written formula to get wrong)."""
    z = z.detach().clone().requires_grad_(True)
    ACTIVATIONS[name](z).sum().backward()
    return z.grad


def gaussian_moments(name: str, cells: int = 240000, width: float = 12.0) -> tuple[float, float]:
    """(E[act'(z)], E[act'(z)^2]) for z ~ N(0, 1), by the midpoint rule on [-12, 12] (the tails beyond hold
    less than 1e-30 of the mass). 0 is a cell boundary, so ReLU's jump in act' at 0 costs no error."""
    h = 2 * width / cells
    z = -width + h * (torch.arange(cells, dtype=torch.float64) + 0.5)            # cell midpoints
    density = torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    d = derivative(name, z)
    return float((d * density).sum() * h), float((d ** 2 * density).sum() * h)


# ----------------------------------------------------------------------------------------------
# The model: embeddings of two tokens -> a stack of FFNs -> two logits
# ----------------------------------------------------------------------------------------------

class FFNStack(nn.Module):
    """h_0 = [E(a), E(b)] (2 d);  h_l = W2_l act(W1_l h_{l-1}) (+ biases);  logits = W_out h_L."""

    def __init__(self, vocab: int, embd: int, hidden: int, layers: int, activation: str):
        super().__init__()
        self.activation = activation
        self.embed = nn.Embedding(vocab, embd)
        width = 2 * embd
        self.w1 = nn.ModuleList(nn.Linear(width, hidden) for _ in range(layers))
        self.w2 = nn.ModuleList(nn.Linear(hidden, width) for _ in range(layers))
        self.out = nn.Linear(width, 2)

    def inputs(self, pairs):
        """pairs (N, 2) of token ids -> h_0 (N, 2 d)."""
        return self.embed(pairs).flatten(1)

    def stack(self, h, keep=None):
        """h_0 (N, 2 d) -> h_L (N, 2 d); `keep` (a list) collects each layer's pre-activations (N, hidden)."""
        act = ACTIVATIONS[self.activation]
        for w1, w2 in zip(self.w1, self.w2):
            z = w1(h)
            if keep is not None:
                keep.append(z)
            h = w2(act(z))
        return h

    def forward(self, pairs, keep=None):
        return self.out(self.stack(self.inputs(pairs), keep))          # (N, 2)


def collapsed_map(net: FFNStack):
    """With the identity activation, the stack as ONE affine map h_L = P h_0 + c: P = prod_l W2_l W1_l and
    c accumulates the biases, c <- W2_l (W1_l c + b1_l) + b2_l. -> (P (2d, 2d), c (2d,))."""
    width, dtype = net.out.in_features, net.out.weight.dtype
    P, c = torch.eye(width, dtype=dtype), torch.zeros(width, dtype=dtype)
    for w1, w2 in zip(net.w1, net.w2):
        P = w2.weight @ w1.weight @ P
        c = w2.weight @ (w1.weight @ c + w1.bias) + w2.bias
    return P, c


def parity_data(vocab: int, held_out: int):
    """Every pair (a, b) of 0..V-1 with y = (a + b) mod 2; the pairs with (a//2 + b//2) mod K = 0 are held out.
    The split depends on a//2 and b//2 only, so flipping one token's parity (a <-> a xor 1) maps the training
    set onto itself with every label flipped: each token meets as many even partners as odd ones, and the
    best additive model is exactly at chance on the training set too, not only on the full table.
    -> (train pairs (N, 2), train y (N,), held-out pairs, held-out y)."""
    a, b = torch.meshgrid(torch.arange(vocab), torch.arange(vocab), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], 1)                # (V^2, 2)
    labels = pairs.sum(1) % 2
    test = (pairs[:, 0] // 2 + pairs[:, 1] // 2) % held_out == 0
    return pairs[~test], labels[~test], pairs[test], labels[test]


# ----------------------------------------------------------------------------------------------
# Measuring: gradients at init, dead units, training
# ----------------------------------------------------------------------------------------------

def gradient_stats(net: FFNStack, pairs, labels) -> dict:
    """One backward pass on (pairs, labels): the gradient norm of the first and last layer's W1, the mean
    act'(z) over all hidden units and inputs, and the share of (unit, input) where act'(z) = 0 (no gradient
    flows through that unit for that input)."""
    net.zero_grad()
    keep = []
    F.cross_entropy(net(pairs, keep), labels).backward()
    slopes = torch.cat([derivative(net.activation, z).flatten() for z in keep])
    stats = {"grad_first": float(net.w1[0].weight.grad.norm()), "grad_last": float(net.w1[-1].weight.grad.norm()),
             "mean_slope": float(slopes.mean()), "zero_slope": float((slopes == 0).float().mean())}
    net.zero_grad()
    return stats


@torch.no_grad()
def dead_share(net: FFNStack, pairs) -> float:
    """Share of hidden units (all layers) whose pre-activation is <= 0 on EVERY input: dead, for an
    activation with act'(z) = 0 below 0. Other activations: nan (their units are never exactly off)."""
    if net.activation not in ZERO_BELOW:
        return float("nan")
    keep = []
    net(pairs, keep)
    return float(torch.cat([(z <= 0).all(0) for z in keep]).float().mean())


@torch.no_grad()
def loss_and_accuracy(net, pairs, labels) -> tuple[float, float]:
    logits = net(pairs)
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def train_one(args: Args, activation: str, seed: int) -> dict:
    """Train one network on the parity pairs (full batch, AdamW) and measure it before and after."""
    train_pairs, train_y, test_pairs, test_y = parity_data(args.vocab, args.held_out)
    every_pair = torch.cat([train_pairs, test_pairs])
    torch.manual_seed(seed)
    net = FFNStack(args.vocab, args.embd, args.hidden, args.layers, activation)
    at_init = gradient_stats(net, train_pairs, train_y)
    dead_init = dead_share(net, every_pair)
    matrices = [p for p in net.parameters() if p.dim() >= 2]       # the project's rule: decay matrices only
    others = [p for p in net.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=args.lr)
    curve, every = [], max(1, args.steps // 24)
    for step in range(args.steps):
        loss = F.cross_entropy(net(train_pairs), train_y)
        cli.check_finite(f"{activation} seed {seed} step {step}", loss=loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0:
            curve.append(loss_and_accuracy(net, test_pairs, test_y)[1])    # held-out accuracy
    train_loss, train_acc = loss_and_accuracy(net, train_pairs, train_y)
    test_loss, test_acc = loss_and_accuracy(net, test_pairs, test_y)
    return {"activation": activation, "seed": seed, "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "dead_init": dead_init, "dead_end": dead_share(net, every_pair),
            "init": at_init, "curve": curve}


# ----------------------------------------------------------------------------------------------
# Options, the report, main
# ----------------------------------------------------------------------------------------------

def parse_list(text: str, name: str, allowed=None, kind=str) -> list:
    try:
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise cli.UserError(f"--{name} {text!r}: give comma-separated values") from None
    if not items or (allowed is not None and any(item not in allowed for item in items)):
        raise cli.UserError(f"--{name} {text!r}: give one or more of {', '.join(allowed or ())}")
    if len(set(items)) < len(items):
        raise cli.UserError(f"--{name} {text!r}: a value is repeated")
    return items


def parse_seeds(text: str) -> list[int]:
    seeds = parse_list(text, "seeds", kind=int)
    if any(not 0 <= s < 2 ** 32 for s in seeds):
        raise cli.UserError(f"--seeds {text!r}: each seed must be in [0, 2**32)")
    return seeds


def check_args(args: Args) -> None:
    """Every option before anything runs or is written: one line, exit 2."""
    parse_list(args.activations, "activations", tuple(ACTIVATIONS))
    parse_seeds(args.seeds)
    cli.require_at_least(args, 4, "vocab")     # 2 tokens: the only pair group (0, 0) is held out, nothing to train on
    cli.require_at_least(args, 1, "embd", "hidden", "layers", "steps")
    cli.require_at_least(args, 0, "threads")
    cli.require_at_least(args, 2, "held_out")
    cli.check_options(args, positive=("lr",), non_negative=("weight_decay",))
    if args.vocab % 2:
        raise cli.UserError(f"--vocab must be even (tokens pair up as 2i, 2i+1 of opposite parity), got {args.vocab}")
    if not args.out:
        raise cli.UserError("--out: a folder is needed")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out}: exists and is not a folder")


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def summarize(runs: list[dict], activations: list[str]) -> list[dict]:
    """One row per activation: each number's mean and standard deviation over the seeds."""
    rows = []
    for name in activations:
        mine = [r for r in runs if r["activation"] == name]
        row = {"activation": name, "seeds": len(mine)}
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "dead_init", "dead_end"):
            row[key] = mean_std([r[key] for r in mine])
        for key in ("grad_first", "grad_last", "mean_slope", "zero_slope"):
            row[key] = mean_std([r["init"][key] for r in mine])
        row["moments"] = gaussian_moments(name)
        row["curve"] = [sum(values) / len(values) for values in zip(*(r["curve"] for r in mine))]
        rows.append(row)
    return rows


def format_table(rows: list[dict], args: Args) -> str:
    pm = lambda pair, scale=1.0, digits=1: ("—" if math.isnan(pair[0]) else
                                           f"{scale * pair[0]:.{digits}f} ± {scale * pair[1]:.{digits}f}")
    head = ["activation", "train acc %", "held-out acc %", "held-out loss", "dead units % (init → end)",
            "E[act'] N(0,1)", "E[act'^2] N(0,1)", "mean act' at init", "act'=0 at init %", "|grad W1| first / last",
            "held-out acc during training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        dead = "—" if math.isnan(r["dead_end"][0]) else f"{100 * r['dead_init'][0]:.1f} → {100 * r['dead_end'][0]:.1f}"
        cells = [r["activation"], pm(r["train_acc"], 100), pm(r["test_acc"], 100), pm(r["test_loss"], 1, 3), dead,
                 f"{r['moments'][0]:.3f}", f"{r['moments'][1]:.3f}", f"{r['mean_slope'][0]:.3f}",
                 f"{100 * r['zero_slope'][0]:.1f}", f"{r['grad_first'][0]:.3f} / {r['grad_last'][0]:.3f}",
                 f"{rundir.sparkline(r['curve'], 24)} {100 * min(r['curve']):.0f}–{100 * max(r['curve']):.0f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collapse_check(args: Args) -> float:
    """The identity on a fresh linear stack: max |stack(h) - (P h + c)| over random inputs."""
    torch.manual_seed(0)
    net = FFNStack(args.vocab, args.embd, args.hidden, args.layers, "linear")
    h = torch.randn(64, 2 * args.embd)
    P, c = collapsed_map(net)
    with torch.no_grad():
        return float((net.stack(h) - (h @ P.T + c)).abs().max())


def main(argv=None) -> dict:
    args = cli.parse_args(Args, argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    activations, seeds = parse_list(args.activations, "activations", tuple(ACTIVATIONS)), parse_seeds(args.seeds)
    rundir.claim_run_dir(args.out)
    t0 = time.time()
    runs = [train_one(args, name, seed) for name in activations for seed in seeds]
    rows = summarize(runs, activations)
    gap = collapse_check(args)
    table = format_table(rows, args)
    n_test = len(parity_data(args.vocab, args.held_out)[2])
    header = (f"Parity of two tokens, y = (a + b) mod 2, V = {args.vocab}: {args.vocab ** 2 - n_test} training pairs, "
              f"{n_test} held out; {args.layers} FFN layers of width {args.hidden}, {args.steps} full-batch AdamW "
              f"steps at lr {args.lr} (weight decay {args.weight_decay}); mean ± std over seeds {args.seeds}. "
              f"Chance: 50 % accuracy, loss ln 2 = {math.log(2):.3f}. The first four columns are measured "
              f"after training, the next two are closed forms, the rest are measured at initialisation.")
    collapse = (f"Identity: a linear stack of {args.layers} FFN layers equals one affine map P h + c, "
                f"max |stack(h) - (P h + c)| = {gap:.1e}")
    with rundir.atomic_write(os.path.join(args.out, "results.json")) as f:
        json.dump({"args": asdict(args), "rows": rows, "runs": runs, "collapse_max_error": gap}, f, indent=1)
    with rundir.atomic_write(os.path.join(args.out, "results.md")) as f:
        f.write(f"{header}\n\n{table}\n\n{collapse}\n")
    print(header)
    print(table)
    print(collapse)
    print(f"{len(runs)} runs in {time.time() - t0:.1f} s; {args.out}/results.json, results.md")
    return {"rows": rows, "runs": runs, "collapse_max_error": gap}


if __name__ == "__main__":
    cli.run(main)
