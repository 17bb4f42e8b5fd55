"""Data parallelism under torchrun: DDP (gloo on a CPU, nccl on CUDA) and FSDP2's fully_shard.

    torchrun --nproc_per_node 2 sft.py            # DDP: every rank holds the whole model
    torchrun --nproc_per_node 2 sft.py --fsdp     # FSDP2: every rank holds 1/world of it

A plain python x.py run is one process and none of this is used.

setup_ddp checks the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT: a bad one is a one-line error naming it), then waits for every process to reach MASTER_ADDR:MASTER_PORT
for DIST_JOIN_TIMEOUT_S seconds (default 120; a rank other than 0 retries a refused connection once, so at most
about twice that): a missing peer is a one-line error saying what it waited for, not a silent hang. Once joined,
a collective may wait an hour (rank 0 evaluates alone while the others wait at the next collective).

FSDP2 (Zhao et al. 2023, "PyTorch FSDP"; torch.distributed.fsdp.fully_shard): every rank keeps 1/world of each
parameter (a DTensor sharded on dim 0), of its gradient and of the optimizer state built on it. A unit's
forward all-gathers its parameters and frees them after; its backward reduce-scatters the gradients. Under
torchrun, after setup_ddp: shard_model, then build the optimizer on the sharded parameters.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import re
import sys
import tempfile
import time

import torch

import model as M
from lib import cli


JOIN_TIMEOUT_S = 120.0                                  # default of DIST_JOIN_TIMEOUT_S: the wait for every process
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)    # once joined: rank 0 may evaluate alone this long


def env_int(name: str, low: int, high: int, default: int | None = None) -> int:
    """The environment variable `name` as a whole number in low..high (`default` where it is unset);
    anything else is a UserError naming the variable."""
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    if text is None:
        raise cli.UserError(f"{name} is not set, but WORLD_SIZE={os.environ['WORLD_SIZE']}: run under torchrun "
                            f"--nproc_per_node N, or set RANK, MASTER_ADDR and MASTER_PORT for every process")
    if not re.fullmatch(r"[0-9]+", text) or not low <= int(text) <= high:
        raise cli.UserError(f"{name}={text!r}: must be a whole number in {low}..{high}")
    return int(text)


def ddp_environment() -> dict | None:
    """The torchrun variables, checked: None for one process (WORLD_SIZE unset or 1), else
    {world, rank, local_world, local_rank, addr, port, join_s}. A bad variable is a UserError naming it."""
    world = env_int("WORLD_SIZE", 1, 2 ** 31 - 1, default=1)
    if world == 1:
        return None
    rank = env_int("RANK", 0, world - 1)
    local_world = env_int("LOCAL_WORLD_SIZE", 1, world, default=world)
    local_rank = env_int("LOCAL_RANK", 0, local_world - 1, default=0)
    addr = os.environ.get("MASTER_ADDR", "").strip()
    if not addr:
        raise cli.UserError(f"MASTER_ADDR is not set, but WORLD_SIZE={world}: name the host of rank 0 (torchrun sets it)")
    port = env_int("MASTER_PORT", 1, 65535)
    text = os.environ.get("DIST_JOIN_TIMEOUT_S", str(JOIN_TIMEOUT_S))
    join_s = float(text) if re.fullmatch(r"[0-9]+(\.[0-9]*)?", text) else math.nan
    if not 0 < join_s < 1e7:
        raise cli.UserError(f"DIST_JOIN_TIMEOUT_S={text!r}: must be a number of seconds > 0")
    return dict(world=world, rank=rank, local_world=local_world, local_rank=local_rank, addr=addr, port=port,
                join_s=join_s)


@contextlib.contextmanager
def cpp_log_held_back():
    """Hold back what is written to file descriptor 2 inside the block (c10d's C++ log: a retry, a timed-out
    poll, with stack frames): written out after the block, or dropped when the block raises a UserError, whose
    one line says what went wrong."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except cli.UserError:
            held.truncate(0)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            os.write(2, held.read())


