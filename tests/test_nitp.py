"""The NITP module on a real (tiny) Hugging Face Qwen3-MoE, without DeepSpeed."""

import pytest
import torch

from nitp_ds.config import ModelConfig
from nitp_ds.losses import nitp_cosine_loss
from nitp_ds.models import build_model
from nitp_ds.nitp import NITPModel

SHAPE = ModelConfig(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, num_experts=4,
                    experts_per_token=2, moe_intermediate_size=16, intermediate_size=64)


def tiny(head="swiglu", target_layer=1, seed=0):
    torch.manual_seed(seed)
    model = NITPModel(build_model(SHAPE, vocab_size=64), head=head, target_layer=target_layer, ce_chunk_tokens=16)
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


def test_no_gradient_reaches_the_target_path_through_the_nitp_loss():
    """Gradients of L_NITP equal those with z replaced by a constant; without the stop-gradient they differ."""
    model = tiny(target_layer=2)
    x, y = batch()
    early = list(model.lm.model.layers[0].parameters()) + list(model.lm.model.embed_tokens.parameters())

    grads = torch.autograd.grad(model(x, y)["nitp"], early, allow_unused=True)

    with torch.no_grad():
        z_const = model.lm.model(input_ids=x, output_hidden_states=True).hidden_states[2]
    h = model.lm.model(input_ids=x).last_hidden_state
    reference = torch.autograd.grad(nitp_cosine_loss(model.nitp_head(h), z_const, y), early, allow_unused=True)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r)

    # The same check fails when the target keeps its graph: the test can tell the difference.
    def leaky_loss(prediction, target, labels):
        cos = torch.nn.functional.cosine_similarity(prediction[:, :-1], target[:, 1:], dim=-1)
        return (1 - cos).mean()

    model._capture_target = lambda module, args, output: setattr(model, "_target", output)
    model.attach_hooks()
    import nitp_ds.nitp as nitp_module

    original_loss = nitp_module.nitp_cosine_loss
    nitp_module.nitp_cosine_loss = leaky_loss
    try:
        leaky = torch.autograd.grad(model(x, y)["nitp"], early, allow_unused=True)
    finally:
        nitp_module.nitp_cosine_loss = original_loss
    assert any(not torch.allclose(g, r) for g, r in zip(leaky, reference) if g is not None)


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
