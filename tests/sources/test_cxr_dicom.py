"""DICOM chest X-rays map to 8-bit as the standard says: the modality LUT (rescale), then the VOI LUT Sequence when
there is one (over any window), else the window (PS3.3 C.11.2.1.2.1, LINEAR), else the image's own range;
MONOCHROME1 inverted. `prepare cxr` stores those pixels and `predict` reads them with the same function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import kdcli_run
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kdcli.errors import KdcliError
from kdcli.predict.images import image_reader
from kdcli.shards.reader import ShardStore
from kdcli.sources.cxr import read_xray, stored_xray
from kdcli.synth.cxr import synth_cxr

SHAPE = (24, 30)
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def stored_values(seed: int, bits: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, SHAPE).astype(np.uint16)


def write_dicom(path: Path, raw: np.ndarray, photometric: str = "MONOCHROME2", **header) -> Path:
    """A minimal DX file: 12 bits stored in 16, the given header elements (keyword -> value) on top."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, photometric
    ds.Rows, ds.Columns = raw.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.PixelData = raw.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def voi_lut(first: int, data: np.ndarray) -> Sequence:
    """One VOI LUT item with 16-bit entries (descriptor and data written as US, their ambiguous VRs resolved)."""
    item = Dataset()
    item.add_new(0x00283002, "US", [len(data), first, 16])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", [int(v) for v in data])  # LUT Data
    return Sequence([item])


def linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..1, written out here independently of pydicom."""
    below, above = values <= centre - 0.5 - (width - 1) / 2, values > centre - 0.5 + (width - 1) / 2
    inside = ((values - (centre - 0.5)) / (width - 1) + 0.5)
    return np.where(below, 0.0, np.where(above, 1.0, inside))


def gamma_lut(entries: int) -> np.ndarray:
    return np.round(65535 * np.sqrt(np.arange(entries) / (entries - 1))).astype(np.uint16)


def test_a_voi_lut_sequence_maps_the_pixels_and_wins_over_the_window(tmp_path) -> None:
    raw, first, lut = stored_values(0), 500, gamma_lut(4096)
    path = write_dicom(tmp_path / "lut.dcm", raw, RescaleSlope=2, RescaleIntercept=-100, VOILUTSequence=voi_lut(
        first, lut), WindowCenter=3000, WindowWidth=500)
    modality = raw.astype(np.int64) * 2 - 100
    expected = np.round(lut[np.clip(modality - first, 0, len(lut) - 1)] / 65535 * 255).astype(np.uint8)
    windowed = np.round(linear_window(modality.astype(float), 3000, 500) * 255).astype(np.uint8)
    assert not np.array_equal(expected, windowed)  # the two transforms differ, so the test sees which one ran
    np.testing.assert_array_equal(read_xray(path), expected)


def test_a_window_maps_the_rescaled_pixels_and_monochrome1_is_inverted(tmp_path) -> None:
    raw, centre, width = stored_values(1), 1000.0, 41.0
    modality = raw.astype(float) - 1024
    for photometric, flip in (("MONOCHROME2", False), ("MONOCHROME1", True)):
        path = write_dicom(tmp_path / f"{photometric}.dcm", raw, photometric, RescaleSlope=1, RescaleIntercept=-1024,
                           WindowCenter=centre, WindowWidth=width)
        unit = linear_window(modality, centre, width)
        expected = np.round((1 - unit if flip else unit) * 255).astype(np.uint8)
        assert 0 < (unit == 0).mean() < 1 and 0 < (unit == 1).mean() < 1  # both clips and the ramp are exercised
        np.testing.assert_array_equal(read_xray(path), expected, err_msg=photometric)


def test_without_a_voi_transform_the_image_spans_its_own_range(tmp_path) -> None:
    raw = stored_values(2)
    path = write_dicom(tmp_path / "plain.dcm", raw, RescaleSlope=0.5, RescaleIntercept=10)
    values = raw * 0.5 + 10
    expected = np.round((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_xray(path), expected)


def test_an_invalid_window_is_one_line_naming_the_file(tmp_path) -> None:
    path = write_dicom(tmp_path / "zero.dcm", stored_values(3), WindowCenter=100, WindowWidth=0)
    with pytest.raises(KdcliError) as caught:
        read_xray(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value) and "Window Width" in str(caught.value)


def test_prepare_stores_and_predict_reads_the_voi_lut_mapping(tmp_path) -> None:
    raw_root, shards = tmp_path / "raw", tmp_path / "shards"
    info = synth_cxr(raw_root, per_class=1, size=64, layout="nih", gaze="none", annotated_fraction=0.0,
                     dicom_fraction=0.5, seed=0)
    name = next(n for n, image in info["images"].items() if image["dicom"])
    path = raw_root / info["images"][name]["path"]
    raw, lut = stored_values(4), gamma_lut(4096)
    write_dicom(path, raw, "MONOCHROME1", VOILUTSequence=voi_lut(0, lut), WindowCenter=10, WindowWidth=5)
    expected = stored_xray(255 - np.round(lut[raw] / 65535 * 255).astype(np.uint8), 32)
    kdcli_run("prepare", "cxr", raw_root, "--out", shards, "--size", "32")
    store = ShardStore(shards)
    row = store.rows().filter(id=name).row(0, named=True)
    np.testing.assert_array_equal(store.read(row["shard"], row["index"], "xray"), expected)
    store.close()
    np.testing.assert_array_equal(image_reader({"source": "cxr", "size": 32}, "xray")(str(path)), expected)
