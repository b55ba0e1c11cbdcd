"""Loading a deployment profile: built-in names, ``extends`` merging, ``--set`` overrides, validation.

Loading is a pipeline of small named steps, each collecting every error it finds and never coercing a
bad value into a default:  read TOML -> resolve ``extends`` -> apply overrides -> validate (pydantic,
strict, unknown keys forbidden) -> cross-field rules.  Errors name the file, the dotted key and what
was expected (``profiles/x.toml: lmcache.max_local_cpu_size: expected a number of GB, got "10GB"``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from supervisor.errors import ProfileError, ProfileErrors
from supervisor.profile.raw import (
    apply_overrides,
    builtin_names,
    deep_merge,
    display,
    load_raw,
    merged,
    parse_override,
    read_toml,
    resolve,
)
from supervisor.profile.rules import check_rules
from supervisor.profile.schema import Profile, Worker
from supervisor.redact import MASK, is_secret_name, redact_text

__all__ = [
    "Profile",
    "apply_overrides",
    "builtin_names",
    "deep_merge",
    "load",
    "load_raw",
    "parse_override",
    "read_toml",
    "resolve",
    "validate",
]


# -------------------------------------------------------------------------------------- validation


def _got(loc: Sequence[Any], got: Any) -> str:
    """How an offending value is quoted in an error: never a secret (a credential-named key's
    value is masked whole, a URL password inside any value is masked)."""
    if any(is_secret_name(str(part)) for part in loc):
        return MASK
    got_text = f"{got!r}" if not isinstance(got, (dict, list)) else type(got).__name__
    if isinstance(got, str):
        got_text = f'"{got}"'
    return redact_text(got_text)


def _expected(error: Mapping[str, Any]) -> str:
    """A short "expected ..., got ..." from one pydantic error, in the profile's own vocabulary."""
    kind, got = error["type"], error.get("input")
    got_text = _got(error["loc"], got)
    loc = [str(p) for p in error["loc"]]
    if kind in ("float_type", "float_parsing") and loc and loc[-1].endswith("_size"):
        return f"expected a number of GB, got {got_text}"
    table = {
        "bool_type": "expected true or false",
        "int_type": "expected an integer",
        "float_type": "expected a number",
        "string_type": "expected a string",
        "list_type": "expected an array",
        "dict_type": "expected a table",
        "model_type": "expected a table",
        "missing": "is required",
    }
    ctx = error.get("ctx") or {}
    bounds = {
        "greater_than": "above",
        "greater_than_equal": "at least",
        "less_than": "below",
        "less_than_equal": "at most",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"expected a number {bounds[kind]} {limit}, got {got_text}"
    if kind == "finite_number":
        return f"expected a finite number, got {got_text}"
    if kind == "string_pattern_mismatch":
        return f"expected a lower-case name of letters, digits, '-' and '_' (at most 48), got {got_text}"
    if kind in table:
        return f"{table[kind]}, got {got_text}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{message}, got {got_text}" if "got" not in message else message


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names the schema allows at ``loc`` (for "did you mean")."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            # a dict of models (workers.<name>) : step into its value type
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        if args and isinstance(args[-1], type) and issubclass(args[-1], BaseModel):
            current = args[-1]
        elif args and any(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            current = next(a for a in args if isinstance(a, type) and issubclass(a, BaseModel))
        else:
            current = annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _to_profile_errors(exc: ValidationError, source: str) -> ProfileErrors:
    errors = []
    for error in exc.errors():
        loc = list(error["loc"])
        key = ".".join(str(p) for p in loc if p != "[key]")
        if error["type"] == "extra_forbidden":
            parent = loc[:-1]
            if len(parent) == 2 and parent[0] == "workers":
                allowed = list(Worker.model_fields)
            else:
                allowed = _fields_at(Profile, parent)
            allowed = [a for a in allowed if a != "source"]
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.append(ProfileError(source, key, f"unknown key{hint}"))
        elif error["type"] == "literal_error":
            expected = error.get("ctx", {}).get("expected", "")
            got = MASK if any(is_secret_name(str(p)) for p in loc) else redact_text(repr(error["input"]))
            errors.append(ProfileError(source, key, f"expected one of {expected}, got {got}"))
        else:
            errors.append(ProfileError(source, key, _expected(error)))
    return ProfileErrors(errors)


def validate(data: dict[str, Any], source: str) -> Profile:
    try:
        profile = Profile.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise _to_profile_errors(exc, source) from None
    check_rules(profile)
    return profile


def load(name_or_path: str, *, overrides: Sequence[str] = (), model: str | None = None) -> Profile:
    """Load, merge, override and validate a profile by built-in name or path."""
    path, data = merged(name_or_path, overrides, model)
    try:
        return validate(data, display(path))
    except ProfileErrors as exc:
        raise _blame_overrides(exc, overrides, model) from None


def _blame_overrides(exc: ProfileErrors, overrides: Sequence[str], model: str | None) -> ProfileErrors:
    """Errors in keys the command line set name ``--set``/``--model`` as their source, not the file."""
    keys = [text.partition("=")[0].strip() for text in overrides]
    sources = {key: "--set" for key in keys} | ({"model.name": "--model"} if model is not None else {})

    def source_of(error: ProfileError) -> str:
        for key, source in sources.items():
            if error.key == key or error.key.startswith(key + "."):
                return source
        return error.source

    return ProfileErrors([ProfileError(source_of(e), e.key, e.problem) for e in exc.errors])
