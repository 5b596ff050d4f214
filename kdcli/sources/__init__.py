"""Raw dataset readers, one file each, registered by name (listing them imports nothing heavy)."""

from kdcli.registry import Registry

SOURCES = Registry("dataset source")
SOURCES.add(
    "multieye",
    "kdcli.sources.multieye:MultiEyeSource",
    "MultiEYE fundus + OCT (assemble/ and assemble_oct/ folders), 9 classes",
)
SOURCES.add(
    "fundus-grading",
    "kdcli.sources.fundus_grading:FundusGradingSource",
    "graded fundus sets, one task per set (EyePACS/APTOS CSV layouts); appends to one shard directory",
)
SOURCES.add(
    "brats",
    "kdcli.sources.brats:BratsSource",
    "BraTS 2018-2023 NIfTI cases (any release's naming): 4 MRI sequences + tumour labels, stored as axial slices",
)
SOURCES.add(
    "cxr",
    "kdcli.sources.cxr:CxrSource",
    "ChestX-ray14 or MIMIC-CXR-JPG multi-label X-rays, with EGD-CXR/REFLACX gaze heat maps and NIH boxes",
)
SOURCES.add(
    "camelyon",
    "kdcli.sources.camelyon:CamelyonSource",
    "whole-slide images (OpenSlide formats or BCNB jpg+json) + a clinical sheet: tissue patches per slide",
)
SOURCES.add(
    "table",
    "kdcli.sources.table:TableSource",
    "a lab's own data: one CSV row per sample (id, patient, split, label) with a path column per modality",
)
SOURCES.add("isic", "kdcli.sources.isic:IsicSource", "ISIC 2019/2020 dermoscopy: image folder + ground-truth CSV")
