"""nitp_ds/one_pass_adamw.py: the one-pass update is torch's fused Adam(W), step for step.

The update runs eagerly and traced by torch.compile (the aot_eager backend: the graph a GPU compiles into one
kernel, with its in-place writes) against torch.optim.AdamW/Adam(fused=True) on the same master weights, with
gradients in bf16 and fp32, a clip scale, weight decay decoupled or not, and a learning rate that changes every
step. The training-level check against DeepSpeed's own step is in tests/test_train_options.py.
"""

from __future__ import annotations

import pytest
import torch

from nitp_ds.one_pass_adamw import adamw_update


def run_both(update, grad_dtype: torch.dtype, decoupled: bool, weight_decay: float, scale: float | None):
    torch.manual_seed(0)
    master = torch.randn(4099)  # not a multiple of any vector width
    ref = master.clone().requires_grad_()
    opt_class = torch.optim.AdamW if decoupled else torch.optim.Adam
    reference = opt_class([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, fused=True)
    exp_avg, exp_avg_sq = torch.zeros_like(master), torch.zeros_like(master)
    step, out = torch.zeros(()), torch.empty(master.shape, dtype=grad_dtype)
    for i in range(5):
        lr = 1e-2 * (i + 1) / 5  # a schedule: a new learning rate every step
        grad = torch.randn(master.shape).to(grad_dtype)
        reference.param_groups[0]["lr"] = lr
        reference.grad_scale = None if scale is None else torch.full((1,), scale)
        ref.grad = grad.float().clone()  # torch writes the unscaled gradient back into .grad
        reference.step()
        update(master, grad, exp_avg, exp_avg_sq, out, step, torch.tensor(lr), torch.tensor(scale or 1.0),
               0.9, 0.95, 1e-8, weight_decay, decoupled)
    state = reference.state[ref]
    return master, ref.detach(), (exp_avg, exp_avg_sq, step, out), state


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("grad_dtype,decoupled,weight_decay,scale", [
    (torch.bfloat16, True, 0.1, 3.0), (torch.float32, True, 0.0, None), (torch.float32, False, 0.1, 2.0)],
    ids=["bf16-adamw-clipped", "fp32-no-decay", "fp32-adam-l2"])
def test_one_pass_update_is_torch_fused_adamw(compiled, grad_dtype, decoupled, weight_decay, scale):
    update = torch.compile(adamw_update, backend="aot_eager", fullgraph=True, dynamic=True) if compiled \
        else adamw_update
    master, ref, (exp_avg, exp_avg_sq, step, out), state = run_both(update, grad_dtype, decoupled, weight_decay,
                                                                    scale)
    assert float(step) == float(state["step"]) == 5
    torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(master, ref, rtol=1e-6, atol=1e-7)
    assert out.dtype == grad_dtype
    assert torch.equal(out, master.to(grad_dtype))  # the partition the model reads is the new master weights
    moved = (master - torch.randn(4099, generator=torch.Generator().manual_seed(0))).abs().max()
    assert moved > 1e-3  # the weights did move
