"""FSDP2 (distributed.shard_model) under two gloo processes: sharded SFT and GRPO updates equal one process on
the whole batch; checkpoints gathered on rank 0 load in one process; resume under FSDP is exact; and
`torchrun --nproc_per_node 2 sft.py --fsdp` / `grpo.py --fsdp` run end to end.

References: one process on the whole batch (sft.train_step, grpo.update, model.generate), the per-rank
normalisation that the whole-batch count must NOT give (so the comparison can fail), an uninterrupted
FSDP run for resume, and checkpoints.load in one process for the saved files. Every multi-process computation
runs in ONE spawn of two processes (the `fsdp` fixture; spawn, never fork), so the interpreter start-ups,
the cost of these tests, are paid once; each test then asserts one property of what it wrote."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo
import model as M
from lib import checkpoints, cli, distributed, stages, tasks, tokenizer
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, PAD = M.BYTE_EOT_ID, M.BYTE_PAD_ID
TINY = dict(vocab_size=258, block_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)   # tied embeddings
SGD_LR = 0.1           # p - lr * g: the weights move by exactly lr times the gradient, no amplification
CHUNK = 258 * 4        # token_logprobs' LM head in chunks of 4 positions (checkpointed): the path big vocabularies take
WORLD = 2

# SFT: five (prompt, completion) pairs; sft.py's split gives rank 0 three (9 + 3 + 5 = 17 loss tokens, with
# EOS) and rank 1 two (1 + 10 = 11), so per-rank normalisation differs from the whole batch's 1/28. With
# micro_batch 2, rank 0 runs two micro-batches and rank 1 one: FSDP needs the same number of forwards.
SFT_PAIRS = [([1, 2], [3, 4, 5, 6, 7, 8, 9, 10]), ([11, 12, 13], [14, 15]), ([16], [17, 18, 19, 20]),
             ([21, 22, 23, 24], []), ([25], [26, 27, 28, 29, 30, 31, 32, 33, 34])]
SFT_MICRO = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(seed, **overrides):
    torch.manual_seed(seed)
    return M.GPT(M.Config(**{**TINY, **overrides}))


def to_examples(pairs):
    return [(torch.tensor(p + c + [EOS]), len(p)) for p, c in pairs]


def sft_micro_batches(pairs, rank=0, world=1):
    """This rank's share of the batch, cut as sft.py cuts it (tensor_split, length-sorted micro-batches)."""
    examples = to_examples(pairs)
    mine = torch.tensor_split(torch.arange(len(examples)), world)[rank].tolist()
    return sft.length_sorted_micro_batches([examples[i] for i in mine], SFT_MICRO, PAD)


