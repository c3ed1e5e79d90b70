# Sourced by scripts/*.sh: make sure PostgreSQL answers on 127.0.0.1:5432 with
# trust authentication for user postgres. Starts an installed cluster that is
# down; installs PostgreSQL with apt-get when it is missing.

pg_log() { echo "[postgres] $*" >&2; }

pg_answers() {
  command -v pg_isready >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 -q
}

pg_login_works() {
  psql "postgres://postgres@127.0.0.1:5432/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1
}

pg_wait() {
  for _ in $(seq 1 60); do
    pg_answers && return 0
    sleep 0.5
  done
  pg_log "PostgreSQL did not start answering on 127.0.0.1:5432"
  return 1
}

ensure_postgres() {
  if ! pg_answers; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
      pg_log "PostgreSQL is not installed: installing it with apt-get"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >&2
      apt-get install -y -qq postgresql >&2
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_log "starting cluster $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || pg_ctlcluster "$version" main start >&2
    pg_wait
  fi
  if ! pg_login_works; then
    # A fresh Debian cluster asks for a password over TCP: trust local
    # connections, as the tests and demo expect.
    local version hba
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    pg_log "enabling trust authentication for 127.0.0.1 in $hba"
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload >&2 || pg_ctlcluster "$version" main reload >&2
    pg_login_works || { pg_log "cannot log in as postgres on 127.0.0.1:5432"; return 1; }
  fi
}
