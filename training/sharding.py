"""Sharded training (torch's FSDP2) for the fit loop: the launch, the sharding, sharded checkpoints.

What runs how is decided before any work (``launch_settings``): ``run.strategy: fsdp`` in the config, or an
``accelerate launch`` with an FSDP config (``ACCELERATE_USE_FSDP`` and accelerate's ``FSDP_*`` variables).
A DeepSpeed launch, FSDP version 1, parameter offload or fp16 is refused there with a one-line reason.

``shard_loss_module`` applies ``fully_shard`` to every decoder layer of the language model, to every block
of a trained image encoder, then to the root (the loss module), with an optional bf16 mixed-precision
policy (fp32 master weights and fp32 gradient reduction) and activation checkpointing per layer. A frozen
image encoder is not sharded: it has no gradients or optimizer state, and the feature cache runs it outside
the root's forward, where sharded parameters would not be gathered.

A sharded checkpoint is a ``torch.distributed.checkpoint`` folder (``sharded/``: every rank writes its
shards of the trainable parameters and of the optimizer state) beside the usual ``model.safetensors`` of the
trained parts (gathered; rank 0 writes it), so ``rcmed segment --weights`` reads either kind of run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

STRATEGIES = ("ddp", "fsdp")
MIXED_PRECISION = ("auto", "bf16", "no")
FSDP_LAUNCH = "accelerate launch --config_file configs/accelerate_syre7b_fsdp.yaml"


class UnsupportedLaunch(ValueError):
    """A launch or setting the loop does not run; raised before any work, with a one-line reason."""


def _env_true(env, name: str, default: str = "false") -> bool:
    return env.get(name, default).strip().lower() in ("true", "1", "yes")


def launch_settings(run, env=os.environ):
    """``run`` (a RunConfig) as this launch runs it: an accelerate FSDP launch sets strategy, mixed precision
    and activation checkpointing from its config; what the loop cannot run raises UnsupportedLaunch."""
    if _env_true(env, "ACCELERATE_USE_DEEPSPEED"):
        raise UnsupportedLaunch(f"DeepSpeed launches are not supported; shard with FSDP instead: {FSDP_LAUNCH} "
                                "-m rcmed_training.cli fit CONFIG.yaml")
    if _env_true(env, "ACCELERATE_USE_FSDP"):
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise UnsupportedLaunch(f"FSDP version {version} is not supported: set fsdp_version: 2 in the accelerate "
                                    "config (configs/accelerate_syre7b_fsdp.yaml)")
        for key, want in (("FSDP_OFFLOAD_PARAMS", False), ("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", False),
                          ("FSDP_RESHARD_AFTER_FORWARD", True)):
            if _env_true(env, key, str(want)) != want:
                raise UnsupportedLaunch(f"{key.lower()}: {str(not want).lower()} is not supported under FSDP: "
                                        f"set it to {str(want).lower()} in the accelerate config")
        mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if mixed not in ("no", "bf16"):
            raise UnsupportedLaunch(f"mixed precision {mixed!r} is not supported under FSDP: use bf16 or no "
                                    "(fp16 would need a gradient scaler)")
        run = dataclasses.replace(run, strategy="fsdp", mixed_precision=mixed,
                                  activation_checkpointing=_env_true(env, "FSDP_ACTIVATION_CHECKPOINTING"))
    if run.strategy not in STRATEGIES:
        raise UnsupportedLaunch(f"run.strategy must be one of {list(STRATEGIES)}, not {run.strategy!r}")
    if run.mixed_precision not in MIXED_PRECISION:
        raise UnsupportedLaunch(f"run.mixed_precision must be one of {list(MIXED_PRECISION)}, "
                                f"not {run.mixed_precision!r}")
    if run.strategy == "ddp" and (run.mixed_precision != "auto" or run.activation_checkpointing):
        raise UnsupportedLaunch("run.mixed_precision and run.activation_checkpointing apply to run.strategy: fsdp")
    if run.strategy == "fsdp" and "WORLD_SIZE" not in env:
        raise UnsupportedLaunch(f"run.strategy: fsdp needs a launcher: torchrun --nproc_per_node N or {FSDP_LAUNCH}")
    return run


def param_dtype(mixed: str, device: torch.device) -> torch.dtype | None:
    """The dtype layers compute in under FSDP: bf16 on CUDA by default, the master weights' dtype on the CPU."""
    if mixed == "bf16" or (mixed == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _blocks(module: nn.Module) -> list[nn.Module]:
    """A SAM ViT's blocks or a TinyViT's stages: the encoder's repeated units."""
    for name in ("blocks", "layers"):
        units = getattr(module, name, None)
        if isinstance(units, nn.ModuleList) and len(units):
            return list(units)
    return []


class Sharded:
    """The FSDP-wrapped loss module, and what the loop must do that DDP did through hooks."""

    def __init__(self, module: nn.Module, row_masks: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        self.module = module
        self.row_masks = row_masks

    def grad_sync(self, enabled: bool) -> None:
        """Off for all but the last micro-batch of an accumulated step (DDP's no_sync)."""
        self.module.set_requires_gradient_sync(enabled)

    @torch.no_grad()
    def mask_rows(self) -> None:
        """Rows-only embeddings (set_trainable's added tokens): their hook went with the parameter FSDP
        replaced, so the gradient's frozen rows are zeroed here, on each rank's shard."""
        for p, keep in self.row_masks:
            if p.grad is not None:
                p.grad.to_local().mul_(keep)


def _cast_inputs_to_own_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def shard_loss_module(module: nn.Module, device: torch.device, mixed: str = "auto", checkpointing: bool = False,
                      reshard_after_forward: bool = True) -> Sharded:
    """fully_shard per language-model decoder layer, per trained image-encoder block, then the root.

    ``module`` is a LossModule (``.rcmed`` the model, parameters' requires_grad already set); it may still be
    on the CPU: fully_shard moves each group to ``device`` as it shards it. Needs the process group."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = module.rcmed
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = param_dtype(mixed, device)
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
          "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)}
    row_masks = {n: p._rcmed_row_mask for n, p in module.named_parameters() if hasattr(p, "_rcmed_row_mask")}
    encoder = model.image_encoder
    frozen_encoder = not any(p.requires_grad for p in encoder.parameters())
    layers = list(model.language_model.model.layers) + ([] if frozen_encoder else _blocks(encoder))
    for layer in layers:
        if checkpointing:
            checkpoint(layer)  # composable: recomputes the layer in backward, keeps parameter names
        fully_shard(layer, **kw)
    ignored = None
    if frozen_encoder:
        encoder.to(device=device, dtype=dtype)
        encoder.register_forward_pre_hook(_cast_inputs_to_own_dtype)  # the feature cache calls it with fp32
        ignored = set(encoder.parameters())
    fully_shard(module, ignored_params=ignored, **kw)
    module.touch_unused = True
    params = dict(module.named_parameters())
    masks = []
    for name, keep in row_masks.items():
        p = params[name]
        p._rcmed_row_mask = keep  # make_optimizer: no weight decay (the new parameter lost the mark)
        local = distribute_tensor(keep.to(device, p.dtype), mesh, p.placements).to_local()
        masks.append((p, local))
    return Sharded(module, masks)


# ------------------------------------------------------------------------------------------- gathering
def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered (a collective: every rank calls it), any other as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_trained_state(model, include: tuple[str, ...], dtype: torch.dtype | None, keep: bool) -> dict:
    """``trained_state_dict`` of a sharded RCMed: the same keys, gathered tensor by tensor on every rank
    (in one order), kept on the CPU only where ``keep`` (rank 0)."""
    from rcmed_engine.model.checkpoint import ADDED_TOKENS_KEY
    from rcmed_engine.model.rcmed import added_token_rows

    state = model.state_dict()
    names = list(dict.fromkeys(model.rcmed_parameter_names() + [n for n in state if include and n.startswith(include)]))
    embed = model.language_model.get_input_embeddings().weight
    embed_name = next(n for n, p in model.named_parameters() if p is embed)
    out = {}
    for name in names + ([] if embed_name in names else [embed_name]):
        tensor = full(state[name].detach())
        if keep:
            out[name] = tensor.to("cpu", copy=True).contiguous()
    if not keep:
        return {}
    rows = out[embed_name] if embed_name in names else out.pop(embed_name)
    out[ADDED_TOKENS_KEY] = rows[added_token_rows(model)].clone()
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------ checkpoints
def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Trainable parameters only: the frozen base comes from the config's weights, not from every checkpoint.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank's shards of the trainable parameters and the optimizer state, written to a temporary
    folder that rank 0 then renames to ``folder``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer, options=_state_options())
    tmp = folder.with_name(f".{folder.name}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    dist.barrier()


def load_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """``save_sharded``'s folder back into the sharded parameters and the optimizer (any world size:
    DCP reshards on load). Refuses, naming one, a checkpoint that lacks a trainable parameter."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer, options=_state_options())
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    missing = [k for k in model_sd if f"model.{k}" not in saved]
    if missing:
        raise ValueError(f"{folder} lacks trainable parameters {missing[:3]}… (was model.train changed?)")
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_options())
