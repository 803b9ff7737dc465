"""Data parallelism for the engine: wrapping the model (DDP, or FSDP2's `fully_shard`), skipping the
gradient exchange on all but the last micro-batch, and optimizer state and weights in one full format
keyed by parameter name, whichever way the run was split, so a checkpoint is the same folder from one
process, from DDP or from FSDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from kiln.distributed import DistributedError, World
from kiln.errors import ConfigError
from kiln.model.gpt import GPT
from kiln.train.optim import OptimConfig


def check_optimizer_fits(optim: OptimConfig, parallel: str, world: World) -> None:
    if world.distributed and parallel == "fsdp" and optim.optimizer == "muon":
        raise ConfigError("optimizer muon needs each weight matrix whole; with parallel=fsdp use optimizer=adamw")


def wrap_model(module: nn.Module, parallel: str, world: World, device: torch.device) -> tuple[nn.Module, float]:
    """The model that runs the training steps, and a factor for the loss that undoes a gradient
    reduction that is not a plain mean (see `fsdp_gradient_factor`)."""
    if not world.distributed:
        return module, 1.0
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids), 1.0
    from torch.distributed.fsdp import fully_shard

    if not isinstance(module, GPT):
        raise ConfigError("parallel=fsdp shards a whole GPT; LoRA adapters are small, train them with parallel=ddp")
    factor = 1.0 / fsdp_gradient_factor(world, device)
    for block in module.blocks:
        fully_shard(block)
    fully_shard(module)
    return module, factor


def fsdp_gradient_factor(world: World, device: torch.device) -> float:
    """What FSDP2's gradient reduction gives over the mean of the ranks' gradients, measured on a tiny
    layer: 1.0 when it is right. Some torch releases multiplied gradients by the world size on gloo."""
    from torch.distributed.fsdp import fully_shard

    probe = nn.Linear(world.size * 2, world.size * 2, bias=False, device=device)
    torch.nn.init.zeros_(probe.weight)
    fully_shard(probe)
    inputs = torch.full((1, world.size * 2), float(world.rank + 1), device=device)
    probe(inputs).sum().backward()
    measured = float(probe.weight.grad.full_tensor()[0, 0])
    expected = (world.size + 1) / 2  # the mean of 1, 2, ..., world size
    factor = measured / expected
    if not 0.5 < factor < 2 * world.size:
        raise DistributedError(f"FSDP's gradient reduction gave {measured}, expected {expected}; use parallel=ddp")
    return factor


@contextlib.contextmanager
def sync_gradients(step_model: nn.Module, parallel: str, world: World, now: bool) -> Iterator[None]:
    """Exchange gradients in this micro-batch's backward only when `now` (the step's last one)."""
    if not world.distributed:
        yield
    elif parallel == "ddp":
        with contextlib.nullcontext() if now else step_model.no_sync():
            yield
    else:
        step_model.set_requires_gradient_sync(now)
        yield


def reshard(module: nn.Module, parallel: str, world: World) -> None:
    """After a forward with no backward (evaluation), put FSDP's root weights back into their shards:
    FSDP2 keeps the root's gathered after forward for the backward that usually follows."""
    if _sharded(parallel, world):
        module.reshard()


def _sharded(parallel: str, world: World) -> bool:
    return world.distributed and parallel == "fsdp"


def _parameter_names(module: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


def optimizer_states(module: nn.Module, optimizers: list, parallel: str, world: World) -> list[dict]:
    """Each optimizer's state keyed by parameter name (torch.distributed.checkpoint's full form); under
    FSDP gathered onto rank 0's CPU (a collective: every rank calls it)."""
    if _sharded(parallel, world):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return [get_optimizer_state_dict(module, optimizer, options=options) for optimizer in optimizers]
    names = _parameter_names(module)
    states = []
    for optimizer in optimizers:
        state_dict = optimizer.state_dict()
        index_names = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        states.append(
            {
                "state": {index_names[i]: values for i, values in state_dict["state"].items()},
                "param_groups": [
                    {**group, "params": [index_names[i] for i in group["params"]]}
                    for group in state_dict["param_groups"]
                ],
            }
        )
    return states


def load_optimizer_states(module: nn.Module, optimizers: list, states: list[dict], parallel: str, world: World) -> None:
    """The inverse of `optimizer_states`, onto optimizers built for `module` as it is now."""
    if len(states) != len(optimizers):
        raise ConfigError(
            f"the checkpoint holds {len(states)} optimizer state(s) but this run builds {len(optimizers)}; "
            "resume with the optimizer it was trained with"
        )
    if _sharded(parallel, world):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        for optimizer, state in zip(optimizers, states, strict=True):
            set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    names = _parameter_names(module)
    for optimizer, state in zip(optimizers, states, strict=True):
        if all(isinstance(i, int) for group in state["param_groups"] for i in group["params"]):  # older: by index
            optimizer.load_state_dict(state)
            continue
        groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        saved_groups = [group["params"] for group in state["param_groups"]]
        if [sorted(g) for g in groups] != [sorted(g) for g in saved_groups]:
            raise ConfigError(
                "the checkpoint's optimizer state is for other trainable weights than this run has; "
                "resume with the same model and settings"
            )
        index = {name: i for i, name in enumerate(name for group in groups for name in group)}
        optimizer.load_state_dict(
            {
                "state": {index[name]: values for name, values in state["state"].items()},
                "param_groups": [
                    {**saved, "params": [index[name] for name in group]}
                    for saved, group in zip(state["param_groups"], groups, strict=True)
                ],
            }
        )


def full_model_copy(module: nn.Module, parallel: str, world: World) -> nn.Module | None:
    """The model as one process holds it, for writing a checkpoint: the module itself, or under FSDP a
    CPU copy gathered on rank 0 (None on the other ranks; every rank must call it)."""
    if not _sharded(parallel, world):
        return module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    copy = GPT(module.config).to(next(iter(state.values())).dtype)
    copy.load_state_dict(state)
    return copy
