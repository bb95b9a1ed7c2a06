"""The NITP module on a real (tiny) Hugging Face Qwen3-MoE, without DeepSpeed."""

import pytest
import torch

from nitp_ds.config import ModelConfig
from nitp_ds.models import build_model, compile_decoder_layers
from nitp_ds.models.families import FAMILY_NAMES
from nitp_ds.nitp import NITPModel, experts_unpadded, remove_output_capturing_hooks, router_modules

SHAPE = ModelConfig(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, num_experts=4,
                    experts_per_token=2, moe_intermediate_size=16, intermediate_size=64)


def tiny(head="swiglu", target_layer=1, seed=0, **options):
    torch.manual_seed(seed)
    model = NITPModel(build_model(SHAPE, vocab_size=64), head=head, target_layer=target_layer, ce_chunk_tokens=16,
                      **options)
    model.attach_hooks()
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 13), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_forward_returns_every_loss_part():
    model = tiny()
    parts = model(*batch())
    for key in ("ntp", "nitp", "aux", "z"):
        assert torch.isfinite(parts[key]) and parts[key].ndim == 0
    assert parts["load"].shape == (4, 4)
    assert parts["tokens"].item() == 24


def test_ntp_part_equals_hugging_face_cross_entropy():
    model = tiny()
    x, y = batch()
    logits = model.lm(input_ids=x).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), y.reshape(-1))
    assert model(x, y)["ntp"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_target_is_the_output_of_the_first_k_layers():
    model = tiny(target_layer=2)
    x, y = batch()
    captured = {}
    original = model._capture_target

    def spy(module, args, output):
        original(module, args, output)
        captured["z"] = model._target

    model._hooks[0].remove()
    model._hooks[0] = model.lm.model.layers[1].register_forward_hook(spy)
    model(x, y)
    hidden_states = model.lm.model(input_ids=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(captured["z"], hidden_states[2])
    assert not captured["z"].requires_grad


def reference_nitp(model, x, k, kind="cosine", offset=1, stop_grad=True):
    """The NITP loss written plainly from one Hugging Face forward: P(last_hidden_state[t]) against
    hidden_states[k][t + offset], mean over positions (no label is ignored in `batch`)."""
    out = model.lm.model(input_ids=x, output_hidden_states=True)
    z = out.hidden_states[k].detach() if stop_grad else out.hidden_states[k]
    prediction = model.nitp_head(out.last_hidden_state)
    length = x.shape[1]
    terms = []
    for t in range(length - offset):
        p, target = prediction[:, t], z[:, t + offset]
        if kind == "cosine":
            terms.append(1 - torch.nn.functional.cosine_similarity(p, target, dim=-1))
        else:
            terms.append(((p - target) ** 2).mean(dim=-1))
    return torch.stack(terms).mean()


def early_parameters(model):
    return list(model.lm.model.layers[0].parameters()) + list(model.lm.model.embed_tokens.parameters())


@pytest.mark.parametrize("stop_grad", [True, False])
def test_gradient_reaches_the_first_k_layers_through_the_target_only_without_stop_grad(stop_grad):
    """Gradients of L_NITP on the layers below the target equal the plain reference's, with z detached
    (the paper) or kept in the graph (`nitp.stop_grad: false`); the two settings give different gradients."""
    model = tiny(target_layer=2, stop_grad=stop_grad)
    x, y = batch()
    early = early_parameters(model)
    grads = torch.autograd.grad(model(x, y)["nitp"], early, allow_unused=True)
    reference = torch.autograd.grad(reference_nitp(model, x, 2, stop_grad=stop_grad), early, allow_unused=True)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r)
    other = torch.autograd.grad(reference_nitp(model, x, 2, stop_grad=not stop_grad), early, allow_unused=True)
    assert any(not torch.allclose(g, o) for g, o in zip(grads, other) if g is not None)


@pytest.mark.parametrize("kind,offset", [("cosine", 0), ("mse", 1), ("mse", 0)])
def test_loss_kind_and_offset_match_the_plain_reference(kind, offset):
    model = tiny(target_layer=2, loss=kind, offset=offset)
    x, y = batch()
    ours = model(x, y)["nitp"]
    expected = reference_nitp(model, x, 2, kind=kind, offset=offset)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    default = reference_nitp(model, x, 2)
    assert abs(ours.item() - default.item()) > 1e-3  # the option changes the loss


def test_head_gets_gradients_and_none_head_has_no_parameters():
    model = tiny()
    model(*batch())["nitp"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.nitp_head.parameters())
    plain = tiny(head="none")
    assert plain.nitp_head is None
    assert plain(*batch())["nitp"].item() == 0.0
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in plain.lm.parameters())


