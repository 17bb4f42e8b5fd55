"""Data parallelism under torchrun: DDP (gloo on a CPU, nccl on CUDA) and FSDP2's fully_shard.

    torchrun --nproc_per_node 2 sft.py            # DDP: every rank holds the whole model
    torchrun --nproc_per_node 2 sft.py --fsdp     # FSDP2: every rank holds 1/world of it

A plain python x.py run is one process and none of this is used.

FSDP2 (Zhao et al. 2023, "PyTorch FSDP"; torch.distributed.fsdp.fully_shard): every rank keeps 1/world of each
parameter (a DTensor sharded on dim 0), of its gradient and of the optimizer state built on it. A unit's
forward all-gathers its parameters and frees them after; its backward reduce-scatters the gradients. Under
torchrun, after setup_ddp: shard_model, then build the optimizer on the sharded parameters.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch

import model as M
from lib import cli


def setup_ddp():
    """Under torchrun (RANK/WORLD_SIZE set): join the process group (nccl on CUDA, gloo on CPU).
    -> (rank, world_size, is_ddp). A plain `python file.py` gives (0, 1, False)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist
    # nccl when every process on this node has a GPU of its own; otherwise (a CPU, or more processes than
    # GPUs, as in the CPU tests on a one-GPU machine) gloo, with the tensors on the CPU
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # rank 0 evaluates alone while the other ranks wait at the next collective: a timeout of an hour instead
        # of NCCL's default 10 minutes, so that a long evaluation of a real model is not taken for a hang
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
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

