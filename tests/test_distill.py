"""multi_layer_distillation_loss against an independent float64 brute force; its gradient claim."""

import math
import weakref

import numpy as np
import pytest
import torch

from indexcache_ops.distill import multi_layer_distillation_loss

def brute_force(scores, layers, mask=None, selected=None, reduction="sum"):
    """The loss written out with loops in float64 numpy, straight from the definition."""
    scores = np.asarray(scores, dtype=np.float64)
    layers = [np.asarray(a, dtype=np.float64) for a in layers]
    T, N = scores.shape
    total, rows = 0.0, 0
    for t in range(T):
        if selected is not None:
            keys = [int(s) for s in selected[t] if s >= 0]
        else:
            keys = [s for s in range(N) if mask is None or mask[t][s]]
        if not keys:
            continue
        # p of every layer: heads summed, then normalised over the layer's whole key axis.
        p_bar = {s: 0.0 for s in keys}
        for a in layers:
            row = a[t] if a.ndim == 2 else a[t].sum(axis=0)
            row_sum = sum(row)
            for s in keys:
                p_bar[s] += (row[s] / row_sum if row_sum > 0 else 0.0) / len(layers)
        mass = sum(p_bar.values())
        if mass == 0:
            continue
        top = max(scores[t][s] for s in keys)
        z = sum(math.exp(scores[t][s] - top) for s in keys)
        kl = 0.0
        for s in keys:
            p = p_bar[s] / mass
            if p > 0:
                kl += p * (math.log(p) - (scores[t][s] - top - math.log(z)))
        total += kl
        rows += 1
    return total / max(rows, 1) if reduction == "mean" else total


def causal_attention(generator, T, H, N, mask):
    """Softmax attention over the visible keys of each row: zero mass outside the mask."""
    logits = torch.randn(T, H, N, generator=generator, dtype=torch.float64)
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)


def make_case(seed, T=12, N=16, H=4, layers=3):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, N, generator=g, dtype=torch.float64)
    # A causal mask in prefill layout: query t sees keys [0, N - T + t + 1).
    mask = torch.arange(N)[None, :] < (N - T + 1 + torch.arange(T))[:, None]
    attention = [causal_attention(g, T, H, N, mask) for _ in range(layers)]
    return g, scores, mask, attention


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dense_matches_brute_force(device, reduction):
    g, scores, mask, attention = make_case(0)
    # Mix per-head [T, H, N] and head-aggregated [T, N] layers, unnormalised, with mass outside
    # the mask.
    raw = [torch.rand(12, 4, 16, generator=g, dtype=torch.float64),
           torch.rand(12, 16, generator=g, dtype=torch.float64), attention[0]]
    for m in [None, mask]:
        got = multi_layer_distillation_loss(scores.to(device), [a.to(device) for a in raw],
                                            mask=None if m is None else m.to(device),
                                            reduction=reduction)
        want = brute_force(scores, raw, None if m is None else m.numpy(), reduction=reduction)
        assert got.shape == () and got.dtype == torch.float64
        assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sparse_matches_brute_force(device, index_dtype):
    g, scores, mask, attention = make_case(1)
    selected = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(12)])
    selected[torch.rand(12, 6, generator=g) < 0.3] = -1
    selected[3] = -1  # a row with nothing selected
    got = multi_layer_distillation_loss(scores.to(device), [a.to(device) for a in attention],
                                        selected=selected.to(device=device, dtype=index_dtype))
    want = brute_force(scores, attention, selected=selected.numpy())
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_float32_scores_and_bf16_attention():
    _, scores, mask, attention = make_case(2)
    attention = [a.bfloat16() for a in attention]
    got = multi_layer_distillation_loss(scores.float(), attention, mask=mask)
    assert got.dtype == torch.float32
    want = brute_force(scores.float().double(), [a.double() for a in attention], mask.numpy())
    assert got.item() == pytest.approx(want, rel=1e-5)


def grad_of(loss_fn, scores):
    scores = scores.clone().requires_grad_(True)
    loss_fn(scores).backward()
    return scores.grad


def closed_form_grad(scores, p_bar_rows, keys_of_row):
    """∂/∂s KL(p̄‖softmax(s)) = softmax(s) − p̄ on the row's keys, 0 elsewhere."""
    grad = torch.zeros_like(scores)
    for t, keys in enumerate(keys_of_row):
        q = torch.softmax(scores[t, keys], 0)
        grad[t, keys] = q - p_bar_rows[t]
    return grad


def test_dense_gradient_is_sum_of_per_layer_kls_over_m_plus_1():
    _, scores, mask, attention = make_case(3, layers=4)
    m_plus_1 = len(attention)
    grad = grad_of(lambda s: multi_layer_distillation_loss(s, attention, mask=mask), scores)
    per_layer = grad_of(lambda s: sum(multi_layer_distillation_loss(s, [a], mask=mask)
                                      for a in attention), scores)
    torch.testing.assert_close(grad, per_layer / m_plus_1, rtol=1e-12, atol=1e-15)
    # And both against the closed form q − p̄ (p̄: mean of the head-normalised layers).
    p_bar = sum(a.sum(1) / a.sum((1, 2))[:, None] for a in attention) / m_plus_1
    keys = [mask[t].nonzero().flatten() for t in range(mask.shape[0])]
    want = closed_form_grad(scores, [p_bar[t, k] for t, k in enumerate(keys)], keys)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)


