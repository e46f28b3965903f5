"""The LoRA adapter: attaching it, its tensors, and saving it in peft format verified to read back equal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from toolkit import files
from toolkit.align.distributed import Dist
from toolkit.config import AlignConfig
from toolkit.errors import UserError


def attach_lora(model: torch.nn.Module, a: AlignConfig, n_layers: int) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA model (B = 0 at start, so it begins as the base model)."""
    from peft import LoraConfig, get_peft_model

    from toolkit.config import parse_layers

    targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
    layers = parse_layers(a.lora_layers, n_layers)
    config = LoraConfig(
        r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, target_modules=targets,
        layers_to_transform=None if len(layers) == n_layers else layers,
        layers_pattern=None if len(layers) == n_layers else "layers", task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft names the modules it could not find
        raise UserError(f"align.lora_targets {a.lora_targets!r}: {exc}") from None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors as peft saves them (adapter name stripped), detached copies on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapter(model: torch.nn.Module, engine, dist: Dist, target: Path, trained: bool = True
                 ) -> dict[str, torch.Tensor]:
    """Save the peft adapter atomically (rank 0) from gathered parameters and check it reads back equal.

    Returns the saved tensors. Raises if the file differs from the trained weights, or if `trained`
    and every lora_B is still zero (LoRA starts with B = 0, so that is an adapter that learnt nothing).
    """
    from safetensors.torch import load_file

    with engine.gathered():
        state = trainable_state(model)
        if dist.main:
            with files.staged(target, replace_dir=True) as tmp:
                model.save_pretrained(str(tmp))
                saved = load_file(str(tmp / "adapter_model.safetensors"))
                bad = sorted(set(state) ^ set(saved)) or [k for k in state if not torch.equal(state[k], saved[k].cpu())]
                if bad:
                    raise RuntimeError(f"the adapter saved to {target} differs from the trained weights ({bad[:3]})")
                if trained and not any(bool(v.any()) for k, v in saved.items() if "lora_B" in k):
                    raise RuntimeError(f"the adapter saved to {target} is empty (every lora_B is zero) after training")
    dist.barrier()
    return state


def adapter_sha(adapter: Path) -> str:
    h = hashlib.sha256()
    with open(adapter / "adapter_model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
