"""Checkpoints: one torch file holding tensors and a JSON string, loaded with weights_only=True so that
opening a checkpoint never unpickles code. Written under a temporary name, then renamed."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcli.errors import KdcliError
from kdcli.storage import atomic_write

FORMAT = "kdcli-checkpoint"
VERSION = 1
REQUIRED_META = ("kind", "task", "model", "classes", "modality", "data")


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)  # optimizer, scheduler, epoch... (last only)


def save_checkpoint(path: Path, meta: dict[str, Any], model_state: dict[str, torch.Tensor],
                    state: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta),
               "model": {k: v.detach().cpu() for k, v in model_state.items()}, "state": state or {}}
    payload["digest"] = payload_digest(payload)
    atomic_write(path, lambda tmp: _torch_save(payload, tmp))


class _WriteErrors:
    """A file torch.save writes through that keeps the OSError of a failed write: torch's serializer turns it
    into a RuntimeError without errno ("unexpected pos ..."), so a full disk would not be recognised."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(payload: dict[str, Any], tmp: Path) -> None:
    with open(tmp, "wb") as handle:
        target = _WriteErrors(handle)
        try:
            torch.save(payload, target)
            handle.flush()
        except RuntimeError:
            if target.error is not None:
                raise target.error from None
            raise


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise KdcliError("checkpoint not found", path=path)
    try:
        # mmap: tensors are paged in when used, so reading a checkpoint's metadata (to dispatch on its task, say)
        # costs no more than its JSON; files are replaced by rename, so a mapped one never changes underneath
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise KdcliError(f"not a readable kdcli checkpoint ({type(exc).__name__})", path=path,
                         hint="the file is damaged or was not written by kdcli; retrain or restore it") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise KdcliError("not a kdcli checkpoint", path=path, hint="pass a .pt written by kdcli teach/distill")
    if payload.get("version") != VERSION:
        raise KdcliError(f"checkpoint version {payload.get('version')}, this kdcli reads {VERSION}", path=path)
    try:
        meta = json.loads(payload["meta"])
        missing = [key for key in REQUIRED_META if key not in meta]
    except (KeyError, TypeError, json.JSONDecodeError):
        missing = ["meta"]
    if missing or not isinstance(payload.get("model"), dict):
        raise KdcliError(f"checkpoint lacks {', '.join(missing) or 'weights'}", path=path,
                         hint="the file is damaged or was written by hand; retrain or restore it")
    check_digest(path, payload)
    return Checkpoint(path, meta, payload["model"], payload.get("state") or {})


_digest_checked: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) whose tensors matched, this process


def payload_digest(payload: dict[str, Any]) -> str:
    """sha256 of the meta string and every tensor (name, dtype, shape, bytes) and plain value of the weights and
    the training state, in a fixed order: what a flipped byte anywhere in the data would change."""
    hasher = hashlib.sha256(payload["meta"].encode())
    for section in ("model", "state"):
        _digest_value(hasher, section, payload.get(section) or {})
    return "sha256:" + hasher.hexdigest()


def _digest_value(hasher, name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _digest_value(hasher, f"{name}.{key}", value[key])
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _digest_value(hasher, f"{name}[{index}]", item)
    else:
        hasher.update(f"{name}={type(value).__name__}:{value!r}\n".encode())


def check_digest(path: Path, payload: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors no longer give the digest stored at save time (once per process and
    file version). Checkpoints from before digests existed load, with a note that they cannot be checked."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _digest_checked:
        return
    recorded = payload.get("digest")
    if recorded is None:
        print(f"note: {path} predates checkpoint digests, so damage to its weights cannot be detected; "
              "retraining writes one with a digest", file=sys.stderr)
    elif payload_digest(payload) != recorded:
        raise KdcliError("checkpoint weights differ from the digest stored when it was saved (the file was "
                         "damaged or edited)", path=path, hint="restore it from a copy, or retrain it")
    _digest_checked.add(key)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


def sibling(out: Path, suffix: str) -> Path:
    """oct.pt -> oct.last.pt, oct.metrics.csv, ..."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + suffix)
