"""What a command uses when an option is left out: the lab-script short forms

    kdcli prepare multieye ./raw                     -> shards/multieye/ (or $KDCLI_SHARDS/multieye/)
    kdcli teach --modality oct                       -> the one dataset under shards/, writes oct.pt
    kdcli distill --teacher oct.pt --student fundus  -> the teacher's dataset, the method the data call for,
                                                        writes fundus-<method>.pt beside the teacher
    kdcli evaluate fundus-coda.pt                    -> the dataset the checkpoint was trained on

Every default is checked before it is used (a recorded dataset must still be there with the same contents), and
a choice that is not obvious (the dataset, the method) is refused, or said, in one line. Light on purpose: no
torch, so the CLI can import it anywhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdcli.errors import KdcliError, UsageError

SHARDS_ENV = "KDCLI_SHARDS"


def shards_home() -> Path:
    """Where prepared datasets live by default: $KDCLI_SHARDS, else shards/ in the working directory."""
    return Path(os.environ.get(SHARDS_ENV) or "shards")


def default_prepare_out(source: str) -> Path:
    return shards_home() / source


def prepared_datasets(home: Path | None = None) -> list[Path]:
    """Shard directories (holding dataset.json) directly under `home`."""
    from kdcli.shards.format import DATASET_JSON

    home = home or shards_home()
    if not home.is_dir():
        return []
    return sorted(path for path in home.iterdir() if (path / DATASET_JSON).is_file())


def only_dataset() -> Path:
    """The dataset `teach` uses without --data: the single one under the default folder."""
    home = shards_home()
    found = prepared_datasets(home)
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"--data is required: no prepared dataset under {home}/ (run `kdcli prepare SOURCE RAW`, "
                         f"or set {SHARDS_ENV})")
    raise UsageError(f"--data is required: {home}/ holds {len(found)} datasets ({', '.join(p.name for p in found)}); "
                     f"pass --data {found[0]}")


def recorded_dataset(meta: dict[str, Any], checkpoint: Path) -> Path:
    """The dataset a checkpoint was trained on, if it is still where it was recorded with the same contents."""
    from kdcli.shards.format import DatasetMeta

    data = meta.get("data") or {}
    recorded = data.get("path")
    if not recorded:
        raise KdcliError("the checkpoint records no dataset path", path=checkpoint, hint="pass --data SHARDS")
    try:
        found = DatasetMeta.load(Path(recorded))
    except KdcliError:
        raise KdcliError(f"the dataset it was trained on, {recorded}, is gone", path=checkpoint,
                         hint="pass --data with the dataset's new place") from None
    if data.get("content_hash") and found.content_hash != data["content_hash"]:
        raise KdcliError(f"the dataset it was trained on, {recorded}, has changed (content hash "
                         f"{found.content_hash[:19]}, recorded {data['content_hash'][:19]})", path=checkpoint,
                         hint="pass --data with the dataset it was trained on")
    return Path(recorded)


def default_method(dataset: Any, teachers: list[dict]) -> tuple[str, str]:
    """(method, why) for `distill` without --method, from what the data (DatasetMeta) and teachers are: the
    task type's choice (tasks/)."""
    from kdcli.tasks import task_of

    return task_of(dataset).run("default_method", dataset, teachers)


def checkpoint_stem(modality: str) -> str:
    """A file-name-safe form of a modality list ("t1,t1ce" -> "t1+t1ce")."""
    return modality.replace(",", "+").replace("/", "_")


def default_teach_out(modality: str, task: str = "") -> Path | None:
    name = task or modality
    return Path(f"{checkpoint_stem(name)}.pt") if name else None


def default_distill_out(teacher: Path, student: str, method: str) -> Path:
    return Path(teacher).parent / f"{checkpoint_stem(student)}-{method}.pt"