def setup_ddp():
    """Under torchrun (WORLD_SIZE > 1): check the environment (ddp_environment), wait for every process at
    MASTER_ADDR:MASTER_PORT (at most DIST_JOIN_TIMEOUT_S seconds, else a UserError saying what it waited for),
    and join the process group (nccl on CUDA, gloo on CPU) with an hour's timeout for collectives.
    -> (rank, world_size, is_ddp). A plain `python file.py` gives (0, 1, False)."""
    env = ddp_environment()
    if env is None:
        return 0, 1, False
    import torch.distributed as dist
    # nccl when every process on this node has a GPU of its own; otherwise (a CPU, or more processes than
    # GPUs, as in the CPU tests on a one-GPU machine) gloo, with the tensors on the CPU
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= env["local_world"] else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env["local_rank"])
    if not dist.is_initialized():
        where = f"{env['addr']}:{env['port']} (MASTER_ADDR:MASTER_PORT)"
        start = time.monotonic()
        with cpp_log_held_back():
            try:
                # the rendezvous (every process connects to rank 0's store) and gloo's connections wait join_s,
                # the store's timeout; collectives get an hour, so that a long evaluation is not taken for a hang
                store, _, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=env["join_s"])))
                dist.init_process_group(backend, store=store, rank=env["rank"], world_size=env["world"],
                                        timeout=COLLECTIVE_TIMEOUT)
            except dist.DistError as e:
                reason = (str(e).strip().splitlines() or ["?"])[0][:200]
                if "time" in reason.lower():
                    raise cli.UserError(f"rank {env['rank']}: waited {time.monotonic() - start:.0f} s for the "
                                        f"{env['world']} processes of WORLD_SIZE={env['world']} to join at {where}: "
                                        f"start every rank, or raise DIST_JOIN_TIMEOUT_S={env['join_s']:g} "
                                        f"({reason})") from None
                raise cli.UserError(f"rank {env['rank']}: cannot join the processes at {where}: {reason}") from None
        store.set_timeout(COLLECTIVE_TIMEOUT)       # NCCL's lazy set-up reads the store at the first collective
    return dist.get_rank(), dist.get_world_size(), True


def cleanup_ddp() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_units(model) -> list:
    """The FSDP2 units inside `model` (the root first, then the blocks): [] for a model that is not sharded."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def shard_model(model: M.GPT, device, sum_gradients: bool = False) -> M.GPT:
    """Fully shard `model` (in place) over the default process group: each Block is one unit, then the root
    (embedding, final norm, LM head). Tied embeddings are one parameter, so wte and lm_head share one unit.

    Memory per rank for a full fine-tune with AdamW, P parameters, W ranks (activations apart):
        DDP:  16 P bytes            (bf16 weights and gradients, fp32 master weights and two moments)
        FSDP: 16 P / W bytes + the gathered bf16 weights of one or two units at a time
    Cost: each step all-gathers the weights twice (forward, backward) and reduce-scatters the gradients:
    1.5x DDP's all-reduce volume, overlapped with compute on CUDA.

    Mixed precision on CUDA (MixedPrecisionPolicy): units compute in bf16 from gathered bf16 weights, the
    gradients are reduced in fp32 into fp32 shards, and the optimizer updates fp32 master weights. On a CPU
    everything stays fp32 (gloo). Gradients are averaged over ranks, as DDP does; sum_gradients=True sums
    them instead (for a loss already divided by the whole batch's token count, as sft.py's is).

    The root keeps its gathered weights from the forward to the backward (FSDP's default for the root): the
    LM head runs after forward, in chunks, in token_logprobs. So after a forward under no_grad the root stays
    gathered until a backward or gathered()'s exit reshards it; an optimizer step taken in between would leave
    the next forward on the old root weights (model.reshard() first)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise cli.UserError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                            f"this is torch {torch.__version__}") from None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    device = torch.device(device)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    # the mesh on the run's device: fully_shard's default would take a GPU whenever one exists
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if model.config.ffn == "moe":   # an expert no token reached on one rank still joins the reduce-scatter
        model.set_reduce_scatter_unused_params(True)
    if sum_gradients:   # a plain SUM (gloo has no pre-multiplied sum, which a divide factor of 1 would use)
        for unit in fsdp_units(model):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def gathered(model):
    """Every rank holds the full weights inside the block: for generation and evaluation under FSDP
    (a no-op for a model that is not sharded). On entry, one all-gather per unit (collective: every rank
    enters); inside, forwards run on the gathered weights with no communication, so ranks may run different
    numbers of forwards (generate stops when its rows end) and rank 0 may evaluate alone; on exit the
    gathered copies are freed (local, no communication).

    Memory: the full weights in compute precision (2 P bytes in bf16) beside the shards, for the whole block,
    plus the KV cache. Time: one all-gather of 2 P bytes per block, instead of one per unit per forward
    (one per generated token). Production RL systems (verl, OpenRLHF) do not generate through the training
    model at all: a separate vLLM engine (paged KV cache, continuous batching, tensor parallelism) receives
    the new weights after each update and generates; the trainer only computes log-probabilities."""
    units = fsdp_units(model)
    for unit in units:
        unit.unshard()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)   # shard_model's setting
            unit.reshard()


