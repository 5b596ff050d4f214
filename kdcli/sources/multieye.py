"""MultiEYE (xmed-lab/MultiEYE): unpaired fundus photographs and OCT B-scans, 9 retinal classes.

Layout as released (and as the official loader reads it):
    <root>/assemble/{train,dev,test}/large9cls.txt             "<name> <label>" per line, no extension
    <root>/assemble/train/ImageData/cfp-clahe-224x224/<name>.png    every split's fundus images
    <root>/assemble_oct/{train,dev,test}/large9cls.txt
    <root>/assemble_oct/train/ImageData/oct-filter-448x448/<name>.png

Unlabeled pool (kdcli's extension, for distillation on images nobody graded):
    <root>/assemble/train/unlabeled.txt, <root>/assemble_oct/train/unlabeled.txt   one image name per line
A second column, if present, is ignored (with a note). A name in both lists is one paired eye (when the
labelled eyes are paired too); a name in one list only is an unpaired image, which paired methods leave out.
Unlabeled images train only: an unlabeled list under dev/ or test/, a name that is also labelled, or a listed
image that is missing is refused in one line.

Quirks handled: lists separated by spaces or tabs (the official `test_file` override is tab-separated),
names without extension and with inner dots, `large9cls_balance.txt` as the fundus list in some copies,
8- and 16-bit PNGs of any size (zero-padded to square like the paper's offline step).
The class order is the code's, not the README's (the README omits MYO at index 6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcli.errors import KdcliError
from kdcli.shards.format import SPLITS
from kdcli.shards.quality import warn
from kdcli.sources.base import UNLABELED, Record, Scan, Source
from kdcli.sources.imaging import clahe_rgb, median_filter, read_image, resize_square, resize_square_step
from kdcli.sources.text import read_text

CLASSES = ["NOR", "AMD", "CSC", "DR", "GLC", "MEM", "MYO", "RVO", "WAMD"]
LAYOUT = {  # modality -> (folder, image subfolder, channels)
    "fundus": ("assemble", "cfp-clahe-224x224", 3),
    "oct": ("assemble_oct", "oct-filter-448x448", 1),
}
LIST_NAMES = ("large9cls.txt", "large9cls_balance.txt")
UNLABELED_LIST = "unlabeled.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# Textual concepts per class (ours, after the paper's GPT-4 bank); `--concepts FILE` replaces them.
CONCEPTS = [
    "normal foveal contour", "intact retinal layers", "healthy optic disc rim",
    "drusen: small yellowish deposits under the retina", "irregular retinal pigment epithelium",
    "subretinal fluid: serous detachment of the neuroretina", "round macular discolouration",
    "intraretinal haemorrhage dots", "hard exudates", "intraretinal cysts",
    "optic disc cupping", "thinned nerve fibre layer",
    "epiretinal membrane: hyperreflective line on the inner retina", "retinal surface wrinkling",
    "myopic tessellated fundus", "peripapillary atrophy crescent", "posterior staphyloma curvature",
    "occluded retinal vein with flame haemorrhages", "retinal thickening with oedema",
    "pigment epithelial detachment", "choroidal neovascular membrane", "subretinal haemorrhage",
]


def find_root(raw: Path) -> Path:
    for candidate in (raw, raw / "multieye_data"):
        if (candidate / "assemble").is_dir() or (candidate / "assemble_oct").is_dir():
            return candidate
    raise KdcliError(
        "no MultiEYE layout found (expected assemble/ and assemble_oct/ folders)",
        path=raw,
        hint="point RAW at the folder that holds assemble/ and assemble_oct/ (e.g. multieye_data/)",
    )


def parse_list(path: Path) -> list[tuple[str, int, int]]:
    """(name, label, line number) for every non-empty line; space- or tab-separated."""
    entries = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split("\t") if "\t" in line else line.rsplit(None, 1)
        if len(parts) != 2:
            raise KdcliError(f"line {number} is not '<name> <label>': {line!r}", path=path,
                             hint="fix or delete that line")
        name, label_text = parts[0].strip(), parts[1].strip()
        try:
            label = int(label_text)
        except ValueError:
            raise KdcliError(f"line {number}: label {label_text!r} is not an integer", path=path,
                             hint="labels are class indices 0..8") from None
        if not 0 <= label < len(CLASSES):
            raise KdcliError(f"line {number}: label {label} outside 0..{len(CLASSES) - 1}", path=path,
                             hint=f"classes are {', '.join(CLASSES)} in that order")
        entries.append((name, label, number))
    return entries


def resolve_image(image_dir: Path, name: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = image_dir / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    plain = image_dir / name
    return plain if plain.is_file() else None


def preprocess_image(path: str | Path, modality: str, size: int, clahe: bool = False, median: int = 0) -> np.ndarray:
    """One raw image as `prepare` stores it (`kdcli predict` calls this too): decoded to the modality's channels,
    CLAHE on fundus photos / a median filter on OCT when asked, zero-padded to square and resized."""
    image = read_image(path, LAYOUT[modality][2])
    if modality == "fundus" and clahe:
        image = clahe_rgb(image)
    if modality == "oct" and median:
        image = median_filter(image, median)
    return resize_square(image, size)


@dataclass
class MultiEyeOptions:
    """MultiEYE: fundus (assemble/) and OCT (assemble_oct/) lists and images."""

    clahe: bool = field(default=False, metadata={"help": "CLAHE on fundus photos (the paper's offline step)."})
    median: int = field(default=0, metadata={"help": "Median filter kernel for OCT (0 = off; paper: 3)."})
    list_name: str | None = field(default=None, metadata={"help": "List file name in each split folder."})


class MultiEyeSource(Source):
    """Options: clahe (bool, fundus), median (odd kernel, OCT; 0 = off), list_name (override)."""

    name = "multieye"
    Options = MultiEyeOptions
    raw_help = "Folder holding assemble/ and assemble_oct/."

    pixel_options = ("clahe", "median")

    @classmethod
    def raw_image_reader(cls, record: dict, modality: str) -> Callable[[str], np.ndarray]:
        options = record.get("options") or {}
        return functools.partial(preprocess_image, modality=modality, size=int(record["size"]),
                                 clahe=bool(options.get("clahe")), median=int(options.get("median") or 0))

    @classmethod
    def preprocessing_steps(cls, record: dict, meta: dict) -> list[str]:
        options = record.get("options") or {}
        if meta["modality"] == "fundus":
            steps = ["decode to RGB uint8 (16-bit / 257)"]
            if options.get("clahe"):
                steps.append("CLAHE on the L channel of Lab (clip limit 2, 8x8 tiles)")
        else:
            steps = ["decode to grey uint8 (16-bit / 257)"]
            if options.get("median"):
                steps.append(f"median filter, kernel {int(options['median'])}")
        return [*steps, resize_square_step(int(record["size"]))]

    def scan(self, raw: Path) -> Scan:
        root = find_root(Path(raw))
        notes: list[str] = []
        entries: dict[str, list[tuple[str, str, int, Path]]] = {}
        for modality, (folder, subfolder, _) in LAYOUT.items():
            if not (root / folder).is_dir():
                continue
            image_dir = root / folder / "train" / "ImageData" / subfolder
            if not image_dir.is_dir():
                image_dir = self._fallback_image_dir(root / folder, subfolder, notes)
            entries[modality] = self._scan_modality(root / folder, image_dir, notes)
        if not entries:
            raise KdcliError("neither assemble/ nor assemble_oct/ holds list files", path=root)
        records, pairing = self._pair(entries)
        records += self._unlabeled(root, entries, pairing, notes)
        return Scan(
            records=records,
            classes=list(CLASSES),
            modalities={m: LAYOUT[m][2] for m in entries},
            pairing=pairing,
            extra={"concepts": list(CONCEPTS)},
            notes=notes,
        )

    def load(self, record: Record, size: int) -> dict[str, np.ndarray]:
        return {modality: preprocess_image(path, modality, size, bool(self.options.get("clahe")),
                                           int(self.options.get("median", 0) or 0))
                for modality, path in record.files.items()}

    def _fallback_image_dir(self, folder: Path, expected: str, notes: list[str]) -> Path:
        parent = folder / "train" / "ImageData"
        subdirs = sorted(p for p in parent.glob("*") if p.is_dir()) if parent.is_dir() else []
        if len(subdirs) != 1:
            raise KdcliError(f"image folder train/ImageData/{expected} not found", path=folder,
                             hint="MultiEYE keeps every split's images under train/ImageData/<subfolder>/")
        notes.append(f"{folder.name}: images found in {subdirs[0].name}/ instead of {expected}/")
        return subdirs[0]

    def _scan_modality(self, folder: Path, image_dir: Path, notes: list[str]) -> list:
        found, seen = [], {}
        for split in SPLITS:
            list_path = self._list_path(folder / split)
            rows = parse_list(list_path)
            if not rows:
                raise KdcliError(f"empty split {split!r}", path=list_path,
                                 hint="every split needs at least one image")
            raw_text = read_text(list_path)
            if "\t" in raw_text:
                notes.append(f"{folder.name}/{split}/{list_path.name} is tab-separated")
            for name, label, number in rows:
                if name in seen:
                    first_split, first_label, first_line = seen[name]
                    if first_split != split:
                        raise KdcliError(f"line {number}: {name!r} is also listed in split {first_split!r}",
                                         path=list_path, hint="an image may belong to one split only")
                    if first_label != label:
                        raise KdcliError(f"line {number}: {name!r} is listed again with label {label} "
                                         f"({CLASSES[label]}); line {first_line} gives {first_label} "
                                         f"({CLASSES[first_label]})", path=list_path,
                                         hint="keep the line with the right label and delete the other")
                    warn("duplicate_entry", "images listed twice with the same label, kept once",
                         f"{list_path}:{number} {name}")
                    continue
                seen[name] = (split, label, number)
                image = resolve_image(image_dir, name)
                if image is None:
                    raise KdcliError(f"line {number}: listed image {name!r} not found in {image_dir}",
                                     path=list_path, hint="restore the image or delete the line")
                found.append((name, split, label, image))
        return found

    def _unlabeled(self, root: Path, entries: dict[str, list], pairing: str, notes: list[str]) -> list[Record]:
        """Records of the unlabeled lists (label -1, train split): paired where both lists name an image and the
        labelled eyes are paired, else one record per modality and image."""
        pools: dict[str, dict[str, Path]] = {}
        for modality, (folder, _, _) in LAYOUT.items():
            if modality not in entries:
                continue
            for split in ("dev", "test"):
                if (root / folder / split / UNLABELED_LIST).is_file():
                    raise KdcliError(f"an unlabeled list under {split}/", path=root / folder / split / UNLABELED_LIST,
                                     hint="unlabeled images can only train: move the list to train/")
            list_path = root / folder / "train" / UNLABELED_LIST
            if not list_path.is_file():
                continue
            labelled = {name for name, *_ in entries[modality]}
            image_dir = entries[modality][0][3].parent
            pool: dict[str, Path] = {}
            extra_columns = False
            for number, line in enumerate(read_text(list_path).splitlines(), start=1):
                parts = line.split("\t") if "\t" in line else line.split()
                if not parts:
                    continue
                name = parts[0].strip()
                extra_columns |= len(parts) > 1
                if name in labelled:
                    raise KdcliError(f"line {number}: {name!r} is also labelled", path=list_path,
                                     hint="an image is labelled or unlabeled, not both: delete one of the lines")
                image = resolve_image(image_dir, name)
                if image is None:
                    raise KdcliError(f"line {number}: listed image {name!r} not found in {image_dir}",
                                     path=list_path, hint="restore the image or delete the line")
                if name in pool:
                    warn("duplicate_entry", "images listed twice with the same label, kept once",
                         f"{list_path}:{number} {name}")
                pool.setdefault(name, image)
            if extra_columns:
                notes.append(f"{list_path}: columns after the image name ignored (unlabeled images have no label)")
            pools[modality] = pool
        if not pools:
            return []
        both = set(pools.get("fundus", {})) & set(pools.get("oct", {})) if pairing == "paired" else set()
        records = [Record(id=name, group=name, split="train", label=UNLABELED,
                          files={m: str(pools[m][name]) for m in ("fundus", "oct")}) for name in sorted(both)]
        alone = {m: sorted(set(pool) - both) for m, pool in pools.items()}
        for modality, names in alone.items():
            records += [Record(id=name if pairing == "paired" else f"{modality}:{name}",
                               group=name if pairing == "paired" else f"{modality}:{name}", split="train",
                               label=UNLABELED, files={modality: str(pools[modality][name])}) for name in names]
        if pairing == "paired" and any(alone.values()):
            notes.append("unlabeled images listed for one modality only: "
                         + ", ".join(f"{len(n)} {m}" for m, n in alone.items() if n)
                         + " (paired methods leave them out)")
        counts = ", ".join(f"{len(pool)} {m}" for m, pool in pools.items())
        notes.append(f"unlabeled pool: {counts} images ({len(both)} paired eyes)" if both else
                     f"unlabeled pool: {counts} images")
        return records

    def _list_path(self, split_dir: Path) -> Path:
        names = (self.options["list_name"],) if self.options.get("list_name") else LIST_NAMES
        for name in names:
            if (split_dir / name).is_file():
                return split_dir / name
        raise KdcliError(f"missing list file {names[0]}", path=split_dir,
                         hint="each of train/, dev/ and test/ needs its large9cls.txt")

    @staticmethod
    def _pair(entries: dict[str, list]) -> tuple[list[Record], str]:
        """Paired when both modalities list the same eyes with the same label and split."""
        keyed = {m: {name: (split, label, path) for name, split, label, path in rows} for m, rows in entries.items()}
        if len(keyed) == 2 and keyed["fundus"].keys() == keyed["oct"].keys() and all(
            keyed["fundus"][n][:2] == keyed["oct"][n][:2] for n in keyed["fundus"]
        ):
            return [
                Record(id=name, group=name, split=split, label=label,
                       files={"fundus": str(path), "oct": str(keyed["oct"][name][2])})
                for name, (split, label, path) in sorted(keyed["fundus"].items())
            ], "paired"
        records = [
            Record(id=f"{modality}:{name}", group=f"{modality}:{name}", split=split, label=label,
                   files={modality: str(path)})
            for modality, rows in keyed.items()
            for name, (split, label, path) in sorted(rows.items())
        ]
        return records, "unpaired"
