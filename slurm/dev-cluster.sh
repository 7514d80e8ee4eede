#!/usr/bin/env bash
# slurm/dev-cluster.sh — a real single-node Slurm cluster on this machine, for tdbench's
# Slurm tests and for trying the `slurm` executor without a real cluster.
#
#   slurm/dev-cluster.sh up [--accounting]   install (apt) if needed, start, wait for the node
#   slurm/dev-cluster.sh down                stop the daemons this script started
#   slurm/dev-cluster.sh status              which daemons run + sinfo; exit 0 up, 1 not up
#
# Daemons: munged, slurmctld, slurmd; with --accounting also MariaDB + slurmdbd (for sacct,
# which submitit polls for job states). Everything lives in one directory:
#   ${TDBENCH_SLURM_DIR:-$HOME/.cache/tdbench/slurm}
# `up` prints `export SLURM_CONF=<dir>/slurm.conf` as its last line (the only line on stdout;
# progress goes to stderr), so `eval "$(slurm/dev-cluster.sh up)"` points clients at it.
#
# Exit codes: 0 ok; 1 error (or `status`: not up); 2 usage; 3 prerequisites missing and not
# installable here (not root, no apt-get, apt failed): tests skip on 3.
#
# Tunables (environment): TDBENCH_SLURM_DIR, TDBENCH_SLURM_CLUSTER (tdbench),
# TDBENCH_SLURM_PARTITION (debug), TDBENCH_SLURM_CPUS (max(8, real)), TDBENCH_SLURM_ACCOUNTING=1
# (same as --accounting), TDBENCH_SLURM_PORT_BASE (6817: slurmctld, +1 slurmd, +2 slurmdbd,
# +3 MariaDB).
set -euo pipefail

PROG=${0##*/}
DIR=${TDBENCH_SLURM_DIR:-${HOME:-/root}/.cache/tdbench/slurm}
CLUSTER=${TDBENCH_SLURM_CLUSTER:-tdbench}
PARTITION=${TDBENCH_SLURM_PARTITION:-debug}
PORT_BASE=${TDBENCH_SLURM_PORT_BASE:-6817}
if ! [[ $PORT_BASE =~ ^[1-9][0-9]*$ ]] || ((PORT_BASE > 65530)); then
  echo "${0##*/}: error: TDBENCH_SLURM_PORT_BASE must be a port number, not '$PORT_BASE'" >&2
  exit 2
fi
HOST=$(hostname -s 2>/dev/null || uname -n)
HOST=${HOST%%.*}  # slurmd's own short name: NodeName must equal it
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))

CONF=$DIR/slurm.conf
DBD_CONF=$DIR/slurmdbd.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
RUN_DIR=$DIR/run
LOG_DIR=$DIR/log
DB_DIR=$DIR/mariadb
DB_SOCKET=$DB_DIR/mysqld.sock
MODE_FILE=$DIR/mode

