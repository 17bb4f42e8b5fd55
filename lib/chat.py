"""Chat with any checkpoint this project loads: a stage's .pt, a Hugging Face folder, a .gguf file.

    python model.py chat --checkpoint runs/sft/model.pt --prompt "What is 12+34?"     # one answer, then exit
    python model.py chat --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf                 # a conversation on stdin
    python model.py chat --checkpoint hf/grpo --system "Be brief." --temperature 0.7 --top-p 0.9 --seed 1

A conversation reads one user turn per line of stdin, until the end of input, an empty line or /quit. Every turn
renders the whole conversation so far with tokenizer.encode_chat (the checkpoint's chat format, opened by its
trained default system prompt, or by --system for this conversation; --system "" for none), and model.generate
answers it until an end-of-turn token (tokenizer.stop_ids), at most --max-new-tokens and never past the model's
context (block_size). A conversation that leaves no room for a whole answer (--max-new-tokens, at most half the
context) loses its oldest exchanges, one user turn and its answer at a time (the system prompt stays); a latest
turn that does not fit alone is refused. Each answer is printed when it is done, then its length and speed (new
tokens per second of generation).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

import model as M
from lib import checkpoints, cli, tokenizer


@dataclass
class Args:
    checkpoint: str = ""          # a .pt checkpoint, a Hugging Face folder or a .gguf file (required)
    prompt: str = ""              # answer this prompt and exit; without it, a conversation read from stdin
    system: str = "auto"          # system prompt: auto = the checkpoint's trained default, "" = none, else this text
    max_new_tokens: int = 256     # longest answer in tokens (fewer where the context ends first)
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0            # nucleus truncation of the sampler (1 = off)
    top_k: int = 0                # keep the k most likely tokens (0 = off)
    seed: int = 0                 # sampling seed
    chat_template: str = "auto"   # auto|none|chatml|llama3: how turns are wrapped (auto: from the checkpoint)
    device: str = "auto"          # auto|cpu|cuda
    dtype: str = "float32"        # float32|bfloat16: the weights' precision
    threads: int = 0              # torch CPU threads (0 = torch's default; 1 is often faster on a busy machine)


def fit_context(enc, messages: list[dict], block_size: int, max_new_tokens: int) -> tuple[list[int], int]:
    """(the conversation's ids, how many new tokens fit after them). The oldest exchanges (a user turn and its
    answer) are dropped from `messages`, in place, while the ids leave no room for a whole answer (max_new_tokens,
    at most half of block_size, so that a long answer does not cost the whole history); a latest turn that leaves
    no room for one token even alone is a UserError."""
    room = min(max_new_tokens, block_size // 2)
    while True:
        ids = tokenizer.encode_chat(enc, messages)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) + room <= block_size or len(messages) - first <= 1:
            break
        del messages[first:first + 2]
        print(f"(the oldest exchange was dropped: the conversation is over the context of {block_size} tokens)")
    if len(ids) >= block_size:
        raise cli.UserError(f"the prompt is {len(ids)} tokens, the model's context {block_size}: shorten it")
    return ids, min(max_new_tokens, block_size - len(ids))


def answer(model, enc, ids: list[int], max_new_tokens: int, args: Args, generator) -> tuple[list[int], float]:
    """(the answer's tokens, its stop token included where it stopped; seconds of generation)."""
    start = time.perf_counter()
    out = M.generate(model, [ids], max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, stop_ids=tokenizer.stop_ids(enc), pad_id=tokenizer.pad_id(enc),
                     generator=generator)
    return out.tokens[0, :int(out.lengths[0])].tolist(), time.perf_counter() - start


def turn(model, enc, messages: list[dict], args: Args, generator) -> str:
    """Answer the conversation's last user turn: print the answer and its speed, append it to `messages`."""
    ids, room = fit_context(enc, messages, model.config.block_size, args.max_new_tokens)
    tokens, seconds = answer(model, enc, ids, room, args, generator)
    reply = tokenizer.decode(enc, tokens)
    stopped = bool(tokens) and tokens[-1] in tokenizer.stop_ids(enc)
    print(reply)
    print(f"[{len(tokens)} tokens, {len(tokens) / max(seconds, 1e-9):.1f} tokens/s"
          f"{'' if stopped else ', cut at the length limit'}]", flush=True)
    messages.append({"role": "assistant", "content": reply})
    return reply


def main(argv=None) -> None:
    """python model.py chat --checkpoint PATH [--prompt TEXT]: answer one prompt, or hold a conversation."""
    args = cli.parse_args(Args, argv, description=__doc__)
    if not args.checkpoint:
        raise cli.UserError("chat needs --checkpoint PATH (a .pt checkpoint, a Hugging Face folder or a .gguf file)")
    cli.check_options(args, positive=("max_new_tokens",), temperature=("temperature",),
                      non_negative=("top_k", "threads"), seed=("seed",))
    if not 0 < args.top_p <= 1:
        raise cli.UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    cli.check_choices(args, chat_template=("auto", *tokenizer.CHAT_FORMATS), dtype=tuple(cli.DTYPES))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = cli.get_device(args.device)         # checkpoints.load says "loading PATH ..." before a slow load
    model, enc, _ = checkpoints.load(args.checkpoint, device, cli.DTYPES[args.dtype], args.chat_template)
    model.eval()
    if args.system != "auto":
        tokenizer.set_system_prompt(enc, args.system)
    print(f"chat format {enc.chat_format}, system prompt {getattr(enc, 'system_prompt', '')!r}, "
          f"context {model.config.block_size} tokens", flush=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.prompt:
        turn(model, enc, [{"role": "user", "content": args.prompt}], args, generator)
        return
    messages = []
    while True:
        if sys.stdin.isatty():
            print("> ", end="", flush=True)
        text = sys.stdin.readline().rstrip("\n")            # "" at the end of input
        if not text.strip() or text.strip() == "/quit":
            break
        messages.append({"role": "user", "content": text})
        turn(model, enc, messages, args, generator)
