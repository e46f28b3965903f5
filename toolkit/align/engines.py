"""Optimizer engines behind one interface (forward, backward, micro_step, lr, train, save, load, gathered):
a plain torch AdamW loop and DeepSpeed. Both restore checkpoints without unpickling arbitrary objects."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from toolkit.align.checkpoints import load_safetensors, load_tensors
from toolkit.align.distributed import Dist
from toolkit.align.objective import TERMS, Objective
from toolkit.capture import TokenBatch
from toolkit.config import AlignConfig
from toolkit.errors import UserError
from toolkit.models import LoadedModel

MAX_GRAD_NORM = 1.0
WARMUP_STEPS = 10  # linear warmup (at most a tenth of the run), then constant: extending `steps` keeps resuming


def _warmup(steps: int) -> Callable[[int], float]:
    warm = max(1, min(WARMUP_STEPS, steps // 10))
    return functools.partial(_warmup_factor, warm=warm)


def _warmup_factor(step: int, warm: int) -> float:
    return min(1.0, (step + 1) / warm)


class TorchEngine:
    """Plain AdamW loop; averages gradients over ranks itself when launched with several processes."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, a: AlignConfig, n_micro: int, dist: Dist):
        self.model, self.dist, self.n_micro = model, dist, n_micro
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=a.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup(a.steps))
        self._micro = 0

    def forward(self, **inputs):
        return self.model(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.n_micro).backward()

    def micro_step(self) -> None:
        self._micro += 1
        if self._micro % self.n_micro:
            return
        if self.dist.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.dist.world
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def save(self, folder: Path) -> None:
        if self.dist.main:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, load_safetensors(folder / "adapter" / "adapter_model.safetensors"))
        state = load_tensors(folder / "optimizer.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        yield


class DeepSpeedEngine:
    """deepspeed.initialize with a torch AdamW (no CPUAdam build), ZeRO, bf16 on GPUs, grad accumulation.

    ZeRO stages above 1 only partition gradients, which buys nothing on CPU, so CPU runs use at most 1.
    """

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, a: AlignConfig, n_micro: int, dist: Dist, lm: LoadedModel):
        import deepspeed

        self.model, self.dist = model, dist
        self.stage = a.zero_stage if lm.device.type == "cuda" else min(a.zero_stage, 1)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(a.steps))
        self.config = {
            "train_micro_batch_size_per_gpu": a.batch_size,
            "gradient_accumulation_steps": n_micro,
            "gradient_clipping": MAX_GRAD_NORM,
            "zero_optimization": {"stage": self.stage},
            "bf16": {"enabled": lm.dtype == torch.bfloat16},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)

    def forward(self, **inputs):
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself

    def micro_step(self) -> None:
        self.engine.step()  # steps the optimizer and scheduler only at accumulation boundaries

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, folder: Path) -> None:
        # every rank writes its optimizer partition; frozen base weights are not repeated
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        # DeepSpeed's TorchCheckpointEngine.load unpickles with weights_only=False (deepspeed 0.19); an instance
        # attribute shadows it, so every file load_checkpoint reads (model states, ZeRO optimizer partitions)
        # goes through weights_only=True with only DeepSpeed's own plain record types allowed besides.
        self.engine.checkpoint_engine.load = _weights_only_load
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False)
        if path is None:
            raise UserError(f"{folder}: DeepSpeed could not load its checkpoint; delete the folder to start afresh")

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full LoRA tensors on every rank: a no-op below ZeRO-3, which alone partitions parameters."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in self.model.parameters() if p.requires_grad]):
            yield


def _deepspeed_globals() -> list[type]:
    """The classes DeepSpeed pickles into its ZeRO checkpoints (loss scaler, stage enum, fragment record):
    rebuilt from their fields by torch's restricted unpickler, none runs code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(path: str, map_location=None):
    with torch.serialization.safe_globals(_deepspeed_globals()):
        return load_tensors(Path(path), map_location)


def make_engine(name: str, model: torch.nn.Module, a: AlignConfig, n_micro: int, dist: Dist, lm: LoadedModel):
    if name == "deepspeed":
        return DeepSpeedEngine(model, a, n_micro, dist, lm)
    return TorchEngine(model, a, n_micro, dist)


def optimizer_step(objective: Objective, eng, micro: list[tuple[TokenBatch, TokenBatch, str]],
                   grad_norms: bool = False) -> dict[str, float]:
    """One optimizer step of training: the objective, backward and micro-step on each (target batch, English
    batch, language) micro-batch; the engine steps once it has seen all of them. Returns the terms averaged,
    and with `grad_norms` (torch engine only) the norm of each weighted term's gradient on the first micro-batch
    (`grad_{term}`)."""
    sums = dict.fromkeys(TERMS, 0.0)
    for m, (target, english, lang) in enumerate(micro):
        losses = objective(eng.forward, target, english, lang)
        if grad_norms and m == 0 and eng.name == "torch":  # DeepSpeed's gradient hooks fire on any backward
            sums.update(term_grad_norms(objective, losses))
        eng.backward(losses["total"])
        eng.micro_step()
        for k in TERMS:
            sums[k] += losses[k].item() / len(micro)
    return sums


def term_grad_norms(objective: Objective, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """||d(weight x term) / d(LoRA parameters)|| of ce, align and keep: which term steers the adapter."""
    a = objective.a
    params = [p for p in objective.lm.model.parameters() if p.requires_grad]
    out = {}
    for name, weight in (("ce", 1.0), ("align", a.lambda_align), ("keep", a.lambda_keep)):
        term = losses[name] * weight
        if not term.requires_grad:
            out[f"grad_{name}"] = 0.0
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[f"grad_{name}"] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    return out
