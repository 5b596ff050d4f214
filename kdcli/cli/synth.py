"""`kdcli synth ...`: phantom datasets in each dataset's real layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kdcli.cli.common import command, err

synth_app = typer.Typer(no_args_is_help=True, help="Write phantom datasets in each dataset's real layout.")

SynthSize = Annotated[int, typer.Option(help="Image side in pixels (`prepare` stores 224 px unless given --size: "
                                             "pass it this size, or smaller).")]
SynthSeed = Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")]
SynthWorkers = Annotated[int, typer.Option(help="Processes.")]


def run_synth(name: str, out: Path, **options: Any) -> dict:
    """The generators reject impossible sizes and counts with ValueError: show it as a usage error."""
    from kdcli.synth import SYNTHS

    try:
        return SYNTHS.get(name)(out, **options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@command(synth_app, "multieye")
def synth_multieye(
    out: Annotated[Path, typer.Argument(help="Folder to write (MultiEYE layout: assemble/, assemble_oct/).")],
    per_class: Annotated[int, typer.Option(help="Images per class and modality, all splits together (without "
                                                "the splits --test-per-class / --dev-per-class fill).")] = 20,
    size: SynthSize = 128,
    seed: SynthSeed = 0,
    paired: Annotated[bool, typer.Option(help="Same eyes in both modalities (for --method kd): each eye's "
                                              "fundus and OCT render one latent.")] = False,
    label_noise: Annotated[float, typer.Option(
        "--label-noise", metavar="RHO", help="Share of TRAINING labels flipped to the eye's confusable "
        "neighbour class, borderline eyes most often; dev/test stay clean; flips listed in label_noise.csv.",
    )] = 0.0,
    independent: Annotated[bool, typer.Option(help="Negative control: each fundus image renders a latent of "
                                                   "its own; fundus and OCT of an eye share only the class.")]
    = False,
    test_per_class: Annotated[int, typer.Option(help="Test images per class from a case pool of their own, "
                                                     "the same whatever --per-class is (0: 20% of it).")] = 0,
    dev_per_class: Annotated[int, typer.Option(help="Dev images per class from a case pool of their own "
                                                    "(0: 20% of --per-class, 25% with --test-per-class).")] = 0,
    unlabeled: Annotated[int, typer.Option(help="Unlabeled eyes per modality (the same eyes in both with "
                                                "--paired), listed in train/unlabeled.txt.")] = 0,
    workers: SynthWorkers = 1,
) -> None:
    """MultiEYE phantoms: one latent per eye (severity, subtype mix, lesion position) rendered clearly in OCT and
    faintly in fundus; concept_embeddings.npy beside the data is for --concept-embeddings."""
    summary = run_synth("multieye", out, per_class=per_class, size=size, seed=seed, paired=paired,
                        label_noise=label_noise, independent=independent, test_per_class=test_per_class,
                        dev_per_class=dev_per_class, unlabeled=unlabeled, workers=workers)
    flipped = sum(summary["flipped"].values())
    err(f"wrote {sum(sum(c.values()) for c in summary['counts'].values())} images to {out}"
        + (f" (labels of {flipped} training images flipped, see {out / 'label_noise.csv'})" if label_noise else ""))


@command(synth_app, "fundus-grading")
def synth_fundus_grading(
    out: Annotated[Path, typer.Argument(help="Folder to write: dr/ (EyePACS or APTOS layout) and amd/.")],
    per_class: Annotated[int, typer.Option(help="DR eyes per DR grade, all splits together (without "
                                                "--test-per-class's pool).")] = 100,
    amd_per_class: Annotated[int, typer.Option(help="AMD eyes per AMD grade: the small set SALL helps.")] = 20,
    size: SynthSize = 128,
    seed: SynthSeed = 0,
    dr_layout: Annotated[str, typer.Option(help="eyepacs (trainLabels.csv) or aptos (train.csv).")] = "eyepacs",
    label_noise: Annotated[float, typer.Option(
        "--label-noise", metavar="RHO", help="Share of TRAINING grades moved to the neighbouring grade, "
        "borderline eyes most often (grader noise); dev/test stay clean; listed in label_noise.csv.",
    )] = 0.0,
    independent: Annotated[bool, typer.Option(help="Negative control: each set's eyes show no sign of the other "
                                                   "disease, so SALL's extra labels carry nothing.")] = False,
    test_per_class: Annotated[int, typer.Option(help="Test eyes per grade and set from a pool of their own, the "
                                                     "same whatever --per-class is (0: 20% of each set).")] = 0,
    workers: SynthWorkers = 1,
) -> None:
    """Two disjoint graded fundus sets (DR 0-4, AMD 0-3): every eye renders one latent with both diseases, each
    set lists its own grade; splits.csv in each set is the phantom's split (prepare --splits)."""
    summary = run_synth("fundus-grading", out, per_class=per_class, amd_per_class=amd_per_class, size=size,
                        seed=seed, dr_layout=dr_layout, label_noise=label_noise, independent=independent,
                        test_per_class=test_per_class, workers=workers)
    for name, info in summary["sets"].items():
        counts = info["split_counts"]
        moved = f", {info['flipped']} training grades moved" if label_noise else ""
        err(f"{name}: {sum(info['counts'])} images ({counts['train']}/{counts['dev']}/{counts['test']} "
            f"train/dev/test{moved}), labels {info['labels']}")
    if label_noise or test_per_class:
        err("prepare each set with --splits <set>/splits.csv (the grader noise and the test pool depend on it)")


