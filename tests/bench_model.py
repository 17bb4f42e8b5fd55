"""The model's speed on this machine: training tokens/s and MFU, generation at batch 1 and 64, peak memory
(a benchmark, not a test: it prints ratios measured side by side in one process, after a warm-up).

    python tests/bench_model.py                  # the default 0.84 M model
    python tests/bench_model.py --shape 135m     # SmolLM2-135M's shape (0.5b: Qwen2.5-0.5B's), random weights
    python tests/bench_model.py --compile        # also compiled training blocks and the compiled decode step
    python tests/bench_model.py --shape 135m --lora 8 --layers 8 --batch-size 8 --seq-len 64 --steps 3
                                                 # full fine-tuning vs LoRA rank 8: step time and training memory
    python tests/bench_model.py --help
"""
from __future__ import annotations

import copy
import os
import random
import sys
import time
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402  (the project root is on sys.path only from the line above)
from lib import cli, rundir, tokenizer  # noqa: E402


BENCH_SHAPES = {   # random weights at real shapes
    "default": {},
    "135m": dict(vocab_size=49152, n_layer=30, n_embd=576, n_head=9, n_kv_head=3, ffn_hidden=1536,
                 rope_base=100000.0, norm_eps=1e-5, block_size=2048),                      # SmolLM2-135M
    "0.5b": dict(vocab_size=151936, n_layer=24, n_embd=896, n_head=14, n_kv_head=2, ffn_hidden=4864,
                 qkv_bias=True, rope_base=1000000.0, norm_eps=1e-6, block_size=2048),      # Qwen2.5-0.5B
}


@dataclass
class BenchArgs:
    shape: str = "default"       # default (this project's 0.84 M model) | 135m (SmolLM2-135M) | 0.5b (Qwen2.5-0.5B)
    layers: int = 0              # transformer blocks; 0 = the shape's own (fewer: a shorter run at the same width)
    lora: int = 0                # > 0: instead, compare full fine-tuning with LoRA of this rank (step time, memory)
    batch_size: int = 32         # sequences per training step
    seq_len: int = 128           # tokens per training sequence
    steps: int = 10              # timed training steps (after 2 warm-up steps)
    gen_batches: str = "1,64"    # generation batch sizes, comma-separated
    gen_tokens: int = 96         # new tokens per prompt (greedy, no early stop, so every row makes them all)
    recompute: bool = True       # also time generation without a cache (the whole sequence per token)
    compile: bool = False        # also time compiled blocks in training and the compiled decode step (CUDA graph / inductor)
    device: str = "auto"         # auto | cpu | cuda
    seed: int = 0                # random seed


