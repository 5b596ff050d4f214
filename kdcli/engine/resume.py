"""`teach/distill --resume`: continue the very run that was interrupted, or refuse before anything is written.

A resumed run repeats the uninterrupted one bit for bit (the loop reseeds per epoch), so it must be the same run:
the same architecture, modality, method, teachers, data (by content hash) and training options. Any other
value, e.g. a new --lr, would be recorded in config.json while the optimizer state restored from .last.pt
kept the old one, so a changed option is refused rather than half used. Only where and how fast the run goes
may change (the worker count, the device, compile, the paths: the data are compared by content), and how long:
--epochs, which the loop and the learning-rate schedule read afresh, extends or shortens the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli.engine.checkpoint import load_checkpoint, sibling
from kdcli.errors import KdcliError

# epochs may change too: the loop and the schedule read it afresh, so a resumed run can be extended (or cut short)
FREE_OPTIONS = frozenset({"resume", "overwrite", "data", "out", "workers", "device", "compile", "teacher", "epochs",
                          "threads", "log", "log_every", "allow_partial"})  # the last: how it runs, is logged
SHOWN = 3  # differences named in the one error line; the rest are counted


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _teacher_digests(teacher: Any) -> list[str]:
    entries = teacher if isinstance(teacher, list) else [teacher] if teacher else []
    return [str(entry.get("sha256")) for entry in entries if isinstance(entry, dict)]


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What this run would do differently from the run recorded in .last.pt's meta, one phrase each."""
    found = []
    same_modality = recorded.get("modality") == current.get("modality")
    if not same_modality:
        found.append(f"--modality {current.get('modality')} (the run being resumed trains {recorded.get('modality')})")
    old_model, new_model = recorded.get("model") or {}, current.get("model") or {}
    if old_model.get("backbone") != new_model.get("backbone"):
        found.append(f"--model {new_model.get('backbone')} (the run being resumed trains {old_model.get('backbone')})")
    elif old_model != new_model and same_modality:  # another modality changes the input layer: said above
        keys = sorted(k for k in set(old_model) | set(new_model) if old_model.get(k) != new_model.get(k))
        found.append(f"the model differs in {', '.join(keys)}")
    old_data, new_data = recorded.get("data") or {}, current.get("data") or {}
    if old_data.get("content_hash") != new_data.get("content_hash"):
        new_hash, old_hash = str(new_data.get("content_hash"))[:19], str(old_data.get("content_hash"))[:19]
        found.append(f"--data {new_data.get('path')} holds other data (content hash {new_hash}, the run being "
                     f"resumed trained on {old_hash} from {old_data.get('path')})")
    for key, what in (("method", "--method"), ("method_params", "--param"), ("label_task", "--task"),
                      ("classes", "the classes"), ("tasks", "the tasks")):
        if key in recorded and recorded.get(key) != current.get(key):
            found.append(f"{what} {_short(current.get(key))} (the run being resumed: {_short(recorded.get(key))})")
    if _teacher_digests(recorded.get("teacher")) != _teacher_digests(current.get("teacher")):
        found.append("another --teacher checkpoint (its sha256 differs from the one the run being resumed used)")
    old_config, new_config = recorded.get("config") or {}, current.get("config") or {}
    for key in sorted(set(old_config) & set(new_config) - FREE_OPTIONS - {"method", "params", "model", "modality"}):
        if old_config[key] != new_config[key]:
            found.append(f"{_flag(key)} {_short(new_config[key])} (the run being resumed used "
                         f"{_short(old_config[key])})")
    return found


def check_resume(out: Path, meta: dict[str, Any]) -> None:
    """Refuse, in one line naming what differs, a --resume of another run than the one in <out>.last.pt."""
    last_path = sibling(Path(out), ".last.pt")
    if not last_path.is_file():
        raise KdcliError("nothing to resume", path=last_path, hint="drop --resume to start a new run")
    found = differences(load_checkpoint(last_path).meta, meta)
    if not found:
        return
    more = f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    raise KdcliError(f"--resume of another run: {'; '.join(found[:SHOWN])}{more}", path=last_path,
                     hint=f"resume with the options in {sibling(Path(out), '.config.json').name}, or pass "
                          "--overwrite instead of --resume to start a new run")
