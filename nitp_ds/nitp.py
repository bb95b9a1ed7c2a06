"""The NITP head, the target capture, and the training module that computes every loss part.

`NITPModel` wraps a stock Hugging Face causal LM (`self.lm`) and, for training only, an NITP head
(`self.nitp_head`). Its forward runs the decoder once and returns the raw loss parts; the engine
(`nitp_ds.engine.NITPEngine`) weights them. The target z_{t+1} is the output of the first k
decoder layers, captured by a forward hook on layer k-1 (the embedding for k = 0) and detached:
no gradient reaches the target path through the NITP loss. The paper's ablations are options:
`stop_grad=False` keeps the target's graph (the NITP loss then trains the first k layers too),
`offset=0` pairs position t with the target at t instead of t+1, `loss="mse"` replaces 1 - cos.

Documented choice: h_t is the final hidden state *after* the final norm (the vector fed to the
LM head); z is the raw residual stream (`hidden_states[k]` in Hugging Face terms).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from nitp_ds.losses import (chunked_cross_entropy, compiled_nitp_loss, cross_entropy_per_row, nitp_loss,
                            router_losses, use_compiled_loss)
from nitp_ds.models import experts_per_token
from nitp_ds.models.families import AUTOEP_ROUTER, family_of


class SwiGLUHead(nn.Module):
    """P(h) = W_down (silu(W_gate h) ⊙ W_up h): the paper's head, 12d² parameters at width 4d."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.gate = nn.Linear(d, width, bias=False)
        self.up = nn.Linear(d, width, bias=False)
        self.down = nn.Linear(width, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(h)) * self.up(h))


class MLPHead(nn.Module):
    def __init__(self, d: int, width: int):
        super().__init__()
        self.up = nn.Linear(d, width, bias=False)
        self.down = nn.Linear(width, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(h)))


def build_head(kind: str, d: int, mult: int, init_std: float) -> nn.Module | None:
    if kind == "none":
        return None
    head: nn.Module
    if kind == "swiglu":
        head = SwiGLUHead(d, mult * d)
    elif kind == "mlp":
        head = MLPHead(d, mult * d)
    else:
        head = nn.Linear(d, d, bias=False)
    init_head(head, init_std)
    return head


def init_head(head: nn.Module, init_std: float) -> None:
    """The head's initial weights: N(0, init_std) (the model's initializer_range) for every parameter."""
    for p in head.parameters():
        nn.init.normal_(p, std=init_std)


