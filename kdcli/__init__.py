"""kdcli: distil a multi-modal teacher into a single-modality student for medical imaging."""

__version__ = "0.1.0"
