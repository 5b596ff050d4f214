"""CVI's pieces against closed forms: KL of Gaussians, the cyclical annealing, the masked BCE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from kdcli.methods.cvi import cyclical_beta, kl_gaussians
from kdcli.methods.multilabel import masked_bce


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = (torch.randn(4, 8) for _ in range(4))
    expected = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(mu_p, (0.5 * lv_p).exp())).sum(-1)
    assert torch.allclose(kl_gaussians(mu_q, lv_q, mu_p, lv_p), expected, atol=1e-5)
    assert kl_gaussians(mu_q, lv_q, mu_q, lv_q).abs().max() < 1e-6


@pytest.mark.parametrize(("progress", "beta"), [(0.0, 0.0), (0.0625, 0.5), (0.125, 1.0), (0.2, 1.0), (0.25, 0.0),
                                                (0.3125, 0.5)])
def test_cyclical_beta_four_cycles_half_rising(progress, beta):
    assert cyclical_beta(progress, 4, 0.5) == pytest.approx(beta)


def test_masked_bce_leaves_out_unknown_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1, 255, 0]], dtype=torch.uint8)
    expected = F.binary_cross_entropy_with_logits(logits[:, [0, 2]], torch.tensor([[1.0, 0.0]]))
    assert masked_bce(logits, labels) == pytest.approx(expected.item())
