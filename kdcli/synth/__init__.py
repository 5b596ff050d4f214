"""Phantom datasets written in each real dataset's on-disk layout, registered by name."""

from kdcli.registry import Registry

SYNTHS = Registry("synthetic dataset")
SYNTHS.add("multieye", "kdcli.synth.multieye:synth_multieye", "MultiEYE fundus + OCT phantoms")
SYNTHS.add("fundus-grading", "kdcli.synth.fundus_grading:synth_fundus_grading",
           "graded fundus phantoms: a DR set (EyePACS/APTOS layout) and an AMD set")
SYNTHS.add("brats", "kdcli.synth.brats:synth_brats", "BraTS NIfTI phantoms (2018/2020/2021/2023 layouts)")
SYNTHS.add("cxr", "kdcli.synth.cxr:synth_cxr", "chest X-ray phantoms (NIH or MIMIC layout) with EGD-CXR/REFLACX gaze")
SYNTHS.add("camelyon", "kdcli.synth.camelyon:synth_camelyon",
           "biopsy slide phantoms (pyramidal TIFF or BCNB jpg+json) with a BCNB clinical sheet")
SYNTHS.add("table", "kdcli.synth.table:synth_table",
           "a lab's table: two modalities of one latent per sample (PNG, NIfTI) and the CSV `prepare table` reads")
