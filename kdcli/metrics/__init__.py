"""Metrics as plain functions of arrays (classification: scikit-learn; segmentation: Dice, HD95 per region).
Below the engine, which selects checkpoints by them, and below evaluate, which reports them."""
