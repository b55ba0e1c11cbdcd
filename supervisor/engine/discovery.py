"""Forget a dead worker in Dynamo's file discovery, so the frontend stops routing to it at once.

A SIGKILLed worker cannot deregister: its entries under ``DYN_FILE_KV`` linger until their lease
lapses (~10 s in Dynamo 1.6.1), and meanwhile the frontend counts a worker that is gone and about
half the requests fail. The supervisor knows the worker is dead the moment it exits, so it removes
the entries itself. They are found through the model card, which names the worker's own health
server (``http://HOST:<DYN_SYSTEM_PORT>/v1/metadata/...``); every entry of that registration ends in
the same lease id. Unknown layouts are left alone: the lease then lapses as before.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Dynamo 1.6.1's layout: <DYN_FILE_KV>/v1/{instances,mdc,...}/<url-quoted key ending in %2F<lease>>
LAYOUT = "v1"
_LEASE = re.compile(r"%2F([0-9a-f]+)$")


def _leases_of(mdc_dir: Path, system_port: int) -> set[str]:
    marker = f":{system_port}/v1/metadata/"
    leases = set()
    for card in mdc_dir.iterdir():
        try:
            text = card.read_text(encoding="utf-8")
            json.loads(text)  # only well-formed cards count
        except (OSError, ValueError):
            continue
        match = _LEASE.search(card.name)
        if marker in text and match:
            leases.add(match.group(1))
    return leases


def forget_worker(discovery_dir: str, system_port: int) -> list[str]:
    """Remove the registrations of the worker whose health server was on ``system_port``.

    Call only after that worker's process group is gone. Returns the removed file names.
    """
    root = Path(discovery_dir) / LAYOUT
    mdc = root / "mdc"
    if not mdc.is_dir():
        return []
    leases = _leases_of(mdc, system_port)
    removed = []
    for entry in root.glob("*/*"):
        match = _LEASE.search(entry.name)
        if match and match.group(1) in leases:
            try:
                entry.unlink()
            except FileNotFoundError:
                continue  # the worker or its lease expiry got there first
            removed.append(f"{entry.parent.name}/{entry.name}")
    return sorted(removed)