def test_sparse_gradient_is_sum_of_per_layer_kls_over_m_plus_1():
    # Sparse attention of every served layer lies within the selected keys, as in the sparse stage.
    g, scores, _, _ = make_case(4)
    selected = torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(12)])
    selected[:, 4] = -1
    keys = [row[row >= 0] for row in selected]
    kept = torch.zeros(12, 16, dtype=torch.bool)
    for t, k in enumerate(keys):
        kept[t, k] = True
    attention = [causal_attention(g, 12, 4, 16, kept) for _ in range(3)]
    grad = grad_of(lambda s: multi_layer_distillation_loss(s, attention, selected=selected), scores)
    per_layer = grad_of(lambda s: sum(multi_layer_distillation_loss(s, [a], selected=selected)
                                      for a in attention), scores)
    torch.testing.assert_close(grad, per_layer / 3, rtol=1e-12, atol=1e-15)
    p_bar = sum(a.sum(1) / 4 for a in attention) / 3
    want = closed_form_grad(scores, [p_bar[t, k] for t, k in enumerate(keys)], keys)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)
    assert (grad[~kept] == 0).all()


def test_teachers_get_no_gradient():
    _, scores, mask, attention = make_case(5)
    attention = [a.clone().requires_grad_(True) for a in attention]
    scores.requires_grad_(True)
    multi_layer_distillation_loss(scores, attention, mask=mask).backward()
    assert all(a.grad is None for a in attention)
    assert scores.grad is not None


def test_rows_without_target_contribute_nothing():
    _, scores, mask, attention = make_case(6)
    mask = mask.clone()
    mask[2] = False                      # no visible key
    attention = [a.clone() for a in attention]
    for a in attention:
        a[5, :, mask[5]] = 0.0           # teacher has no mass on the visible keys
    scores = scores.clone()
    scores[7, ~mask[7]] = float("-inf")  # -inf scores on invisible keys, as indexer logits have
    scores.requires_grad_(True)
    loss = multi_layer_distillation_loss(scores, attention, mask=mask, reduction="mean")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert (scores.grad[[2, 5]] == 0).all()
    # "mean" divides by the 10 rows that have a target.
    want = brute_force(scores.detach(), attention, mask.numpy(), reduction="sum") / 10
    assert loss.item() == pytest.approx(want, rel=1e-12)
    nothing = multi_layer_distillation_loss(scores, attention, mask=torch.zeros_like(mask),
                                            reduction="mean")
    assert nothing.item() == 0.0


def test_zero_teacher_probability_with_minus_inf_score_is_finite():
    scores = torch.tensor([[0.0, float("-inf"), 1.0]], dtype=torch.float64, requires_grad=True)
    attention = [torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64)]
    loss = multi_layer_distillation_loss(scores, attention)
    loss.backward()
    q = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    assert loss.item() == pytest.approx(float((0.5 * (0.5 / q).log()).sum()))
    assert torch.isfinite(scores.grad).all() and scores.grad[0, 1] == 0


def test_generator_of_many_layers_runs_in_constant_memory():
    _, scores, mask, _ = make_case(7)
    g = torch.Generator().manual_seed(8)
    storages = []

    def layers(count):
        for _ in range(count):
            # Tensors are freed by reference counting: when the next layer is made, at most the one
            # being consumed may still be alive, so nothing is stacked or kept.
            assert sum(ref() is not None for ref in storages) <= 1
            a = torch.rand(12, 4, 16, generator=g, dtype=torch.float64)
            storages.append(weakref.ref(a.untyped_storage()))
            yield a

    got = multi_layer_distillation_loss(scores, layers(300), mask=mask)
    g.manual_seed(8)
    want = brute_force(scores, [torch.rand(12, 4, 16, generator=g, dtype=torch.float64)
                                for _ in range(300)], mask.numpy())
    assert got.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(mask=torch.ones(12, 16, dtype=torch.bool), selected=torch.zeros(12, 2, dtype=torch.long)),
     ValueError, "not both"),
    (dict(mask=torch.ones(12, 15, dtype=torch.bool)), ValueError, "mask must be a tensor of shape"),
    (dict(mask=torch.ones(12, 16)), ValueError, "mask must be bool"),
    (dict(selected=torch.zeros(11, 2, dtype=torch.long)), ValueError, "selected must be"),
    (dict(selected=torch.zeros(12, 2)), ValueError, "int32 or int64"),
])
def test_rejects_bad_arguments(kwargs, error, match):
    _, scores, _, attention = make_case(9)
    with pytest.raises(error, match=match):
        multi_layer_distillation_loss(scores, attention, **kwargs)


def test_rejects_bad_inputs():
    _, scores, mask, attention = make_case(10)
    with pytest.raises(ValueError, match="indexer_scores"):
        multi_layer_distillation_loss(scores[0], attention)
    with pytest.raises(ValueError, match="indexer_scores"):
        multi_layer_distillation_loss(scores.long(), attention)
    with pytest.raises(TypeError, match="not one tensor"):
        multi_layer_distillation_loss(scores, attention[0])
    with pytest.raises(ValueError, match="empty"):
        multi_layer_distillation_loss(scores, iter([]))
    with pytest.raises(ValueError, match=r"served_attention\[1\]"):
        multi_layer_distillation_loss(scores, [attention[0], attention[1][:, :, :-1]])
    with pytest.raises(ValueError, match=r"served_attention\[0\]"):
        multi_layer_distillation_loss(scores, [attention[0][None]])
