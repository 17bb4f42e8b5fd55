"""Side by side with Hugging Face transformers, in one process, on the same random weights: the decode, training
and GRPO tables of docs/performance.md (a benchmark, not a test: transformers is a test-only oracle, so this lives
beside the tests, not in model.py).

    python tests/bench_vs_transformers.py --device cuda                  # the GPU run: shapes 135m and 0.5b
    python tests/bench_vs_transformers.py --device cuda --out gpu.md     # the same tables, also written to gpu.md
    python tests/bench_vs_transformers.py --shapes default --layers 1    # a small run on a CPU

For each shape it prints three markdown tables, each as soon as it is measured:
1. Decode. Greedy new tokens/s at each batch size (a 16-token prompt, --gen-tokens new tokens, no stop) by each of
   our decode steps (model.Decoder's modes: eager; on CUDA cuda_graph, the eager step captured as a CUDA graph,
   and inductor, the step compiled by torch.compile and captured; on a CPU inductor) and by transformers' generate
   (its default dynamic cache). On CUDA both models decode with bf16 weights (model.to(torch.bfloat16)), as a step
   that is to reach the bandwidth bound must (fp32 weights under autocast read 4 bytes a weight, and cast them);
   on a CPU, fp32. Two rates: "generate", whole generate calls after a warm-up call (prefill and the graph's
   capture included, compilation not), and "step", the decode step alone (greedy_steps). Each is also a share of
   the bandwidth bound (decode_bytes_per_token: the card's measured copy bandwidth / the bytes a step must read).
   Whether each fused mode's greedy tokens equal the eager step's is printed twice: on the timed weights, and in
   fp32 (no autocast) on a model of the shape with at most 2 layers, where they must (fp32_tokens_equal).
2. Training: tokens/s and peak memory of a training step (forward, backward, AdamW, fp32 weights, bf16 autocast
   on CUDA) of transformers and ours, ours eager and with compiled blocks (GPT.compile_blocks, --compile-train).
3. GRPO: one step of grpo.py's defaults (32 prompts x 8 completions) split into generation, reward scoring,
   old log-probs (the no-grad forward grpo.update takes them from on CUDA) and the update.

Cost on one H100 for the default shapes: estimated at 6 minutes (not yet run), most of it torch.compile: for each
shape, inductor compiles the decode step once per batch size and once for the fp32 check, and one block for
training. Repeats are few: a generate rate is --repeats (1) timed calls after a warm-up call, a step rate the
steps of one call after its first two, a training rate 3 steps after a warm-up step; ours and theirs alternate in
the same process."""
import argparse
import contextlib
import copy
import math
import os
import re
import sys
import time
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
from lib import cli, convert, rundir, tokenizer  # noqa: E402
import bench_model  # noqa: E402  (beside this file)
import grpo  # noqa: E402


