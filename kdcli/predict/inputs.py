"""INPUTS of `kdcli predict` -> the items a checkpoint reads: image files, BraTS cases, slides.

An input is a file, a folder (searched at any depth for the files the checkpoint reads) or a glob pattern
(`photos/*.png`, `scans/**/*.dcm`). One that names nothing usable becomes a failure of its own, reported in one
line, and the others go on."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
XRAY_SUFFIXES = (*IMAGE_SUFFIXES, ".dcm")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".jpg", ".jpeg")  # OpenSlide's and BCNB's jpg


@dataclass
class Item:
    """One unit of prediction: an image, a case (sequence -> file) or a slide."""

    id: str
    path: str  # what the output names: the file, or a case's folder
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class Failure:
    input: str
    reason: str


def progress(total: int, what: str):
    """A progress bar on an interactive terminal (tqdm), silent in logs and pipelines; call it with a count."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit=what, desc="predict", file=sys.stderr, leave=False, disable=None)


def has_suffix(path: str | Path, suffixes: Iterable[str]) -> bool:
    return str(path).lower().endswith(tuple(suffixes))


def strip_suffix(name: str, suffixes: Iterable[str]) -> str:
    lower = name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):  # .nii.gz before .gz-less .nii
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _walk(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        found += [Path(root) / n for n in sorted(names) if not n.startswith(".") and has_suffix(n, suffixes)]
    return found


def expand(inputs: list[str], suffixes: tuple[str, ...], what: str) -> tuple[list[Path], list[Failure]]:
    """Files named by INPUTS, in the order given (folders and patterns sorted), each once; and the inputs that
    name none. A file named directly is taken whatever its suffix (reading it says whether it is usable)."""
    files: list[Path] = []
    failures: list[Failure] = []
    for text in inputs:
        path = Path(text)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = _walk(path, suffixes)
            if not found:
                failures.append(Failure(text, f"folder holds no {what} ({', '.join(suffixes)})"))
            files += found
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            found = [Path(m) for m in matches if Path(m).is_file() and has_suffix(m, suffixes)]
            found += [f for m in matches if Path(m).is_dir() for f in _walk(Path(m), suffixes)]
            if not found:
                failures.append(Failure(text, f"pattern matches no {what}"))
            files += found
        else:
            failures.append(Failure(text, "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for file in files:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(file)
    return unique, failures


def unique_ids(paths: list[Path], suffixes: tuple[str, ...]) -> list[str]:
    """File stems as ids; where two files share a stem, their paths (without suffix) tell them apart."""
    stems = [strip_suffix(p.name, suffixes) for p in paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [stem if counts[stem] == 1 else strip_suffix(str(p), suffixes) for stem, p in zip(stems, paths, strict=True)]


def image_items(inputs: list[str], suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
                what: str = "images") -> tuple[list[Item], list[Failure]]:
    files, failures = expand(inputs, suffixes, what)
    ids = unique_ids(files, suffixes)
    return [Item(i, str(f), {"image": str(f)}) for i, f in zip(ids, files, strict=True)], failures


def slide_items(inputs: list[str]) -> tuple[list[Item], list[Failure]]:
    """Slides keep their file stem as id: `prepare camelyon` names slides so, and seeds their patch choice by it."""
    files, failures = expand(inputs, SLIDE_SUFFIXES, "slides")
    items, seen = [], {}
    for file in files:
        slide_id = Path(file).stem
        if slide_id in seen:
            failures.append(Failure(str(file), f"slide id {slide_id} already given by {seen[slide_id]}"))
            continue
        seen[slide_id] = file
        items.append(Item(slide_id, str(file), {"wsi": str(file)}))
    return items, failures


# a BraTS file name: <case><sep><sequence>.nii[.gz], 2018-2021 (`_t1ce`) or 2023 (`-t1c`) naming
SEQUENCE_NAME = re.compile(r"^(?P<case>.+?)(?P<sep>[_-])(?P<suffix>t1ce|t1n|t1c|t2w|t2f|flair|seg|t1|t2)$",
                           re.IGNORECASE)


def sequence_of(path: Path) -> tuple[str, str | None, str | None]:
    """(case, kdcli sequence name or None, naming or None) from a NIfTI file's name."""
    from kdcli.sources.brats import NAMINGS

    stem = strip_suffix(path.name, NIFTI_SUFFIXES)
    match = SEQUENCE_NAME.match(stem)
    if match:
        sep, suffix = match.group("sep"), match.group("suffix").lower()
        for naming, (separator, table) in NAMINGS.items():
            if separator == sep and suffix in table:
                return match.group("case"), table[suffix], naming
    return stem, None, None


def case_items(inputs: list[str], sequences: list[str]) -> tuple[list[Item], list[Failure], dict[str, str]]:
    """BraTS cases: the NIfTI files of each case folder (or given one by one) grouped by case, sequence -> file;
    label files (`_seg`) left out. A file whose name names no sequence is taken as the model's sequence when it
    takes one only. Returns the items, the failures and each case's naming (when its file names tell)."""
    files, failures = expand(inputs, NIFTI_SUFFIXES, "NIfTI files")
    groups: dict[tuple[str, str], dict[str, str]] = {}
    namings: dict[str, str] = {}
    where: dict[tuple[str, str], str] = {}
    from kdcli.sources.brats import MISNAMED_LABEL

    for file in files:
        case, sequence, naming = sequence_of(file)
        if sequence == "seg" or MISNAMED_LABEL.search(file.name):  # label files (BraTS 2020's misnamed one too)
            continue
        if sequence is None:
            if len(sequences) != 1:
                failures.append(Failure(str(file), f"cannot tell which sequence it is (the model takes "
                                                   f"{', '.join(sequences)}): name it <case>_<sequence>.nii.gz"))
                continue
            sequence = sequences[0]
        key = (str(file.parent), case)
        if sequence in groups.get(key, {}):
            failures.append(Failure(str(file), f"a second {sequence} file for case {case} "
                                               f"(first: {groups[key][sequence]})"))
            continue
        groups.setdefault(key, {})[sequence] = str(file)
        where.setdefault(key, str(file.parent) if naming else str(file))
        if naming:
            namings[case] = naming
    items, seen = [], set()
    for (folder, case), found in groups.items():
        name = case if case not in seen else f"{Path(folder).name}_{case}"
        seen.add(name)
        items.append(Item(name, where[(folder, case)], found))
    return items, failures, namings
