"""`kdcli predict`: a checkpoint on raw files (no shards), preprocessed exactly as `prepare` stored its data.

    contract.py   what a checkpoint records about its data's preprocessing (and the fallback for older ones)
    inputs.py     INPUTS (files, folders, globs) -> the items a checkpoint's source reads (images, cases, slides)
    images.py     2-D classifiers: fundus, OCT, chest X-rays (single-label, multi-label, multi-head)
    volumes.py    segmentation: BraTS cases or single NIfTI sequences -> NIfTI label volumes in the input grid
    slides.py     MIL: slides -> slide-level scores and attention heat maps
    run.py        options, dispatch, the output table
"""
