"""Side by side with Hugging Face transformers, in one process, on the same random weights (a benchmark,
not a test: transformers is a test-only oracle, so this lives beside the tests, not in model.py).

    python tests/bench_vs_transformers.py                       # 135m and 0.5b shapes, the device's default
    python tests/bench_vs_transformers.py --shapes 135m --gen-batches 1,64 --device cuda

For each shape: training tokens/s and peak memory (fp32 weights, bf16 autocast on CUDA, fused AdamW on
CUDA, both models; ours also with torch.compile'd blocks), greedy generation new tokens/s at each batch
size (ours eager, ours compiled, transformers' generate with its default dynamic cache), and one GRPO
step's time split at that shape.
Every figure is measured after a warm-up call, ours and theirs alternating in the same process."""
import argparse
import os
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
from lib import cli, convert, rundir, tokenizer  # noqa: E402
import bench_model  # noqa: E402  (beside this file)
import grpo  # noqa: E402


def hf_model(shape: str, cfg: M.Config):
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


def peak_mb(device, fn):
    """Peak CUDA memory of one call of fn, in MB; nan on a CPU (torch keeps no peak there)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    rundir.sync(device)
    return torch.cuda.max_memory_allocated() / 2 ** 20


def compare(shape: str, args, device):
    cfg = M.Config(**{"vocab_size": 258, "block_size": BLOCK, **bench_model.BENCH_SHAPES[shape]})
    torch.manual_seed(0)
    theirs = hf_model(shape, cfg).to(device)
    ours = M.GPT(cfg).to(device)
    ours.load_state_dict(convert.state_dict_from_hf(theirs.state_dict(), cfg, shape))
    print(f"\n== {shape}: {ours.num_params() / 1e6:.1f} M parameters, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}", flush=True)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    with torch.no_grad(), M.autocast(device):
        ours.eval(), theirs.eval()
        difference = (ours(x[:2, :64]) - theirs(x[:2, :64]).logits.float()).abs().max().item()
    print(f"same weights: max |logit difference| {difference:.2e} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'})")
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

    tokens = args.batch_size * args.seq_len
    s_ours, s_theirs = bench_model.timed(step_ours, device, 3), bench_model.timed(step_theirs, device, 3)
    m_ours, m_theirs = peak_mb(device, step_ours), peak_mb(device, step_theirs)

    def memory(mb: float) -> str:
        return f"{mb:,.0f} MB ({mb / m_theirs:.2f}x)" if device.type == "cuda" else "not measured on a CPU"
    print(f"training batch {args.batch_size}x{args.seq_len}: ours {tokens / s_ours:,.0f} tokens/s vs transformers "
          f"{tokens / s_theirs:,.0f} ({s_theirs / s_ours:.2f}x) | peak memory ours {memory(m_ours)}"
          + (f", transformers {m_theirs:,.0f} MB" if device.type == "cuda" else ""), flush=True)
    ours.compile_blocks()           # the same step with torch.compile'd blocks (the warm-up call compiles)
    s_compiled = bench_model.timed(step_ours, device, 3)
    m_compiled = peak_mb(device, step_ours)
    ours.compiled_blocks = None
    print(f"training, ours with compiled blocks: {tokens / s_compiled:,.0f} tokens/s ({s_theirs / s_compiled:.2f}x "
          f"transformers) | peak memory {memory(m_compiled)}", flush=True)
    del opt_ours, opt_theirs
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    ours.eval(), theirs.eval()
    n_new = args.gen_tokens
    # the tokens compared are informational, not a check: each model has taken its own optimizer steps above, so
    # their weights differ in the last bits, and a random model's near-tied logits can flip (the oracle tests
    # compare generation on equal weights)
    precision = "bf16" if device.type == "cuda" else "fp32"
    for batch in [int(b) for b in args.gen_batches.split(",")]:
        prompt = torch.randint(0, 256, (batch, PROMPT_LEN), device=device)
        prompts = prompt.tolist()
        out = {}

        def gen_ours(compile):
            out["compiled" if compile else "eager"] = M.generate(ours, prompts, n_new, temperature=0.0, stop_ids=(),
                                                                 compile=compile).tokens

        def gen_theirs():
            with torch.no_grad(), M.autocast(device):
                out["hf"] = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                            min_new_tokens=n_new, do_sample=False, eos_token_id=None,
                                            pad_token_id=0)[:, prompt.shape[1]:]
        t_eager = bench_model.timed(lambda: gen_ours(False), device, 2)
        t_compiled = bench_model.timed(lambda: gen_ours(True), device, 2)
        t_hf = bench_model.timed(gen_theirs, device, 2)
        new = batch * n_new
        agree = (out["hf"] == out["eager"]).float().mean().item()
        print(f"greedy generation batch {batch:3d}, {n_new} new tokens: ours eager {new / t_eager:,.0f} tok/s, ours "
              f"compiled {new / t_compiled:,.0f} tok/s, transformers {new / t_hf:,.0f} tok/s | compiled / transformers "
              f"{t_hf / t_compiled:.2f}x, eager / transformers {t_hf / t_eager:.2f}x | compiled == eager tokens: "
              f"{torch.equal(out['compiled'], out['eager'])}, tokens equal to transformers' ({precision}): {agree:.1%}", flush=True)
    del theirs
    grpo_split(ours, device, args)


def grpo_split(policy, device, args, prompts_per_step=8, group_size=8):
    """One GRPO step at this shape (random weights, byte prompts): seconds in generation, scoring and update."""
    enc = tokenizer.get_tokenizer()
    rows = [{"prompt": f"{a}+{b}=?\n", "answer": str(a + b)} for a, b in zip(range(100, 200), range(300, 400))]
    byte_decode = tokenizer.decode     # a random model at a real shape samples ids past the byte tokenizer's 258: skip them
    tokenizer.decode = lambda enc, ids: byte_decode(enc, [i for i in ids if int(i) < enc.n_vocab])
    run = grpo.Args(prompts_per_step=prompts_per_step, group_size=group_size, max_new_tokens=args.gen_tokens,
                    micro_batch=16, device=device.type)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=device.type == "cuda")
    weights = grpo.parse_reward_weights("correct=1")
    generator = torch.Generator(device).manual_seed(0)
    for attempt in range(2):                    # the first step is the warm-up
        t0 = time.perf_counter()
        batch, seen = grpo.collect_rollouts(policy, enc, lambda n: rows[:n], prompts_per_step, run, weights, generator, False)
        rundir.sync(device)
        t1 = time.perf_counter()
        batch.rewards = torch.randn_like(batch.rewards)          # random rewards: every group has a signal
        advantages = grpo.group_advantages(batch.rewards).flatten()
        grpo.update(policy, policy, optimizer, batch, advantages, None, run, device, step=1)
        rundir.sync(device)
        t2 = time.perf_counter()
    gen = t1 - t0 - batch.score_s
    print(f"GRPO step ({prompts_per_step} prompts x {group_size}, {args.gen_tokens} new tokens): generation {gen:.2f} s, "
          f"scoring {batch.score_s:.3f} s, update ({run.update_epochs} epochs) {t2 - t1:.2f} s", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="135m,0.5b", help="comma-separated: default, 135m, 0.5b")
    parser.add_argument("--batch-size", type=int, default=8, help="training sequences per step")
    parser.add_argument("--seq-len", type=int, default=512, help="training tokens per sequence")
    parser.add_argument("--gen-batches", default="1,64", help="generation batch sizes")
    parser.add_argument("--gen-tokens", type=int, default=128, help="new tokens per row")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    device = cli.get_device(args.device)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in bench_model.BENCH_SHAPES]
    if unknown:
        raise cli.UserError(f"--shapes {unknown[0]!r}: choose among {', '.join(bench_model.BENCH_SHAPES)}")
    if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", args.gen_batches):
        raise cli.UserError(f"--gen-batches {args.gen_batches!r}: comma-separated batch sizes >= 1, e.g. 1,64")
    if min(args.batch_size, args.seq_len, args.gen_tokens) < 1:
        raise cli.UserError("--batch-size, --seq-len and --gen-tokens must be >= 1")
    if args.seq_len + 1 > BLOCK or PROMPT_LEN + args.gen_tokens > BLOCK:
        raise cli.UserError(f"--seq-len + 1 and {PROMPT_LEN} + --gen-tokens must fit the {BLOCK}-token context")
    for shape in shapes:
        compare(shape, args, device)


if __name__ == "__main__":
    cli.run(main)
