"""Bidirectional distillation's student: where each part starts (the multi-modal branch as its teacher, the
WSI-only branch fresh, seeded), that the sm -> mm alignment is a real
term from the first step (the two branches' WSI features differ, its gradient reaches the multi-modal branch and
stops at the WSI-only one), and that checkpoints of the unchanged layout still load; and the evaluation bags
(disjoint, seeded by the slide, the slide's score the mean of its bags')."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcli.engine.device import seed_everything
from kdcli.methods.bidirectional import Bidirectional, BidirectionalParams
from kdcli.models.mil import MILClassifier, mil_spec

FEATURES, CLINICAL, HIDDEN = 24, 5, 16


def teacher_model(pixels: bool = False) -> MILClassifier:
    """A WSI + clinical teacher; reads cached patch embeddings unless `pixels` (then a shared timm encoder)."""
    seed_everything(0)
    spec = mil_spec("test_resnet", 2, ["mm"], CLINICAL, hidden=HIDDEN, clinical_hidden=8)
    if not pixels:
        spec["embeddings"] = {"name": "random", "model": "test_resnet", "dim": FEATURES}
    return MILClassifier(spec).eval()


def random_batch(pixels: bool = False, slides: int = 4, patches: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    batch = {"bag_mask": torch.ones(slides, patches, dtype=torch.bool),
             "clinical": torch.randn(slides, CLINICAL, generator=generator),
             "clinical_mask": torch.ones(slides, CLINICAL), "clinical_present": torch.ones(slides, dtype=torch.bool),
             "label": torch.arange(slides) % 2}
    if pixels:
        batch["patches"] = torch.randint(0, 256, (slides, patches, 3, 32, 32), generator=generator,
                                         dtype=torch.uint8)
    else:
        batch["features"] = torch.randn(slides, patches, FEATURES, generator=generator).relu()
    return batch


def make_student(teacher: MILClassifier, seed: int = 0) -> MILClassifier:
    seed_everything(seed)  # as distill does before make_student
    return Bidirectional.make_student(BidirectionalParams(), teacher).eval()


def grad_norm(parameters) -> float:
    grads = [p.grad.float().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def test_branches_differ_at_start_so_the_alignment_has_a_gradient():
    # Until issue 13 the WSI-only pooling was a copy of the multi-modal one: h_sm == h_mm, align 0, gradient ~1e-7.
    student = make_student(teacher_model())
    method = Bidirectional(BidirectionalParams(), student).eval()  # eval: no dropout, the weights' own difference
    batch = random_batch()
    out = student(batch)
    assert (out["h_mm"] - out["h_sm"]).abs().max() > 1e-3
    terms = method(batch)
    assert terms["align"] > 1e-6
    terms["align"].backward()
    assert grad_norm(student.pool["mm"].parameters()) > 1e-4


def test_alignment_gradient_reaches_the_mm_branch_and_shared_encoder_but_not_the_sm_branch():
    student = make_student(teacher_model(pixels=True))
    method = Bidirectional(BidirectionalParams(), student).eval()
    method(random_batch(pixels=True, slides=2, patches=4))["align"].backward()
    assert grad_norm(student.pool["mm"].parameters()) > 1e-4
    assert grad_norm(student.encoder.parameters()) > 0  # shared: reached through h_mm only
    assert grad_norm(student.pool["sm"].parameters()) == 0 and grad_norm(student.head_sm.parameters()) == 0
    assert grad_norm(student.clinical.parameters()) == 0 and grad_norm(student.head_mm.parameters()) == 0


def test_student_starts_as_its_teacher_with_a_fresh_seeded_wsi_only_branch():
    teacher = teacher_model()
    student = make_student(teacher, seed=3)
    batch = random_batch()
    with torch.no_grad():
        from_teacher, from_student = teacher(batch), student(batch)
    assert torch.allclose(from_student["logits_mm"], from_teacher["logits_mm"], atol=1e-6)
    assert torch.equal(from_student["h_clinical"], from_teacher["h_clinical"])
    seed_everything(3)  # the WSI-only branch is what a new model built under the same seed holds
    fresh = MILClassifier({**teacher.spec, "branches": ["mm", "sm"]}).state_dict()
    for key, value in student.state_dict().items():
        expected = fresh[key] if key.startswith(("pool.sm.", "head_sm.")) else teacher.state_dict()[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(student.pool["sm"].project[0].weight, teacher.pool["mm"].project[0].weight)


def test_student_init_is_seeded_and_ignores_a_teachers_own_sm_branch():
    teacher = teacher_model()
    first, again, other = make_student(teacher, 3), make_student(teacher, 3), make_student(teacher, 4)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    assert not torch.equal(first.pool["sm"].gate.weight, other.pool["sm"].gate.weight)
    # a bidirectional student as teacher: its WSI-only branch is not carried over either
    second = make_student(first, 5)
    assert not torch.equal(second.pool["sm"].project[0].weight, first.pool["sm"].project[0].weight)
    assert not torch.equal(second.head_sm.weight, first.head_sm.weight)
    assert torch.equal(second.pool["mm"].project[0].weight, first.pool["mm"].project[0].weight)


def test_checkpoint_written_before_issue_13_loads_and_predicts_as_saved(tmp_path):
    from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint
    from kdcli.train import load_model

    # what distill wrote before: the teacher's spec with both branches, the WSI-only pooling a copy of the fusion one
    spec = {**teacher_model().spec, "branches": ["mm", "sm"]}
    seed_everything(0)
    old = MILClassifier(spec).eval()
    old.pool["sm"].load_state_dict(old.pool["mm"].state_dict())
    meta = {"kind": "student", "task": "mil", "model": spec, "classes": ["0", "1"], "modality": "wsi",
            "data": {}, "method": "bidirectional"}
    save_checkpoint(tmp_path / "old.pt", meta, old.state_dict())
    loaded = load_model(load_checkpoint(tmp_path / "old.pt"))
    batch = random_batch()
    batch["clinical_present"] = torch.tensor([True, False, True, False])
    with torch.no_grad():
        before, after = old(batch), loaded(batch)
    for key in ("logits", "logits_mm", "logits_sm", "h_mm", "h_sm"):
        assert torch.equal(before[key], after[key])
    assert torch.equal(after["h_mm"], after["h_sm"])  # its branches stay as they were trained


# ---- evaluation bags ----------------------------------------------------------------------------------------------


def test_eval_bags_partition_the_slide_seeded_by_its_id():
    from kdcli.data.bags import eval_bags

    for count in (1, 7, 16, 17, 33, 64):
        bags = eval_bags(count, 16, "slide-a")
        chosen = np.concatenate(bags)
        assert sorted(chosen.tolist()) == list(range(count))  # disjoint, every patch once
        assert len(bags) == -(-count // 16) and max(len(b) for b in bags) - min(len(b) for b in bags) <= 1
        assert all(len(b) <= 16 for b in bags)
        assert all(np.array_equal(a, b) for a, b in zip(bags, eval_bags(count, 16, "slide-a"), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(eval_bags(64, 16, "slide-a"), eval_bags(64, 16, "slide-b"),
                                                          strict=True))


class FakeView:
    """What predict_bags reads from a BagView: items, records."""

    def __init__(self, batch: dict[str, torch.Tensor], counts: list[int]):
        self.records = [f"slide-{i}" for i in range(len(counts))]
        self.items = [{"features": batch["features"][i, :count], "bag_mask": batch["bag_mask"][i, :count],
                       "clinical": batch["clinical"][i], "clinical_mask": batch["clinical_mask"][i],
                       "clinical_present": bool(batch["clinical_present"][i]), "label": int(batch["label"][i]),
                       "index": i, "teacher_index": i} for i, count in enumerate(counts)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return dict(self.items[i])


@pytest.mark.parametrize("bag_size", [None, 5, 64])
def test_slide_score_is_the_mean_of_its_bags_probabilities(bag_size):
    from kdcli.data.bags import eval_bags
    from kdcli.mil import predict_bags

    student = make_student(teacher_model())
    batch = random_batch(slides=3, patches=12)
    batch["clinical_present"] = torch.tensor([True, False, True])
    view = FakeView(batch, counts=[12, 9, 3])
    predicted = predict_bags(student, view, torch.device("cpu"), keep_attention=True, bag_size=bag_size)
    for i, item in enumerate(view.items):
        bags = eval_bags(len(item["bag_mask"]), bag_size, view.records[i]) if bag_size \
            else [np.arange(len(item["bag_mask"]))]
        probs, attention = [], np.zeros(len(item["bag_mask"]), np.float32)
        for chosen in bags:
            single = {k: (v[chosen][None] if k in ("features", "bag_mask") else torch.as_tensor(v)[None])
                      for k, v in item.items()}
            with torch.no_grad():
                out = student(single)
            probs.append(out["logits"].softmax(-1)[0])
            attention[chosen] = out["attention_mm" if item["clinical_present"] else "attention_sm"][0].numpy()
        assert np.allclose(predicted["probs"][i], torch.stack(probs).mean(0).numpy(), atol=1e-6)
        assert np.allclose(predicted["attention"][i], attention, atol=1e-6)
    assert predicted["labels"].tolist() == batch["label"].tolist()