@command(synth_app, "brats")
def synth_brats(
    out: Annotated[Path, typer.Argument(help="Folder to write, in the chosen release's layout.")],
    cases: Annotated[int, typer.Option(help="Cases (patients).")] = 12,
    size: Annotated[int, typer.Option(help="In-plane side (240 = real BraTS; depth follows 240:155).")] = 64,
    naming: Annotated[str, typer.Option(help="2018 (HGG/LGG), 2019, 2020 (with its misnamed label), 2021 or "
                                             "2023 (t1n/t1c/t2w/t2f, ET=3).")] = "2021",
    seed: SynthSeed = 0,
    workers: SynthWorkers = 1,
    label_noise: Annotated[float, typer.Option(help="Rater noise 0-1 on the TRAIN cases' label files (boundary "
                                                    "dilation/erosion, dropped oedema fingers); clean maps go "
                                                    "to clean_labels/.")] = 0.0,
    test_cases: Annotated[int, typer.Option(help="Extra test cases, identical whatever --cases is (a fixed "
                                                 "test set across training sizes).")] = 0,
    independent: Annotated[bool, typer.Option(help="Negative control: fixed contrasts, no shared latent, "
                                                   "labels exactly the pixels' geometry.")] = False,
    unlabeled: Annotated[int, typer.Option(help="Cases without label files in OUT/unlabeled/ (as validation data "
                                                "ship), for prepare --unlabeled.")] = 0,
) -> None:
    """BraTS NIfTI phantoms: a per-case tumour latent rendered strongly in T1/T2/FLAIR, faintly in T1ce."""
    summary = run_synth("brats", out, cases=cases, size=size, naming=naming, seed=seed, workers=workers,
                        label_noise=label_noise, test_cases=test_cases, independent=independent,
                        unlabeled=unlabeled)
    counts = {split: len(ids) for split, ids in summary["splits"].items()}
    err(f"wrote {len(summary['cases'])} cases ({naming} naming, {summary['design']} design; "
        f"{counts['train']}/{counts['dev']}/{counts['test']} train/dev/test) to {out}")
    if summary["splits_file"]:
        err(f"prepare with --splits {out / summary['splits_file']} (the noisy labels and extra test cases "
            "depend on this split)")
    if unlabeled:
        err(f"{unlabeled} unlabeled cases in {out / 'unlabeled'}: prepare with --unlabeled {out / 'unlabeled'}")


@command(synth_app, "cxr")
def synth_cxr(
    out: Annotated[Path, typer.Argument(help="Folder to write (NIH or MIMIC layout; gaze under egd-cxr/ or "
                                             "reflacx/).")],
    per_class: Annotated[int, typer.Option(help="Images per finding (plus as many without finding).")] = 6,
    size: SynthSize = 256,
    layout: Annotated[str, typer.Option(help="nih (ChestX-ray14) or mimic (MIMIC-CXR-JPG).")] = "nih",
    gaze: Annotated[str, typer.Option(help="egd, reflacx or none.")] = "egd",
    annotated_fraction: Annotated[float, typer.Option(help="Fraction of images with gaze (and NIH boxes).")] = 0.3,
    dicom_fraction: Annotated[float, typer.Option(help="Fraction written as DICOM (half MONOCHROME1).")] = 0.0,
    seed: SynthSeed = 0,
    workers: SynthWorkers = 1,
    label_noise: Annotated[float, typer.Option(
        "--label-noise", metavar="RHO", help="Share of TRAINING images whose finding labels a rater flips, "
        "borderline lesions most often; dev/test stay clean; flips listed in label_noise.csv.",
    )] = 0.0,
    independent: Annotated[bool, typer.Option(help="Negative control: gaze and boxes drawn from a latent of their "
                                                   "own with the same labels; they carry nothing beyond them.")]
    = False,
    test_per_class: Annotated[int, typer.Option(help="Test images per finding (plus 7x as many normal) from a case "
                                                     "pool of their own, the same whatever --per-class is (0: 20% "
                                                     "of the patients).")] = 0,
    unlabeled: Annotated[int, typer.Option(help="Unlabeled training images (patients of their own): NIH rows with "
                                                "blank Finding Labels; MIMIC studies without a CheXpert label.")]
    = 0,
) -> None:
    """Chest X-ray phantoms: one latent per image (lesion severities and places) rendered faintly in the X-ray and
    strongly in the gaze and boxes, plus look-alike distractors that the gaze avoids."""
    summary = run_synth("cxr", out, per_class=per_class, size=size, layout=layout, gaze=gaze,
                        annotated_fraction=annotated_fraction, dicom_fraction=dicom_fraction, seed=seed,
                        workers=workers, label_noise=label_noise, independent=independent,
                        test_per_class=test_per_class, unlabeled=unlabeled)
    err(f"wrote {summary['n_images']} labelled images ({layout} layout, gaze {gaze}, {summary['design']} design) "
        f"to {out}" + (f", {summary['n_unlabeled']} unlabeled" if unlabeled else "")
        + (f" (labels of {summary['flipped']} training images flipped, see {out / 'label_noise.csv'})"
           if label_noise else ""))


