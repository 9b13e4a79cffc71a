"""Adafactor against transformers' Adafactor, step by step; schedules against transformers' schedules."""

from __future__ import annotations

import pytest
import torch

from t5kit.optim import Adafactor, get_scheduler

from conftest import hf


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # A matrix (factored), a 3-D tensor (factored over the last two dims) and a vector (not factored).
    return [torch.randn(6, 5, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(7, generator=g)]


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # T5's defaults: relative step, parameter scaling, no first moment
        dict(warmup_init=True),
        dict(lr=1e-2, relative_step=False, scale_parameter=False),
        dict(lr=3e-3, relative_step=False, beta1=0.9, weight_decay=0.01, clip_threshold=0.5, decay_rate=-0.6),
        dict(scale_parameter=False, eps=(1e-20, 1e-2)),
    ],
)
def test_adafactor_equals_reference_step_by_step(options):
    reference_cls = hf().optimization.Adafactor
    ours = [torch.nn.Parameter(p.clone()) for p in _params()]
    ref = [torch.nn.Parameter(p.clone()) for p in _params()]
    opt, ref_opt = Adafactor(ours, **options), reference_cls(ref, **options)
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        grads = [torch.randn(p.shape, generator=g) * (step + 1) for p in ours]
        for p, q, grad in zip(ours, ref, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.data, q.data, rtol=1e-6, atol=1e-7, msg=f"step {step}")


def test_adafactor_bf16_params_keep_fp32_statistics():
    p = torch.nn.Parameter(torch.randn(4, 4).bfloat16())
    opt = Adafactor([p], lr=1e-2, relative_step=False)
    p.grad = torch.randn(4, 4).bfloat16()
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg_sq_row"].dtype == torch.float32


def test_adafactor_bad_options():
    with pytest.raises(ValueError, match="relative_step"):
        Adafactor([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    with pytest.raises(ValueError, match="warmup_init"):
        Adafactor([torch.nn.Parameter(torch.ones(2))], lr=1e-3, relative_step=False, warmup_init=True)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "inverse_sqrt"])
def test_schedules_equal_reference(name):
    optimization = hf().optimization
    reference = {
        "constant": lambda o: optimization.get_constant_schedule(o),
        "constant_with_warmup": lambda o: optimization.get_constant_schedule_with_warmup(o, 10),
        "linear": lambda o: optimization.get_linear_schedule_with_warmup(o, 10, 50),
        "inverse_sqrt": lambda o: optimization.get_inverse_sqrt_schedule(o, 10),
    }[name]
    opts = [torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1) for _ in range(2)]
    ours, ref = get_scheduler(name, opts[0], 10, 50), reference(opts[1])
    for _ in range(60):
        assert ours.get_last_lr() == pytest.approx(ref.get_last_lr(), rel=1e-12)
        opts[0].step(), opts[1].step(), ours.step(), ref.step()
    with pytest.raises(ValueError, match="Unknown schedule"):
        get_scheduler("cosine-ish", opts[0])
