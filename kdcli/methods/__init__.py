"""Training methods, one file each, registered by name. `teach` uses `supervised`; `distill --method X`."""

from kdcli.registry import Registry

METHODS = Registry("method")
METHODS.add("supervised", "kdcli.methods.supervised:Supervised", "cross-entropy on one modality (teach)")
METHODS.add("kd", "kdcli.methods.kd:HintonKD", "Hinton logit distillation; needs paired data")
METHODS.add("dkd", "kdcli.methods.dkd:DKD", "decoupled KD: target-vs-rest and non-target KL weighed apart; paired data")
METHODS.add("coda", "kdcli.methods.coda:CoDA", "OCT-CoDA concept distillation, unpaired (MultiEYE)")
METHODS.add("sall", "kdcli.methods.sall:SALL", "SALL: per-task teachers' soft labels + adversarial alignment")
METHODS.add("segmentation", "kdcli.methods.segmentation:Segmentation",
            "CE + soft Dice on label maps (teach on segmentation datasets)")
METHODS.add("protokd", "kdcli.methods.protokd:ProtoKD",
            "ProtoKD: multi-sequence teacher -> one-sequence segmentation student (pixel KD + prototype maps)")
METHODS.add("multilabel", "kdcli.methods.multilabel:MultiLabel", "BCE per label (teach on multi-label datasets)")
METHODS.add("cvi", "kdcli.methods.cvi:CVI",
            "coarse-to-fine CXR stage 2: gaze/box posterior distilled into the image prior (KL), lower layers frozen")
METHODS.add("mil", "kdcli.methods.mil:MIL", "attention MIL on slide bags (teach on WSI datasets)")
METHODS.add("bidirectional", "kdcli.methods.bidirectional:Bidirectional",
            "WSI + clinical branch <-> WSI-only branch (logit KD one way, feature alignment the other)")
