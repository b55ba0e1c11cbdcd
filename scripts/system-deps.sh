#!/usr/bin/env bash
# Install the Debian packages the test suite uses for real, when missing: redis-server (remote-cache
# preflight), systemd (systemd-analyze verify of the rendered unit), iproute2 (network namespaces),
# tmux (the terminal `up` test reads the screen of a real pseudo-terminal), openssl (certificates for
# the two-namespace test's mutual TLS), haproxy (two frontends behind a load balancer, as
# docs/reliability.md tells operators to run them), nftables and iptables (the two-namespace test
# runs the README's firewall rules for open cluster planes).
# Needs root for apt-get; without root, say what is missing and let the tests that need it report it.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v ip >/dev/null || need+=(iproute2)
command -v tmux >/dev/null || need+=(tmux)  # a real pseudo-terminal for the terminal `up` test
command -v haproxy >/dev/null || need+=(haproxy)  # tests/e2e/test_frontends_lb.py
command -v openssl >/dev/null || need+=(openssl)  # the two-namespace test's cluster certificates
command -v nft >/dev/null || need+=(nftables)  # tests/e2e/test_two_hosts.py: the README's rule on the head
command -v iptables >/dev/null || need+=(iptables)  # tests/e2e/test_two_hosts.py: its iptables form on the worker
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${need[*]}; run 'sudo apt-get install ${need[*]}' (not root, so not installed)" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