# name -> pid file (the comm of the process must equal the name, so a reused pid is ignored)
declare -A PIDFILE=(
  [munged]=$MUNGE_DIR/munged.pid
  [mariadbd]=$RUN_DIR/mariadbd.pid
  [slurmdbd]=$RUN_DIR/slurmdbd.pid
  [slurmctld]=$RUN_DIR/slurmctld.pid
  [slurmd]=$RUN_DIR/slurmd.pid
)
BASE_DAEMONS=(munged slurmctld slurmd)
ACCT_DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
STOP_ORDER=(slurmd slurmctld slurmdbd mariadbd munged)

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
die_prereq() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 3; }
usage() {
  cat >&2 <<EOF
usage: $PROG up [--accounting] | down | status
  up            install Slurm (apt) if missing, start munged/slurmctld/slurmd, wait until
                the node is idle, print 'export SLURM_CONF=...' last
  --accounting  also run MariaDB + slurmdbd so that sacct works
  down          stop the daemons started by 'up' (by their pid files)
  status        show daemons and sinfo; exit 0 when up, 1 when not
state directory: $DIR  (set TDBENCH_SLURM_DIR to change)
EOF
  exit 2
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- processes ------------------------------------------------------------------------------

# pid_of NAME: print the pid from NAME's pid file when that process is alive (not a zombie)
# and really is NAME; return 1 otherwise.
pid_of() {
  local name=$1 file=${PIDFILE[$1]} pid stat state comm
  [[ -r $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file" 2>/dev/null) || return 1
  [[ -n $pid ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  comm=${stat#*(}; comm=${comm%)*}
  state=${stat##*) }; state=${state%% *}
  [[ $state != Z && $state != X ]] || return 1
  # comm is truncated to 15 characters by the kernel
  [[ $comm == "${name:0:15}" ]] || return 1
  printf '%s\n' "$pid"
}

is_running() { pid_of "$1" >/dev/null; }

# wait_gone NAME PID SECONDS: wait until PID is gone or a zombie.
wait_gone() {
  local pid=$2 deadline=$((SECONDS + $3)) stat state
  while ((SECONDS < deadline)); do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0
    state=${stat##*) }; state=${state%% *}
    [[ $state == Z || $state == X ]] && return 0
    sleep 0.1
  done
  return 1
}

stop_daemon() {
  local name=$1 pid
  if ! pid=$(pid_of "$name"); then
    rm -f "${PIDFILE[$name]}"
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$name" "$pid" 30; then
    log "$name (pid $pid) still running after 30 s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$name" "$pid" 10 || die "could not stop $name (pid $pid)"
  fi
  rm -f "${PIDFILE[$name]}"
}

# Run a daemon detached from the caller: clean environment, no inherited stdio or lock fd
# (so `subprocess.run(..., capture_output=True)` on this script does not hang on the pipes).
DAEMON_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME="${HOME:-/root}" LANG=C.UTF-8
  SLURM_CONF="$CONF")
spawn() {  # for daemons that fork into the background themselves
  local out=$1; shift
  (cd "$DIR" && exec "${DAEMON_ENV[@]}" "$@" </dev/null >>"$out" 2>&1 9>&-)
}
spawn_bg() {  # for foreground-only daemons: the subshell execs, so no bash stays behind
  local out=$1; shift
  (cd "$DIR" && exec "${DAEMON_ENV[@]}" setsid "$@" </dev/null >>"$out" 2>&1 9>&-) &
}

log_tail() {
  local file=$1
  if [[ -s $file ]]; then
    printf '%s: --- last lines of %s ---\n' "$PROG" "$file" >&2
    tail -n 15 "$file" | sed 's/^/    /' >&2
  fi
}

# wait_for SECONDS COMMAND...: poll COMMAND until it succeeds; 1 on timeout.
wait_for() {
  local secs=$1; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_port_free() {
  local port=$1 who=$2
  if port_in_use "$port"; then
    die "port $port (for $who) is already in use on 127.0.0.1 — another Slurm/MariaDB \
(perhaps a dev cluster from another TDBENCH_SLURM_DIR)? Stop it, or set TDBENCH_SLURM_PORT_BASE."
  fi
}

slurm_env() { SLURM_CONF=$CONF "$@"; }

# --- install --------------------------------------------------------------------------------

ensure_installed() {
  local accounting=$1 missing=() pkgs=()
  for b in slurmctld slurmd sinfo sbatch munged munge; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  ((${#missing[@]} == 0)) || pkgs+=(slurm-wlm munge)
  if [[ $accounting == 1 ]]; then
    local m2=()
    for b in slurmdbd sacct sacctmgr mariadbd mariadb-install-db mariadb mariadb-admin; do
      command -v "$b" >/dev/null 2>&1 || m2+=("$b")
    done
    if ((${#m2[@]})); then missing+=("${m2[@]}"); pkgs+=(slurmdbd mariadb-server); fi
  fi
  ((${#pkgs[@]} == 0)) && return 0
  log "missing: ${missing[*]}"
  ((EUID == 0)) || die_prereq "Slurm is not installed and installing it needs root (apt-get install ${pkgs[*]})"
  command -v apt-get >/dev/null 2>&1 ||
    die_prereq "no apt-get here: install ${pkgs[*]} (Slurm, munge) by hand"
  local t0; t0=$(now)
  log "apt-get update && apt-get install ${pkgs[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >"$LOG_DIR/apt.log" 2>&1 ||
    { log_tail "$LOG_DIR/apt.log"; die_prereq "apt-get update failed (see $LOG_DIR/apt.log)"; }
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$LOG_DIR/apt.log" 2>&1 ||
    { log_tail "$LOG_DIR/apt.log"; die_prereq "apt-get install ${pkgs[*]} failed (see $LOG_DIR/apt.log)"; }
  log "installed ${pkgs[*]} in $(elapsed "$t0") s"
  # Package scripts may start system daemons where an init system runs; this cluster uses
  # its own, so nothing else is touched.
}

# --- configuration --------------------------------------------------------------------------

write_slurm_conf() {
  local accounting=$1 host real_cpus mem ncpus defmem
  host=$HOST
  local probe; probe=$(slurmd -C 2>/dev/null) || die "'slurmd -C' failed"
  real_cpus=$(grep -o 'CPUs=[0-9]*' <<<"$probe" | head -n1 | cut -d= -f2)
  mem=$(grep -o 'RealMemory=[0-9]*' <<<"$probe" | head -n1 | cut -d= -f2)
  [[ -n $real_cpus && -n $mem ]] || die "could not parse 'slurmd -C' output: $probe"
  ncpus=${TDBENCH_SLURM_CPUS:-$((real_cpus > 8 ? real_cpus : 8))}
  [[ $ncpus =~ ^[1-9][0-9]*$ ]] || die "TDBENCH_SLURM_CPUS must be a positive integer, not '$ncpus'"
  mem=$((mem * 95 / 100))
  defmem=$((mem / ncpus))
  local acct_lines
  if [[ $accounting == 1 ]]; then
    acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# not a password: the munge socket slurmctld and clients use to talk to slurmdbd
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
  else
    acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  local tmp=$CONF.tmp
  cat >"$tmp" <<EOF
# Written by slurm/dev-cluster.sh (tdbench) — regenerated on every 'up'; edits are lost.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job restarts after ~10 s instead of 120 s
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups: plain /proc process tracking, no task binding or memory enforcement
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
# requeued jobs start within seconds instead of waiting for the 30 s backfill cycle
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job without --mem takes one CPU's share, not the whole node
DefMemPerCPU=$defmem
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
MaxArraySize=10001
MaxJobCount=100000
JobCompType=jobcomp/none
$acct_lines
# more CPUs than the machine has ($real_cpus), so several small jobs run at once
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$ncpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$ncpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv -f "$tmp" "$CONF"
  chmod 0644 "$CONF"
}

# --- munge ----------------------------------------------------------------------------------

MUNGE_USER=munge
start_munged() {
  is_running munged && return 0
  # munged runs as user munge unless that user cannot reach the state directory (e.g. it
  # lives under a 0700 /root): then it runs as root with --force. Either way only root (and
  # users who can reach the state directory) can talk to it.
  if ! id munge >/dev/null 2>&1 || ! runuser -u munge -- test -x "$DIR" 2>/dev/null; then
    MUNGE_USER=root
  fi
  mkdir -p "$MUNGE_DIR"
  chown "$MUNGE_USER:" "$MUNGE_DIR"
  chmod 0755 "$MUNGE_DIR"
  local key=$MUNGE_DIR/munge.key
  if [[ ! -s $key ]]; then
    (umask 077 && head -c 1024 /dev/urandom >"$key")
  fi
  chown "$MUNGE_USER:" "$key"
  chmod 0400 "$key"
  [[ -e $MUNGE_DIR/munged.log ]] && chown "$MUNGE_USER:" "$MUNGE_DIR/munged.log"
  [[ -e $MUNGE_DIR/munged.seed ]] && chown "$MUNGE_USER:" "$MUNGE_DIR/munged.seed"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  log "starting munged (as $MUNGE_USER)"
  local cmd=(munged --socket="$MUNGE_SOCKET" --key-file="$key" --pid-file="${PIDFILE[munged]}"
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed")
  if [[ $MUNGE_USER == root ]]; then
    # --force: munged otherwise refuses a socket whose path not everyone can traverse
    spawn "$LOG_DIR/munged.out" "${cmd[@]}" --force ||
      { log_tail "$MUNGE_DIR/munged.log"; log_tail "$LOG_DIR/munged.out"; die "munged failed to start"; }
  else
    spawn "$LOG_DIR/munged.out" runuser -u munge -- "${cmd[@]}" ||
      { log_tail "$MUNGE_DIR/munged.log"; log_tail "$LOG_DIR/munged.out"; die "munged failed to start"; }
  fi
  wait_for 15 sh -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" ||
    { log_tail "$MUNGE_DIR/munged.log"; die "munged did not answer on $MUNGE_SOCKET within 15 s"; }
}

# --- accounting: MariaDB + slurmdbd ---------------------------------------------------------

db_sql() { mariadb --no-defaults -S "$DB_SOCKET" -u root -e "$1"; }

start_mariadb() {
  is_running mariadbd && return 0
  check_port_free "$DB_PORT" MariaDB
  mkdir -p "$DB_DIR"
  chmod 0700 "$DB_DIR"
  if [[ ! -d $DB_DIR/data/mysql ]]; then
    log "initialising MariaDB data directory"
    rm -rf "$DB_DIR/data"
    mariadb-install-db --no-defaults --datadir="$DB_DIR/data" --user=root \
      --auth-root-authentication-method=socket --skip-test-db \
      >"$LOG_DIR/mariadb-install.log" 2>&1 ||
      { log_tail "$LOG_DIR/mariadb-install.log"; die "mariadb-install-db failed"; }
  fi
  rm -f "$DB_SOCKET"
  log "starting mariadbd on 127.0.0.1:$DB_PORT"
  # mariadbd stays in the foreground: background it in its own session
  spawn_bg "$LOG_DIR/mariadb.out" mariadbd --no-defaults --user=root \
    --datadir="$DB_DIR/data" --socket="$DB_SOCKET" --pid-file="${PIDFILE[mariadbd]}" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --log-error="$LOG_DIR/mariadb.log" \
    --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
    --innodb-lock-wait-timeout=900 --max-allowed-packet=16M
  wait_for 60 mariadb-admin --no-defaults -S "$DB_SOCKET" -u root ping ||
    { log_tail "$LOG_DIR/mariadb.log"; die "MariaDB did not start within 60 s"; }
  wait_for 10 is_running mariadbd ||
    die "MariaDB answers but wrote no pid file ${PIDFILE[mariadbd]}"
}

ensure_db_user() {
  local pwfile=$DIR/dbpass pw
  if [[ ! -s $pwfile ]]; then
    (umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$pwfile")
  fi
  pw=$(<"$pwfile")
  db_sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    FLUSH PRIVILEGES;" || die "could not create the slurm database user in MariaDB"
  local tmp=$DBD_CONF.tmp
  (umask 077 && cat >"$tmp" <<EOF
# Written by slurm/dev-cluster.sh (tdbench) — regenerated on every 'up --accounting'.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdAddr=127.0.0.1
DbdHost=$HOST
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=${PIDFILE[slurmdbd]}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pw
StorageLoc=slurm_acct_db
EOF
  )
  mv -f "$tmp" "$DBD_CONF"
  chown root: "$DBD_CONF"
  chmod 0600 "$DBD_CONF"
}

start_slurmdbd() {
  if ! is_running slurmdbd; then
    check_port_free "$DBD_PORT" slurmdbd
    log "starting slurmdbd on 127.0.0.1:$DBD_PORT"
    spawn "$LOG_DIR/slurmdbd.out" slurmdbd ||
      { log_tail "$LOG_DIR/slurmdbd.log"; log_tail "$LOG_DIR/slurmdbd.out"; die "slurmdbd failed to start"; }
  fi
  wait_for 60 slurm_env sacctmgr -n -P show cluster format=cluster ||
    { log_tail "$LOG_DIR/slurmdbd.log"; die "slurmdbd did not answer within 60 s"; }
  if ! slurm_env sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    log "registering cluster '$CLUSTER' in the accounting database"
    slurm_env sacctmgr -i add cluster "$CLUSTER" >&2 || die "sacctmgr add cluster $CLUSTER failed"
  fi
}

# --- slurmctld + slurmd ---------------------------------------------------------------------

node_state() { slurm_env sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null | head -n1; }

start_slurm() {
  if ! is_running slurmctld; then
    check_port_free "$CTLD_PORT" slurmctld
    log "starting slurmctld on 127.0.0.1:$CTLD_PORT"
    spawn "$LOG_DIR/slurmctld.out" slurmctld -f "$CONF" ||
      { log_tail "$LOG_DIR/slurmctld.log"; log_tail "$LOG_DIR/slurmctld.out"; die "slurmctld failed to start"; }
  fi
  wait_for 30 slurm_env scontrol ping ||
    { log_tail "$LOG_DIR/slurmctld.log"; die "slurmctld did not answer within 30 s"; }
  if ! is_running slurmd; then
    check_port_free "$SLURMD_PORT" slurmd
    log "starting slurmd on 127.0.0.1:$SLURMD_PORT"
    spawn "$LOG_DIR/slurmd.out" slurmd -f "$CONF" ||
      { log_tail "$LOG_DIR/slurmd.log"; log_tail "$LOG_DIR/slurmd.out"; die "slurmd failed to start"; }
  fi
  local deadline=$((SECONDS + 60)) state resumed=0
  while :; do
    state=$(node_state)
    case $state in
      idle | mix | alloc | comp) break ;;  # the node responds (alloc/mix: recovered jobs)
      down | drain | drng | fail)
        # e.g. left down by an unclean stop; slurmd answers, so put it back in service once
        if ((resumed == 0)) && is_running slurmd; then
          log "node is '$state' — resuming it"
          slurm_env scontrol update nodename="$HOST" state=resume >&2 || true
          resumed=1
        fi ;;
    esac
    if ((SECONDS >= deadline)); then
      log_tail "$LOG_DIR/slurmd.log"
      log_tail "$LOG_DIR/slurmctld.log"
      slurm_env sinfo -N -l >&2 || true
      die "node did not become idle within 60 s (state: '${state:-unknown}')"
    fi
    sleep 0.2
  done
}

# --- commands -------------------------------------------------------------------------------

recorded_accounting() { [[ -r $MODE_FILE ]] && grep -qx 'accounting=1' "$MODE_FILE"; }

daemons_for() { if [[ $1 == 1 ]]; then echo "${ACCT_DAEMONS[@]}"; else echo "${BASE_DAEMONS[@]}"; fi; }

running_daemons() {
  local n out=()
  for n in "${ACCT_DAEMONS[@]}"; do is_running "$n" && out+=("$n"); done
  echo "${out[@]}"
}

cluster_is_up() {  # all daemons of the recorded mode run
  local n rec=0
  recorded_accounting && rec=1
  [[ -e $MODE_FILE ]] || return 1
  for n in $(daemons_for "$rec"); do is_running "$n" || return 1; done
}

do_down() {
  local any=0 n njobs
  if is_running slurmctld; then
    njobs=$(slurm_env squeue -h -t R,CG -o %i 2>/dev/null | wc -l) || njobs=0
    if ((njobs > 0)); then
      log "note: $njobs job(s) running: their processes go on (under slurmstepd) and the next" \
        "'up' picks them up again; scancel them first to end them"
    fi
  fi
  for n in "${STOP_ORDER[@]}"; do
    if is_running "$n"; then any=1; stop_daemon "$n"; else rm -f "${PIDFILE[$n]}"; fi
  done
  rm -f "$MODE_FILE"
  if ((any)); then log "cluster stopped"; else log "cluster was not running"; fi
}

cmd_up() {
  local accounting=$1 t0
  t0=$(now)
  ((EUID == 0)) || die_prereq "'up' must run as root (it runs slurmctld/slurmd as SlurmUser=root)"
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  flock 9
  if cluster_is_up; then
    if [[ $accounting == 1 ]] && ! recorded_accounting; then
      log "cluster is up without accounting: restarting it with --accounting"
      do_down
    else
      log "already up ($(running_daemons))"
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
  elif [[ -n $(running_daemons) ]]; then
    log "partially up (running: $(running_daemons)): restarting everything"
    do_down
  fi
  [[ $accounting == 1 ]] || accounting=0
  # a failed 'up' stops what it started (logs stay for a look), so it never leaves half a cluster
  trap 'rc=$?; if ((rc != 0)); then log "up failed: stopping what it started"; do_down || true; fi' EXIT
  mkdir -p "$RUN_DIR" "$LOG_DIR" "$DIR/state" "$DIR/spool"
  chmod 0755 "$DIR" "$RUN_DIR" "$LOG_DIR"
  chmod 0700 "$DIR/state" "$DIR/spool"
  # unix socket paths are limited to 107 bytes
  ((${#MUNGE_SOCKET} < 100 && ${#DB_SOCKET} < 100)) ||
    die "state directory path too long for unix sockets: $DIR (set TDBENCH_SLURM_DIR to a shorter path)"
  # fail before starting anything when another program holds one of our ports
  check_port_free "$CTLD_PORT" slurmctld
  check_port_free "$SLURMD_PORT" slurmd
  if [[ $accounting == 1 ]]; then
    check_port_free "$DBD_PORT" slurmdbd
    check_port_free "$DB_PORT" MariaDB
  fi
  ensure_installed "$accounting"
  write_slurm_conf "$accounting"
  start_munged
  if [[ $accounting == 1 ]]; then
    start_mariadb
    ensure_db_user
    start_slurmdbd
  fi
  start_slurm
  echo "accounting=$accounting" >"$MODE_FILE"
  trap - EXIT
  log "up in $(elapsed "$t0") s: partition '$PARTITION', node $HOST ($(node_state)), accounting $([[ $accounting == 1 ]] && echo on || echo off)"
  log "state in $DIR"
  echo "export SLURM_CONF=$CONF"
}

cmd_down() {
  ((EUID == 0)) || die_prereq "'down' must run as root (the daemons run as root)"
  [[ -d $DIR ]] || { log "cluster was not running (no $DIR)"; return 0; }
  exec 9>"$DIR/.lock"
  flock 9
  do_down
}

cmd_status() {
  local n pid want=() rec=0 up=1
  if [[ -e $MODE_FILE ]]; then
    recorded_accounting && rec=1
  else
    up=0
  fi
  read -r -a want <<<"$(daemons_for "$rec")"
  echo "state directory: $DIR"
  for n in "${ACCT_DAEMONS[@]}"; do
    if pid=$(pid_of "$n"); then
      printf '  %-10s running (pid %s)\n' "$n" "$pid"
    else
      if [[ " ${want[*]} " == *" $n "* ]]; then
        up=0
        printf '  %-10s not running\n' "$n"
      else
        printf '  %-10s not running (not needed: accounting off)\n' "$n"
      fi
    fi
  done
  if is_running slurmctld && [[ -r $CONF ]]; then
    echo "sinfo:"
    slurm_env sinfo 2>&1 | sed 's/^/  /' || up=0
  fi
  if ((up)); then
    echo "cluster: up (accounting $([[ $rec == 1 ]] && echo on || echo off))"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  if [[ -n $(running_daemons) ]]; then
    echo "cluster: not up (partly running: 'up' restarts it, 'down' stops it)"
  else
    echo "cluster: down"
  fi
  return 1
}

main() {
  (($# >= 1)) || usage
  local sub=$1; shift
  local accounting=0
  [[ ${TDBENCH_SLURM_ACCOUNTING:-0} == 1 ]] && accounting=1
  while (($#)); do
    case $1 in
      --accounting) accounting=1 ;;
      -h | --help) usage ;;
      *) printf '%s: error: unknown argument: %s\n' "$PROG" "$1" >&2; usage ;;
    esac
    shift
  done
  case $sub in
    up) cmd_up "$accounting" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *) printf '%s: error: unknown command: %s\n' "$PROG" "$sub" >&2; usage ;;
  esac
}

main "$@"
