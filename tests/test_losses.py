"""The loss functions against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F

from nitp_ds.losses import (IGNORE, chunked_cross_entropy, compiled_nitp_loss, cross_entropy_per_row, nitp_loss,
                            router_losses)


def reference_aux(logits, top_k):
    """Switch-style balancing written as plain loops: E · Σ_e f_e · P_e, f over the N·k assignments."""
    n, e = logits.shape
    probs = [[math.exp(v) for v in row] for row in logits.tolist()]
    probs = [[v / sum(row) for v in row] for row in probs]
    counts = [0] * e
    for row in probs:
        for idx in sorted(range(e), key=lambda i: -row[i])[:top_k]:
            counts[idx] += 1
    f = [c / (n * top_k) for c in counts]
    p_mean = [sum(row[i] for row in probs) / n for i in range(e)]
    return e * sum(fi * pi for fi, pi in zip(f, p_mean))


def reference_z(logits):
    return sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / logits.shape[0]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_aux_loss_matches_an_independent_reference(top_k):
    torch.manual_seed(top_k)
    layers = [torch.randn(37, 6, dtype=torch.float64) * 2 for _ in range(3)]
    out = router_losses(layers, top_k)
    expected = sum(reference_aux(l, top_k) for l in layers) / len(layers)
    assert out["aux"].item() == pytest.approx(expected, rel=1e-6)
    assert out["z"].item() == pytest.approx(sum(reference_z(l) for l in layers) / 3, rel=1e-6)
    assert out["load"].shape == (3, 6)
    assert out["load"].sum().item() == pytest.approx(3 * 37 * top_k)


def test_layers_at_once_equal_each_layer_on_its_own():
    # router_losses takes all layers in one stacked pass: each layer's terms, load row and gradient must be the
    # ones that layer gives alone
    torch.manual_seed(0)
    layers = [torch.randn(50, 8, requires_grad=True) for _ in range(4)]
    mask = (torch.rand(50) > 0.2).long()
    together = router_losses(layers, 2, token_mask=mask)
    alone = [router_losses([l], 2, token_mask=mask) for l in layers]
    assert together["aux"].item() == pytest.approx(sum(a["aux"].item() for a in alone) / 4, rel=1e-6)
    assert together["z"].item() == pytest.approx(sum(a["z"].item() for a in alone) / 4, rel=1e-6)
    assert torch.equal(together["load"], torch.cat([a["load"] for a in alone]))
    grads = torch.autograd.grad(together["aux"] + together["z"], layers)
    for layer, alone_out, grad in zip(layers, alone, grads):
        expected = torch.autograd.grad((alone_out["aux"] + alone_out["z"]) / 4, layer)[0]
        torch.testing.assert_close(grad, expected)


def test_aux_loss_is_one_when_perfectly_balanced():
    logits = torch.log(torch.full((8, 4), 0.25)) + torch.eye(4).repeat(2, 1) * 1e-3
    assert router_losses([logits], 1)["aux"].item() == pytest.approx(1.0, abs=1e-3)


def test_aux_loss_masks_ignored_tokens():
    logits = torch.randn(10, 4)
    mask = torch.tensor([1] * 6 + [0] * 4)
    masked = router_losses([logits], 2, token_mask=mask)["aux"]
    assert masked.item() == pytest.approx(router_losses([logits[:6]], 2)["aux"].item(), rel=1e-6)


def test_aux_loss_gradient_reaches_the_router():
    logits = torch.randn(16, 4, requires_grad=True)
    router_losses([logits], 2)["aux"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk,compiled", [(1, False), (7, False), (10_000, False), (7, True), (10_000, True)])
def test_chunked_cross_entropy_matches_full_logits(chunk, compiled):
    # compiled: the torch.compile'd softmax-gradient kernel (inductor's C++ backend here, Triton on CUDA)
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 11))
    y[0, :4] = IGNORE
    loss, count = chunked_cross_entropy(h, w, y, chunk, compiled=compiled)
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 50), y.reshape(-1), ignore_index=IGNORE)
    assert count.item() == 29
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    g_h, g_w = torch.autograd.grad(loss * 3.0, (h, w))
    r_h, r_w = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(g_h, r_h)
    torch.testing.assert_close(g_w, r_w)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_cross_entropy_per_row_sums_each_rows_token_losses(chunk):
    torch.manual_seed(0)
    h, w = torch.randn(3, 11, 16), torch.randn(50, 16)
    y = torch.randint(0, 50, (3, 11))
    y[0, :4] = IGNORE
    y[2, :] = IGNORE  # a row with nothing scored
    sums, counts = cross_entropy_per_row(h, w, y, chunk)
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 50), y.reshape(-1), ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(sums, ref.reshape(3, 11).sum(1))
    assert counts.tolist() == [7.0, 11.0, 0.0]
    mean, count = chunked_cross_entropy(h, w, y, chunk)
    assert float(sums.sum() / counts.sum()) == pytest.approx(float(mean), rel=1e-6) and int(count) == 18


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_compiled_cross_entropy_matches_fp32_reference_on_cuda_bf16():
    torch.manual_seed(0)
    for rows, vocab, chunk in [(4096, 32000, 1536), (2048, 151936, 4096)]:  # several chunks; one chunk
        h = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(vocab, 512, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_()
        y = torch.randint(0, vocab, (rows,), device="cuda")
        y[:100] = IGNORE
        loss, _ = chunked_cross_entropy(h, w, y, chunk, compiled=True)
        g_h, g_w = torch.autograd.grad(loss, (h, w))
        h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        ref = F.cross_entropy(h32 @ w32.t(), y, ignore_index=IGNORE)
        r_h, r_w = torch.autograd.grad(ref, (h32, w32))
        assert loss.item() == pytest.approx(ref.item(), rel=2e-3)
        for got, want in ((g_h, r_h), (g_w, r_w)):
            assert torch.isfinite(got).all()
            assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


def test_chunked_cross_entropy_without_grad():
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,)), 3)
    assert torch.isfinite(loss)


def test_nitp_loss_pairs_position_t_with_target_t_plus_1():
    target = torch.randn(2, 5, 8)
    prediction = torch.roll(target, shifts=-1, dims=1)  # prediction[t] == target[t+1]
    labels = torch.zeros(2, 5, dtype=torch.long)
    assert nitp_loss(prediction, target, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert nitp_loss(target, target, labels).item() > 0.5  # same position is not the target
    assert nitp_loss(target, target, labels, offset=0).item() == pytest.approx(0.0, abs=1e-6)
    assert nitp_loss(target, target, labels, kind="mse", offset=0).item() == 0.0


def test_nitp_loss_masks_like_ntp():
    prediction, target = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    labels = torch.tensor([[1, 1, IGNORE, IGNORE, IGNORE, 1]])
    kept = nitp_loss(prediction[:, :3], target[:, :3], labels[:, :3])
    assert nitp_loss(prediction, target, labels).item() == pytest.approx(kept.item(), rel=1e-6)


def reference_nitp(prediction, target, labels, kind, offset):
    """Position by position: the distance of prediction[b, t] to target[b, t + offset] where the label is kept."""
    total, count = 0.0, 0
    batch, length, _ = prediction.shape
    for b in range(batch):
        for t in range(length - offset):
            if labels[b, t] == IGNORE:
                continue
            p, z = prediction[b, t].double(), target[b, t + offset].double()
            if kind == "cosine":
                total += 1.0 - float(p @ z) / max(float(p.norm() * z.norm()), 1e-6)
            else:
                total += float(((p - z) ** 2).sum()) / len(p)
            count += 1
    return total / count


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("offset", [1, 0])
def test_nitp_loss_matches_a_position_by_position_reference(kind, offset):
    torch.manual_seed(offset)
    prediction, target = torch.randn(3, 7, 5), torch.randn(3, 7, 5) * 4
    labels = torch.randint(0, 9, (3, 7))
    labels[0, 2:5] = IGNORE
    labels[2, 0] = IGNORE
    expected = reference_nitp(prediction, target, labels, kind, offset)
    assert nitp_loss(prediction, target, labels, kind=kind, offset=offset).item() == pytest.approx(expected, rel=1e-5)


def test_compiled_nitp_loss_matches_the_eager_one():
    """The compiled NITP loss (inductor's C++ backend here, Triton on CUDA): the same value and gradient."""
    torch.manual_seed(0)
    prediction = torch.randn(2, 9, 6, requires_grad=True)
    target = torch.randn(2, 9, 6)
    labels = torch.randint(0, 9, (2, 9))
    labels[1, 3:6] = IGNORE
    got = compiled_nitp_loss()(prediction, target, labels, "cosine", 1)
    (grad,) = torch.autograd.grad(got * 3.0, prediction)
    want = nitp_loss(prediction, target, labels, "cosine", 1)
    (want_grad,) = torch.autograd.grad(want * 3.0, prediction)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)  # fp32 sums, fused in another order
    torch.testing.assert_close(grad, want_grad)


def test_nitp_loss_sends_gradient_to_the_target_only_when_the_target_keeps_its_graph():
    prediction = torch.randn(1, 4, 8, requires_grad=True)
    target = torch.randn(1, 4, 8, requires_grad=True)
    labels = torch.zeros(1, 4, dtype=torch.long)
    nitp_loss(prediction, target.detach(), labels).backward()  # the paper's stop-gradient, as NITPModel passes it
    assert target.grad is None and prediction.grad.abs().sum() > 0
    nitp_loss(prediction, target, labels).backward()  # nitp.stop_grad false
    assert target.grad is not None and target.grad.abs().sum() > 0
