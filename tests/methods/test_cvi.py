"""CVI's pieces against closed forms (KL of Gaussians, the cyclical annealing, the masked BCE) and the gradients
that make the posterior worth distilling: it must read z_q, and its BCE must reach the trainable block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from kdcli.methods.cvi import CVI, CVIParams, annotation_verdict, cyclical_beta, kl_gaussians
from kdcli.methods.multilabel import masked_bce
from kdcli.models.classifier import Classifier, default_normalisation

CLASSES = 3


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = (torch.randn(4, 8) for _ in range(4))
    per_dimension = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(mu_p, (0.5 * lv_p).exp()))
    assert torch.allclose(kl_gaussians(mu_q, lv_q, mu_p, lv_p), per_dimension.mean(-1), atol=1e-6)  # VKD's
    assert torch.allclose(kl_gaussians(mu_q, lv_q, mu_p, lv_p, "sum"), per_dimension.sum(-1), atol=1e-5)
    assert kl_gaussians(mu_q, lv_q, mu_q, lv_q).abs().max() < 1e-6


def test_kl_mean_is_the_sum_over_latent_dimensions_divided_by_their_number():
    torch.manual_seed(1)
    mu_q, lv_q, mu_p, lv_p = (torch.randn(5, 64) for _ in range(4))
    assert torch.allclose(64 * kl_gaussians(mu_q, lv_q, mu_p, lv_p), kl_gaussians(mu_q, lv_q, mu_p, lv_p, "sum"),
                          rtol=1e-5)


@pytest.mark.parametrize(("progress", "beta"), [(0.0, 0.0), (0.0625, 0.5), (0.125, 1.0), (0.2, 1.0), (0.25, 0.0),
                                                (0.3125, 0.5)])
def test_cyclical_beta_four_cycles_half_rising(progress, beta):
    assert cyclical_beta(progress, 4, 0.5) == pytest.approx(beta)


def test_masked_bce_leaves_out_unknown_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1, 255, 0]], dtype=torch.uint8)
    expected = F.binary_cross_entropy_with_logits(logits[:, [0, 2]], torch.tensor([[1.0, 0.0]]))
    assert masked_bce(logits, labels) == pytest.approx(expected.item())


def stage1() -> Classifier:
    torch.manual_seed(0)
    mean, std = default_normalisation(1)
    return Classifier({"backbone": "test_resnet", "head": "linear", "in_chans": 1, "num_classes": CLASSES,
                       "mean": mean, "std": std})


def batch(size: int = 4, annotated: tuple[int, ...] = (1, 1, 0, 1)) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    gaze = torch.zeros(size, 1, 32, 32, dtype=torch.uint8)
    gaze[:, :, 4:14, 18:30] = 255  # the radiologist looked at one corner
    flags = torch.tensor([[a, a] for a in annotated], dtype=torch.uint8)
    return {"image": torch.randint(0, 255, (size, 1, 32, 32), dtype=torch.uint8, generator=generator),
            "labels": torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.uint8)[:size],
            "gaze": gaze * flags[:, :1, None, None], "boxes": gaze * flags[:, 1:, None, None], "annotated": flags}


def method(**params) -> CVI:
    p = CVIParams(samples=4, latent=8, hidden=16, **params)
    return CVI(p, CVI.make_student(p, stage1()))


def test_posterior_logits_depend_on_z_q_from_the_first_step():
    """The posterior's only route to the logits is z_q: at the student's initial state dL/dz_q is non-zero
    (z_q is mu_q plus a noise term, so dL/dz_q = dL/dmu_q). The earlier [z_q, f] head started with its z weights
    at zero: dL/dz_q was exactly 0 and nothing pushed the annotation's information into z_q."""
    for head_input, moves in (("z", True), ("zf", False)):
        cvi = method(head_input=head_input).train()
        data = batch()
        out = cvi.student(data["image"], data["gaze"])
        loss = masked_bce(out["posterior_logits"], data["labels"])
        (grad,) = torch.autograd.grad(loss, out["mu_q"])
        assert (grad.abs().max() > 1e-6) == moves, head_input