def matmul_peak_flops(device, n: int = 2048, reps: int = 10) -> float:
    """This machine's measured dense fp32 (bf16 on CUDA) matmul throughput, 2 n^3 FLOPs per product."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    rundir.sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    rundir.sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def timed(fn, device, repeats: int = 1) -> float:
    """Seconds per call of fn() after one warm-up call (compilation, CUDA graph capture, allocator)."""
    fn()
    rundir.sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    rundir.sync(device)
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def generate_by_recomputing(model, prompts, new_tokens: int, pad: int):
    """The baseline a KV cache removes: run the whole sequence again for every new token (greedy)."""
    device = model.wte.weight.device
    seq, mask = M.padded_batch(prompts, pad, side="left", device=device)
    for _ in range(new_tokens):
        positions, doc_ids = M.left_pad_inputs(mask)
        with M.autocast(device):
            next_token = model(seq, positions, doc_ids)[:, -1].argmax(-1)
        seq = torch.cat([seq, next_token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return seq[:, -new_tokens:]


def compare_lora(args, cfg, device) -> None:
    """Full fine-tuning vs LoRA (Hu et al. 2021) of rank args.lora from the same random base weights, side by
    side in this process: the median seconds of a training step (forward + backward + AdamW; the two kinds of
    step alternate, after one warm-up step each, so a change in the machine's load hits both) and the training
    memory that differs, counted from the tensors: trainable parameters, their gradients, and AdamW's two
    moments (exp_avg, exp_avg_sq). Weights and activations are needed by both and not counted."""
    base = M.GPT(cfg).to(device)
    models = {"full": base, f"LoRA r={args.lora}": copy.deepcopy(base).add_lora(args.lora)}
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    print(f"device {device} | shape {args.shape}: {base.num_params() / 1e6:.2f} M parameters ({cfg.n_layer} layers, "
          f"width {cfg.n_embd}, vocab {cfg.vocab_size}) | random weights | batch {args.batch_size}x{args.seq_len} | "
          f"median of {args.steps} steps | {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4,
                                          fused=device.type == "cuda") for name, model in models.items()}

    def train_step(name):
        optimizers[name].zero_grad(set_to_none=True)
        with M.autocast(device):
            loss = -M.token_logprobs(models[name], x).mean()
        loss.backward()
        optimizers[name].step()
    seconds = {name: [] for name in models}
    for step in range(args.steps + 1):
        for name in models:
            rundir.sync(device)
            start = time.perf_counter()
            train_step(name)
            rundir.sync(device)
            if step > 0:                                   # step 0: the warm-up
                seconds[name].append(time.perf_counter() - start)
    mib = 2 ** -20
    rows = []
    for name, model in models.items():
        trainable = [p for p in model.parameters() if p.requires_grad]
        rows.append({
            "step time (ms)": sorted(seconds[name])[len(seconds[name]) // 2] * 1e3,
            "trainable parameters (M)": sum(p.numel() for p in trainable) / 1e6,
            "gradients (MiB)": sum(p.grad.numel() * p.grad.element_size() for p in trainable) * mib,
            "AdamW state (MiB)": sum(state[k].numel() * state[k].element_size()
                                     for state in optimizers[name].state.values() for k in ("exp_avg", "exp_avg_sq")) * mib,
        })
    full, lora = rows
    print(f"{'':26s} " + " ".join(f"{name:>12s}" for name in models) + f" {'LoRA / full':>12s}")
    for quantity in full:
        print(f"{quantity:26s} {full[quantity]:12,.2f} {lora[quantity]:12,.2f} {lora[quantity] / full[quantity]:12.4f}")


def main(argv=None):
    args = cli.parse_args(BenchArgs, argv)
    cli.check_choices(args, shape=tuple(BENCH_SHAPES))
    cli.check_options(args, positive=("batch_size", "seq_len", "steps", "gen_tokens"), non_negative=("layers", "lora"),
                      seed=("seed",))
    try:
        gen_batches = [int(b) for b in args.gen_batches.split(",")]
        assert gen_batches and min(gen_batches) > 0
    except (ValueError, AssertionError):
        raise cli.UserError(f"--gen-batches {args.gen_batches!r}: give positive integers, e.g. 1,64") from None
    cli.seed_everything(args.seed)
    device = cli.get_device(args.device)
    enc = tokenizer.get_tokenizer("bytes")
    cfg = M.Config(**{"vocab_size": enc.n_vocab, "block_size": max(256, args.seq_len), **BENCH_SHAPES[args.shape]})
    if args.layers:
        cfg = replace(cfg, n_layer=args.layers)
    if args.lora:
        return compare_lora(args, cfg, device)
    model = M.GPT(cfg).to(device)
    n_params = model.num_params()
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''} | shape "
          f"{args.shape}: {n_params / 1e6:.2f} M parameters ({cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} "
          f"heads / {cfg.n_kv_head} kv, ffn {cfg.ffn} {cfg.ffn_width}, vocab {cfg.vocab_size}) | random weights, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")

    # Training: forward + backward + AdamW (fused on CUDA) on random tokens; loss from chunked log-probs.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        with M.autocast(device):
            loss = -M.token_logprobs(model, x).mean() + model.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_s = timed(train_step, device, args.steps)
    tokens_per_s = args.batch_size * args.seq_len / train_s
    # FLOPs per token (Kaplan et al. 2020; PaLM appendix B): 6 N for the matmuls + 12 L C T for attention.
    n_matmul = n_params - cfg.vocab_size * cfg.n_embd * (1 if cfg.tie_embeddings else 0)
    flops_per_token = 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * args.seq_len
    peak = matmul_peak_flops(device)
    achieved = flops_per_token * tokens_per_s
    print(f"training   {tokens_per_s:,.0f} tokens/s ({train_s * 1e3:.1f} ms/step, batch {args.batch_size}x{args.seq_len}) "
          f"| {achieved / 1e12:.3f} TFLOP/s = {achieved / peak:.1%} of the measured matmul peak "
          f"({peak / 1e12:.2f} TFLOP/s) | peak memory {rundir.peak_memory_mb(device):,.0f} MB")
    if args.compile:    # the same step with torch.compile'd blocks; the first call (the compilation) is the warm-up
        model.compile_blocks()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        compiled_s = timed(train_step, device, args.steps)
        model.compiled_blocks = None
        print(f"training, compiled blocks: {args.batch_size * args.seq_len / compiled_s:,.0f} tokens/s "
              f"({compiled_s * 1e3:.1f} ms/step), {train_s / compiled_s:.2f}x eager | peak memory "
              f"{rundir.peak_memory_mb(device):,.0f} MB")
    del optimizer, x
    model.zero_grad(set_to_none=True)

    # Generation: greedy, every row makes gen_tokens new tokens; the static KV cache, the compiled decode
    # step, and recomputing the whole sequence per token, all producing the same tokens.
    model.eval()
    rng = random.Random(args.seed)
    for batch in gen_batches:
        prompts = [tokenizer.encode(enc, f"{rng.randint(100, 999)}+{rng.randint(100, 999)}=?\n") for _ in range(batch)]
        new = batch * args.gen_tokens
        runs = {"KV cache": dict(compile=False)}
        if args.compile:
            runs["compiled"] = dict(compile=True)
        results, speeds = {}, {}
        for name, options in runs.items():
            def run():
                results[name] = M.generate(model, prompts, args.gen_tokens, temperature=0.0, stop_ids=(), **options).tokens
            speeds[name] = new / timed(run, device)
        line = f"generation batch {batch:3d}: " + " | ".join(f"{name} {s:,.0f} new tokens/s" for name, s in speeds.items())
        if "compiled" in speeds:
            line += (f" | compiled / eager {speeds['compiled'] / speeds['KV cache']:.2f}x, same tokens: "
                     f"{torch.equal(results['compiled'], results['KV cache'])}")
        if args.recompute:
            def recompute():
                results["recompute"] = generate_by_recomputing(model, prompts, args.gen_tokens, M.BYTE_PAD_ID)
            speed = new / timed(recompute, device)
            line += (f" | recomputing {speed:,.0f} new tokens/s: KV cache {speeds['KV cache'] / speed:.2f}x faster, "
                     f"same tokens: {torch.equal(results['recompute'], results['KV cache'])}")
        print(line, flush=True)



if __name__ == "__main__":
    cli.run(main)