def test_swiglu_head_has_12_d_squared_parameters():
    model = tiny()
    assert sum(p.numel() for p in model.nitp_head.parameters()) == 12 * 32 * 32


def test_target_layer_zero_is_the_embedding_output():
    model = tiny(target_layer=0)
    x, y = batch()
    captured = []
    original = model._capture_target

    def spy(module, args, output):
        original(module, args, output)
        captured.append(model._target)

    model._capture_target = spy
    model.attach_hooks()
    model(x, y)
    torch.testing.assert_close(captured[0], model.lm.model.embed_tokens(x))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_router_modules_are_the_family_routers_one_per_moe_layer(family):
    # The family table names the router; each module found returns (first) one logit per routed expert.
    shape = ModelConfig(family=family, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=4,
                        experts_per_token=2, moe_intermediate_size=16, intermediate_size=64)
    model = build_model(shape, vocab_size=64)
    moe_layers = [layer for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    routers = router_modules(model)
    assert len(routers) == len(moe_layers) >= 2  # DeepSeek's first layer is dense, without a router
    logits = []
    for router in routers:
        router.register_forward_hook(lambda module, args, out: logits.append(out[0] if isinstance(out, tuple) else out))
    model(batch()[0])
    assert len(logits) == len(routers) and all(x.shape[-1] == 4 for x in logits)


def compiled_graphs(num_layers: int, zero_linear: bool = False, hf_capture: bool = False) -> int:
    """Graphs dynamo builds for one training forward and backward of an NITP model with compiled decoder layers.

    `zero_linear`: as under ZeRO-3 with DeepSpeed's memory-efficient linear (its default): `F.linear` is
    DeepSpeed's and every parameter carries its own `ds_id`. `hf_capture`: Hugging Face's output-capturing hooks
    installed before the NITP model's own, as AutoEP installs them."""
    import dataclasses

    import torch._dynamo
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    lm = build_model(dataclasses.replace(SHAPE, num_layers=num_layers), vocab_size=64)
    if hf_capture:
        from transformers.utils.output_capturing import install_all_output_capturing_hooks

        install_all_output_capturing_hooks(lm.model)
    model = NITPModel(lm, head="swiglu", target_layer=1, ce_chunk_tokens=16)
    model.attach_hooks()
    compile_decoder_layers(lm, backend="eager")  # dynamo's graphs and guards, without code generation
    x, y = batch()
    installed = F.linear
    if zero_linear:
        for ds_id, param in enumerate(model.parameters()):
            param.ds_id, param.ds_status = ds_id, ZeroParamStatus.AVAILABLE
        F.linear = zero3_linear_wrap
    try:
        parts = model(x, y)
        (parts["ntp"] + parts["nitp"] + parts["aux"]).backward()
        assert F.linear is (zero3_linear_wrap if zero_linear else installed)  # as it was after every layer
    finally:
        F.linear = installed
    assert set(parts) >= {"ntp", "nitp", "aux", "load"} and torch.isfinite(parts["aux"])
    return counters["stats"]["unique_graphs"]


def test_compiled_decoder_layers_are_not_compiled_again_layer_by_layer():
    """Layers share their compiled code: the router-logit capture must not make each layer a new guard case
    (a list growing layer by layer did: 4 layers compiled 4 times, ~1.5 s each on a GPU), nor must DeepSpeed's
    memory-efficient linear (with torch 2.11 dynamo guarded on each weight's ds_id inside it)."""
    assert compiled_graphs(num_layers=6) == compiled_graphs(num_layers=3)
    assert compiled_graphs(num_layers=6, zero_linear=True) == compiled_graphs(num_layers=3, zero_linear=True)


def test_hugging_face_output_capturing_hooks_are_removed_and_break_no_compiled_layer():
    """AutoEP installs Hugging Face's output-capturing hooks on the attention and router modules; inactive, each
    still broke a compiled layer's graph (dynamo cannot trace their ContextVar.get)."""
    from transformers.utils.output_capturing import install_all_output_capturing_hooks

    lm = build_model(SHAPE, vocab_size=64)
    install_all_output_capturing_hooks(lm.model)
    hooked = sum(h.__name__ == "output_capturing_hook" for m in lm.modules() for h in m._forward_hooks.values())
    assert hooked >= 2 * SHAPE.num_layers and remove_output_capturing_hooks(lm) == hooked
    assert not any(h.__name__ == "output_capturing_hook" for m in lm.modules() for h in m._forward_hooks.values())
    assert lm.model(input_ids=batch()[0], output_router_logits=True).router_logits  # asked for: installed again
    assert compiled_graphs(num_layers=3, hf_capture=True) == compiled_graphs(num_layers=3)


def test_compiled_layer_backward_keeps_the_weight_parameters_not_views_of_their_data():
    """Why compiled layers need no memory-efficient linear: what their backward keeps of a weight is the parameter
    itself, whose data ZeRO-3 swaps out after forward and back in before backward, not a view that would hold
    the gathered copy alive in between."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lm = build_model(SHAPE, vocab_size=64)
    compile_decoder_layers(lm, backend="aot_eager")  # AOTAutograd chooses what backward keeps, as inductor's does
    layer = lm.model.layers[0]
    hidden = torch.randn(2, 12, SHAPE.hidden_size, requires_grad=True)
    positions = lm.model.rotary_emb(hidden, torch.arange(12)[None])
    out = layer(hidden, position_embeddings=positions, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    kept = [t for node in grad_nodes(out) if type(node).__name__ == "CompiledFunctionBackward"
            for t in node.saved_tensors]
    params = {p.untyped_storage().data_ptr(): p for p in layer.parameters()}
    of_params = [t for t in kept if t.untyped_storage().data_ptr() in params]
    assert of_params, "the compiled backward keeps no weight at all"
    assert all(t is params[t.untyped_storage().data_ptr()] for t in of_params)


def grad_nodes(tensor):
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        todo.extend(next_node for next_node, _ in node.next_functions)


def test_forward_skips_the_packed_sequence_check_and_keeps_hugging_faces_hidden_states():
    """Hugging Face's check for packed position ids reads a device tensor on the host at every forward; the
    model's forward skips it (its own position ids are never packed) and gives Hugging Face's hidden states."""
    from transformers import masking_utils

    model = tiny()
    x, y = batch()
    check, seen = masking_utils.find_packed_sequence_indices, []

    def spy(position_ids):
        seen.append(position_ids)
        return check(position_ids)

    masking_utils.find_packed_sequence_indices = spy
    try:
        reference = model.lm.model(input_ids=x, use_cache=False).last_hidden_state
        assert len(seen) == 1 and check(seen[0]) is None  # Hugging Face's own forward checks, and finds none
        captured = {}
        handle = model.lm.model.norm.register_forward_hook(lambda module, args, out: captured.setdefault("h", out))
        model(x, y)
        handle.remove()
        assert len(seen) == 1  # the model's forward did not check
        assert masking_utils.find_packed_sequence_indices is spy  # and it put the spy back
    finally:
        masking_utils.find_packed_sequence_indices = check
    torch.testing.assert_close(captured["h"], reference)


def autoep_tiny(seed=0):
    """`tiny()` with its MoE blocks replaced by DeepSpeed's AutoEP layers at expert-parallel size 1, as
    `deepspeed.initialize` replaces them on one rank."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config

    model = tiny(seed=seed)
    autoep = AutoEP(model.lm, parse_autoep_config({"expert_parallel": {"enabled": True, "autoep_size": 1}}))
    autoep.replace_moe_layers(autoep.ep_parser(), ep_size=1, ep_rank=0)
    model.attach_hooks()
    assert type(model.lm.model.layers[0].mlp).__name__ == "AutoEPMoELayer"
    return model


def test_autoep_at_one_rank_groups_tokens_in_place_with_deepspeeds_losses_and_gradients():
    """At expert-parallel size 1 the model's forward skips AutoEP's copies of the routed tokens into an
    alignment-padded layout and back; losses and every gradient are those of DeepSpeed's own path."""
    from deepspeed.module_inject import auto_ep_layer

    x, y = batch()
    results = {}
    permute, calls = auto_ep_layer.permute_by_local_expert, []

    def spy(tokens, counts):
        calls.append(counts.shape)
        return permute(tokens, counts)

    auto_ep_layer.permute_by_local_expert = spy
    try:
        for unpadded in (False, True):
            model = autoep_tiny()
            model.unpadded_experts = unpadded
            calls.clear()
            parts = model(x, y)
            (parts["ntp"] + parts["nitp"] + 0.1 * parts["aux"]).backward()
            results[unpadded] = parts, {n: p.grad for n, p in model.named_parameters()}, len(calls)
            assert auto_ep_layer.permute_by_local_expert is spy  # put back after the forward
    finally:
        auto_ep_layer.permute_by_local_expert = permute
    (padded, padded_grads, padded_calls), (direct, direct_grads, direct_calls) = results[False], results[True]
    assert padded_calls == SHAPE.num_layers and direct_calls == 0
    for key in ("ntp", "nitp", "aux", "z"):
        torch.testing.assert_close(direct[key], padded[key], rtol=1e-6, atol=1e-7)
    assert padded_grads.keys() == direct_grads.keys()
    experts = [n for n in padded_grads if ".mlp.experts." in n]
    assert experts and all(padded_grads[n].abs().sum() > 0 for n in experts)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(direct_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_several_expert_parallel_ranks_still_regroup_their_tokens():
    """Tokens received from several ranks ([ranks, experts] counts) are regrouped by DeepSpeed's own functions."""
    from deepspeed.module_inject import auto_ep_layer

    tokens = torch.randn(6, 4)
    counts = torch.tensor([[1, 2], [2, 1]], dtype=torch.int32)  # 2 source ranks x 2 local experts
    reference = auto_ep_layer.permute_by_local_expert(tokens, counts)
    with experts_unpadded():
        regrouped = auto_ep_layer.permute_by_local_expert(tokens, counts)
        back = auto_ep_layer.unpermute_by_local_expert(regrouped[0], regrouped[1], regrouped[3])
    torch.testing.assert_close(regrouped[0], reference[0])
    assert torch.equal(regrouped[1], reference[1]) and torch.equal(regrouped[2], reference[2])
    torch.testing.assert_close(back, tokens)


def test_compiled_autoep_layers_at_one_rank_are_one_graph():
    """With the routed tokens grouped in place, dynamo traces a whole AutoEP decoder layer (bf16, as trained on a
    GPU) as one graph, shared by every layer and step; DeepSpeed's padding path breaks it (on CPU at its
    host-side index fill)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs = {}
    for unpadded in (True, False):
        torch._dynamo.reset()
        counters.clear()
        model = autoep_tiny().to(torch.bfloat16)
        model.unpadded_experts = unpadded
        compile_decoder_layers(model.lm, backend="eager")
        x, y = batch()
        for _ in range(2):
            parts = model(x, y)
            (parts["ntp"] + parts["nitp"]).backward()
        graphs[unpadded] = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    assert graphs[True] == (1, 0)
    assert graphs[False][1] > 0
