"""Training methods, one file each, registered by name. `teach` uses `supervised`; `distill --method X`."""

from kdcli.registry import Registry

METHODS = Registry("method")
METHODS.add("supervised", "kdcli.methods.supervised:Supervised", "cross-entropy on one modality (teach)")
METHODS.add("kd", "kdcli.methods.kd:HintonKD", "Hinton logit distillation; needs paired data")
METHODS.add("coda", "kdcli.methods.coda:CoDA", "OCT-CoDA concept distillation, unpaired (MultiEYE)")
METHODS.add("sall", "kdcli.methods.sall:SALL", "SALL: per-task teachers' soft labels + adversarial alignment")
