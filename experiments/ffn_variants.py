"""FFN variants at equal parameters and equal compute: does gating win at this scale?

The position-wise FFN holds most of a transformer's parameters. Its variants (Shazeer 2020, "GLU
Variants Improve Transformer"; So et al. 2021, Primer; Fedus et al. 2021, Switch Transformer):

    plain   FFN(x) = W2 act(W1 x)                 act = GELU, ReLU or ReLU^2     params 2 C h
    gated   FFN(x) = W2 (act(W1 x) * W3 x)        SwiGLU (act = SiLU), GEGLU     params 3 C h_g
    MoE     FFN(x) = sum_{e in top-k(p(x))} p_e(x) / sum_top-k p * FFN_e(x),  p(x) = softmax(W_r x)
            each expert a SwiGLU of width h_e: total params E 3 C h_e + C E, active per token k 3 C h_e + C E

A fair comparison holds the parameter count AND the compute per token fixed (a matmul costs 2 FLOPs per
parameter per token, so for a dense FFN equal parameters is equal compute): with the plain width
h = 4C, the gated width is h_g = round(2h/3) (Shazeer's 8C/3). MoE cannot match both: at equal compute
(k h_e = 2h/3, "moe") it holds E/k times the parameters; at equal parameters (E h_e = 2h/3,
"moe_params") it spends k/E of the compute. Both are run and the table says which is which. The MoE
loss adds the Switch load-balancing term E sum_e f_e P_e (1 when balanced) and the router z-loss
(GPT.aux_loss); the table reports the experts' load shares on held-out text.

Shazeer reports the GLU variants ahead of the plain ones at equal compute (on T5-scale models). Here:
a 2-layer model of width 64 on the project's synthetic arithmetic text (data/*.jsonl, made by synth.py
when missing), the same data order, steps and schedule for every variant, a small learning-rate sweep
(each variant's rate picked by a tuning seed's validation loss, on a slice of the training text), then
held-out loss on sft_test over 3 fresh seeds at that rate. The last line says whether gating wins.

    python experiments/ffn_variants.py                        # 7 variants, a few minutes
    python experiments/ffn_variants.py --variants swiglu,relu --steps 400
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
import torch.nn.functional as F  # noqa: E402

import model as M  # noqa: E402  (the project root is on sys.path only from the line above)
from lib import cli, rundir, stages, tasks, tokenizer  # noqa: E402  (the project root is on sys.path only from the line above)


@dataclass
class Args:
    data: str = "data/sft_train.jsonl"      # prompt/completion JSONL: training text (its last 10 % is validation)
    test_data: str = "data/sft_test.jsonl"  # prompt/completion JSONL: the held-out text of the table
    out: str = "runs/ffn_variants"          # results.json and results.md
    variants: str = "swiglu,geglu,gelu,relu,relu2,moe,moe_params"   # which FFNs to compare
    n_layer: int = 2                        # transformer blocks
    n_embd: int = 64                        # width C
    n_head: int = 4                         # attention heads
    base_hidden: int = 256                  # h: the plain FFN's width (4C); the others are matched to it
    n_expert: int = 4                       # E: MoE experts
    moe_top_k: int = 2                      # k: experts per token
    seq_len: int = 32                       # tokens per row
    batch_size: int = 16                    # rows per step
    steps: int = 150                        # training steps of every run
    lrs: str = "0.001,0.003,0.01"           # the learning-rate sweep (AdamW, warmup 10 %, cosine to 10 %)
    tune_seed: int = 100                    # the seed of the sweep; the chosen rate is then run on --seeds
    seeds: str = "0,1,2"                    # seeds of the reported runs (fresh: not the tuning seed)
    weight_decay: float = 0.1               # AdamW decay on matrices and embeddings
    grad_clip: float = 1.0                  # global gradient-norm clip
    eval_rows: int = 256                    # rows of validation / held-out text evaluated (0 = all)
    device: str = "cpu"                     # cpu | cuda | auto
    threads: int = 0                        # torch CPU threads (0 = torch's default)


VARIANTS = ("swiglu", "geglu", "gelu", "relu", "relu2", "moe", "moe_params")
GATED = ("swiglu", "geglu")
PLAIN = ("gelu", "relu", "relu2")


# ----------------------------------------------------------------------------------------------
# Matching the widths: equal parameters, equal compute
# ----------------------------------------------------------------------------------------------

def matched_width(variant: str, base_hidden: int, n_expert: int, top_k: int) -> int:
    """The FFN width (Config.ffn_hidden) of a variant, matched to a plain FFN of width h = base_hidden:

    plain  h                      2 C h params and 2 * 2 C h FLOPs per token
    gated  round(2h / 3)          3 C h_g = 2 C h
    moe    round(2h / (3 k))      active k 3 C h_e = 2 C h  (equal compute; total E/k times larger)
    moe_params round(2h / (3 E))  total E 3 C h_e = 2 C h   (equal parameters; compute k/E of it)"""
    if variant in PLAIN:
        return base_hidden
    if variant in GATED:
        return max(1, round(2 * base_hidden / 3))
    if variant == "moe":
        return max(1, round(2 * base_hidden / (3 * top_k)))
    if variant == "moe_params":
        return max(1, round(2 * base_hidden / (3 * n_expert)))
    raise ValueError(f"unknown variant {variant!r}")


def ffn_kind(variant: str) -> str:
    return "moe" if variant.startswith("moe") else variant


def ffn_params(model) -> tuple[int, int]:
    """(total, active per token) parameters of all FFN blocks, router included: a MoE token passes
    through k of its E experts and the router; a dense FFN uses every parameter."""
    total = active = 0
    for block in model.blocks:
        ffn = block.ffn
        n = sum(p.numel() for p in ffn.parameters())
        total += n
        if isinstance(ffn, M.MoE):
            per_expert = sum(p.numel() for p in ffn.experts[0].parameters())
            active += ffn.router.weight.numel() + ffn.cfg.moe_top_k * per_expert
        else:
            active += n
    return total, active


def make_model(args: Args, variant: str, vocab_size: int, seed: int, device):
    torch.manual_seed(seed)
    cfg = M.Config(vocab_size=vocab_size, block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                   n_kv_head=args.n_head, n_embd=args.n_embd, ffn=ffn_kind(variant), n_expert=args.n_expert,
                   moe_top_k=args.moe_top_k,
                   ffn_hidden=matched_width(variant, args.base_hidden, args.n_expert, args.moe_top_k))
    return M.GPT(cfg).to(device)


# ----------------------------------------------------------------------------------------------
# Data, training, evaluation
# ----------------------------------------------------------------------------------------------

def token_rows(path: str, seq_len: int, enc) -> torch.Tensor:
    """The demonstrations of `path` (prompt ++ completion ++ EOT, concatenated) cut into rows (N, seq_len + 1)."""
    stream = []
    for row in tasks.read_demonstrations(path):
        stream += tokenizer.encode(enc, row["prompt"] + row["completion"]) + [enc.eot_token]
    n = len(stream) // (seq_len + 1)
    if n < 2:
        raise cli.UserError(f"{path}: fewer than {2 * (seq_len + 1)} tokens; lower --seq-len")
    return torch.tensor(stream[:n * (seq_len + 1)]).view(n, seq_len + 1)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first 10 % of steps, then cosine decay to lr / 10 at the last step. Not sft.py's
    rule (warm-up counted in updates, as a factor on a cosine over the whole run, which also serves a time
    budget): a sweep at a fixed step count wants the same schedule shape at every run length (optim.lr_cosine's)."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, rows, limit: int, device) -> dict:
    """Mean next-token loss over the first `limit` rows (0 = all), and each MoE layer's expert load:
    the share of token->expert assignments each expert receives (1/E each when balanced)."""
    rows = rows[:limit] if limit else rows
    loads, hooks = [], []

    def count_assignments(counts):
        def hook(module, inputs, output):                 # returns None: the layer's output is unchanged
            experts = module.route(inputs[0].reshape(-1, inputs[0].shape[-1]))[1]          # (N, k)
            counts.add_(torch.bincount(experts.flatten().cpu(), minlength=len(counts)).float())
        return hook

    for block in model.blocks:
        if isinstance(block.ffn, M.MoE):
            loads.append(torch.zeros(block.ffn.cfg.n_expert))
            hooks.append(block.ffn.register_forward_hook(count_assignments(loads[-1])))
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(rows), 64):
        batch = rows[start:start + 64].to(device)
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        n += batch[:, 1:].numel()
    model.train()
    for hook in hooks:
        hook.remove()
    return {"loss": total / n, "expert_load": [(c / c.sum()).tolist() for c in loads]}


def train_run(args: Args, variant: str, lr: float, seed: int, rows, eval_sets: dict, vocab_size: int, device) -> dict:
    """One variant at one learning rate and seed: the same batches (by seed) and schedule for every variant."""
    model = make_model(args, variant, vocab_size, seed, device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(seed)
    losses, aux_losses = [], []
    t0 = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, lr)
        batch = rows[torch.randint(len(rows), (args.batch_size,), generator=generator)].to(device)
        logits = model(batch[:, :-1])                                            # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = model.aux_loss                                                     # 0 without MoE
        optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        cli.check_finite(f"{variant} lr {lr} seed {seed} step {step}", loss=loss, grad_norm=grad_norm)
        optimizer.step()
        losses.append(loss.item())
        aux_losses.append(aux.item())
    seconds = time.time() - t0
    total, active = ffn_params(model)
    result = {"variant": variant, "lr": lr, "seed": seed, "losses": losses, "aux_loss": aux_losses[-1],
              "ms_per_step": 1000 * seconds / args.steps, "params": model.num_params(), "ffn_params": total,
              "ffn_active": active, "ffn_hidden": model.config.ffn_width}
    for name, eval_rows in eval_sets.items():
        measured = evaluate(model, eval_rows, args.eval_rows, device)
        result[f"{name}_loss"] = measured["loss"]
        result[f"{name}_expert_load"] = measured["expert_load"]
    print(f"{variant:10s} lr {lr:<7g} seed {seed:<4d} " + " ".join(f"{name} loss {result[f'{name}_loss']:.4f}"
                                                             for name in eval_sets) + f" ({seconds:.0f} s)", flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# Options, the report, main
# ----------------------------------------------------------------------------------------------

def parse_list(text: str, name: str, kind=str, allowed=None) -> list:
    try:
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise cli.UserError(f"--{name} {text!r}: give comma-separated values") from None
    if not items or len(set(items)) < len(items) or (allowed and any(item not in allowed for item in items)):
        raise cli.UserError(f"--{name} {text!r}: give distinct values" + (f" from {', '.join(allowed)}" if allowed else ""))
    return items


def parse_lrs(text: str) -> list[float]:
    lrs = parse_list(text, "lrs", float)
    if any(not (0 < lr < math.inf) for lr in lrs):
        raise cli.UserError(f"--lrs {text!r}: every learning rate must be a finite number > 0")
    return lrs


def parse_seeds(text: str) -> list[int]:
    seeds = parse_list(text, "seeds", int)
    if any(not 0 <= s < 2 ** 32 for s in seeds):
        raise cli.UserError(f"--seeds {text!r}: each seed must be in [0, 2**32)")
    return seeds


def check_args(args: Args) -> None:
    """Every option before anything is read or written: one line, exit 2."""
    parse_list(args.variants, "variants", str, VARIANTS)
    parse_lrs(args.lrs)
    parse_seeds(args.seeds)
    cli.check_options(args, seed=("tune_seed",), non_negative=("weight_decay", "grad_clip"))
    cli.require_at_least(args, 1, "n_layer", "n_embd", "n_head", "n_expert", "moe_top_k", "seq_len", "batch_size",
                         "steps")
    cli.require_at_least(args, 3, "base_hidden")
    cli.require_at_least(args, 0, "eval_rows", "threads")
    if args.moe_top_k > args.n_expert:
        raise cli.UserError(f"--moe-top-k {args.moe_top_k} must be <= --n-expert {args.n_expert}")
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
        raise cli.UserError(f"--n-embd {args.n_embd} must split into --n-head {args.n_head} heads of even width")
    cli.get_device(args.device)
    for name in ("data", "test_data", "out"):
        if not getattr(args, name):
            raise cli.UserError(f"--{name.replace('_', '-')}: a path is needed")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out}: exists and is not a folder")


def data_command() -> list[str]:
    """synth.py with its defaults: makes data/*.jsonl when a default input file is missing."""
    return stages.stage_command("synth.py")


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def summarize(variants: list[str], sweep: list[dict], runs: list[dict]) -> list[dict]:
    """One row per variant: the chosen rate, held-out loss mean/std/min/max over seeds, sizes, MoE loads."""
    rows = []
    for variant in variants:
        tuned = [r for r in sweep if r["variant"] == variant]
        best = min(tuned, key=lambda r: r["val_loss"])
        mine = [r for r in runs if r["variant"] == variant]
        test = [r["test_loss"] for r in mine]
        loads = [max(max(layer) for layer in r["test_expert_load"]) for r in mine if r["test_expert_load"]]
        rows.append({"variant": variant, "lr": best["lr"], "sweep": {r["lr"]: r["val_loss"] for r in tuned},
                     "test_loss": mean_std(test), "test_min": min(test), "test_max": max(test),
                     "params": mine[0]["params"], "ffn_params": mine[0]["ffn_params"],
                     "ffn_active": mine[0]["ffn_active"], "ffn_hidden": mine[0]["ffn_hidden"],
                     "ms_per_step": sum(r["ms_per_step"] for r in mine) / len(mine),
                     "max_expert_load": max(loads) if loads else None,
                     "curve": [sum(v) / len(v) for v in zip(*(r["losses"] for r in mine))]})
    return rows


def verdict_line(rows: list[dict], n_seeds: int) -> str:
    """Best gated vs best plain dense variant: the difference of their mean held-out losses against its
    standard error sqrt((s_g^2 + s_p^2) / n) over n seeds each; "wins" needs more than 2 standard errors."""
    gated = [r for r in rows if r["variant"] in GATED]
    plain = [r for r in rows if r["variant"] in PLAIN]
    if not gated or not plain:
        return "Gated vs plain: run at least one of each to compare."
    g = min(gated, key=lambda r: r["test_loss"][0])
    p = min(plain, key=lambda r: r["test_loss"][0])
    difference = p["test_loss"][0] - g["test_loss"][0]
    stderr = math.sqrt((g["test_loss"][1] ** 2 + p["test_loss"][1] ** 2) / n_seeds)
    z = difference / stderr if stderr > 0 else math.copysign(math.inf, difference) if difference else 0.0
    if z > 2:
        said = "yes: gated wins at this scale"
    elif z < -2:
        said = "no: the plain FFN wins at this scale"
    else:
        said = "not resolved at this scale: the difference is within 2 standard errors"
    return (f"Do gated FFNs win (Shazeer 2020)? Best gated {g['variant']} {g['test_loss'][0]:.4f} vs best plain "
            f"{p['variant']} {p['test_loss'][0]:.4f}: plain - gated = {difference:+.4f} nats, {z:+.1f} standard errors "
            f"over {n_seeds} seeds -> {said}.")


def format_table(rows: list[dict], args: Args) -> str:
    head = ["variant", "ffn_hidden", "FFN params (total)", "FFN params active / token", "model params",
            f"lr (sweep: val loss at {args.lrs})", "held-out loss mean ± std", "min / max", "ms / step",
            "max expert load", "mean train loss curve"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sweep = " / ".join(f"{loss:.3f}" for loss in r["sweep"].values())
        load = "—" if r["max_expert_load"] is None else f"{100 * r['max_expert_load']:.0f} %"
        cells = [r["variant"], str(r["ffn_hidden"]), f"{r['ffn_params']:,}", f"{r['ffn_active']:,}", f"{r['params']:,}",
                 f"{r['lr']:g} ({sweep})", f"{r['test_loss'][0]:.4f} ± {r['test_loss'][1]:.4f}",
                 f"{r['test_min']:.4f} / {r['test_max']:.4f}", f"{r['ms_per_step']:.0f}", load,
                 rundir.sparkline(r["curve"], 24)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = cli.parse_args(Args, argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = Args()
    stages.ensure_inputs(*((getattr(args, name), getattr(defaults, name), data_command())    # before anything is written
                           for name in ("data", "test_data")))
    enc = tokenizer.get_tokenizer("bytes")
    all_rows, test_rows = token_rows(args.data, args.seq_len, enc), token_rows(args.test_data, args.seq_len, enc)
    n_val = max(1, len(all_rows) // 10)
    rows, val_rows = all_rows[:-n_val], all_rows[-n_val:]
    variants, lrs, seeds = parse_list(args.variants, "variants", str, VARIANTS), parse_lrs(args.lrs), parse_seeds(args.seeds)
    device = cli.get_device(args.device)
    rundir.claim_run_dir(args.out)
    t0 = time.time()
    # 1. The sweep: every variant at every rate, with the tuning seed; picked by validation loss.
    sweep = [train_run(args, v, lr, args.tune_seed, rows, {"val": val_rows}, enc.n_vocab, device)
             for v in variants for lr in lrs]
    chosen = {v: min((r for r in sweep if r["variant"] == v), key=lambda r: r["val_loss"])["lr"] for v in variants}
    # 2. The reported runs: each variant at its rate, fresh seeds, held-out loss on test_data.
    runs = [train_run(args, v, chosen[v], seed, rows, {"val": val_rows, "test": test_rows}, enc.n_vocab, device)
            for v in variants for seed in seeds]
    table_rows = summarize(variants, sweep, runs)
    table = format_table(table_rows, args)
    conclusion = verdict_line(table_rows, len(seeds))
    header = (f"FFN variants, {args.n_layer} layers of width {args.n_embd}, plain width h = {args.base_hidden}; "
              f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens of {args.data}; learning rate picked per "
              f"variant from {args.lrs} by validation loss (tuning seed {args.tune_seed}); held-out loss on "
              f"{args.test_data} over seeds {args.seeds}. moe = top-{args.moe_top_k} of {args.n_expert} experts at "
              f"equal compute; moe_params = at equal parameters.")
    with rundir.atomic_write(os.path.join(args.out, "results.json")) as f:
        json.dump({"args": asdict(args), "rows": table_rows, "sweep": sweep, "runs": runs, "verdict": conclusion},
                  f, indent=1)
    with rundir.atomic_write(os.path.join(args.out, "results.md")) as f:
        f.write(f"{header}\n\n{table}\n\n{conclusion}\n")
    print(header)
    print(table)
    print(conclusion)
    print(f"{len(sweep) + len(runs)} runs in {time.time() - t0:.0f} s; {args.out}/results.json, results.md")
    return {"rows": table_rows, "sweep": sweep, "runs": runs, "verdict": conclusion}


if __name__ == "__main__":
    cli.run(main)
