"""A profile's raw stage: TOML files read, ``extends`` merged, ``--set`` and ``--model`` applied.

No validation here (that is ``load``, with pydantic): this much is cheap, so the plan cache
(``host.plancache``) can key on exactly what validation would see without importing pydantic.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from supervisor.errors import ProfileError
from supervisor.paths import profiles_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def builtin_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def resolve(name_or_path: str) -> Path:
    """A profile name (``profiles/<name>.toml``) or a path to a TOML file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".toml" or os.sep in name_or_path:
        if not candidate.is_file():
            raise ProfileError(name_or_path, "", "no such profile file")
        return candidate
    builtin = profiles_dir() / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    names = builtin_names()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ProfileError(
        name_or_path, "", f"unknown profile{hint}; built-in profiles: {', '.join(names)}; or give a path"
    )


def display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_toml(path: Path) -> dict[str, Any]:
    source = display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(source, "", f"cannot read: {exc}") from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
        return data
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(source, "", f"invalid TOML: {exc}") from None


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; every other value (lists included) in ``over`` replaces ``base``'s."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and everything it ``extends``, merged parent first."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(display(p) for p in (*_chain, path))
        raise ProfileError(display(_chain[0]), "extends", f"cycle: {cycle}")
    data = read_toml(path)
    data.setdefault("name", path.stem)
    _anchor_model(data, path.parent)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    if not isinstance(parent_ref, str):
        raise ProfileError(display(path), "extends", f"expected a profile name or path, got {parent_ref!r}")
    if os.sep in parent_ref or parent_ref.endswith(".toml"):
        parent_path = (path.parent / parent_ref).resolve()
        if not parent_path.is_file():
            raise ProfileError(display(path), "extends", f"no such profile file {parent_ref!r}")
    else:
        try:
            parent_path = resolve(parent_ref)
        except ProfileError as exc:
            raise ProfileError(display(path), "extends", exc.problem) from None
    parent = load_raw(parent_path, (*_chain, path))
    parent.pop("name", None)
    parent.pop("description", None)
    return deep_merge(parent, data)


def _anchor_model(data: dict[str, Any], base: Path) -> None:
    """A relative model path (``./x``, ``../x``) is relative to the file, or the shell, that wrote it."""
    model = data.get("model")
    if (
        isinstance(model, dict)
        and isinstance(model.get("name"), str)
        and model["name"].startswith(("./", "../"))
    ):
        data["model"] = {**model, "name": str((base / model["name"]).resolve())}


_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``dotted.key=value``; the value is read as TOML (numbers, booleans, arrays) or else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise ProfileError("--set", text, "expected dotted.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        patch: dict[str, Any] = {path[-1]: value}
        for part in reversed(path[:-1]):
            patch = {part: patch}
        data = deep_merge(data, patch)
    return data


def merged(
    name_or_path: str, overrides: Sequence[str] = (), model: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """The profile file and the data validation will see: files merged, overrides applied."""
    path = resolve(name_or_path)
    data = apply_overrides(load_raw(path), overrides)
    if model is not None:
        data = deep_merge(data, {"model": {"name": model}})
        _anchor_model(data, Path.cwd())
    return path, data
