"""Predicting label maps over a slice view, and the dev-split validator segmentation runs are selected by."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcli.engine.loop import EngineConfig, Validate, make_loader, to_device


@torch.no_grad()
def predict_maps(model: torch.nn.Module, dataset: Dataset, cfg: EngineConfig, device: torch.device,
                 dtype: torch.dtype | None = None, keep_probs: bool = False) -> dict[str, np.ndarray]:
    """Argmax label maps (N, H, W) uint8 and true masks, in dataset order; under torchrun each rank predicts
    every world-th slice and the pieces are gathered, so every rank sees all of them."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    indices = list(range(rank, len(dataset), world))
    model.eval()
    pieces: dict[str, list[np.ndarray]] = {"pred": [], "mask": [], "probs": []}
    if indices:
        subset = dataset if world == 1 else torch.utils.data.Subset(dataset, indices)
        for batch in make_loader(subset, cfg, device, None, train=False):
            batch = to_device(batch, device, False)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(batch["image"])["logits"].float()
            pieces["pred"].append(logits.argmax(1).to(torch.uint8).cpu().numpy())
            pieces["mask"].append(batch["mask"].to(torch.uint8).cpu().numpy())
            if keep_probs:
                pieces["probs"].append(logits.softmax(1).half().cpu().numpy())
    mine = {k: np.concatenate(v) for k, v in pieces.items() if v}
    if world == 1:
        return mine
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (indices, mine))
    order = np.argsort(np.concatenate([g[0] for g in gathered if g[0]]))
    return {k: np.concatenate([g[1][k] for g in gathered if g[0]])[order] for k in mine}


def segmentation_validator(dev_set, regions: dict[str, list[int]], cfg: EngineConfig) -> Validate:
    """Per-case Dice of each region on the dev volumes (slices restacked); `dice_mean` selects the best epoch.
    HD95 is left to `kdcli evaluate`: it costs more than the epoch on small data."""
    from kdcli.metrics.segmentation import aggregate, region_metrics, stack_cases

    def validate(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict:
        maps = predict_maps(model, dev_set, cfg, device, dtype)
        preds = stack_cases(dev_set.records, dev_set.positions, maps["pred"])
        truths = stack_cases(dev_set.records, dev_set.positions, maps["mask"])
        per_case = [region_metrics(preds[case], truths[case], regions, with_hd95=False) for case in preds]
        return aggregate(per_case, regions)

    validate.samples = len(dev_set)  # slices, for the start-up line
    return validate
