"""Image sizes come from the header (PIL's lazy open): they agree with the decoded image for PNG (8/16-bit) and
JPEG (baseline, progressive), a JPEG cut in its scan data still reports them, and a broken file is one line
naming it, through `prepare cxr` too."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import kdcli_run

from kdcli.errors import KdcliError
from kdcli.sources.cxr import image_dims
from kdcli.synth.cxr import synth_cxr

HEIGHT, WIDTH = 37, 53  # not square, so a swapped (width, height) shows


def encoded(suffix: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(suffix, image, params or [])
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("kind", ["png8", "png16", "jpeg", "progressive"])
def test_header_sizes_match_the_decoded_image(kind, tmp_path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH)).astype(np.uint8)
    data = {"png8": lambda: encoded(".png", image), "png16": lambda: encoded(".png", image.astype(np.uint16) * 257),
            "jpeg": lambda: encoded(".jpg", image),
            "progressive": lambda: encoded(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])}[kind]()
    path = tmp_path / ("x.png" if kind.startswith("png") else "x.jpg")
    path.write_bytes(data)
    assert image_dims(path) == cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
    assert image_dims(path) == (HEIGHT, WIDTH)


def test_a_jpeg_cut_in_its_scan_data_still_reports_its_size(tmp_path) -> None:
    data = encoded(".jpg", np.random.default_rng(1).integers(0, 255, (HEIGHT, WIDTH)).astype(np.uint8))
    scan = data.index(b"\xff\xda")  # start of scan: every header segment lies before it
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: (scan + len(data)) // 2])
    assert image_dims(path) == (HEIGHT, WIDTH)


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0\x00\x10JFIF", b"not an image at all" * 5, b""])
def test_a_broken_image_is_one_line_naming_it(content, tmp_path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(KdcliError) as caught:
        image_dims(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "will not decode" in message


def test_prepare_names_a_broken_annotated_image_in_one_line(tmp_path) -> None:
    raw = tmp_path / "raw"
    info = synth_cxr(raw, per_class=1, size=64, layout="nih", gaze="egd", annotated_fraction=1.0,
                     dicom_fraction=0.0, seed=0)
    name = next(n for n in info["annotated"] if not info["images"][n]["dicom"])
    path = raw / info["images"][name]["path"]
    path.write_bytes(path.read_bytes()[:12])  # the PNG signature and no header
    result = kdcli_run("prepare", "cxr", raw, "--out", tmp_path / "out", "--size", "32", "--gaze", raw / "egd-cxr",
                       ok=False)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "will not decode" in errors[0], result.output
