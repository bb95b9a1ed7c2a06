"""Loss functions: chunked next-token cross-entropy, the NITP loss (cosine or MSE), router balancing losses.

All of them take `labels` with -100 at ignored positions, so NTP and NITP are masked alike.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE = -100


def _xent_grad(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
               acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy and its gradient w.r.t. the logits, in the logits' dtype.

    Written as pure elementwise ops and row reductions so that `torch.compile` fuses it into a
    row-reduction kernel (logsumexp) and one pointwise pass that reads the bf16 logits and writes the
    bf16 gradient, instead of eager PyTorch's fp32 cast, softmax, scatter and mask passes.
    """
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    picked = x.gather(1, labels.unsqueeze(1))
    loss = ((lse - picked).squeeze(1) * valid).sum()
    columns = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    target = (columns == labels.unsqueeze(1)).to(acc)
    grad = (torch.exp(x - lse) - target) * valid.unsqueeze(1)
    return loss, grad.to(logits.dtype)


def _xent_grad_eager(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                     acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`_xent_grad` in place, for eager execution (the CPU, or `train.compile_loss: false`)."""
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, labels.unsqueeze(1)).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    grad = torch.softmax(x, dim=-1)
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    grad *= valid.unsqueeze(1)
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_xent_grad():
    return torch.compile(_xent_grad, dynamic=False, fullgraph=True)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of `hidden @ weight.T` against `labels`, `chunk` rows at a time.

    The full-vocabulary logits are never materialised for the whole batch: each chunk's logits
    live only while its loss and gradients are computed. Gradients are computed during the
    forward pass (when grad is enabled) and scaled in backward, so nothing is recomputed.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                compiled: bool):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        xent_grad = _compiled_xent_grad() if compiled else _xent_grad_eager
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        single = hidden.shape[0] <= chunk  # one chunk: its weight gradient needs no fp32 accumulator
        grad_weight = None
        if ctx.needs_input_grad[1] and not single:
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            y = labels[start:start + chunk]
            valid = y != IGNORE
            safe_y = torch.where(valid, y, torch.zeros_like(y))
            logits = h @ weight.t()
            if not needs_grad:
                x = logits.to(acc)
                picked = x.gather(1, safe_y.unsqueeze(1)).squeeze(1)
                total += ((torch.logsumexp(x, dim=-1) - picked) * valid).sum()
                continue
            loss, grad_logits = xent_grad(logits, safe_y, valid.to(acc), acc)
            total += loss
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad_logits @ weight
            if ctx.needs_input_grad[1]:
                if single:
                    grad_weight = grad_logits.t() @ h
                else:
                    grad_weight += (grad_logits.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0),
                              grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_output.to(grad_weight.dtype)).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def use_compiled_loss(setting: bool | None, device: torch.device) -> bool:
    """`train.compile_loss`: None means on for CUDA devices (Triton kernels), off elsewhere."""
    return device.type == "cuda" if setting is None else setting


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 8192, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over positions whose label is not -100, and their count.

    `hidden` is [..., d] (the state fed to the LM head), `weight` the LM head [V, d], `labels` [...].
    With `compiled`, each chunk's softmax gradient runs as `torch.compile`d kernels (same values up
    to rounding; see `_xent_grad`).
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    count = (flat_y != IGNORE).sum()
    total = _LinearCrossEntropy.apply(flat_h, weight, flat_y, chunk_tokens, compiled)
    return total / count.clamp(min=1), count


def cross_entropy_per_row(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of each row and its count of scored positions (no gradient).

    `hidden` is [B, T, d], `labels` [B, T]; returns two float32 tensors [B]. The same per-token loss as
    `chunked_cross_entropy` (fp32 log-sum-exp, `chunk_tokens` rows of logits at a time), kept per row
    so that an evaluation can give a standard error over sequences.
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    per_token = torch.empty(flat_y.shape, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, flat_h.shape[0], chunk_tokens):
            y = flat_y[start:start + chunk_tokens]
            valid = y != IGNORE
            x = (flat_h[start:start + chunk_tokens] @ weight.t()).float()
            picked = x.gather(1, torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)).squeeze(1)
            per_token[start:start + chunk_tokens] = (torch.logsumexp(x, dim=-1) - picked) * valid
    rows = labels.shape[0]
    return per_token.reshape(rows, -1).sum(1), (labels != IGNORE).reshape(rows, -1).sum(1).float()


def nitp_loss(prediction: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, kind: str = "cosine",
              offset: int = 1) -> torch.Tensor:
    """L_NITP, the mean over positions t whose label is kept of a distance between P(h_t) and z_{t+offset}.

    `prediction` and `target` are [B, T, d] at the same positions t = 0..T-1. With `offset` 1 (the paper)
    the target of position t is taken at t+1, so the last position has none and is dropped; with 0 it is
    the target at t itself. `kind` "cosine" is the paper's 1 - cos(P(h_t), z); "mse" is the mean over the
    d features of (P(h_t) - z)^2 (the paper's MSE ablation). The target is used as given: the caller
    detaches it for the paper's stop-gradient (`NITPModel` does, unless `nitp.stop_grad` is false).
    """
    length = prediction.shape[1]
    pred = prediction[:, :length - offset].float()
    tgt = target[:, offset:].float()
    mask = (labels[:, :length - offset] != IGNORE).float()
    if kind == "cosine":
        per_position = 1.0 - F.cosine_similarity(pred, tgt, dim=-1, eps=1e-6)
    elif kind == "mse":
        per_position = (pred - tgt).pow(2).mean(dim=-1)
    else:
        raise ValueError(f"unknown NITP loss kind {kind!r}")
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


@functools.cache
def compiled_nitp_loss():
    """`nitp_loss` as `torch.compile`d kernels: its fp32 casts, cosine and masked mean fused into a few passes
    instead of some twenty eager kernels forward and thirty backward (each a launch on a host-bound step)."""
    return torch.compile(nitp_loss, dynamic=False, fullgraph=True)


def router_losses(router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None,
                  group=None) -> dict[str, torch.Tensor]:
    """Switch/Mixtral-style load-balancing loss, router z-loss, and tokens per expert.

    Per MoE layer with router logits [N, E]: p = softmax(logits); f_e = fraction of the N·k top-k
    assignments that go to expert e; P_e = mean of p_e over tokens; aux = E · Σ_e f_e · P_e
    (1.0 when perfectly balanced). z = mean over tokens of logsumexp(logits)². Both are averaged
    over layers. With `group`, the assignment counts f are summed over that process group first
    (global-batch balancing); P stays local so its gradient is the local one.
    """
    if not router_logits:
        zero = torch.zeros(())
        return {"aux": zero, "z": zero, "load": torch.zeros(0, 0)}
    # All layers at once ([L, N, E]): a few kernels per step instead of a dozen per layer, which on a
    # host-bound step (shape A of bench/gpu_compare.py, 16 layers) is CPU time taken off every step.
    logits = torch.stack([l.reshape(-1, l.shape[-1]) for l in router_logits]).float()
    layers, n, num_experts = logits.shape
    weight = token_mask.reshape(-1).float() if token_mask is not None else torch.ones(n, device=logits.device)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(layers, -1)
    counts = torch.zeros(layers, num_experts, device=logits.device).scatter_add_(
        1, chosen, weight.repeat_interleave(top_k).expand(layers, -1))
    tokens = weight.sum()
    if group is not None:
        import torch.distributed as dist

        reduced = torch.cat([counts.reshape(-1), tokens.reshape(1)])
        dist.all_reduce(reduced, group=group)
        global_counts, global_tokens = reduced[:-1].reshape(layers, num_experts), reduced[-1]
    else:
        global_counts, global_tokens = counts, tokens
    f = global_counts / (global_tokens.clamp(min=1.0) * top_k)
    local_tokens = tokens.clamp(min=1.0)
    p_mean = (probs * weight[None, :, None]).sum(1) / local_tokens
    aux = num_experts * (f * p_mean).sum(-1)
    z = ((torch.logsumexp(logits, dim=-1) ** 2) * weight).sum(-1) / local_tokens
    return {"aux": aux.mean(), "z": z.mean(), "load": counts.detach()}
