# Sourced by scripts/*.sh: make sure PostgreSQL answers on 127.0.0.1:5432 and
# that user postgres can log in. Starts an installed cluster that is down;
# installs PostgreSQL with apt-get when it is missing. It changes the
# authentication settings (pg_hba.conf) and reloads only a cluster it
# installed in this same run; for any other it says what to do instead.

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
  local installed_here=0
  if ! pg_answers; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
      installed_here=1
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
    if [ "$installed_here" != 1 ]; then
      pg_log "cannot log in as postgres on 127.0.0.1:5432 without a password."
      pg_log "This script does not change a server it did not install. Either set DATABASE_URL"
      pg_log "(and DEMO_ADMIN_URL for the demo) to a URL that can log in, e.g."
      pg_log "postgres://postgres:PASSWORD@127.0.0.1:5432/postgres, or allow trust for"
      pg_log "127.0.0.1 in that cluster's pg_hba.conf yourself and reload it."
      return 1
    fi
    # The fresh Debian cluster installed above asks for a password over TCP:
    # trust local connections, as the tests and demo expect.
    local version hba
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    pg_log "enabling trust authentication for 127.0.0.1 in $hba"
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload >&2 || pg_ctlcluster "$version" main reload >&2
    pg_login_works || { pg_log "cannot log in as postgres on 127.0.0.1:5432"; return 1; }
  fi
}
