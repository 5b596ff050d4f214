"""What every registered source declares for `kdcli predict` and `kdcli export` (Source.pixel_options,
raw_image_reader, preprocessing_steps): checked over the SOURCES registry, so a new source line is covered."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kdcli.sources import SOURCES


@pytest.mark.parametrize("name", SOURCES.names())
def test_pixel_options_are_options_of_the_source(name):
    source = SOURCES.get(name)
    fields = {f.name for f in dataclasses.fields(source.Options)}
    assert set(source.pixel_options) <= fields, f"{name}: pixel_options name no option of {source.Options.__name__}"


@pytest.mark.parametrize("name", SOURCES.names())
def test_raw_suffixes_are_lower_case_extensions(name):
    source = SOURCES.get(name)
    assert source.raw_suffixes and all(s.startswith(".") and s == s.lower() for s in source.raw_suffixes)


def test_the_record_keeps_only_the_pixel_options_and_the_sources_extras():
    from types import SimpleNamespace

    from kdcli.sources.preprocessing import preprocessing_record

    dataset = SimpleNamespace(source="multieye", prepare={"size": 64, "source_options": {
        "clahe": True, "median": 3, "list_name": "x.txt"}}, modalities={"oct": {"shape": [64, 64, 1]}}, extra={})
    record = preprocessing_record(dataset)
    assert record == {"source": "multieye", "size": 64, "options": {"clahe": True, "median": 3},
                      "modalities": {"oct": {"shape": [64, 64, 1]}}}
    brats = preprocessing_record(SimpleNamespace(source="brats", prepare={"size": 32}, modalities={},
                                                 extra={"label_values": [0, 1, 2, 4]}))
    assert brats["label_values"] == [0, 1, 2, 4] and brats["options"] == {}


def test_isic_raw_reader_is_what_prepare_stores(tmp_path):
    import cv2

    from kdcli.sources.imaging import preprocess_photo
    from kdcli.sources.isic import IsicSource

    image = (np.arange(40 * 30 * 3) % 251).astype(np.uint8).reshape(40, 30, 3)
    path = tmp_path / "ISIC_0000001.jpg"
    cv2.imwrite(str(path), image)
    record = {"source": "isic", "size": 32, "options": {}, "modalities": {"dermoscopy": {"shape": [32, 32, 3]}}}
    reader = IsicSource.raw_image_reader(record, "dermoscopy")
    assert np.array_equal(reader(str(path)), preprocess_photo(path, 32))
    assert reader(str(path)).shape == (32, 32, 3)
    assert IsicSource.preprocessing_steps(record, {"modality": "dermoscopy"})[-1].endswith(
        "(cv2 INTER_AREA down, INTER_CUBIC up)")
