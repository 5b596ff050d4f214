"""Optional extras: a step that needs a package of [wsi], [cxr] or [mri] that is missing stops in one `error:` line
naming the extra to install (before writing anything, with --skip-bad too), and the modalities that need none of
them (fundus photos, PNG X-rays) prepare without any. A missing package is simulated the way Python sees one:
its entries in sys.modules set to None, so `import` raises ModuleNotFoundError."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import kdcli_run

OPTIONAL = ("openslide", "tifffile", "fastexcel", "xlsxwriter", "pydicom", "nibabel")


def hide(monkeypatch: pytest.MonkeyPatch, *packages: str) -> None:
    """Make `import package` (and its submodules, even ones imported before) fail as if it were not installed."""
    for package in packages:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")] or [package]:
            monkeypatch.setitem(sys.modules, name, None)


def missing_extra_line(args: list[str], package: str, extra: str) -> str:
    result = kdcli_run(*args, ok=False)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors == lines[-1:], result.output  # one line, and it ends the output
    assert f"needs the {package} package" in errors[0] and f"pip install 'kdcli[{extra}]'" in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    from kdcli.synth.camelyon import synth_camelyon

    root = tmp_path_factory.mktemp("raw") / "slides"
    synth_camelyon(root, slides=2, size=512, seed=0)
    return root


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> dict[str, Path]:
    from kdcli.synth.cxr import synth_cxr

    roots = {}
    for kind, fraction in (("dicom", 0.5), ("png", 0.0)):
        roots[kind] = tmp_path_factory.mktemp("raw") / kind
        synth_cxr(roots[kind], per_class=1, size=64, gaze="none", annotated_fraction=0.0, dicom_fraction=fraction)
    return roots


@pytest.mark.parametrize("skip_bad", [False, True])
def test_prepare_slides_without_openslide_names_the_wsi_extra(slides, tmp_path, monkeypatch, skip_bad) -> None:
    hide(monkeypatch, "openslide")
    out = tmp_path / "out"
    missing_extra_line(["prepare", "camelyon", slides, "--out", out, *(["--skip-bad"] if skip_bad else [])],
                       "openslide", "wsi")
    assert not out.exists()


def test_synth_tiff_slides_without_tifffile_names_the_wsi_extra(tmp_path, monkeypatch) -> None:
    hide(monkeypatch, "tifffile")
    missing_extra_line(["synth", "camelyon", tmp_path / "raw", "--slides", "2", "--size", "512"], "tifffile", "wsi")
    assert not (tmp_path / "raw" / "slides").exists()


@pytest.mark.parametrize("skip_bad", [False, True])
def test_prepare_dicoms_without_pydicom_names_the_cxr_extra(xrays, tmp_path, monkeypatch, skip_bad) -> None:
    hide(monkeypatch, "pydicom")
    out = tmp_path / "out"
    missing_extra_line(["prepare", "cxr", xrays["dicom"], "--out", out, "--size", "32",
                        *(["--skip-bad"] if skip_bad else [])], "pydicom", "cxr")
    assert not out.exists()


def test_synth_dicoms_without_pydicom_names_the_cxr_extra(tmp_path, monkeypatch) -> None:
    hide(monkeypatch, "pydicom")
    missing_extra_line(["synth", "cxr", tmp_path / "raw", "--per-class", "1", "--size", "64", "--gaze", "none",
                        "--dicom-fraction", "0.5"], "pydicom", "cxr")


def test_brats_without_nibabel_names_the_mri_extra(tmp_path, monkeypatch) -> None:
    from kdcli.synth.brats import synth_brats

    raw = tmp_path / "raw"
    synth_brats(raw, cases=2, size=32, seed=0)
    hide(monkeypatch, "nibabel")
    missing_extra_line(["synth", "brats", tmp_path / "again", "--cases", "2", "--size", "32"], "nibabel", "mri")
    missing_extra_line(["prepare", "brats", raw, "--out", tmp_path / "out", "--skip-bad"], "nibabel", "mri")
    assert not (tmp_path / "again").exists() and not (tmp_path / "out").exists()


def test_fundus_and_png_xrays_need_no_optional_package(multieye_raw, xrays, tmp_path, monkeypatch) -> None:
    hide(monkeypatch, *OPTIONAL)
    for args in (["prepare", "multieye", multieye_raw, "--out", tmp_path / "fundus", "--size", "32"],
                 ["prepare", "cxr", xrays["png"], "--out", tmp_path / "xray", "--size", "32"]):
        kdcli_run(*args)
        assert (Path(args[4]) / "manifest.parquet").is_file()


def test_a_nifti_column_without_nibabel_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    """`prepare table` reads NIfTI columns through the [mri] extra: without nibabel, one line naming it."""
    from kdcli.synth.table import synth_table

    synth_table(tmp_path / "lab", samples=10, size=16, scan_format="nifti")
    monkeypatch.setitem(sys.modules, "nibabel", None)
    result = kdcli_run("prepare", "table", tmp_path / "lab" / "table.csv", "--out", tmp_path / "out", ok=False)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "needs the nibabel package" in lines[0] and "kdcli[mri]" in lines[0], result.output
    assert not (tmp_path / "out").exists()