def test_posterior_bce_trains_the_trainable_block_by_default():
    cvi = method().train()
    cvi(batch())["bce_posterior"].backward()
    # test_resnet's last BatchNorm of each block starts at zero (timm's zero_init_last): at step 0 the gradient
    # reaches that BatchNorm and the shortcut, not yet the convolutions before it
    trainable = [p for n, p in cvi.student.named_parameters() if n.startswith("base.backbone.layer4.")]
    assert sum(float(p.grad.abs().sum()) for p in trainable if p.grad is not None) > 0
    assert all(p.grad is None for n, p in cvi.student.named_parameters() if n.startswith("base.backbone.layer3."))
    detached = method(posterior_to_backbone=False).train()
    detached(batch())["bce_posterior"].backward()
    assert all(p.grad is None or not p.grad.any() for n, p in detached.student.named_parameters()
               if n.startswith("base.backbone."))


def test_annotated_only_by_default_leaves_unannotated_images_out_of_the_prior_bce():
    assert CVIParams().annotated_only
    data = batch()
    cvi = method().eval()
    with torch.no_grad():
        logits = cvi.student(data["image"])["logits"]
        keep = data["annotated"][:, 0].bool()
        assert cvi(data)["bce_prior"] == pytest.approx(masked_bce(logits[keep], data["labels"][keep]).item())
        everyone = method(annotated_only=False).eval()
        assert everyone(data)["bce_prior"] == pytest.approx(masked_bce(logits, data["labels"]).item())


def test_kl_term_averages_over_latent_dimensions_by_default():
    data = batch()
    with torch.no_grad():
        mean, total = method().eval()(data)["_kl_raw"], method(kl_reduction="sum").eval()(data)["_kl_raw"]
    assert mean > 0 and total == pytest.approx(8 * mean.item(), rel=1e-5)


def test_old_student_spec_without_head_input_loads_and_reads_z_and_f(tmp_path):
    """Students built before `head_input` existed have no such key: their posterior head read [z_q, f]."""
    from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint
    from kdcli.models.cvi import CVIClassifier
    from kdcli.train import load_model

    teacher = stage1()
    spec = {"arch": "cvi", "backbone": "test_resnet", "head": "cvi", "in_chans": 1, "classifier": teacher.spec,
            "latent": 8, "hidden": 16, "samples": 4, "posterior_detached": True}
    old = CVIClassifier(dict(spec))
    old.start_from(teacher)
    meta = {"kind": "student", "task": "multilabel", "model": spec, "classes": ["a", "b", "c"],
            "modality": "xray", "data": {}}
    save_checkpoint(tmp_path / "old.pt", meta, old.state_dict())
    loaded = load_model(load_checkpoint(tmp_path / "old.pt"))
    assert loaded.head_posterior.in_features == 8 + teacher.backbone.num_features
    data = batch()
    with torch.no_grad():
        expected, got = old.eval()(data["image"], data["gaze"]), loaded(data["image"], data["gaze"])
    for key in ("logits", "posterior_logits"):
        assert torch.allclose(expected[key], got[key]), key
    assert torch.allclose(got["posterior_logits"], teacher.eval()(data["image"])["logits"], atol=1e-5)


def test_bad_head_input_is_refused_in_one_line():
    from kdcli.errors import UsageError

    with pytest.raises(UsageError, match="head_input"):
        method(head_input="f")


@pytest.mark.parametrize(("history", "start"), [
    ([{"dev_posterior_auroc_annotated": 0.6, "dev_prior_auroc_annotated": 0.7},
      {"dev_posterior_auroc_annotated": 0.7, "dev_prior_auroc_annotated": 0.7}], "warning: the posterior never beat"),
    ([{"dev_posterior_auroc_annotated": 0.6, "dev_prior_auroc_annotated": 0.7},
      {"dev_posterior_auroc_annotated": 0.8, "dev_prior_auroc_annotated": 0.7}], "the posterior beat the prior"),
    ([{"dev_posterior_auroc_annotated": None, "dev_prior_auroc_annotated": None, "dev_annotated_images": 0}], None),
])
def test_the_run_says_whether_the_annotations_carry_anything(history, start):
    lines = annotation_verdict(history)
    assert (lines[0].startswith(start) and len(lines) == 1) if start else lines == []


def test_a_dev_split_without_annotations_is_said_once(monkeypatch):
    import numpy as np

    from kdcli.methods import cvi as cvi_module

    monkeypatch.setattr(cvi_module, "annotated_rows", lambda view, kind: np.zeros(0, dtype=np.int64))
    said = []
    method().make_validator(object(), ["a", "b", "c"], None, said.append)
    assert len(said) == 1 and said[0].startswith("no dev image has gaze")
