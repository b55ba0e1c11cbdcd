"""Hide secrets in anything the supervisor shows: plan output, status, logs, errors, exports.

A value is secret when it is the password part of a URL, the value of an environment variable
whose name says it holds a credential, or the value of a command-line flag whose name does
(``--api-key X``, ``--hf-token=X``). The plan keeps real values (the children need them); only
what is printed or logged passes through here.

A URL's userinfo ends at its LAST ``@`` (a password may hold ``@`` and ``/`` unescaped, as
redis-py accepts): ``redis://:p@ss/w@cache:6379`` shows as ``redis://:***@cache:6379``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

MASK = "***"
_SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
# scheme://user:password@host or scheme://:password@host; the password runs to the last "@" before
# whitespace or a quote (the user part has no "/", ":" or "@").
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s\"']*:)(?P<secret>[^\s\"']*)@")
# A flag named like a credential: --api-key, --hf-token, --password, --client-secret, ...
_SECRET_FLAG = re.compile(
    r"^--?(?:[a-z0-9]+[-_])*(?:password|passwd|secret|token|api[-_]key|access[-_]key|credentials?)(?:[-_][a-z0-9]+)*$",
    re.IGNORECASE,
)
# ?password=... or &token=... in query strings
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:password|passwd|token|secret|api_key)=)(?P<secret>[^&\s]+)", re.I
)


def redact_text(text: str) -> str:
    """Mask URL passwords and secret query parameters anywhere inside ``text``."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + "@", text)
    return _QUERY_SECRET.sub(lambda m: m.group("head") + MASK, text)


def is_secret_flag(flag: str) -> bool:
    """``--api-key``, ``--hf-token``, ``--db-password`` yes; ``--tokenizer``, ``--max-num-batched-tokens`` no."""
    return bool(_SECRET_FLAG.match(flag))


def redact_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every credential-named flag masked (``--api-key X`` and
    ``--api-key=X``) and URL passwords hidden everywhere."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        flag, eq, _value = arg.partition("=")
        if is_secret_flag(flag):
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                mask_next = True
            continue
        out.append(redact_text(arg))
    return out


def secret_arg_indexes(argv: Sequence[str]) -> set[int]:
    """Indexes of the arguments :func:`redact_argv` masks or changes (for exporters that move
    them into a secret store instead)."""
    return {i for i, (raw, shown) in enumerate(zip(argv, redact_argv(argv))) if raw != shown}


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with credential-named values masked and URL passwords hidden."""
    return {k: (MASK if is_secret_name(k) and v else redact_text(v)) for k, v in env.items()}