@command(synth_app, "camelyon")
def synth_camelyon(
    out: Annotated[Path, typer.Argument(help="Folder to write: slides/ (tiff) or WSIs/ (bcnb), clinical.xlsx.")],
    slides: Annotated[int, typer.Option(help="Slides (patients).")] = 12,
    format: Annotated[str, typer.Option(help="tiff (pyramidal, OpenSlide) or bcnb (jpg + json outlines).")]
    = "tiff",
    size: Annotated[int, typer.Option(help="Level-0 width in pixels (20x, 0.5 um/px).")] = 4096,
    seed: SynthSeed = 0,
    workers: SynthWorkers = 1,
    label_noise: Annotated[float, typer.Option(
        "--label-noise", metavar="RHO", help="Share of TRAINING ALN statuses flipped across N0 / N+, borderline "
        "patients most often; dev/test stay clean; flips listed in label_noise.csv.")] = 0.0,
    independent: Annotated[bool, typer.Option(help="Negative control: slide and clinical record render latents "
                                                   "of their own; they share only the ALN status.")] = False,
    test_slides: Annotated[int, typer.Option(help="Extra test slides, identical whatever --slides is (a fixed "
                                                  "test set across training sizes).")] = 0,
    unlabeled: Annotated[int, typer.Option(help="Extra slides whose sheet row has no ALN status (unlabeled "
                                                "training slides for prepare).")] = 0,
) -> None:
    """Core-needle biopsy slide phantoms and a BCNB clinical sheet: one tumour-biology latent per patient, shown
    strongly in the record and faintly in the slide."""
    summary = run_synth("camelyon", out, slides=slides, format=format, size=size, seed=seed, workers=workers,
                        label_noise=label_noise, independent=independent, test_slides=test_slides,
                        unlabeled=unlabeled)
    counts = {split: len(ids) for split, ids in summary["splits"].items()}
    err(f"wrote {len(summary['slides'])} slides ({format}, {summary['design']} design; {counts['train']}/"
        f"{counts['dev']}/{counts['test']} train/dev/test" + (f", {unlabeled} unlabeled" if unlabeled else "")
        + f") and {summary['clinical']} to {out}")
    if label_noise:
        err(f"labels of {summary['flipped']} training slides flipped, see {out / 'label_noise.csv'}")
    if summary["splits_file"]:
        err(f"prepare with --splits {out / summary['splits_file']} (the noisy labels and extra test slides "
            "depend on this split)")


@command(synth_app, "table")
def synth_table(
    out: Annotated[Path, typer.Argument(help="Folder to write: photo/, scan/ and table.csv.")],
    samples: Annotated[int, typer.Option(help="Rows (samples); two per patient.")] = 30,
    size: SynthSize = 64,
    seed: SynthSeed = 0,
    unpaired: Annotated[bool, typer.Option(help="Each row fills one modality only (photo or scan).")] = False,
    multilabel: Annotated[bool, typer.Option(help="Finding columns spots,ring (0/1) instead of a label column "
                                                  "(prepare with --label-columns spots,ring).")] = False,
    scan_format: Annotated[str, typer.Option(help="Scan files as png or nifti (.nii.gz).")] = "png",
) -> None:
    """A lab's table phantom: a colour photo and a grey scan per sample from one latent, and table.csv (id,
    patient, split, label or finding columns, photo, scan) for `kdcli prepare table`."""
    summary = run_synth("table", out, samples=samples, size=size, seed=seed, unpaired=unpaired,
                        multilabel=multilabel, scan_format=scan_format)
    counts = summary["counts"]
    err(f"wrote {summary['samples']} samples ({counts['train']}/{counts['dev']}/{counts['test']} train/dev/test"
        f"{', unpaired' if unpaired else ''}) and {summary['csv']}")
