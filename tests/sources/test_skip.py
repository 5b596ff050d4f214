"""--skip-bad works from the error's fields: which record is at fault, and what is wrong, without the hint."""

from __future__ import annotations

import pytest

from kdcli.errors import KdcliError
from kdcli.sources._skip import read_or_skip, skip_or_raise


def failing(exc: KdcliError):
    def read():
        raise exc

    return read


def test_error_text_is_built_from_its_fields() -> None:
    exc = KdcliError("t1 is empty — truncated?", path="a/t1.nii.gz", hint="pass --skip-bad", subject="case B_001")
    assert str(exc) == "case B_001: a/t1.nii.gz: t1 is empty — truncated? — pass --skip-bad"
    assert exc.fault == "a/t1.nii.gz: t1 is empty — truncated?"  # a dash in the message is kept, not cut there
    assert exc.problem == "case B_001: a/t1.nii.gz: t1 is empty — truncated?"
    assert str(KdcliError("plain", path="x", hint="h")) == "x: plain — h"


def test_read_or_skip_keeps_the_reason_and_drops_the_samples() -> None:
    exc = KdcliError("damaged", path="s.tif", hint="pass --skip-bad", subject="slide s")
    info, samples = read_or_skip(failing(exc), skip_bad=True)
    assert info == {"skipped": "s.tif: damaged"} and list(samples) == []
    with pytest.raises(KdcliError, match="damaged"):
        read_or_skip(failing(exc), skip_bad=False)
    assert read_or_skip(lambda: ({"grid": 1}, iter([7])), skip_bad=True)[0] == {"grid": 1}


def test_scan_skips_only_errors_that_name_a_record() -> None:
    notes: list[str] = []
    skip_or_raise(KdcliError("no t1ce", hint="pass --skip-bad", subject="case B_002"), True, notes)
    assert notes == ["skipped case B_002: no t1ce"]
    with pytest.raises(KdcliError, match="found twice"):  # about the dataset, not one record: never skipped
        skip_or_raise(KdcliError("case B_003 found twice", path="raw"), True, notes)
    with pytest.raises(KdcliError):
        skip_or_raise(KdcliError("no t1ce", subject="case B_004"), False, notes)
    assert len(notes) == 1
