"""GRPO's rollouts on a CPU: today's `model.generate` against the one issue 21 measured (the `model.py` of
commit 90aac4f: a cache that grew by one slice per step, attention over it with scaled_dot_product_attention,
torch.multinomial, every row decoded until the last one stopped). A benchmark, not a test.

    python grpo.py                                   # once: writes runs/sft/model.pt, the SFT start
    python tests/bench_rollouts.py                   # 8 rollouts each way, interleaved, after a warm-up pair
    python tests/bench_rollouts.py --threads 1 --rollouts 12
    python tests/bench_rollouts.py --grpo-steps 100  # every rollout of a GRPO run, both ways

Both load the same weights and sample GRPO's default rollout (32 prompts x 8 completions of at most 96 new
tokens, temperature 1) from the same prompts of data/rl_train.jsonl; old and new alternate in one process and
the first pair is a warm-up. With --grpo-steps N, grpo.py trains for N steps from --init (no control, a
temporary run folder) and each of its rollouts is also sampled by the baseline, from the policy of that step,
the same prompts and a copy of the same random state; the run itself trains on today's rollouts, as it would
alone. The baseline module is read with `git show`, so this needs the repository's history (a clone, not an
export)."""
import argparse
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo  # noqa: E402
import model as M  # noqa: E402
from lib import checkpoints, cli, stages, tasks, tokenizer  # noqa: E402

BASELINE = "90aac4f"   # main when issue 21 was filed: the generate it measured


