"""A model's ``config.json`` (and the weights' size from a safetensors index), found without the network.

``init`` sizes a host for a model from these. A local directory is read as is; a Hugging Face id is
looked up in the local hub cache (``models--org--name/snapshots/<revision>``, the revision
``refs/main`` names first), never downloaded: the supervisor does not reach the hub, and a machine
without the model should say so in one line rather than hang. Problems are returned as data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INDEX_FILES = ("model.safetensors.index.json",)


@dataclass(frozen=True)
class ModelConfigFacts:
    """``config`` is the parsed config.json; ``problem`` says why there is none. ``weight_bytes`` is the
    safetensors index's ``metadata.total_size`` when the directory has one."""

    name: str
    location: str | None
    config: Mapping[str, Any] | None = field(default=None, repr=False)
    weight_bytes: int | None = None
    problem: str | None = None


def _snapshot(hub: Path, model_id: str) -> Path | None:
    repo = hub / ("models--" + model_id.replace("/", "--"))
    if not repo.is_dir():
        return None
    ref = repo / "refs" / "main"
    try:
        revision = ref.read_text().strip()
        if (repo / "snapshots" / revision / "config.json").is_file():
            return repo / "snapshots" / revision
    except OSError:
        pass
    snapshots = sorted(
        (p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return snapshots[0] if snapshots else None


def _weight_bytes(folder: Path) -> int | None:
    for name in INDEX_FILES:
        try:
            index = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        size = index.get("metadata", {}).get("total_size") if isinstance(index, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    single = folder / "model.safetensors"
    try:
        return single.stat().st_size
    except OSError:
        return None


def model_config_facts(name: str, *, local: bool, hub_dirs: tuple[Path, ...]) -> ModelConfigFacts:
    """Find and read ``name``'s config.json: a local directory when ``local``, else the hub cache."""
    if local:
        folder: Path | None = Path(name).expanduser()
        if not folder.is_dir():  # type: ignore[union-attr]
            return ModelConfigFacts(name, str(folder), problem=f"model directory {folder} does not exist")
    else:
        folder = next((s for hub in hub_dirs if (s := _snapshot(hub, name)) is not None), None)
        if folder is None:
            searched = ", ".join(str(h) for h in hub_dirs)
            return ModelConfigFacts(
                name,
                None,
                problem=(
                    f"{name} is not in the local Hugging Face cache ({searched}); download its config first "
                    f"(`hf download {name} config.json`) or pass a local directory"
                ),
            )
    assert folder is not None
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ModelConfigFacts(name, str(folder), problem=f"{folder} has no config.json")
    except (OSError, UnicodeDecodeError) as exc:
        return ModelConfigFacts(name, str(path), problem=f"{path} cannot be read: {exc}")
    except ValueError as exc:
        return ModelConfigFacts(name, str(path), problem=f"{path} is not valid JSON: {exc}")
    if not isinstance(config, dict):
        return ModelConfigFacts(name, str(path), problem=f"{path} is not a JSON object")
    return ModelConfigFacts(name, str(path), config, _weight_bytes(folder))
