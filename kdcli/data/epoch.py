"""The training epoch, visible to DataLoader workers.

Views draw their augmentation, partners and bag patches from (seed, epoch, item). The engine keeps workers
alive across epochs (`persistent_workers`), and each worker holds its own copy of the view, so a plain
`self.epoch = n` set in the parent never reached them: every epoch repeated epoch 0's draws. The epoch therefore
lives in one shared-memory cell that the parent writes and every worker copy reads (fork and spawn alike: torch
shares the storage instead of copying it when the view is sent to a worker)."""

from __future__ import annotations

import torch


class SharedEpoch:
    """Mixin for datasets: `epoch` (and `set_epoch`) backed by a shared-memory cell."""

    @property
    def epoch(self) -> int:
        cell = self.__dict__.get("_epoch_cell")
        return 0 if cell is None else int(cell[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        cell = self.__dict__.get("_epoch_cell")
        if cell is None:
            cell = self.__dict__["_epoch_cell"] = torch.zeros(1, dtype=torch.int64).share_memory_()
        cell[0] = int(value)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
