"""Phantom datasets written in each real dataset's on-disk layout, registered by name."""

from kdcli.registry import Registry

SYNTHS = Registry("synthetic dataset")
SYNTHS.add("multieye", "kdcli.synth.multieye:synth_multieye", "MultiEYE fundus + OCT phantoms")
SYNTHS.add("fundus-grading", "kdcli.synth.fundus_grading:synth_fundus_grading",
           "graded fundus phantoms: a DR set (EyePACS/APTOS layout) and an AMD set")
