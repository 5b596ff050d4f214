"""Concept banks: the official concepts_raw.npy format, text files, embeddings, and the concept head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcli.errors import KdcliError
from kdcli.models.classifier import Classifier
from kdcli.models.concepts import deterministic_embeddings, load_concept_embeddings, load_concept_texts


def test_official_npy_and_text_files_load(tmp_path):
    concepts = np.array(["drusen: small yellowish spots", "subretinal fluid: dark dome"], dtype="<U127")
    np.save(tmp_path / "concepts_raw.npy", concepts)
    assert load_concept_texts(tmp_path / "concepts_raw.npy") == list(concepts)
    (tmp_path / "c.txt").write_text("drusen\n\n  cupping  \n")
    assert load_concept_texts(tmp_path / "c.txt") == ["drusen", "cupping"]
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(KdcliError, match="objects.npy"):  # never unpickled
        load_concept_texts(tmp_path / "objects.npy")


def test_embeddings_are_unit_rows_and_checked(tmp_path):
    vectors = deterministic_embeddings(["a", "b", "c"], 16)
    assert vectors.shape == (3, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1)
    assert np.array_equal(vectors, deterministic_embeddings(["a", "b", "c"], 16))  # stable across runs
    assert not np.allclose(vectors[0], deterministic_embeddings(["z"], 16)[0])
    np.save(tmp_path / "e.npy", np.random.default_rng(0).standard_normal((3, 8)) * 5)
    loaded = load_concept_embeddings(tmp_path / "e.npy", 3)
    assert np.allclose(np.linalg.norm(loaded, axis=1), 1)
    with pytest.raises(KdcliError, match=r"expected \(4, D\)"):
        load_concept_embeddings(tmp_path / "e.npy", 4)


def test_concept_head_similarities_are_cosines_and_drive_the_logits():
    texts = ["a", "b", "c", "d"]
    spec = {"backbone": "test_resnet", "head": "concept", "in_chans": 3, "num_classes": 2, "mean": [0.5] * 3,
            "std": [0.25] * 3, "concepts": texts, "concept_dim": 16}
    model = Classifier(spec, torch.from_numpy(deterministic_embeddings(texts, 16))).eval()
    out = model(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    assert out["sims"].shape == (2, 2, 4) and out["sims"][:, 0].abs().max() <= 1 + 1e-5
    head = model.head
    expected = head.classifier(head.scale * out["sims"][:, 0])
    assert torch.allclose(out["logits"], expected, atol=1e-5)


def test_concept_scale_is_an_option_off_by_default_and_recorded_in_the_spec(multieye_shards, tmp_path):
    """The official classifier sees the cosines unscaled; x10 is `--concept-scale 10`, and a checkpoint keeps
    the scale it recorded."""
    from conftest import FAST, kdcli_run
    from test_prepare_multieye import assert_one_line_error

    from kdcli.shards.reader import ShardStore
    from kdcli.train import build_student, resolve_config

    store = ShardStore(multieye_shards)
    flags = {"data": str(multieye_shards), "model": "test_resnet", "head": "concept"}
    default = build_student(resolve_config(flags), store, "fundus")
    assert default.spec["concept_scale"] == 1.0 and default.head.scale == 1.0
    scaled = build_student(resolve_config({**flags, "concept_scale": "10"}), store, "fundus")  # as --set sends it
    assert scaled.spec["concept_scale"] == 10.0 and scaled.head.scale == 10.0
    assert Classifier(scaled.spec).head.scale == 10.0  # what load_model rebuilds from an old checkpoint
    result = kdcli_run("teach", "--data", str(multieye_shards), "--modality", "fundus",
                       "--concept-scale", "0", "--out", str(tmp_path / "m.pt"), *FAST, ok=False)
    assert_one_line_error(result, "--concept-scale must be > 0")
