#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the registry/control-plane tests, without systemd.
#
#   url=$(.ci/services/postgres.sh start DIR)   # initdb in DIR, start on a free loopback port,
#                                               # create the database, print its SQLAlchemy URL
#   .ci/services/postgres.sh stop DIR           # stop it (DIR can then be deleted)
#
# DIR must not exist yet or be empty. Uses Debian's binaries (apt-get install -y postgresql;
# /usr/lib/postgresql/<ver>/bin, newest first) or PG_BIN. As root it runs the server as the
# `postgres` user, since postgres refuses to run as root. Logs go to DIR/log and stderr;
# stdout carries only the URL. Environment: PG_DB (default forgeline_test).
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
db="${PG_DB:-forgeline_test}"

die() { echo "postgres.sh: $*" >&2; exit 1; }
[[ "$cmd" == start || "$cmd" == stop ]] && [[ -n "$dir" ]] || die "usage: $0 start|stop DIR"

find_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
    local candidate
    for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r); do
        [[ -x "$candidate/pg_ctl" ]] && { echo "$candidate"; return; }
    done
    command -v pg_ctl >/dev/null && { dirname "$(command -v pg_ctl)"; return; }
    die "PostgreSQL binaries not found; install them with: apt-get install -y postgresql (or set PG_BIN)"
}

bin="$(find_bin)"
owner=""
if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' user (created by Debian's postgresql package)"
    owner=postgres
fi

as_owner() {
    if [[ -n "$owner" ]]; then runuser -u "$owner" -- "$@"; else "$@"; fi
}

if [[ "$cmd" == stop ]]; then
    [[ -f "$dir/data/PG_VERSION" ]] || die "no cluster in $dir"
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    exit 0
fi

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
[[ -z "$(ls -A "$dir")" ]] || die "$dir is not empty"
mkdir -p "$dir/data" "$dir/socket"
if [[ -n "$owner" ]]; then
    chown -R "$owner" "$dir"
    runuser -u "$owner" -- test -w "$dir" \
        || die "user $owner cannot reach $dir (a parent folder is private); use a folder under /tmp"
fi

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
# Tuned for throwaway test data: durability off, small footprint, loopback only.
as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 start -o \
    "-c listen_addresses=127.0.0.1 -p $port -k $dir/socket -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" >&2 \
    || { cat "$dir/log" >&2; die "pg_ctl start failed"; }
as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db" \
    || { as_owner "$bin/pg_ctl" -D "$dir/data" -m fast stop >&2; die "createdb $db failed"; }

url="postgresql+psycopg://postgres@127.0.0.1:$port/$db"
echo "$url" >"$dir/url"
echo "postgres.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $dir/data)" >&2
echo "$url"
