"""`kdcli prepare ...`: a raw download -> a shard directory, one command per source, and `merge`."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from kdcli.cli.common import command, err

prepare_app = typer.Typer(no_args_is_help=True, help="Turn a raw download into a shard directory.")


class Compression(StrEnum):
    none = "none"
    lzf = "lzf"
    gzip = "gzip"


PrepOut = Annotated[Path | None, typer.Option("--out", "-o", help="Shard directory to create (default: "
                                                 "shards/SOURCE, or $KDCLI_SHARDS/SOURCE).")]
PrepSize = Annotated[int, typer.Option(help="Stored image side in pixels (pad to square, then resize; smaller images "
                                            "are upsampled: `kdcli synth` draws 128 px phantoms, so give them "
                                            "--size 128, or 64 for a quick CPU run).")]
PrepWorkers = Annotated[int, typer.Option(help="Parallel processes.")]
PrepResume = Annotated[bool, typer.Option(help="Finish an interrupted prepare; finished shards are kept.")]
PrepOverwrite = Annotated[bool, typer.Option(help="Replace an existing --out (only once the new one is done).")]
PrepShardSize = Annotated[int, typer.Option(help="Records per HDF5 shard (0: the source's default; a volume or "
                                                 "slide is many samples).")]
PrepCompression = Annotated[Compression, typer.Option(help="HDF5 compression of the pixel arrays.")]


def parse_part(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    index, sep, count = value.partition("/")
    if not (sep and index.isdigit() and count.isdigit()) or not 1 <= int(index) <= int(count):
        raise typer.BadParameter(f"{value!r} is not I/N with 1 <= I <= N", param_hint="--part")
    return int(index), int(count)


PrepAllowLeakage = Annotated[bool, typer.Option(help="Keep patients whose records sit in several splits "
                                                   "(refused otherwise); counted in dataset.json.")]
PrepPart = Annotated[str | None, typer.Option(help="I/N: write only the I-th of N disjoint shares (cluster array "
                                                     "jobs); then `kdcli prepare merge OUT`.")]


def run_prepare(source: str, raw: Path, out: Path | None, size: int, workers: int, resume: bool, overwrite: bool,
                shard_size: int, compression: Compression, source_options: dict[str, Any],
                append: bool = False, part: str | None = None, allow_leakage: bool = False) -> None:
    from tqdm import tqdm

    from kdcli.defaults import default_prepare_out
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.shards.quality import lines as quality_lines

    out = out or default_prepare_out(source)
    options = PrepareOptions(source=source, raw=raw, out=out, size=size, workers=workers, resume=resume,
                             overwrite=overwrite, shard_size=shard_size,
                             compression=None if compression is Compression.none else compression.value,
                             source_options=source_options, append=append, part=parse_part(part),
                             allow_leakage=allow_leakage)
    bars: list = []

    def progress_factory(total: int):
        bar = tqdm(total=total, unit="img", desc=f"prepare {source}", file=sys.stderr, leave=False,
                   disable=None)  # None: silent when stderr is not a terminal (CI logs)
        bars.append(bar)
        return bar.update

    try:
        result = prepare(options, progress_factory)
    finally:
        for bar in bars:
            bar.close()
    for note in result.notes:
        err(f"note: {note}")
    for line in quality_lines(result.warnings):
        err(f"warning: {line}")
    if options.part:
        err(f"part {options.part[0]}/{options.part[1]} done ({result.written} shards written, {result.reused} "
            f"reused); when every part is done: kdcli prepare merge {out}")
        return
    counts = ", ".join(f"{m}: " + "/".join(str(c[s]) for s in ("train", "dev", "test"))
                       for m, c in result.meta.counts.items())
    err(f"prepared {out} ({counts} train/dev/test; {result.written} shards written, {result.reused} reused, "
        f"{result.seconds:.1f}s) {result.meta.content_hash[:19]}")


@command(prepare_app, "multieye")
def prepare_multieye(
    raw: Annotated[Path, typer.Argument(help="Folder holding assemble/ and assemble_oct/.")],
    out: PrepOut = None,
    size: PrepSize = 224,
    workers: PrepWorkers = 1,
    resume: PrepResume = False,
    overwrite: PrepOverwrite = False,
    shard_size: PrepShardSize = 0,
    compression: PrepCompression = Compression.none,
    clahe: Annotated[bool, typer.Option(help="CLAHE on fundus photos (the paper's offline step).")] = False,
    median: Annotated[int, typer.Option(help="Median filter kernel for OCT (0 = off; paper: 3).")] = 0,
    list_name: Annotated[str | None, typer.Option(help="List file name in each split folder.")] = None,
    allow_leakage: PrepAllowLeakage = False,
    part: PrepPart = None,
) -> None:
    """MultiEYE: fundus (assemble/) and OCT (assemble_oct/) lists and images."""
    run_prepare("multieye", raw, out, size, workers, resume, overwrite, shard_size, compression,
                {"clahe": clahe, "median": median, **({"list_name": list_name} if list_name else {})}, part=part,
                allow_leakage=allow_leakage)


@command(prepare_app, "merge")
def prepare_merge(
    out: Annotated[Path, typer.Argument(help="The --out every part was written for.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Join the parts of `prepare ... --part I/N` into one dataset (one manifest, one hash)."""
    from kdcli.prepare import merge_parts

    meta = merge_parts(out, overwrite)
    err(f"merged into {out} ({sum(sum(c.values()) for c in meta.counts.values())} samples) {meta.content_hash[:19]}")


