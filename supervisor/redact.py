"""Hide secrets in anything the supervisor shows: plan output, status, logs.

A value is secret when it is the password part of a URL, or the value of an environment variable
whose name says it holds a credential. The plan keeps real values (the children need them); only
what is printed or logged passes through here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MASK = "***"
_SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
# scheme://user:password@host  or  scheme://:password@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*:)(?P<secret>[^@/\s]+)(?=@)")
# ?password=... or &token=... in query strings
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:password|passwd|token|secret|api_key)=)(?P<secret>[^&\s]+)", re.I
)


def redact_text(text: str) -> str:
    """Mask URL passwords and secret query parameters anywhere inside ``text``."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    return _QUERY_SECRET.sub(lambda m: m.group("head") + MASK, text)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with credential-named values masked and URL passwords hidden."""
    return {k: (MASK if is_secret_name(k) and v else redact_text(v)) for k, v in env.items()}