def grpo_batch(seed=0, N=4, T=14):
    """A GRPO rollout batch of N sequences with completions of different lengths (so the two halves have
    different token counts), sampler log-probs perturbed away from the model's so that ratios differ
    from 1 and some clip, and advantages of both signs."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (N, T), generator=generator)
    mask = torch.zeros(N, T - 1)
    for i, (start, length) in enumerate([(3, 10), (4, 2), (2, 5), (5, 8)][:N]):
        mask[i, start:start + length] = 1.0
    with torch.no_grad():
        logprobs = M.token_logprobs(tiny_model(1).eval(), tokens)
    old_logprobs = (logprobs + 0.3 * torch.randn(N, T - 1, generator=generator)) * mask
    advantages = torch.randn(N, generator=generator)
    return tokens, mask, old_logprobs, advantages


def grpo_rollout(tokens, mask, old_logprobs):
    n = tokens.shape[0]
    return grpo.Rollout(tokens, mask, old_logprobs, torch.zeros(n // 2, 2), torch.zeros(n // 2, 2),
                        mask.sum(1).long(), torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool), [""] * n)


def grpo_args():
    return grpo.Args(update_epochs=1, micro_batch=1, grad_clip=0.0, aggregation="dapo", beta=0.05,
                     eps_low=0.2, eps_high=0.28, temperature=1.0)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a full copy of each gradient as step() sees it (grpo.update zeroes them after)."""

    def step(self, closure=None):
        self.grads = [full(p.grad).clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def full(tensor):
    """The whole tensor of a sharded DTensor (collective), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def tiny_rows(n=24):
    return [{"prompt": f"{a}+{b}=?\n", "completion": f"{a % 10}+{b % 10}=?\n#### {a + b}", "answer": str(a + b)}
            for a, b in zip(range(10, 10 + n), range(30, 30 + n))]


def write_sft_data(folder):
    rows = tiny_rows()
    tasks.write_jsonl(os.path.join(folder, "train.jsonl"), rows)
    tasks.write_jsonl(os.path.join(folder, "test.jsonl"), rows[:8])
    tasks.write_jsonl(os.path.join(folder, "heldout.jsonl"), [{"prompt": r["prompt"], "answer": r["answer"]}
                                                             for r in rows[:4]])


def sft_args(folder, out, **overrides):
    """A tiny SFT run: batch 5 over 2 ranks (3 and 2 sequences, micro-batches of 2), dropout on (so the
    saved RNG state matters), a checkpoint after every step."""
    base = dict(data=os.path.join(folder, "train.jsonl"), test_data=os.path.join(folder, "test.jsonl"),
                eval_data=os.path.join(folder, "heldout.jsonl"), out=os.path.join(folder, out), n_layer=1,
                n_embd=32, n_head=2, n_kv_head=2, block_size=64, batch_size=5, micro_batch=2, max_steps=3,
                time_budget=0, eval_every=1, eval_minutes=0, n_eval=4, max_new_tokens=4, log_every=1,
                warmup_steps=2, dropout=0.1, device="cpu", keep_state=True)
    return sft.Args(**{**base, **overrides})


RESUME_STEPS, RESUME_AT = 3, 1


# ---- the two processes -------------------------------------------------------------------------

def _fsdp_worker(rank, world, ports, folder, states):
    """Rank `rank` of 2: every FSDP computation the tests below check, results saved as rank{r}_*.pt."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]))
    distributed.setup_ddp()
    M.LOGIT_CHUNK_ELEMENTS = CHUNK
    save = lambda name, obj: torch.save(obj, os.path.join(folder, f"rank{rank}_{name}.pt"))

    # SFT: one update on this rank's share, gradients summed by the reduce-scatter (no clip, then clipped)
    for clip in (0.0, 0.5):
        policy = M.GPT(M.Config(**TINY))
        policy.load_state_dict(states["sft"])
        distributed.shard_model(policy, "cpu", sum_gradients=True)
        optimizer = torch.optim.SGD(policy.parameters(), lr=SGD_LR)
        loss, grad_norm, n_tokens = sft.train_step(policy, optimizer, sft_micro_batches(SFT_PAIRS, rank, world),
                                                   "cpu", grad_clip=clip, world_size=world, fsdp=True)
        save(f"sft_clip{clip}", {"loss": loss, "grad_norm": grad_norm, "n_tokens": n_tokens,
                                 "tied": policy.lm_head.weight is policy.wte.weight,
                                 "grads": {n: full(p.grad) for n, p in policy.named_parameters()},
                                 "params": {n: full(p.detach()) for n, p in policy.named_parameters()}})

    # The checkpoint of that sharded model: gathered on rank 0, written by checkpoints.save; logits of the sharded model
    inputs = torch.arange(40).view(2, 20) % 256
    with torch.no_grad():
        logits = policy(inputs)                            # every rank: the forward gathers from every rank
    copy = distributed.full_model(policy)
    if rank == 0:
        checkpoints.save(os.path.join(folder, "fsdp_saved.pt"), copy, tokenizer.get_tokenizer())
    else:
        assert copy is None
    save("logits", {"inputs": inputs, "logits": logits})

    # Generation on the gathered weights: ranks decode different lengths, no collective inside
    with distributed.gathered(policy):
        generation = M.generate(policy, [[5, 6, 7], [8, 9]], max_new_tokens=3 + 9 * rank, temperature=0.0,
                                stop_ids=(), pad_id=PAD)
    save("generate", {"tokens": generation.tokens, "sharded_after": hasattr(policy.wte.weight, "full_tensor")})

    # GRPO: one update of this rank's half, normalisers all-reduced, gradients averaged (as DDP)
    tokens, mask, old_logprobs, advantages = grpo_batch()
    rows = torch.tensor_split(torch.arange(tokens.shape[0]), world)[rank]
    policy = M.GPT(M.Config(**TINY)).eval()
    policy.load_state_dict(states["grpo"])
    reference = M.GPT(M.Config(**TINY)).requires_grad_(False)
    reference.load_state_dict(states["reference"])
    distributed.shard_model(policy, "cpu")
    distributed.shard_model(reference, "cpu")
    optimizer = RecordingSGD(policy.parameters(), lr=SGD_LR)
    stats = grpo.update(policy, policy, optimizer, grpo_rollout(tokens[rows], mask[rows], old_logprobs[rows]),
                        advantages[rows], reference, grpo_args(), torch.device("cpu"), step=1, world=world)
    save("grpo", {"grads": optimizer.grads, "stats": stats,
                  "params": {n: full(p.detach()) for n, p in policy.named_parameters()}})
    distributed.cleanup_ddp()

    # Resume under FSDP: N steps straight vs stopped after k (checkpoint at k), then --resume --fsdp
    os.environ["MASTER_PORT"] = str(ports[1])
    sft.run(sft_args(folder, "straight", max_steps=RESUME_STEPS, fsdp=True))
    real_step, calls = sft.train_step, []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) > RESUME_AT:
            raise RuntimeError("stopped for the test")
        return real_step(*args, **kwargs)

    sft.train_step = stopped
    os.environ["MASTER_PORT"] = str(ports[2])
    try:
        sft.run(sft_args(folder, "resumed", max_steps=RESUME_STEPS, fsdp=True))
    except RuntimeError as err:
        assert "stopped for the test" in str(err)
    sft.train_step = real_step
    if rank == 0:   # the checkpoint at step k, for a single-process resume in the test process
        os.makedirs(os.path.join(folder, "stopped"))
        for name in ("model.pt", "resume.pt", "args.json", "metrics.jsonl"):
            shutil.copy(os.path.join(folder, "resumed", name), os.path.join(folder, "stopped", name))
    os.environ["MASTER_PORT"] = str(ports[3])
    sft.main(["--out", os.path.join(folder, "resumed"), "--resume", "--fsdp"])
    cli.exit_without_shutdown(0)   # as cli.run ends a torchrun rank: spawn's exit would shut the interpreter down


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """Run _fsdp_worker in two spawned processes (a hang fails the test after 4 minutes, not never)."""
    folder = str(tmp_path_factory.mktemp("fsdp"))
    write_sft_data(folder)
    states = {"sft": tiny_model(3).state_dict(), "grpo": tiny_model(4).state_dict(),
              "reference": tiny_model(5).state_dict()}
    context = mp.start_processes(_fsdp_worker, args=(WORLD, [free_port() for _ in range(4)], folder, states),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + 240     # about 20 s here
    while not context.join(timeout=2):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the FSDP processes did not finish in 4 minutes (a collective that not every rank joined?)")
    return folder


def load(folder, rank, name):
    return torch.load(os.path.join(folder, f"rank{rank}_{name}.pt"), weights_only=True)


def assert_gradients_match(got, want, name):
    """float32 sums of the same terms in another order (two halves, then the reduce-scatter, against one
    pass over the batch; other thread counts): the rounding error is a small multiple of eps32 * max|g|,
    so the tolerance scales with the tensor's largest element, never with the element itself (a near-zero
    element from cancellation has no relative accuracy)."""
    tolerance = 1e-5 * float(want.abs().max()) + 1e-12
    torch.testing.assert_close(got, want, atol=tolerance, rtol=1e-5, msg=name)
    return tolerance


# ---- SFT ---------------------------------------------------------------------------------------

def single_process_sft_step(clip):
    policy = tiny_model(3)
    optimizer = torch.optim.SGD(policy.parameters(), lr=SGD_LR)
    loss, grad_norm, n_tokens = sft.train_step(policy, optimizer, sft_micro_batches(SFT_PAIRS), "cpu", grad_clip=clip)
    return policy, loss, grad_norm, n_tokens


def test_sharded_sft_update_equals_one_process_on_the_whole_batch(fsdp):
    """Gradients before the step (no clip), the SGD update, the reported loss and token count: the same on
    both ranks as one process on the whole batch, with tied embeddings still one parameter under FSDP."""
    policy, loss, _, n_tokens = single_process_sft_step(0.0)
    assert n_tokens == 28
    for rank in range(WORLD):
        got = load(fsdp, rank, "sft_clip0.0")
        assert got["tied"] and got["n_tokens"] == n_tokens
        assert abs(got["loss"] - loss) <= 1e-5 * abs(loss)
        for name, param in policy.named_parameters():
            tolerance = assert_gradients_match(got["grads"][name], param.grad, name)
            torch.testing.assert_close(got["params"][name], param.detach(), atol=SGD_LR * tolerance, rtol=1e-6,
                                       msg=name)


def test_halves_with_different_token_counts_get_the_whole_batch_normalisation(fsdp):
    """The two shares hold 17 and 11 loss tokens. Dividing each by its own count (then averaging, as a
    per-rank mean would) gives another gradient, far outside the tolerance: the sharded one is 1/28 of the
    summed -log p gradient, the whole batch's, not the per-rank one."""
    policy, _, _, _ = single_process_sft_step(0.0)
    per_rank = {}
    for rank in range(WORLD):
        share = tiny_model(3)
        micro_batches = sft_micro_batches(SFT_PAIRS, rank, WORLD)
        count = sum(int(mask.sum()) for _, _, mask in micro_batches)
        sft.train_step(share, torch.optim.SGD(share.parameters(), lr=0.0), micro_batches, "cpu", grad_clip=0.0)
        per_rank[rank] = (count, {n: p.grad / WORLD for n, p in share.named_parameters()})
    assert sorted(count for count, _ in per_rank.values()) == [11, 17]
    got = load(fsdp, 0, "sft_clip0.0")["grads"]
    worst = max(float((got[name] - sum(g[name] for _, g in per_rank.values())).abs().max())
                / (1e-5 * float(param.grad.abs().max()) + 1e-12) for name, param in policy.named_parameters())
    assert worst > 100, "the per-rank normalisation would pass this test too"


def test_sharded_gradient_clip_uses_the_norm_over_every_shard(fsdp):
    """clip_grad_norm_ over DTensor shards: the global norm (all-reduced), the same as one process's, and the
    clipped gradient equal to one process's clipped gradient."""
    policy, _, grad_norm, _ = single_process_sft_step(0.5)
    assert grad_norm > 0.5
    for rank in range(WORLD):
        got = load(fsdp, rank, "sft_clip0.5")
        assert abs(got["grad_norm"] - grad_norm) <= 1e-5 * grad_norm
        for name, param in policy.named_parameters():
            assert_gradients_match(got["grads"][name], param.grad, name)


# ---- checkpoints and generation ----------------------------------------------------------------

def test_a_checkpoint_gathered_under_fsdp_loads_in_one_process_with_the_same_logits(fsdp):
    """checkpoints.save of full_model's copy: a plain checkpoint (checkpoints.load validates it), tied embeddings tied,
    the weights the sharded model held (gathering copies, bit for bit) and the logits it computed."""
    loaded, _, _ = checkpoints.load(os.path.join(fsdp, "fsdp_saved.pt"))
    assert loaded.lm_head.weight is loaded.wte.weight
    sharded = load(fsdp, 0, "sft_clip0.5")["params"]
    for name, param in loaded.named_parameters():
        torch.testing.assert_close(param.detach(), sharded[name], atol=0, rtol=0, msg=name)
    got = load(fsdp, 0, "logits")
    with torch.no_grad():
        logits = loaded(got["inputs"])
    torch.testing.assert_close(got["logits"], logits, atol=1e-5 * float(logits.abs().max()), rtol=1e-5)


def test_generation_on_gathered_weights_equals_one_process_and_frees_them_after(fsdp):
    """Inside distributed.gathered each rank decodes alone (3 and 12 new tokens: a collective per decode step would
    hang); greedy tokens equal the single-process model's; on exit the parameters are shards again."""
    loaded, _, _ = checkpoints.load(os.path.join(fsdp, "fsdp_saved.pt"))
    for rank in range(WORLD):
        got = load(fsdp, rank, "generate")
        want = M.generate(loaded, [[5, 6, 7], [8, 9]], max_new_tokens=3 + 9 * rank, temperature=0.0, stop_ids=(),
                          pad_id=PAD)
        assert got["tokens"].shape == (2, 3 + 9 * rank)
        assert torch.equal(got["tokens"], want.tokens)
        assert got["sharded_after"]


# ---- GRPO --------------------------------------------------------------------------------------

def test_sharded_grpo_update_equals_one_process_on_the_whole_batch(fsdp):
    """grpo.update (token-mean 'dapo' aggregation, k3 KL to a sharded reference, micro-batches of one,
    the LM head in checkpointed chunks) on halves with 12 and 13 completion tokens under FSDP: the gradient
    before the step and the SGD update equal one process on the whole batch."""
    tokens, mask, old_logprobs, advantages = grpo_batch()
    halves = [float(half.sum()) for half in torch.tensor_split(mask, WORLD)]
    assert halves[0] != halves[1]
    policy = tiny_model(4).eval()
    reference = tiny_model(5).requires_grad_(False)
    optimizer = RecordingSGD(policy.parameters(), lr=SGD_LR)
    chunk, M.LOGIT_CHUNK_ELEMENTS = M.LOGIT_CHUNK_ELEMENTS, CHUNK
    try:
        stats = grpo.update(policy, policy, optimizer, grpo_rollout(tokens, mask, old_logprobs), advantages,
                            reference, grpo_args(), torch.device("cpu"), step=1)
    finally:
        M.LOGIT_CHUNK_ELEMENTS = chunk
    assert 0 < stats["clipfrac"] < 1   # some tokens clip: the comparison covers both branches of the min
    names = [name for name, _ in policy.named_parameters()]
    for rank in range(WORLD):
        got = load(fsdp, rank, "grpo")
        for name, want, grad in zip(names, optimizer.grads, got["grads"]):
            tolerance = assert_gradients_match(grad, want, name)
            torch.testing.assert_close(got["params"][name], dict(policy.named_parameters())[name].detach(),
                                       atol=SGD_LR * tolerance, rtol=1e-6, msg=name)


# ---- resume ------------------------------------------------------------------------------------

def test_resume_under_fsdp_continues_bit_identically(fsdp):
    """Stopped after step 1 of 3 (the checkpoint every step wrote: weights and AdamW state gathered on rank
    0), then `sft.py --resume --fsdp`: the final weights and optimizer state equal the uninterrupted FSDP
    run's bit for bit, as single-process resume does (test_sft). Exact, because both runs do the same float
    operations in the same order: gathering and scattering shards copies numbers, and a sum over two ranks
    does not depend on their order."""
    straight, _, ckpt_a = checkpoints.load(os.path.join(fsdp, "straight", "model.pt"))
    resumed, _, ckpt_b = checkpoints.load(os.path.join(fsdp, "resumed", "model.pt"))
    assert ckpt_a["meta"]["step"] == ckpt_b["meta"]["step"] == RESUME_STEPS
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    state_a, state_b = (torch.load(os.path.join(fsdp, run, "resume.pt"), weights_only=True)["optimizer"]["state"]
                        for run in ("straight", "resumed"))
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key in state_a[index]:
            torch.testing.assert_close(state_a[index][key], state_b[index][key], atol=0, rtol=0)
    lines = [json.loads(line) for line in open(os.path.join(fsdp, "resumed", "metrics.jsonl"))]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, RESUME_STEPS + 1))