def full_model(model, device="cpu"):
    """Collective: every rank calls it. Rank 0 gets a plain GPT holding the full fp32 weights, gathered from
    the shards (get_model_state_dict with full_state_dict=True, cpu_offload=True), for checkpoints.save and for
    evaluation in one process; the other ranks get None. A model that is not sharded is returned as it is."""
    if not fsdp_units(model):
        return model
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):     # allocates nothing: the gathered tensors become its parameters
        copy = M.GPT(model.config)
    copy.load_state_dict(state, assign=True)
    if model.config.tie_embeddings:
        copy.lm_head.weight = copy.wte.weight
    return copy.to(device)


def optimizer_parameter_names(model, optimizer) -> list[str]:
    """The name of each parameter of `optimizer`, in its param_groups order: index i of optimizer.state_dict()."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[param] for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_state(model, optimizer):
    """Collective. Rank 0: the full (unsharded) optimizer state in torch.optim's own format (state keyed by
    parameter index), the format optimizer.state_dict() gives one process, so a run saved under FSDP resumes
    in one process and the other way round. Other ranks: None. Not sharded: optimizer.state_dict()."""
    if not fsdp_units(model):
        return optimizer.state_dict()
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    index = {name: i for i, name in enumerate(optimizer_parameter_names(model, optimizer))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_full_optimizer_state(model, optimizer, state) -> None:
    """Collective. Load a full optimizer state (torch.optim's format, as full_optimizer_state or one process
    saved it) into the sharded optimizer: rank 0's copy is broadcast and each rank keeps its shards
    (set_optimizer_state_dict with full_state_dict=True, broadcast_from_rank0=True). Every rank checks the
    state's structure first (ValueError), so a state that does not fit fails on all ranks, not in a collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = optimizer_parameter_names(model, optimizer)
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    shapes = [tuple(param.shape) for group in optimizer.param_groups for param in group["params"]]
    if [len(group["params"]) for group in state["param_groups"]] != sizes:
        raise ValueError(f"parameter groups of sizes {sizes} expected")
    for i, values in state["state"].items():
        if not isinstance(i, int) or not 0 <= i < len(names):
            raise ValueError(f"state for parameter {i!r}, but the optimizer has {len(names)}")
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() and tuple(value.shape) != shapes[i]:
                raise ValueError(f"state {key} of parameter {names[i]} has shape {tuple(value.shape)}, not {shapes[i]}")
    named = {}
    if dist.get_rank() == 0:
        named = {"state": {names[i]: values for i, values in state["state"].items()},
                 "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                  for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def is_main(rank: int = 0) -> bool:
    return rank == 0