class NITPModel(nn.Module):
    def __init__(self, lm: nn.Module, head: str = "swiglu", head_mult: int = 4, target_layer: int = 1,
                 ce_chunk_tokens: int = 8192, aux_group_fn=None, compile_loss: bool | None = None,
                 loss: str = "cosine", stop_grad: bool = True, offset: int = 1):
        super().__init__()
        self.lm = lm
        self.config = lm.config  # AutoEP reads the root module's config
        self.nitp_head = build_head(head, lm.config.hidden_size, head_mult, lm.config.initializer_range)
        self.target_layer = target_layer
        self.nitp_loss_kind, self.stop_grad, self.offset = loss, stop_grad, offset
        self.ce_chunk_tokens = ce_chunk_tokens
        self.compile_loss = compile_loss
        self.aux_group_fn = aux_group_fn  # returns a process group for global-batch balancing, or None
        self.top_k = experts_per_token(lm.config)
        self._target: torch.Tensor | None = None
        self._routers: list[nn.Module] = []  # the MoE layers' router modules, which keep their logits for the loss
        self._hooks: list = []
        self.unpadded_experts = True  # experts_unpadded: AutoEP at expert-parallel size 1 copies no tokens
        self._register_external_lm_head()

    def _register_external_lm_head(self) -> None:
        # Under ZeRO-3 a parameter is gathered only while its owning module runs; the chunked loss
        # reads the LM head's weight directly, so it is registered with this module too.
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(self, self.lm.get_output_embeddings().weight)

    # -- hooks: attached after AutoEP has replaced the MoE blocks --------------------------------

    def attach_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        remove_output_capturing_hooks(self.lm)
        if self.nitp_head is not None:
            source = (self.lm.get_input_embeddings() if self.target_layer == 0
                      else self.lm.model.layers[self.target_layer - 1])
            self._hooks.append(source.register_forward_hook(self._capture_target))
        self._routers = router_modules(self.lm)
        for router in self._routers:
            self._hooks.append(router.register_forward_hook(self._capture_router))

    def _capture_target(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self._target = hidden.detach() if self.stop_grad else hidden

    def _capture_router(self, module, args, output) -> None:
        # Kept on the router module itself, not appended to a list: inside a compiled decoder layer, a list
        # that grows layer by layer is a guard on its length, and every layer would be compiled anew.
        module._nitp_router_logits = output[0] if isinstance(output, tuple) else output

    def _take_router_logits(self) -> list[torch.Tensor]:
        """The router logits of this forward pass, one tensor per MoE layer in order; the modules let go of them."""
        logits = []
        for router in self._routers:
            logits.append(router.__dict__.pop("_nitp_router_logits"))
        return logits

    # -- forward: one decoder pass, every loss part ---------------------------------------------

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self._hooks:
            self.attach_hooks()
        self._target = None
        with positions_unpacked(), experts_unpadded(self.unpadded_experts):
            hidden = self.lm.model(input_ids=input_ids, use_cache=False).last_hidden_state
        weight = self.lm.get_output_embeddings().weight
        compiled = use_compiled_loss(self.compile_loss, hidden.device)
        if torch.is_grad_enabled():
            ntp, tokens = chunked_cross_entropy(hidden, weight, labels, self.ce_chunk_tokens, compiled=compiled)
            parts = {"ntp": ntp, "tokens": tokens}
        else:  # evaluation: the same loss kept per sequence, for the standard error of the validation loss
            row_sums, row_tokens = cross_entropy_per_row(hidden, weight, labels, self.ce_chunk_tokens)
            tokens = row_tokens.sum()
            parts = {"ntp": row_sums.sum() / tokens.clamp(min=1), "tokens": tokens.long(),
                     "ntp_rows": row_sums, "tokens_rows": row_tokens}
        if self.nitp_head is not None:
            loss_fn = compiled_nitp_loss() if compiled else nitp_loss
            parts["nitp"] = loss_fn(self.nitp_head(hidden), self._target, labels, self.nitp_loss_kind, self.offset)
        else:
            parts["nitp"] = torch.zeros((), device=hidden.device)
        group = self.aux_group_fn() if self.aux_group_fn is not None else None
        router = router_losses(self._take_router_logits(), self.top_k, token_mask=None, group=group)
        parts["aux"], parts["z"], parts["load"] = router["aux"].to(hidden.device), router["z"].to(hidden.device), router["load"]
        self._target = None
        return parts


@contextlib.contextmanager
def positions_unpacked() -> Iterator[None]:
    """Hugging Face's causal mask skips its check for packed sequences in the position ids.

    Without position ids, as this model calls the decoder, Hugging Face makes them 0..T-1 in every row, and
    `find_packed_sequence_indices` always finds them unpacked (the mask stays None: causal attention). Its
    `.all()` on a device tensor is read on the host, though: a wait for the device at every forward, so the
    host could not queue a forward while the device still ran the last optimizer step (one H200, shape B: the
    step's one wait besides the skip-step vote's). Here the check answers "unpacked" without reading it."""
    from transformers import masking_utils

    check = getattr(masking_utils, "find_packed_sequence_indices", None)
    if check is None:  # a transformers without the check
        yield
        return
    masking_utils.find_packed_sequence_indices = _unpacked
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = check


def _unpacked(position_ids: torch.Tensor) -> None:
    return None


@contextlib.contextmanager
def experts_unpadded(enabled: bool = True) -> Iterator[None]:
    """AutoEP layers at expert-parallel size 1 hand their routed tokens to the grouped GEMMs as they are.

    An AutoEP layer sorts its routed tokens by expert, then, at expert-parallel size 1, `permute_by_local_expert`
    copies them into a layout where each expert's group is padded to a multiple of 8 rows, and
    `unpermute_by_local_expert` copies the experts' output back: two copies of every routed token in the forward,
    two in the backward, and the kernels that make their indices, in every MoE layer. At that size the tokens go
    nowhere: the copies only add padding, and the grouped GEMMs (torch's `_grouped_mm`, as Hugging Face's
    grouped_mm experts call it, DeepSpeed's Triton kernel or its loop) take groups of any size. Here both are
    the identity for that case (the counts of one rank's experts, a 1-D tensor); with several expert-parallel
    ranks (a [ranks, experts] count matrix) the received tokens really are regrouped, and DeepSpeed's own run."""
    try:
        from deepspeed.module_inject import auto_ep_layer
    except ImportError:  # a deepspeed without AutoEP
        auto_ep_layer = None
    if not enabled or auto_ep_layer is None or auto_ep_layer.permute_by_local_expert is _grouped_in_place:
        yield
        return
    # Module-level functions, not closures made per forward: a compiled decoder layer guards on what it calls.
    _deepspeed_regroup[:] = [auto_ep_layer.permute_by_local_expert, auto_ep_layer.unpermute_by_local_expert]
    auto_ep_layer.permute_by_local_expert = _grouped_in_place
    auto_ep_layer.unpermute_by_local_expert = _ungrouped_in_place
    try:
        yield
    finally:
        auto_ep_layer.permute_by_local_expert, auto_ep_layer.unpermute_by_local_expert = _deepspeed_regroup


_deepspeed_regroup: list = []  # DeepSpeed's permute_by_local_expert and unpermute_by_local_expert, while swapped


def _grouped_in_place(tokens: torch.Tensor, local_counts: torch.Tensor):
    if local_counts.ndim != 1:  # [ranks, experts]: tokens received from several ranks
        return _deepspeed_regroup[0](tokens, local_counts)
    return tokens, None, local_counts, tokens.shape[0]


def _ungrouped_in_place(expert_output: torch.Tensor, permuted_indices: torch.Tensor | None, n_tokens: int):
    if permuted_indices is None:
        return expert_output
    return _deepspeed_regroup[1](expert_output, permuted_indices, n_tokens)


def remove_output_capturing_hooks(lm: nn.Module) -> int:
    """Remove Hugging Face's output-capturing forward hooks (`output_attentions`, `output_router_logits`, ...),
    which AutoEP installs on the attention and router modules when it retargets them; how many were removed.

    This model asks for none of those outputs (it keeps its own hooks), and inside a compiled decoder layer each
    of them is a graph break, even when inactive: dynamo cannot trace their `ContextVar.get`. Hugging Face
    installs them again if a later call asks for such an output."""
    removed = 0
    for module in lm.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "output_capturing_hook":
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
                removed += 1
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False  # asked for later, they are installed anew
    return removed


def router_modules(lm: nn.Module) -> list[nn.Module]:
    """The modules whose output is the router logits, one per MoE layer (Hugging Face or AutoEP); the family
    table names them."""
    family = family_of(lm.config.model_type)
    found = []
    for layer in lm.model.layers:
        autoep = _submodule(layer, AUTOEP_ROUTER)
        if autoep is not None:
            found.append(autoep)
        elif hasattr(getattr(layer, "mlp", None), "experts"):  # a dense layer (DeepSeek's first) has no router
            hf = _submodule(layer, family.router_module)
            if hf is not None:
                found.append(hf)
    return found


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None