@command(prepare_app, "fundus-grading")
def prepare_fundus_grading(
    raw: Annotated[Path, typer.Argument(help="The set's folder (holds the label CSV and the images).")],
    labels: Annotated[Path, typer.Option(help="Label CSV (EyePACS image,level or APTOS id_code,diagnosis).")],
    task: Annotated[str, typer.Option(help="The task this set is graded for, e.g. dr or amd.")],
    out: PrepOut = None,
    size: PrepSize = 224,
    workers: PrepWorkers = 1,
    resume: PrepResume = False,
    overwrite: Annotated[bool, typer.Option(help="Replace this task's samples if --out already has them.")] = False,
    shard_size: PrepShardSize = 0,
    compression: PrepCompression = Compression.none,
    image_dir: Annotated[Path | None, typer.Option(help="Image folder (default: train/, train_images/ or "
                                                        "images/ beside the CSV).")] = None,
    image_column: Annotated[str | None, typer.Option(help="CSV column with image names.")] = None,
    label_column: Annotated[str | None, typer.Option(help="CSV column with grades.")] = None,
    grades: Annotated[int | None, typer.Option(help="Number of grades (default 5 for dr, 4 for amd).")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the patient-level 60/20/20 split.")] = 0,
    splits: Annotated[Path | None, typer.Option(help="Each image's split: CSV image,split or JSON {train: [...], "
                                                     "dev: [...], test: [...]} (default: the seeded split).")]
    = None,
    allow_leakage: PrepAllowLeakage = False,
) -> None:
    """A graded fundus set for one task; a second call with another --task adds to the same --out."""
    options = {"labels": str(labels), "task": task, "split_seed": split_seed,
               **{k: str(v) if isinstance(v, Path) else v for k, v in
                  (("image_dir", image_dir), ("image_column", image_column), ("label_column", label_column),
                   ("grades", grades), ("splits", splits)) if v is not None}}
    run_prepare("fundus-grading", raw, out, size, workers, resume, overwrite, shard_size, compression, options,
                append=True, allow_leakage=allow_leakage)


@command(prepare_app, "brats")
def prepare_brats(
    raw: Annotated[Path, typer.Argument(help="Folder of BraTS cases (any release's naming, nested or not).")],
    out: PrepOut = None,
    size: PrepSize = 128,
    workers: PrepWorkers = 1,
    resume: PrepResume = False,
    overwrite: PrepOverwrite = False,
    shard_size: PrepShardSize = 0,
    compression: PrepCompression = Compression.none,
    empty_slices: Annotated[float, typer.Option(help="Fraction of tumour-free brain slices kept in train "
                                                     "(dev/test keep every brain slice).")] = 0.2,
    splits: Annotated[Path | None, typer.Option(help="Case splits: CSV case,split or JSON {train: [...], ...} "
                                                     "(default: seeded ratios by patient).")] = None,
    ratios: Annotated[str, typer.Option(help="train,dev,test fractions when --splits is not given.")]
    = "0.7,0.1,0.2",
    split_seed: Annotated[int, typer.Option(help="Seed of the patient split and of the empty-slice choice.")] = 0,
    skip_bad: Annotated[bool, typer.Option(help="Skip broken cases with a report instead of stopping.")] = False,
    unlabeled: Annotated[Path | None, typer.Option(help="Folder of cases with the four sequences and no label "
                                                        "(BraTS validation data as shipped): unlabeled training "
                                                        "cases, every brain slice kept, for distillation only.")]
    = None,
    allow_leakage: PrepAllowLeakage = False,
    part: PrepPart = None,
) -> None:
    """BraTS volumes -> axial slices of the 4 sequences (z-scored in the brain, cropped) and label maps."""
    options = {"empty_slices": empty_slices, "ratios": ratios, "seed": split_seed, "skip_bad": skip_bad,
               **({"splits": str(splits)} if splits else {}), **({"unlabeled": str(unlabeled)} if unlabeled else {})}
    run_prepare("brats", raw, out, size, workers, resume, overwrite, shard_size, compression, options, part=part,
                allow_leakage=allow_leakage)


class Uncertain(StrEnum):
    ones = "ones"
    zeros = "zeros"
    ignore = "ignore"


@command(prepare_app, "cxr")
def prepare_cxr(
    raw: Annotated[Path, typer.Argument(help="ChestX-ray14 folder (Data_Entry_2017.csv, images_*/) or "
                                             "MIMIC-CXR-JPG folder (files/, the split/metadata/chexpert CSVs).")],
    out: PrepOut = None,
    gaze: Annotated[Path | None, typer.Option(help="EGD-CXR folder (master_sheet.csv, fixations.csv) or REFLACX "
                                                   "folder (main_data/).")] = None,
    boxes: Annotated[Path | None, typer.Option(help="NIH BBox_List_2017.csv.")] = None,
    uncertain: Annotated[Uncertain, typer.Option(help="MIMIC/CheXpert -1 labels: ones (U-Ones), zeros or "
                                                      "ignore (left out of loss and metrics).")] = Uncertain.ones,
    egd_sigma: Annotated[float, typer.Option(help="EGD-CXR heat map Gaussian sigma in original-image pixels "
                                                  "(official: 150).")] = 150.0,
    size: PrepSize = 224,
    workers: PrepWorkers = 1,
    resume: PrepResume = False,
    overwrite: PrepOverwrite = False,
    shard_size: PrepShardSize = 0,
    compression: PrepCompression = Compression.none,
    dev_fraction: Annotated[float, typer.Option(help="NIH: patients of train_val_list moved to dev.")] = 0.1,
    split_seed: Annotated[int, typer.Option(help="Seed of the dev split.")] = 0,
    labels: Annotated[str | None, typer.Option(help="Comma list restricting the label set.")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip bad rows/images with a report instead of stopping.")] = False,
    allow_leakage: PrepAllowLeakage = False,
    part: PrepPart = None,
) -> None:
    """Chest X-rays -> multi-label targets, gaze heat maps (official recipes) and box masks, patient-wise splits.
    Images without labels (NIH: blank Finding Labels; MIMIC: study without a CheXpert row, or every finding blank)
    become unlabeled training samples (label -1) for distillation."""
    options = {"uncertain": uncertain.value, "egd_sigma": egd_sigma, "dev_fraction": dev_fraction,
               "seed": split_seed, "skip_bad": skip_bad,
               **{k: str(v) for k, v in (("gaze", gaze), ("boxes", boxes), ("labels", labels)) if v is not None}}
    run_prepare("cxr", raw, out, size, workers, resume, overwrite, shard_size, compression, options, part=part,
                allow_leakage=allow_leakage)


@command(prepare_app, "camelyon")
def prepare_camelyon(
    raw: Annotated[Path, typer.Argument(help="Folder of slides (OpenSlide formats, or BCNB WSIs/*.jpg + .json).")],
    out: PrepOut = None,
    clinical: Annotated[Path | None, typer.Option(help="Clinical sheet (.xlsx/.csv; default raw/clinical.xlsx).")]
    = None,
    mag: Annotated[float, typer.Option(help="Magnification of the patches (objective power).")] = 20.0,
    patch_size: Annotated[int, typer.Option(help="Patch side in pixels at --mag (then resized to --size).")] = 256,
    max_patches: Annotated[int, typer.Option(help="Patches kept per slide, spread over the tissue (0: all).")] = 64,
    size: PrepSize = 224,
    workers: PrepWorkers = 1,
    resume: PrepResume = False,
    overwrite: PrepOverwrite = False,
    shard_size: PrepShardSize = 0,
    compression: PrepCompression = Compression.none,
    id_column: Annotated[str, typer.Option(help="Sheet column holding the slide/patient id.")] = "Patient ID",
    label_column: Annotated[str, typer.Option(help="Sheet column holding the ALN status.")] = "ALN status",
    binary: Annotated[bool, typer.Option(help="N0 vs N+ (else N0 / N+(1-2) / N+(>2)).")] = True,
    native_mag: Annotated[float | None, typer.Option(help="Magnification of JPEG slides, or of slides that "
                                                          "record neither objective power nor mpp.")] = None,
    tissue_threshold: Annotated[int, typer.Option(help="Saturation threshold of the tissue mask (CLAM's).")] = 8,
    min_tissue: Annotated[float, typer.Option(help="Tissue fraction a patch needs.")] = 0.5,
    annotated_only: Annotated[bool, typer.Option(help="Only patches inside the tumour outlines.")] = False,
    ratios: Annotated[str, typer.Option(help="train,dev,test fractions (stratified by label).")] = "0.6,0.2,0.2",
    split_seed: Annotated[int, typer.Option(help="Seed of the split and the patch choice.")] = 0,
    splits: Annotated[Path | None, typer.Option(help="Splits file: JSON {train: [ids], dev: [...], test: [...]} "
                                                     "or CSV slide,split (e.g. synth camelyon's splits.json).")]
    = None,
    thumbnails: Annotated[bool, typer.Option(help="A tissue-mask/patch thumbnail PNG per slide in "
                                                  "<out>/thumbnails/.")] = True,
    skip_bad: Annotated[bool, typer.Option(help="Skip bad slides/rows with a report instead of stopping.")] = False,
    allow_leakage: PrepAllowLeakage = False,
    part: PrepPart = None,
) -> None:
    """Slides + clinical sheet -> tissue patches at a magnification (with level-0 coordinates) and the encoded
    clinical record per slide (missing values kept as missing); rows without an ALN status are unlabeled
    training slides (for distillation terms)."""
    options = {"mag": mag, "patch_size": patch_size, "max_patches": max_patches, "id_column": id_column,
               "label_column": label_column, "binary": binary, "tissue_threshold": tissue_threshold,
               "min_tissue": min_tissue, "annotated_only": annotated_only, "ratios": ratios, "seed": split_seed,
               "skip_bad": skip_bad,
               **({"clinical": str(clinical)} if clinical else {}),
               **({"splits": str(splits)} if splits else {}),
               **({"native_mag": native_mag} if native_mag else {}),
               **({"thumbnails": str(Path(str(out) + ".partial") / "thumbnails")} if thumbnails else {})}
    run_prepare("camelyon", raw, out, size, workers, resume, overwrite, shard_size, compression, options, part=part,
                allow_leakage=allow_leakage)


@command(prepare_app, "table")
def prepare_table(
    raw: Annotated[Path, typer.Argument(help="The CSV: one row per sample (id, patient, split, label, one path "
                                             "column per modality).")],
    out: PrepOut = None,
    size: PrepSize = 224,
    workers: PrepWorkers = 1,
    resume: PrepResume = False,
    overwrite: PrepOverwrite = False,
    shard_size: PrepShardSize = 0,
    compression: PrepCompression = Compression.none,
    modalities: Annotated[str, typer.Option(help="Comma list of the path columns, one per modality (default: every "
                                                 "column of image, DICOM or NIfTI paths).")] = "",
    root: Annotated[str, typer.Option(help="Folder the paths are relative to (default: the CSV's folder).")] = "",
    id_column: Annotated[str, typer.Option(help="Column with each sample's unique id.")] = "id",
    patient_column: Annotated[str, typer.Option(help="Column with the patient (default if absent: one per id).")]
    = "patient",
    split_column: Annotated[str, typer.Option(help="Column with train/dev/test; if absent, --ratios.")] = "split",
    label_column: Annotated[str, typer.Option(help="Column with the class or grade (else a `grade` column).")]
    = "label",
    label_columns: Annotated[str, typer.Option(help="Multi-label: comma list of 0/1 columns (empty = unknown).")]
    = "",
    classes: Annotated[str, typer.Option(help="Comma list of the classes in order; other labels are refused.")] = "",
    channels: Annotated[str, typer.Option(help="Stored channels per modality, e.g. photo=3,scan=1 (default: from "
                                               "the first file).")] = "",
    ratios: Annotated[str, typer.Option(help="train,dev,test fractions of the patients without a split column.")]
    = "0.7,0.1,0.2",
    split_seed: Annotated[int, typer.Option(help="Seed of the patient split by --ratios.")] = 0,
    allow_leakage: PrepAllowLeakage = False,
    part: PrepPart = None,
) -> None:
    """A lab's own paired or unpaired multi-modal data from one CSV (images, DICOM, NIfTI)."""
    options = {"modalities": modalities, "root": root, "id_column": id_column, "patient_column": patient_column,
               "split_column": split_column, "label_column": label_column, "label_columns": label_columns,
               "classes": classes, "channels": channels, "ratios": ratios, "split_seed": split_seed}
    run_prepare("table", raw, out, size, workers, resume, overwrite, shard_size, compression, options, part=part,
                allow_leakage=allow_leakage)


@command(prepare_app, "isic")
def prepare_isic(
    raw: Annotated[Path, typer.Argument(help="Folder of the ISIC download (ground-truth CSV and image folder).")],
    out: PrepOut = None,
    size: PrepSize = 224,
    workers: PrepWorkers = 1,
    resume: PrepResume = False,
    overwrite: PrepOverwrite = False,
    shard_size: PrepShardSize = 0,
    compression: PrepCompression = Compression.none,
    labels: Annotated[str, typer.Option(help="Ground-truth CSV (default: the ISIC 2019/2020 one in RAW).")] = "",
    image_dir: Annotated[str, typer.Option(help="Image folder (default: ISIC_2019_Training_Input/, train/ or "
                                                "jpeg/train/ in RAW).")] = "",
    splits: Annotated[str, typer.Option(help="Each image's split: CSV image,split or JSON (default: seeded "
                                             "patient split).")] = "",
    ratios: Annotated[str, typer.Option(help="train,dev,test fractions of the patients.")] = "0.7,0.1,0.2",
    split_seed: Annotated[int, typer.Option(help="Seed of the patient split.")] = 0,
    allow_leakage: PrepAllowLeakage = False,
    part: PrepPart = None,
) -> None:
    """ISIC 2019 (8 diagnoses) or 2020 (benign/malignant) dermoscopy: the image folder and the ground-truth CSV."""
    options = {"labels": labels, "image_dir": image_dir, "splits": splits, "ratios": ratios, "split_seed": split_seed}
    run_prepare("isic", raw, out, size, workers, resume, overwrite, shard_size, compression, options, part=part,
                allow_leakage=allow_leakage)