def hf_model(cfg: M.Config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_width,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
                  tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
    if cfg.qkv_bias:
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return LlamaForCausalLM(LlamaConfig(**common))


BLOCK = 2048        # the context of every shape here
PROMPT_LEN = 16     # random prompt tokens before generation
CHECK_LAYERS = 2    # layers of the fp32 model on which a fused decode step must give the eager step's tokens


def peak_mb(device, fn):
    """Peak CUDA memory of one call of fn, in MB; nan on a CPU (torch keeps no peak there)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    rundir.sync(device)
    return torch.cuda.max_memory_allocated() / 2 ** 20


def copy_bandwidth(device, repeats: int = 10) -> float:
    """The memory bandwidth this device reaches, measured, in bytes/s: a copy_ of a 1 GiB buffer (64 MiB on a
    CPU) into another reads and writes every byte once, so bandwidth = 2 x bytes x copies / seconds."""
    source = torch.ones((2 ** 30 if device.type == "cuda" else 2 ** 26) // 4, device=device)     # fp32
    target = torch.empty_like(source)
    target.copy_(source)                                                                         # warm-up
    rundir.sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    rundir.sync(device)
    return 2 * source.nbytes * repeats / (time.perf_counter() - start)


def decode_bytes_per_token(model: M.GPT, batch: int, context: float) -> float:
    """The bytes a decode step at batch B must read from memory, per decoded token: every weight once, in the
    dtype it is stored and read in (bf16 weights: 2 bytes each), the LM head whole but the token (and learned
    position) embedding one row per row of the batch, and each row's keys and values over `context` slots
    (bf16 under CUDA autocast, else the weights' dtype):

        bytes / token = (sum_W |W| s_W  +  B C s_E  +  B 2 L Hkv d context s_KV) / B

    Activations, logits and sampling are left out, so this is a floor: a step at batch B cannot decode faster
    than the bandwidth bound, bandwidth / (bytes / token) tokens/s. The bound grows with B (the weights are read
    once for all rows) until compute, not memory, is the limit."""
    cfg = model.config
    embeddings = [model.wte.weight] + ([model.wpe.weight] if model.wpe is not None else [])
    per_row = {id(e) for e in embeddings} - {id(model.lm_head.weight)}      # tied: the LM head reads the table whole
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in per_row)
    rows = sum(e.shape[1] * e.element_size() for e in embeddings)
    kv_size = 2 if model.wte.weight.is_cuda else model.wte.weight.element_size()
    keys_values = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * context * kv_size
    return (weights + batch * (rows + keys_values)) / batch


@torch.inference_mode()
def greedy_steps(model: M.GPT, prompt, new_tokens: int, mode: str, autocast: bool = True):
    """Greedy decoding by model.Decoder alone, as generate decodes but without its sampling and bookkeeping:
    prefill prompt (B, P), then per new token an argmax and one decode step in `mode`. -> tokens (B, new_tokens),
    the seconds per step (and its argmax) of the steps after the first two (the first compiles or captures), and
    the mode that ran (eager when a compile or capture failed). autocast=False keeps fp32 arithmetic on CUDA too."""
    B, P = prompt.shape
    device = prompt.device
    decoder = M.Decoder(model, mode)
    cache = (M.DenseKVCache if decoder.mode == "eager" else M.KVCache)(model.config, B, P + new_tokens, device)
    positions, doc_ids = M.left_pad_inputs(torch.ones_like(prompt, dtype=torch.bool))       # (B, P): one document
    tokens = []
    with M.autocast(device) if autocast else contextlib.nullcontext():
        logits = model(prompt, positions, doc_ids, cache)[:, -1]                             # (B, V)
        for t in range(new_tokens):
            tokens.append(logits.argmax(-1))
            if t == 2:
                rundir.sync(device)
                start = time.perf_counter()
            if t < new_tokens - 1:
                logits = decoder(tokens[-1], positions[:, -1] + 1 + t, P + t, cache)
    rundir.sync(device)
    return torch.stack(tokens, 1), (time.perf_counter() - start) / (new_tokens - 3), decoder.mode


def fp32_tokens_equal(cfg: M.Config, modes, args, device) -> dict:
    """{mode: "True" if its greedy tokens equal the eager step's, else "False"} on one fp32 model of this shape
    with at most CHECK_LAYERS layers, without autocast: fp32 weights and arithmetic, so the modes differ at most
    in the order of a few fp32 additions, and a random model's greedy tokens must agree."""
    torch.manual_seed(1)
    small = M.GPT(replace(cfg, n_layer=min(cfg.n_layer, CHECK_LAYERS))).to(device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, PROMPT_LEN), device=device)
    eager = greedy_steps(small, prompt, args.gen_tokens, "eager", autocast=False)[0]
    equal = {}
    for mode in modes:
        tokens, _, ran = greedy_steps(small, prompt, args.gen_tokens, mode, autocast=False)
        equal[mode] = str(torch.equal(tokens, eager)) if ran == mode else f"not run ({mode} failed)"
    return equal


def markdown(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def agreement(tokens, reference) -> str:
    """True when every token equals the reference's, else False and the share that does."""
    if torch.equal(tokens, reference):
        return "True"
    return f"False ({(tokens == reference).float().mean().item():.1%} equal)"


def decode_table(shape: str, ours: M.GPT, theirs, args, device, bandwidth: float) -> str:
    """Table 1 (see the module docstring), on bf16 copies of both models on CUDA, fp32 on a CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours, theirs = copy.deepcopy(ours).to(dtype).eval(), copy.deepcopy(theirs).to(dtype).eval()
    fused = ["cuda_graph", "inductor"] if device.type == "cuda" else ["inductor"]
    in_fp32 = fp32_tokens_equal(ours.config, fused, args, device)
    n_new, context = args.gen_tokens, PROMPT_LEN + args.gen_tokens / 2     # context: the mean slots a step reads
    rows = []
    for batch in args.batches:
        torch.manual_seed(batch)
        prompt = torch.randint(0, ours.config.vocab_size, (batch, PROMPT_LEN), device=device)
        prompts = prompt.tolist()
        bytes_per_token = decode_bytes_per_token(ours, batch, context)
        bound = bandwidth / bytes_per_token                                             # tok/s
        tokens, generate_speed, step_speed, names = {}, {}, {}, {}      # by decoder; tok/s
        for mode in ["eager"] + fused:
            def run(mode=mode):
                tokens[mode] = M.generate(ours, prompts, n_new, temperature=0.0, stop_ids=(), compile=mode).tokens
            generate_speed[mode] = batch * n_new / bench_model.timed(run, device, args.repeats)
            _, step_s, ran = greedy_steps(ours, prompt, n_new, mode)
            step_speed[mode] = batch / step_s
            names[mode] = mode if ran == mode else f"{mode} (failed: ran {ran})"

        def run_theirs():
            with torch.no_grad(), M.autocast(device):
                tokens["transformers"] = theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                         max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                                         eos_token_id=None, pad_token_id=0)[:, PROMPT_LEN:]
        generate_speed["transformers"] = batch * n_new / bench_model.timed(run_theirs, device, args.repeats)
        for name, speed in generate_speed.items():
            step = step_speed.get(name)
            rows.append([shape, batch, names.get(name, name), f"{speed:,.0f}",
                         f"{speed / generate_speed['transformers']:.2f}x",
                         "-" if step is None else f"{step:,.0f}", f"{bytes_per_token / 1e6:,.2f}", f"{bound:,.0f}",
                         f"{speed / bound:.1%}", "-" if step is None else f"{step / bound:.1%}",
                         "(reference)" if name == "eager" else agreement(tokens[name], tokens["eager"]),
                         in_fp32.get(name, "-")])
    header = ["shape", "batch", "decoder", "generate tok/s", "vs transformers", "step tok/s", "MB read / token",
              "bound tok/s", "generate / bound", "step / bound", f"greedy tokens = eager's ({str(dtype)[6:]}, timed)",
              f"= eager's (fp32, {min(ours.config.n_layer, CHECK_LAYERS)}-layer model)"]
    return (f"decode, {shape}: {str(dtype)[6:]} weights, prompt {PROMPT_LEN} + {n_new} new tokens, no stop; bound = "
            f"copy bandwidth {bandwidth / 1e9:,.1f} GB/s / MB read per token (mean context {context:g} slots)\n\n"
            + markdown(header, rows))


def training_table(shape: str, ours: M.GPT, theirs, args, device) -> str:
    """Table 2: one training step (forward, backward, AdamW; fused on CUDA) of each model on the same batch."""
    x = torch.randint(0, ours.config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    ours.train(), theirs.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=device.type == "cuda")
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step_ours():
        with M.autocast(device):
            loss = -M.token_logprobs(ours, x).mean()
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        with M.autocast(device):
            loss = theirs(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    seconds = {"transformers": bench_model.timed(step_theirs, device, 3),
               "ours, eager": bench_model.timed(step_ours, device, 3)}
    memory = {"transformers": peak_mb(device, step_theirs), "ours, eager": peak_mb(device, step_ours)}
    ours.compile_blocks()           # the same step with torch.compile'd blocks (the warm-up call compiles)
    seconds["ours, compiled blocks"] = bench_model.timed(step_ours, device, 3)
    memory["ours, compiled blocks"] = peak_mb(device, step_ours)
    ours.compiled_blocks = None
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
    tokens = args.batch_size * args.seq_len
    rows = [[shape, name, f"{tokens / s:,.0f}", f"{seconds['transformers'] / s:.2f}x",
             "not measured on a CPU" if math.isnan(memory[name]) else f"{memory[name]:,.0f}",
             "-" if math.isnan(memory[name]) else f"{memory[name] / memory['transformers']:.2f}x"]
            for name, s in seconds.items()]
    return (f"training, {shape}: batch {args.batch_size}x{args.seq_len}, "
            f"{'bf16 autocast, fused AdamW' if device.type == 'cuda' else 'fp32, AdamW'}\n\n"
            + markdown(["shape", "model", "tokens/s", "vs transformers", "peak memory (MB)", "vs transformers"], rows))


def grpo_table(shape: str, policy: M.GPT, args, device) -> str:
    """Table 3: one GRPO step at this shape (random weights, byte prompts, random rewards so every group has a
    signal), after a warm-up step: seconds in generation, reward scoring, old log-probs and the update."""
    run = grpo.Args(max_new_tokens=args.gen_tokens, micro_batch=16, device=device.type)
    enc = tokenizer.get_tokenizer()
    rows = [{"prompt": f"{a}+{b}=?\n", "answer": str(a + b)} for a, b in zip(range(100, 200), range(300, 400))]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(0)
    byte_decode = tokenizer.decode     # a random model at a real shape samples ids past the byte tokenizer's 258: skip them
    tokenizer.decode = lambda enc, ids: byte_decode(enc, [i for i in ids if int(i) < enc.n_vocab])
    try:
        for attempt in range(2):                    # the first step is the warm-up
            t0 = time.perf_counter()
            batch, _ = grpo.collect_rollouts(policy, enc, lambda n: rows[:n], run.prompts_per_step, run,
                                             grpo.parse_reward_weights("correct=1"), generator, False)
            rundir.sync(device)
            t1 = time.perf_counter()
            grpo.forward_logprobs(policy, batch.tokens.to(device), run, run.micro_batch)
            rundir.sync(device)
            t2 = time.perf_counter()
            batch.rewards = torch.randn_like(batch.rewards)
            grpo.update(policy, policy, optimizer, batch, grpo.group_advantages(batch.rewards).flatten(), None, run,
                        device, step=1)
            rundir.sync(device)
            t3 = time.perf_counter()
    finally:
        tokenizer.decode = byte_decode
    policy.zero_grad(set_to_none=True)
    decoder = "cuda_graph" if device.type == "cuda" else "eager"            # generate's default
    row = [shape, f"{run.prompts_per_step} x {run.group_size}", args.gen_tokens, decoder,
           f"{t1 - t0 - batch.score_s:.2f}", f"{batch.score_s:.3f}", f"{t2 - t1:.2f}", f"{t3 - t2:.2f}"]
    header = ["shape", "prompts x completions", "max new tokens", "decoder", "generation (s)", "reward scoring (s)",
              "old log-probs (s)", f"update, {run.update_epochs} epochs (s)"]
    note = ("on CUDA the update recomputes the old log-probs: the update's seconds include them"
            if device.type == "cuda" else "on a CPU GRPO takes the old log-probs from the sampler: that column times a forward it skips")
    return f"GRPO step, {shape} ({note})\n\n" + markdown(header, [row])


def compare(shape: str, args, device, bandwidth: float, report) -> None:
    cfg = M.Config(**{"vocab_size": 258, "block_size": BLOCK, **bench_model.BENCH_SHAPES[shape]})
    if args.layers:
        cfg = replace(cfg, n_layer=args.layers)
    torch._dynamo.reset()       # dynamo's recompile limit counts per process: each shape starts afresh
    torch.manual_seed(0)
    theirs = hf_model(cfg).to(device)
    ours = M.GPT(cfg).to(device)
    ours.load_state_dict(convert.state_dict_from_hf(theirs.state_dict(), cfg, shape))
    x = torch.randint(0, cfg.vocab_size, (2, 64), device=device)
    with torch.no_grad(), M.autocast(device):
        ours.eval(), theirs.eval()
        difference = (ours(x) - theirs(x).logits.float()).abs().max().item()
    print(f"\n== {shape}: {ours.num_params() / 1e6:.1f} M parameters ({cfg.n_layer} layers), "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__} | same "
          f"weights: max |logit difference| {difference:.2e} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'})",
          flush=True)
    report(decode_table(shape, ours, theirs, args, device, bandwidth))
    report(training_table(shape, ours, theirs, args, device))
    del theirs
    report(grpo_table(shape, ours, args, device))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="135m,0.5b",
                        help="comma-separated: default, 135m, 0.5b (default: 135m,0.5b)")
    parser.add_argument("--layers", type=int, default=0, help="transformer blocks; 0 = each shape's own (default: 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="training sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="training tokens per sequence (default: 512)")
    parser.add_argument("--gen-batches", default="1,64", help="decode batch sizes (default: 1,64)")
    parser.add_argument("--gen-tokens", type=int, default=128, help="new tokens per row, >= 4 (default: 128)")
    parser.add_argument("--repeats", type=int, default=1, help="timed generate calls after the warm-up (default: 1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--out", default="", help="also write the tables to this markdown file (default: none)")
    args = parser.parse_args(argv)
    device = cli.get_device(args.device)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in bench_model.BENCH_SHAPES]
    if unknown:
        raise cli.UserError(f"--shapes {unknown[0]!r}: choose among {', '.join(bench_model.BENCH_SHAPES)}")
    if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", args.gen_batches):
        raise cli.UserError(f"--gen-batches {args.gen_batches!r}: comma-separated batch sizes >= 1, e.g. 1,64")
    args.batches = [int(b) for b in args.gen_batches.split(",")]
    if min(args.batch_size, args.seq_len, args.repeats) < 1 or args.gen_tokens < 4 or args.layers < 0:
        raise cli.UserError("--batch-size, --seq-len and --repeats must be >= 1, --gen-tokens >= 4, --layers >= 0")
    if args.seq_len + 1 > BLOCK or PROMPT_LEN + args.gen_tokens > BLOCK:
        raise cli.UserError(f"--seq-len + 1 and {PROMPT_LEN} + --gen-tokens must fit the {BLOCK}-token context")
    if args.out:
        open(args.out, "w").close()

    def report(table: str) -> None:
        print("\n" + table, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(table + "\n\n")
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth / 1e9:,.1f} GB/s (a copy_ of {'1 GiB' if device.type == 'cuda' else '64 MiB'}"
          f" on {device.type}, bytes read + written / s)", flush=True)
    for shape in shapes:
        compare(shape, args, device, bandwidth, report)


if __name__ == "__main__":
    cli.run(main)
