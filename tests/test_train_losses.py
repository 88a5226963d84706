"""The training objective against brute force: capacity S_t in both forms, chunked KL / NTP, the weighted total."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trimkv.train.losses import capacity_loss, distillation_losses, log_capacity, total_loss


def random_log_beta(L=2, B=2, T=40, H=3, seed=0):
    """Per-layer (B, T, H) log beta spanning fast decay (beta ~ 0.3) to near-permanent tokens (beta ~ 0.999)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(L, B, T, H, dtype=torch.float64).uniform_(-1.0, 7.0, generator=g)
    return list(F.logsigmoid(logits).unbind(0))


def brute_capacity(log_beta):  # (B, T, H) -> S (B, H, T), a double loop in float64
    B, T, H = log_beta.shape
    S = torch.zeros(B, H, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for i in range(t + 1):
                    S[b, h, t] += math.exp((t - i) * float(log_beta[b, i, h]))
    return S


def brute_loss(log_betas, M, form):
    terms = []
    for log_beta in log_betas:
        S = brute_capacity(log_beta)
        for b, h, t in torch.cartesian_prod(*(torch.arange(n) for n in S.shape)).tolist():
            steps = t + 1  # tokens seen at position t
            s = float(S[b, h, t])
            if form == "paper":
                terms.append(max(0.0, s - M) / steps)
            else:
                terms.append(max(0.0, (s - M) / max(steps - M, 1)))
    if form == "paper":
        return sum(terms) / len(terms)
    positive = [x for x in terms if x > 0]
    return sum(positive) / max(len(positive), 1)


@pytest.mark.parametrize("block_elements", [1 << 24, 7 * 40])  # one block / many uneven blocks of query rows
def test_log_capacity_matches_double_loop(block_elements):
    log_beta = random_log_beta(L=1)[0]  # (B, T, H)
    got = log_capacity(log_beta.transpose(1, 2), block_elements=block_elements)
    torch.testing.assert_close(got.double().exp(), brute_capacity(log_beta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["released", "paper"])
@pytest.mark.parametrize("M", [3, 12])
def test_capacity_loss_matches_double_loop(form, M):
    log_betas = random_log_beta()
    got = capacity_loss([lb.float() for lb in log_betas], M, form, block_elements=4 * 40)
    assert float(got) > 0
    assert float(got) == pytest.approx(brute_loss(log_betas, M, form), rel=1e-5)


def test_capacity_gradient_matches_unchunked_autograd():
    log_betas = [lb.float().requires_grad_(True) for lb in random_log_beta(L=1)]
    capacity_loss(log_betas, 5, "paper", block_elements=3 * 40).backward()
    reference = log_betas[0].detach().clone().requires_grad_(True)
    T = reference.shape[1]
    distance = torch.arange(T).view(T, 1) - torch.arange(T).view(1, T)  # (t, i)
    terms = (distance * reference.transpose(1, 2).unsqueeze(-2)).masked_fill(distance < 0, float("-inf"))
    S = terms.logsumexp(-1).exp()  # (B, H, T)
    (F.relu(S - 5) / torch.arange(1, T + 1)).mean().backward()
    torch.testing.assert_close(log_betas[0].grad, reference.grad, rtol=1e-4, atol=1e-6)


def test_no_penalty_within_budget_and_full_retention_is_t():
    zeros = [torch.zeros(1, 10, 2)]  # beta = 1: S_t = t exactly
    torch.testing.assert_close(log_capacity(zeros[0].transpose(1, 2)).exp()[0, 0], torch.arange(1.0, 11.0))
    assert float(capacity_loss(zeros, 10, "released")) == 0.0  # S_t <= t <= M
    assert float(capacity_loss(zeros, 10, "paper")) == 0.0
    # beta = 1 over budget: every t > M gives (t - M) / (t - M) = 1 in the released form
    assert float(capacity_loss(zeros, 4, "released")) == pytest.approx(1.0)


def test_capacity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="capacity form"):
        capacity_loss([torch.zeros(1, 4, 1)], 2, "other")
    with pytest.raises(ValueError, match="memory_size"):
        capacity_loss([torch.zeros(1, 4, 1)], 0)


def test_distillation_blocks_equal_full_logits():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    student = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    teacher = torch.randn(2, 9, 8, generator=g)
    ids = torch.randint(0, 11, (2, 9), generator=g)
    kl, ntp = distillation_losses(student, teacher, ids, head, block_tokens=5)
    log_q = F.log_softmax(head(student[:, :-1]), -1).reshape(-1, 11)
    log_p = F.log_softmax(head(teacher[:, :-1]), -1).reshape(-1, 11)
    expected_kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    expected_ntp = F.cross_entropy(log_q, ids[:, 1:].reshape(-1))
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(ntp, expected_ntp)
    kl.backward()
    assert student.grad.abs().sum() > 0 and head.weight.grad is not None
    kl_same, _ = distillation_losses(teacher, teacher, ids, head)
    assert abs(float(kl_same.detach())) < 1e-6


def test_total_is_the_weighted_sum():
    parts = {"kl": torch.tensor(0.2), "ntp": torch.tensor(3.0), "capacity": torch.tensor(0.5)}
    assert float(total_loss(parts, {"kl": 0.5, "ntp": 0.5, "capacity": 1.0})) == pytest.approx(2.1)
    assert float(total_loss(parts, {"kl": 1.0, "ntp": 0.0, "capacity": 2.0})) == pytest.approx(1.2)


def test_objective_ignores_right_padding():
    from conftest import tiny_model

    import trimkv
    from trimkv.train.losses import attention_implementation, objective

    model = tiny_model()
    trimkv.attach_gates(model, trimkv.GateConfig(intermediate_size=16, bias_init=2.0, init_std=0.2))
    plain = model.config._attn_implementation
    ids = torch.randint(4, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad(), attention_implementation(model, "trimkv_reference"):
        exact = objective(model, ids, 4, plain)
        with_pad = objective(model, padded, 4, plain, length=20)
    for k in exact:
        torch.testing.assert_close(with_pad[k], exact[k], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_log_capacity_forward_matches_double_loop():
    """The fused path's values (its backward runs on CUDA only: tests/test_train_gpu.py)."""
    from trimkv.train.losses import log_capacity_flex

    log_beta = random_log_beta(L=1, T=150)[0]  # (B, T, H), T not a multiple of the 128-token blocks
    got = log_capacity_flex(log_beta.float().transpose(1, 2))
    torch.testing.assert_close(got.double().exp(), brute_capacity(log_beta), rtol=1e-4, atol=1e-4)