def test_an_fsdp_checkpoint_resumes_in_one_process(fsdp, tmp_path):
    """The file written under FSDP is the single-process format: optimizer state keyed by parameter index
    in sft.adamw's order, each moment of its parameter's full shape, so `sft.py --resume` in ONE process
    continues it to the end. (Not bit-identical to the FSDP continuation: one process sums each gradient
    in another order than the two ranks' reduce-scatter, and Adam amplifies the last-bit differences.)"""
    folder = tmp_path / "stopped"
    shutil.copytree(os.path.join(fsdp, "stopped"), folder)
    policy, _, ckpt = checkpoints.load(str(folder / "model.pt"))
    saved = torch.load(folder / "resume.pt", weights_only=True)["optimizer"]
    params = [p for group in sft.adamw(policy, 1e-3, 0.1, (0.9, 0.99)).param_groups for p in group["params"]]
    assert ckpt["meta"]["step"] == RESUME_AT and sorted(saved["state"]) == list(range(len(params)))
    for index, param in enumerate(params):
        assert saved["state"][index]["exp_avg"].shape == param.shape
    sft.main(["--out", str(folder), "--resume"])   # the saved --fsdp is not restored: it is how a command runs
    assert checkpoints.load(str(folder / "model.pt"))[2]["meta"]["step"] == RESUME_STEPS


