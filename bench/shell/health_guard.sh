#!/usr/bin/env bash
# health_guard.sh INTERVAL URL — the shell guard that guardd replaces, kept as a yardstick.
#
# Probes URL with `curl -fsS -m 2` every INTERVAL seconds (fractions allowed). After
# FAILURES failed probes in a row (default 3) it runs SWITCH_COMMAND (a command line,
# e.g. `nginx_switch.sh LINK TARGET -- NGINX_ARGS...`) once and exits 0; with no
# SWITCH_COMMAND it only logs the failure and goes on probing. This is what such
# scripts do in practice: a fork of curl per probe, a fork of sleep per interval,
# and a switch that trusts the first three failures it sees.
set -u

interval=${1:?usage: health_guard.sh INTERVAL URL}
url=${2:?usage: health_guard.sh INTERVAL URL}
failures=${FAILURES:-3}
agent=${USER_AGENT:-health_guard.sh}
fails=0

while :; do
    if curl -fsS -m 2 -A "$agent" -o /dev/null "$url" 2>/dev/null; then
        fails=0
    else
        fails=$((fails + 1))
        echo "$(date -u +%FT%T.%3NZ) probe failed ($fails/$failures): $url" >&2
    fi
    if [ "$fails" -ge "$failures" ]; then
        if [ -n "${SWITCH_COMMAND:-}" ]; then
            # shellcheck disable=SC2086  # a command line, split on purpose
            if $SWITCH_COMMAND; then
                echo "$(date -u +%FT%T.%3NZ) rolled back" >&2
                exit 0
            fi
            echo "$(date -u +%FT%T.%3NZ) switch failed" >&2
            exit 1
        fi
        fails=0
    fi
    sleep "$interval"
done
