"""Optimizers and learning-rate schedules for T5.

``Adafactor`` (Shazeer & Stern, 2018) is T5's optimizer: factored second moments (row and column
statistics for matrices) keep its state tiny. Its semantics are the reference's (fairseq's, as
transformers has it): ``scale_parameter``, ``relative_step``, ``warmup_init``, ``clip_threshold``,
``decay_rate``, ``beta1``, ``weight_decay``. AdamW is ``torch.optim.AdamW``.

Schedules (``torch.optim.lr_scheduler.LambdaLR``): constant, constant with warm-up, linear warm-up
then linear decay, inverse square root (T5's pre-training schedule).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "Adafactor",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_linear_schedule_with_warmup",
    "get_inverse_sqrt_schedule",
    "get_scheduler",
]


class Adafactor(Optimizer):
    """Adafactor with the reference's options.

    Args:
        lr: External learning rate; must be None with ``relative_step=True`` (the step size is then
            ``min(1e-2, 1/sqrt(step))``, or ``min(1e-6 * step, 1/sqrt(step))`` with ``warmup_init``).
        eps: (regulariser added to squared gradients, floor of the parameter scale).
        clip_threshold: Updates are scaled down so that their RMS is at most this.
        decay_rate: Second-moment decay ``1 - step**decay_rate``.
        beta1: First-moment decay; None keeps no first moment (T5's default).
        weight_decay: Decoupled weight decay, times the step size.
        scale_parameter: Multiply the step size by the parameter's RMS (at least ``eps[1]``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
    ) -> None:
        if lr is not None and relative_step:
            raise ValueError("Cannot combine a manual lr with relative_step=True; pass relative_step=False")
        if warmup_init and not relative_step:
            raise ValueError("warmup_init=True requires relative_step=True")
        if not relative_step and lr is None:
            raise ValueError("relative_step=False needs an lr")
        defaults = dict(
            lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
            warmup_init=warmup_init,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _lr(group: dict[str, Any], state: dict[str, Any]) -> float:
        step_size = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
            step_size = min(min_step, 1.0 / math.sqrt(state["step"]))
        scale = max(group["eps"][1], float(state["RMS"])) if group["scale_parameter"] else 1.0
        return scale * step_size

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                grad = p.grad.float()  # statistics in float32 whatever the parameter dtype
                state = self.state[p]
                factored = grad.dim() >= 2
                if not state:
                    state["step"] = 0
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                    if factored:
                        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])  # (..., rows)
                        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])  # (..., cols)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["RMS"] = 0.0
                p32 = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
                state["step"] += 1
                state["RMS"] = self._rms(p32)
                lr = self._lr(group, state)
                beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
                update = grad.square() + group["eps"][0]
                if factored:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
                    col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
                    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                    update = (r * col.unsqueeze(-2).rsqrt()).mul_(grad)
                else:
                    sq = state["exp_avg_sq"]
                    sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
                    update = sq.rsqrt().mul_(grad)
                update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
                update.mul_(lr)
                if group["beta1"] is not None:
                    exp_avg = state["exp_avg"]
                    exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                    update = exp_avg
                if group["weight_decay"] != 0:
                    p32.add_(p32, alpha=-group["weight_decay"] * lr)
                p32.add_(-update)
                if p32 is not p:
                    p.copy_(p32)
        return loss


def _constant(step: int) -> float:
    return 1.0


def _constant_warmup(step: int, *, warmup: int) -> float:
    return min(1.0, step / max(1, warmup))


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def get_constant_schedule(optimizer: Optimizer, last_epoch: int = -1) -> LambdaLR:
    """The optimizer's learning rate, unchanged."""
    return LambdaLR(optimizer, _constant, last_epoch=last_epoch)


def get_constant_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int, last_epoch: int = -1) -> LambdaLR:
    """Linear warm-up from 0 over ``num_warmup_steps``, then constant."""
    return LambdaLR(optimizer, partial(_constant_warmup, warmup=num_warmup_steps), last_epoch=last_epoch)


def get_linear_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1) -> LambdaLR:
    """Linear warm-up, then linear decay to 0 at ``num_training_steps``."""
    return LambdaLR(optimizer, partial(_linear, warmup=num_warmup_steps, total=num_training_steps), last_epoch=last_epoch)


def get_inverse_sqrt_schedule(optimizer: Optimizer, num_warmup_steps: int, timescale: int | None = None, last_epoch: int = -1) -> LambdaLR:
    """Linear warm-up, then ``1 / sqrt((step + shift) / timescale)`` (timescale defaults to the warm-up)."""
    timescale = timescale or num_warmup_steps or 10_000
    return LambdaLR(optimizer, partial(_inverse_sqrt, warmup=num_warmup_steps, timescale=timescale), last_epoch=last_epoch)


def get_scheduler(name: str, optimizer: Optimizer, num_warmup_steps: int = 0, num_training_steps: int | None = None) -> LambdaLR:
    """A schedule by name: ``constant``, ``constant_with_warmup``, ``linear``, ``inverse_sqrt``."""
    if name == "constant":
        return get_constant_schedule(optimizer)
    if name == "constant_with_warmup":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps)
    if name == "linear":
        if num_training_steps is None:
            raise ValueError("the linear schedule needs num_training_steps")
        return get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
    if name == "inverse_sqrt":
        return get_inverse_sqrt_schedule(optimizer, num_warmup_steps)
    raise ValueError(f"Unknown schedule {name!r}: use constant, constant_with_warmup, linear or inverse_sqrt")