# ---- torchrun, end to end ----------------------------------------------------------------------

def torchrun(script, argv, cwd):
    """torchrun --standalone --nproc_per_node 2 SCRIPT ARGV, as a user types it."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(WORLD), os.path.join(ROOT, script), *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_torchrun_sft_fsdp_on_a_time_budget_exits_0_with_one_writer(tmp_path):
    """Two ranks on a wall-clock budget (their clocks differ; rank 0's decides, so both stop at the same
    step or the last collective would hang): exit 0, one run folder, each step logged once. Its first
    update starts from the same weights as one process's: the same loss and gradient norm, which a
    gradient averaged instead of summed over the ranks (half the norm) would not give."""
    write_sft_data(str(tmp_path))
    args = sft_args(str(tmp_path), "run", max_steps=0, time_budget=0.01, eval_every=0, fsdp=True, dropout=0.0,
                    keep_state=False)                       # finished: model.pt alone, no resume.pt
    argv = stages.stage_command("sft.py", **{k: v for k, v in vars(args).items() if k not in ("init", "resume")})[1:]
    done = torchrun("sft.py", argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "args.json", "metrics.jsonl", "model.pt"]
    rows = [r for r in tasks.read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    steps = [r["step"] for r in rows]
    assert steps and steps == list(range(1, len(steps) + 1))
    sft.run(sft_args(str(tmp_path), "one", max_steps=1, eval_every=0, dropout=0.0))
    one = [r for r in tasks.read_jsonl(str(tmp_path / "one" / "metrics.jsonl")) if r["kind"] == "train"][0]
    assert abs(rows[0]["loss"] - one["loss"]) <= 1e-5 * one["loss"]
    assert abs(rows[0]["grad_norm"] - one["grad_norm"]) <= 1e-5 * one["grad_norm"]
    assert checkpoints.load(str(tmp_path / "run" / "model.pt"))[2]["meta"]["step"] == steps[-1]
    assert done.stdout.count("held-out accuracy") == 1


def test_torchrun_grpo_fsdp_exits_0_with_one_writer(tmp_path):
    """GRPO on 2 sharded ranks with a reference model and an eval after every step (each a gather that
    every rank joins): exit 0, one run folder, one table, a checkpoint that loads in one process."""
    torch.manual_seed(0)
    enc = tokenizer.get_tokenizer()
    checkpoints.save(str(tmp_path / "start.pt"), M.GPT(M.Config(**{**TINY, "n_layer": 1})), enc)
    tasks.write_jsonl(str(tmp_path / "rl.jsonl"), [{"prompt": f"{a}+{b}=?\n", "answer": str(a + b)}
                                                   for a in range(10) for b in range(10)])
    argv = stages.stage_command("grpo.py", init="start.pt", data="rl.jsonl", eval_data="rl.jsonl", out="run",
                                prompts_per_step=4, group_size=4, max_new_tokens=6, max_steps=2, n_eval=4,
                                n_eval_during=4, pass_k=2, eval_minutes=1e-4, beta=0.1, micro_batch=3, control=False,
                                png=False, device="cpu", fsdp=True)[1:]
    done = torchrun("grpo.py", argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "args.json", "metrics.jsonl", "model.pt",
                                                    "results.md", "summary.json"]
    rows = tasks.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert len([r for r in rows if r["kind"] == "eval"]) == 4   # start, after steps 1 and 2, final
    assert done.stdout.count("| GRPO |") == 1
    assert checkpoints.load(str(tmp_path / "run" / "model.pt"))[2]["meta"]["step"] == 2


# ---- options -----------------------------------------------------------------------------------

def test_fsdp_without_torchrun_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_sft_data(str(tmp_path))
    with pytest.raises(cli.UserError, match="--fsdp .* torchrun"):
        sft.run(sft_args(str(tmp_path), "run", fsdp=True))
    with pytest.raises(cli.UserError, match="--fsdp .* torchrun"):
        grpo.train(grpo.Args(out=str(tmp_path / "grpo"), fsdp=True))
    assert not (tmp_path / "run").exists() and not (tmp_path / "grpo").exists()
