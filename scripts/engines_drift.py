#!/usr/bin/env python3
"""Drift: would the newest releases of the engines read our worker command lines the same way?

Builds (``--build``) a second engines venv with the NEWEST releases of vllm, lmcache, nixl, kvbm and
ai-dynamo (no pins; ai-dynamo and kvbm ``--no-deps`` as in the pinned set), then asks both venvs
about the same plans (the four vLLM built-ins and a fixed set of variants with engine flags and
LMCache settings) and prints, per worker, every flag, connector or ``LMCACHE_*`` value whose
meaning changed between the pinned set and the newest one, and where the newest one no longer
reads a plan as meant. Not part of CI (it depends on what PyPI serves today); run it before moving
the pins in pyproject.toml's ``gpu`` extra:

    .venv/bin/python scripts/engines_drift.py --build          # ~6 min and ~8 GB the first time
    .venv/bin/python scripts/engines_drift.py                  # reuse .venv-engines-latest

Exit status: 0 when the newest set reads every plan as meant, 1 when it does not, 2 when a venv is
missing or could not be built.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from enginekit import ROOT, VLLM_PROFILES, ask, disagreements, render

from supervisor.host.engines import EngineFacts, ProcessVerdict

# Variants: every engine flag and LMCache setting the supervisor emits or documents, at least once.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    **{name: (name, []) for name in VLLM_PROFILES},
    "disagg-flags": (
        "disagg",
        [
            'frontend.router_mode="kv"',
            'workers.prefill.args=["--max-num-seqs", "64", "--block-size", "16", "--enforce-eager"]',
            'workers.decode.args=["--max-model-len", "2048", "--max-num-batched-tokens", "4096"]',
        ],
    ),
    "agg-lmcache-all": (
        "agg",
        [
            'lmcache.local_disk="/var/cache/lmcache"',
            "lmcache.max_local_disk_size=10.5",
            'lmcache.remote={url="redis://127.0.0.1:6379", serde="cachegen"}',
            "lmcache.track_usage=true",
            'lmcache.log_level="WARNING"',
            "lmcache.extra={save_unfull_chunk=true, blocking_timeout_secs=17}",
        ],
    ),
}
# The newest releases: what `pip install` picks today. torch is left to vllm's own pin.
LATEST = [
    "vllm[flashinfer,otel,runai]",
    "lmcache",
    "nixl[cu13]",
    "blake3",
    "librosa",
    "ray",
    "soundfile",
    "uvloop",
]
# ai-dynamo's own requirements (requirements/dynamo-cpu.txt) by name: ai-dynamo itself goes in --no-deps.
DYNAMO_REQUIREMENTS = [
    line.split("=")[0].split(">")[0].split("<")[0].strip()
    for line in (ROOT / "requirements" / "dynamo-cpu.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


def build_latest(venv: Path) -> None:
    """A venv with the newest releases, by the same steps as scripts/engines-venv.sh."""
    start = time.monotonic()
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--upgrade"]
    subprocess.run([*pip, "pip"], check=True)
    subprocess.run([*pip, *LATEST, *DYNAMO_REQUIREMENTS], check=True)
    subprocess.run([*pip, "--no-deps", "ai-dynamo", "kvbm"], check=True)
    has_cuda = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"]
    )
    if has_cuda.returncode != 0:
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "uninstall",
                "-y",
                "--quiet",
                "torchvision",
                "torchaudio",
                "torchcodec",
            ],
            check=False,
        )
    size = subprocess.run(["du", "-sh", str(venv)], capture_output=True, text=True).stdout.split()[0]
    print(f"built {venv} in {time.monotonic() - start:.0f} s, {size} on disk", flush=True)


def meaning(verdict: ProcessVerdict | None) -> dict[str, Any]:
    """What one engine set made of one worker, as comparable values."""
    if verdict is None:
        return {"verdict": "none"}
    out: dict[str, Any] = {"crashed": verdict.crashed, "mode": verdict.mode}
    out["argv"] = verdict.args.error if verdict.args and not verdict.args.ok else "accepted"
    for c in verdict.connectors:
        out[f"connector {c.connector}@{c.depth}"] = (
            c.resolved if c.verdict.ok else f"refused: {c.verdict.error}"
        )
    ec = verdict.engine_config
    out["engine config"] = None if ec is None else ("valid" if ec.ok else f"refused: {ec.error}")
    for read in verdict.lmcache_reads:
        out[read.var] = read.read if read.verdict.ok else f"error: {read.verdict.error}"
    for var in verdict.lmcache_ignored:
        out[var] = "ignored"
    return out


def versions(facts: EngineFacts) -> str:
    return facts.versions_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pinned", type=Path, default=ROOT / ".venv-engines")
    parser.add_argument("--latest", type=Path, default=ROOT / ".venv-engines-latest")
    parser.add_argument("--build", action="store_true", help="(re)build the --latest venv first")
    args = parser.parse_args()
    if args.build:
        try:
            build_latest(args.latest)
        except subprocess.CalledProcessError as exc:
            print(f"could not build {args.latest}: {exc}", file=sys.stderr)
            return 2
    pythons = {"pinned": args.pinned / "bin" / "python", "latest": args.latest / "bin" / "python"}
    for label, python in pythons.items():
        if not python.exists():
            print(
                f"no {label} engines venv at {python.parent.parent} (scripts/engines-venv.sh; --build)",
                file=sys.stderr,
            )
            return 2
    answers = {}
    plans = {}
    for label, python in pythons.items():
        plans[label] = {key: render(base, str(python), sets) for key, (base, sets) in VARIANTS.items()}
        answers[label] = ask(plans[label], str(python))
    print(f"pinned: {versions(next(iter(answers['pinned'].values())))}")
    print(f"latest: {versions(next(iter(answers['latest'].values())))}")
    changed = broken = 0
    for key in VARIANTS:
        for spec in plans["latest"][key].processes:
            old = meaning(answers["pinned"][key].process(spec.name))
            new = meaning(answers["latest"][key].process(spec.name))
            if old.get("verdict") == new.get("verdict") == "none":
                continue
            for field in sorted(set(old) | set(new)):
                if old.get(field) != new.get(field):
                    changed += 1
                    print(
                        f"CHANGED {key}/{spec.name} {field}: pinned {old.get(field)!r} -> latest {new.get(field)!r}"
                    )
        for why in disagreements(plans["latest"][key], answers["latest"][key]):
            broken += 1
            print(f"NOT AS MEANT (latest) {key}/{why}")
    print(f"{changed} changes of meaning, {broken} readings not as meant by the newest releases")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
