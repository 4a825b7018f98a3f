#!/usr/bin/env bash
# Starts the PostgreSQL server the tests use when it is not running.
# The tests create (and drop) their own throwaway databases on it.
set -euo pipefail

host=${ADSYNC_TEST_PG_HOST:-127.0.0.1}
port=${ADSYNC_TEST_PG_PORT:-5432}

if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
  exit 0
fi
echo "PostgreSQL is not answering on $host:$port; starting it" >&2
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
for _ in $(seq 1 30); do
  if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
    exit 0
  fi
  sleep 1
done
echo "PostgreSQL did not start on $host:$port" >&2
exit 1
