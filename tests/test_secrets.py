"""Secrets never echoed: URL passwords (``@`` inside them too), credential-named keys and flags,
in errors, reload results, ``plan``, ``export k8s`` and logs (docs/reliability.md, "Security")."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
import yaml
from click.testing import CliRunner

from supervisor.cli import main
from supervisor.control.reload import Reloader
from supervisor.errors import ProfileError
from supervisor.redact import MASK, is_secret_flag, redact_argv, redact_text

PASSWORD = "Pa55-w0rd"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:PW@cache:6379", "redis://:***@cache:6379"),
        ("redis://user:PW@cache:6379/0", "redis://user:***@cache:6379/0"),
        ("redis://:p@ss@cache:6379", "redis://:***@cache:6379"),  # userinfo ends at the LAST @
        ("rediss://u:p@s/s@w@cache:6380?x=1", "rediss://u:***@cache:6380?x=1"),
        ('got "redis://:a@b@c:1" twice: redis://:d@e@f:2', 'got "redis://:***@c:1" twice: redis://:***@f:2'),
        ("redis-sentinel://:pw@h1:26379,h2:26379", "redis-sentinel://:***@h1:26379,h2:26379"),
        ("http://example.com/a:b@c", "http://example.com/a:b@c"),  # a path, not a userinfo
        ("http://127.0.0.1:2379", "http://127.0.0.1:2379"),
    ],
)
def test_url_passwords_are_masked_up_to_the_last_at(text: str, shown: str) -> None:
    assert redact_text(text) == shown


@pytest.mark.parametrize(
    "flag", ["--api-key", "--hf-token", "--password", "--db-password", "--client-secret", "-token"]
)
def test_credential_flags_are_recognised(flag: str) -> None:
    assert is_secret_flag(flag)


@pytest.mark.parametrize(
    "flag", ["--tokenizer", "--max-num-batched-tokens", "--tokenizer-mode", "--model", "--key"]
)
def test_ordinary_flags_are_not(flag: str) -> None:
    assert not is_secret_flag(flag)


def test_argv_masks_credential_flag_values_in_both_forms() -> None:
    argv = ["python", "-m", "x", "--api-key", PASSWORD, "--hf-token=" + PASSWORD, "--tokenizer", "t"]
    assert redact_argv(argv) == [
        "python",
        "-m",
        "x",
        "--api-key",
        MASK,
        "--hf-token=" + MASK,
        "--tokenizer",
        "t",
    ]


def test_a_set_override_that_misplaces_a_url_does_not_echo_its_password() -> None:
    """The reported leak: `plan disagg --set 'lmcache.remote="redis://:PASS@cache:6379"'`."""
    result = CliRunner().invoke(
        main, ["plan", "disagg", "--set", f'lmcache.remote="redis://:{PASSWORD}@c@che:6379"']
    )
    assert result.exit_code == 2
    assert PASSWORD not in result.output and "redis://:***@che:6379" in result.output


def test_a_credential_named_key_never_shows_its_value() -> None:
    result = CliRunner().invoke(main, ["plan", "demo", "--set", "workers.decode.env.HF_TOKEN=123456789"])
    assert result.exit_code == 2
    assert "123456789" not in result.output and MASK in result.output


def test_plan_and_export_mask_credential_flags_in_args() -> None:
    args = f'workers.decode.args=["--api-key", "{PASSWORD}", "--served-note=x"]'
    plan = CliRunner().invoke(main, ["plan", "demo", "--json", "--set", args])
    assert plan.exit_code == 0, plan.output
    assert PASSWORD not in plan.output
    decode = next(p for p in json.loads(plan.output)["processes"] if p["name"] == "decode")
    assert decode["argv"][decode["argv"].index("--api-key") + 1] == MASK
    table = CliRunner().invoke(main, ["plan", "demo", "--set", args])
    assert table.exit_code == 0 and PASSWORD not in table.output
    export = CliRunner().invoke(main, ["export", "k8s", "demo", "--set", args])
    assert export.exit_code == 0, export.output
    assert PASSWORD not in export.output
    doc = yaml.safe_load(export.stdout)
    decode_c = next(c for c in doc["spec"]["components"] if c["name"] == "decode")
    container = decode_c["podTemplate"]["spec"]["containers"][0]
    value = container["args"][container["args"].index("--api-key") + 1]
    assert value.startswith("$(") and any(
        e["name"] == value[2:-1] and "secretKeyRef" in e["valueFrom"]
        for e in container["env"]
        if "valueFrom" in e
    )


def test_a_reload_result_never_carries_a_secret(tmp_path: Path) -> None:
    def load() -> object:
        raise ProfileError(
            "--set", "lmcache.remote", f'expected a table, got "redis://:{PASSWORD}@cache:6379"'
        )

    class Runner:
        plan = type("P", (), {"deployment": type("D", (), {"profile": "x", "state_dir": str(tmp_path)})()})()

    outcome = anyio.run(Reloader(load), Runner())  # type: ignore[arg-type]
    assert not outcome.ok
    assert PASSWORD not in outcome.message and "redis://:***@cache:6379" in outcome.message
