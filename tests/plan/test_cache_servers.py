"""LMCache's own servers in the plan: argv, ports, start order, gates, restart defaults, connector, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.errors import PlanError
from supervisor.plan import render as planmod
from supervisor.plan.cache_servers import LM_SERVER_SHIM
from supervisor.plan.spec import Condition, Dependency, HttpCheck, ProtocolCheck, Role
from supervisor.profile import load as profiles

STATE = Path("/srv/state")
ROOT = Path(__file__).resolve().parents[2]


def render(name: str, *overrides: str, binaries: dict[str, str] | None = None):
    return planmod.render(
        profiles.load(name, overrides=overrides),
        state_root=STATE,
        python="/opt/py/bin/python",
        binaries=binaries,
    )


def flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_demo_lmcache_runs_the_server_first_and_gates_the_worker_on_its_healthcheck() -> None:
    plan = render("demo-lmcache", binaries={"lmcache": "/opt/lmc/bin/lmcache"})
    assert [p.name for p in plan.processes] == ["lmcache-server", "frontend", "worker"]
    server = plan.process("lmcache-server")
    assert server.role is Role.LMCACHE_SERVER and server.argv[:2] == ("/opt/lmc/bin/lmcache", "server")
    assert server.ports == {"zmq": 18755, "http": 18756} and server.bind_host == "127.0.0.1"
    assert flag(server.argv, "--host") == flag(server.argv, "--http-host") == "127.0.0.1"
    assert flag(server.argv, "--l1-size-gb") == "0.5" and flag(server.argv, "--eviction-policy") == "LRU"
    assert flag(server.argv, "--chunk-size") == "256" and server.memory_gb == 0.5
    ready = server.probes.readiness.check
    assert ready == HttpCheck(
        url="http://127.0.0.1:18756/healthcheck", json_field="status", json_value="healthy", owned_port=18756
    )
    # The multiprocess client recovers by itself: the server restarts alone.
    assert server.restart.restart_dependents is False
    worker = plan.process("worker")
    assert Dependency("lmcache-server", Condition.HEALTHY) in worker.depends_on
    # The frontend needs no cache: it does not wait for the server.
    assert plan.process("frontend").depends_on == ()


def test_vllm_workers_get_the_mp_connector_pointed_at_the_server_and_no_lmcache_env() -> None:
    plan = render("agg", "lmcache.server={l1_size_gb=8.0, heartbeat_interval_s=2.0}")
    worker = plan.process("worker")
    config = json.loads(flag(worker.argv, "--kv-transfer-config"))
    assert config == {
        "kv_connector": "LMCacheMPConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "lmcache.mp.host": "tcp://127.0.0.1",
            "lmcache.mp.port": 8555,
            "lmcache.mp.heartbeat_interval": 2.0,
        },
    }
    assert not any(k.startswith("LMCACHE_") for k in worker.env) and plan.deployment.lmcache == {}


def test_disagg_prefill_with_the_mp_server_is_refused_as_kvbm_refuses_it() -> None:
    # kvbm 1.6.1's PdConnector: "first connector must be LMCache, KVBM or FlexKV, not LMCacheMPConnector"
    # (the engine check against the released engines, docs/lmcache-servers.md).
    with pytest.raises(PlanError) as caught:
        render("disagg", "lmcache.server={}")
    assert caught.value.key == "lmcache.server" and "kvbm 1.6.1 refuses" in caught.value.problem
    plan = render("disagg", "lmcache.server={}", "workers.prefill.lmcache=false")
    assert "LMCacheMPConnector" not in " ".join(plan.process("prefill").argv)
    # The mocker loads no connector: a disaggregated demo may still run the server beside it.
    assert [p.name for p in render("demo", "lmcache.server={}").processes][0] == "lmcache-server"


def test_l2_adapters_pass_through_as_json() -> None:
    plan = render("demo-lmcache", 'lmcache.server.l2_adapters=[{type="fs", path="/data/l2"}]')
    argv = plan.process("lmcache-server").argv
    assert json.loads(flag(argv, "--l2-adapter")) == {"path": "/data/l2", "type": "fs"}


def test_served_lm_server_runs_with_reuseaddr_and_restarts_its_dependents() -> None:
    binaries = {
        "lmcache_server": "/opt/lmc/bin/lmcache_server",
        "/opt/lmc/bin/lmcache_server#python": "/opt/lmc/bin/python",
    }
    plan = render("demo-agg", 'lmcache.remote={url="lm://127.0.0.1:19650", serve=true}', binaries=binaries)
    assert [p.name for p in plan.processes] == ["lm-server", "frontend", "worker"]
    lm = plan.process("lm-server")
    assert lm.argv == ("/opt/lmc/bin/python", "-c", LM_SERVER_SHIM, "127.0.0.1", "19650")
    assert lm.probes.readiness.check == ProtocolCheck("lm-health", "127.0.0.1", 19650, owned_port=19650)
    assert lm.restart.restart_dependents is True  # LMCache's lm:// connector never reconnects
    assert Dependency("lm-server", Condition.HEALTHY) in plan.process("worker").depends_on
    # Without a known interpreter the console script runs as it is.
    plain = render("demo-agg", 'lmcache.remote={url="lm://127.0.0.1:19650", serve=true}')
    assert plain.process("lm-server").argv == ("lmcache_server", "127.0.0.1", "19650")


def test_served_redis_is_bounded_loopback_and_not_persistent_unless_asked() -> None:
    url = 'lmcache.remote={url="redis://127.0.0.1:19651", serve=true, server={maxmemory_gb=2.0}}'
    redis = render("demo-agg", url).process("redis")
    argv = redis.argv
    assert flag(argv, "--bind") == "127.0.0.1" and flag(argv, "--port") == "19651"
    assert flag(argv, "--maxmemory") == str(2 * 1024**3) and flag(argv, "--maxmemory-policy") == "allkeys-lru"
    assert (
        flag(argv, "--save") == ""
        and flag(argv, "--appendonly") == "no"
        and flag(argv, "--dir") == str(STATE / "demo-agg")
    )
    assert redis.probes.readiness.check == ProtocolCheck("redis-ping", "127.0.0.1", 19651, owned_port=19651)
    assert redis.restart.restart_dependents is False and redis.memory_gb == 2.0
    persistent = render("demo-agg", url.replace("maxmemory_gb=2.0", "persistence=true")).process("redis")
    assert flag(persistent.argv, "--appendonly") == "yes"


def test_restart_dependents_can_be_chosen_per_server() -> None:
    plan = render(
        "demo-agg",
        'lmcache.remote={url="lm://127.0.0.1:19650", serve=true, server={restart={restart_dependents=false}}}',
    )
    assert plan.process("lm-server").restart.restart_dependents is False


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ('lmcache.remote={url="redis://10.1.2.3:6379", serve=true}', "lmcache.remote.url", "loopback only"),
        (
            'lmcache.remote={url="redis://cache.internal:6379", serve=true}',
            "lmcache.remote.url",
            "loopback only",
        ),
        ('lmcache.remote={url="redis://127.0.0.1", serve=true}', "lmcache.remote.url", "explicit port"),
        (
            'lmcache.remote={url="redis://:pw@127.0.0.1:6379", serve=true}',
            "lmcache.remote.url",
            "without a password",
        ),
        (
            'lmcache.remote={url="rediss://127.0.0.1:6379", serve=true}',
            "lmcache.remote.serve",
            "not rediss://",
        ),
    ],
)
def test_serve_bad_urls_are_one_plan_error(override: str, key: str, words: str) -> None:
    with pytest.raises(PlanError) as caught:
        render("demo-agg", override)
    assert caught.value.key == key and words in caught.value.problem
    assert "pw" not in str(caught.value)


def test_server_and_remote_together_are_refused() -> None:
    with pytest.raises(PlanError) as caught:
        render("demo-lmcache", 'lmcache.remote={url="redis://127.0.0.1:6379"}')
    assert caught.value.key == "lmcache.remote" and "l2_adapters" in caught.value.problem


def test_serve_on_a_non_loopback_url_exits_2_with_one_line() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "plan",
            "demo-agg",
            "--set",
            'lmcache.remote={url="redis://192.0.2.7:6379", serve=true}',
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "serve = true runs the server on loopback only" in done.stderr
    assert "Traceback" not in done.stderr


def test_port_collisions_with_the_server_name_both_owners() -> None:
    with pytest.raises(PlanError) as caught:
        render("demo-lmcache", "lmcache.server.http_port=18200")
    assert "frontend" in caught.value.problem or "lmcache-server" in caught.value.problem


def test_flags_the_plan_sets_are_refused_in_server_args() -> None:
    with pytest.raises(PlanError) as caught:
        render("demo-lmcache", 'lmcache.server.args=["--l1-size-gb=4"]')
    assert (
        caught.value.key == "lmcache.server.args" and "use lmcache.server.l1_size_gb" in caught.value.problem
    )
    other = render("demo-lmcache", 'lmcache.server.args=["--max-workers", "4"]').process("lmcache-server")
    assert other.argv[-2:] == ("--max-workers", "4")