def baseline_module(commit: str):
    """The model.py of `commit`, imported under the name model_<commit>."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:model.py"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise cli.UserError(f"cannot read model.py at commit {commit} with git ({e}); run from a git clone") from None
    path = os.path.join(tempfile.mkdtemp(), f"model_{commit}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"model_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/sft/model.pt", help="policy checkpoint (default: grpo.py's SFT start)")
    parser.add_argument("--data", default="data/rl_train.jsonl", help="prompts, as grpo.py reads them")
    parser.add_argument("--rollouts", type=int, default=8, help="timed rollouts each way (after one warm-up pair)")
    parser.add_argument("--prompts-per-step", type=int, default=32, help="prompts per rollout")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=tasks.MAX_NEW_TOKENS, help="completion length limit")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose generate is the baseline")
    parser.add_argument("--grpo-steps", type=int, default=0,
                        help="time every rollout of a GRPO run of this many steps instead (0: fixed policy)")
    args = parser.parse_args(argv)
    if min(args.rollouts, args.prompts_per_step, args.group_size, args.max_new_tokens) < 1 or args.threads < 0:
        raise cli.UserError("--rollouts, --prompts-per-step, --group-size, --max-new-tokens must be >= 1; --threads >= 0")
    if args.grpo_steps < 0 or args.grpo_steps == 1:
        raise cli.UserError(f"--grpo-steps {args.grpo_steps}: 0 (a fixed policy) or at least 2 (the first rollout is "
                            "a warm-up, left out)")
    if not os.path.exists(args.init):
        raise cli.UserError(f"--init {args.init}: no such checkpoint (python grpo.py writes runs/sft/model.pt)")
    if args.threads:
        torch.set_num_threads(args.threads)
    new_model, enc, _ = checkpoints.load(args.init)
    rows = tasks.fit_prompts(tasks.read_prompts(args.data), enc, new_model.config.block_size, args.max_new_tokens, args.data)
    P, G = args.prompts_per_step, args.group_size
    if len(rows) < P * (args.rollouts + 1):
        raise cli.UserError(f"--data {args.data}: {len(rows)} prompts, {P * (args.rollouts + 1)} needed")
    old = baseline_module(args.baseline)
    fields = old.Config.__dataclass_fields__
    old_model = old.GPT(old.Config(**{k: v for k, v in vars(new_model.config).items() if k in fields}))
    old_model.load_state_dict(new_model.state_dict())
    if args.grpo_steps:
        return along_grpo_run(args, old, old_model)
    print(f"{args.init}: {new_model.num_params() / 1e6:.2f} M parameters | {P} prompts x {G} completions, at most "
          f"{args.max_new_tokens} new tokens, temperature 1 | {torch.get_num_threads()} threads | baseline: "
          f"model.py at {args.baseline}", flush=True)
    kwargs = dict(temperature=1.0, stop_ids=tokenizer.stop_ids(enc), pad_id=tokenizer.pad_id(enc))
    seconds, tokens = {"today": 0.0, args.baseline: 0.0}, {"today": 0, args.baseline: 0}
    for i in range(args.rollouts + 1):
        prompts = [tokenizer.encode_prompt(enc, r["prompt"]) for r in rows[i * P:(i + 1) * P] for _ in range(G)]
        runs = [("today", M.generate, new_model), (args.baseline, old.generate, old_model)]
        for name, generate, model in runs if i % 2 else runs[::-1]:
            start = time.perf_counter()
            out = generate(model, prompts, args.max_new_tokens, generator=torch.Generator().manual_seed(i), **kwargs)
            if i:                                    # rollout 0 is the warm-up
                seconds[name] += time.perf_counter() - start
                tokens[name] += int(out.lengths.sum())
    for name in seconds:
        print(f"{name:>8}: {seconds[name] / args.rollouts:.3f} s per rollout, {tokens[name] / args.rollouts:,.0f} new "
              f"tokens per rollout, {tokens[name] / seconds[name]:,.0f} new tokens/s")
    print(f"today's rollouts are {seconds[args.baseline] / seconds['today']:.2f}x faster than {args.baseline}'s "
          f"({args.rollouts} rollouts each, same prompts and weights)")


def along_grpo_run(args, old, old_model):
    """Train GRPO for args.grpo_steps steps; time each rollout's generate both ways (the order alternating), the
    baseline's from a copy of the policy and of the random generator, so the run trains on today's samples."""
    seconds, tokens = {"today": [], args.baseline: []}, {"today": [], args.baseline: []}
    today_generate, accepted = M.generate, inspect.signature(old.generate).parameters
    rollout = grpo.rollout

    def timed_generate(policy, prompts, max_new_tokens, generator=None, **kwargs):
        old_model.load_state_dict(M.unwrap(policy).state_dict())
        old_kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        old_generator = torch.Generator().set_state(generator.get_state())
        runs = [("today", lambda: today_generate(policy, prompts, max_new_tokens, generator=generator, **kwargs)),
                (args.baseline, lambda: old.generate(old_model, prompts, max_new_tokens, generator=old_generator,
                                                     **old_kwargs))]
        result = None
        for name, run in runs if len(seconds["today"]) % 2 else runs[::-1]:
            start = time.perf_counter()
            out = run()
            seconds[name].append(time.perf_counter() - start)
            tokens[name].append(int(out.lengths.sum()))
            result = out if name == "today" else result
        return result

    def timed_rollout(*a, **kw):        # only grpo's rollouts are timed, not its evaluations
        M.generate = timed_generate
        try:
            return rollout(*a, **kw)
        finally:
            M.generate = today_generate

    grpo.rollout = timed_rollout
    with tempfile.TemporaryDirectory() as out:
        command = stages.stage_command("grpo.py", init=args.init, data=args.data, out=out, max_steps=args.grpo_steps,
                                       prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                                       max_new_tokens=args.max_new_tokens, control=False, png=False, n_eval=16,
                                       eval_minutes=1000, threads=args.threads)
        grpo.train(cli.parse_args(grpo.Args, command[1:]))
    grpo.rollout, n = rollout, len(seconds["today"])
    print(f"\nGRPO's {n} rollouts (the first is a warm-up, left out), today's generate against {args.baseline}'s:")
    for label, part in (("first 10", slice(1, 11)), ("last 10", slice(max(1, n - 10), n)), ("all", slice(1, n))):
        count = len(seconds["today"][part])
        new_s, old_s = sum(seconds["today"][part]), sum(seconds[args.baseline][part])
        print(f"{label:>9}: {new_s / count:.3f} vs {old_s / count:.3f} s per rollout "
              f"({sum(tokens['today'][part]) / count:,.0f} new tokens), {old_s / new_s:.2f}x faster")


if __name__ == "__main__":
    cli.run(main)
