#!/usr/bin/env bash
# A throw-away single-node Ceph cluster with a radosgw (S3) on 127.0.0.1:7480, for
# `make test-ceph`. Uses Debian's packages (ceph-mon, ceph-mgr, ceph-osd, radosgw): one
# monitor, one manager, one OSD on memstore (RAM, no disks needed), pool size 1.
#
#   bash scripts/ceph-rgw.sh start   # installs the packages if needed (as root), starts, writes $DIR/env
#   bash scripts/ceph-rgw.sh stop    # stops the daemons and removes $DIR
#
# $DIR/env exports VMBAK_TEST_S3_ENDPOINT, VMBAK_TEST_S3_ACCESS_KEY, VMBAK_TEST_S3_SECRET_KEY
# for tests/s3/conftest.py, and VMBAK_TEST_CEPH_CONF (the cluster's ceph.conf, whose keyring is
# client.admin's) for the RBD tests (tests/ceph). VMBAK_CEPH_DIR, VMBAK_CEPH_RGW_PORT and
# VMBAK_CEPH_MON_PORT (default 6789) let several clusters run side by side.
set -euo pipefail
DIR=${VMBAK_CEPH_DIR:-/tmp/vmbak-ceph}
PORT=${VMBAK_CEPH_RGW_PORT:-7480}
MON_PORT=${VMBAK_CEPH_MON_PORT:-6789}
CONF=$DIR/ceph.conf
ACCESS=VMBAKTESTACCESSKEY01
SECRET=vmbaktestsecretkey0000000000000000000001
PATH=$PATH:/usr/sbin:/sbin

stop() {
    if [[ -d $DIR/run ]]; then
        local pids=()
        for f in "$DIR"/run/*.pid; do
            [[ -f $f ]] && pids+=("$(cat "$f")")
        done
        ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 20); do  # until every daemon has exited
            local alive=0
            for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.5
        done
    fi
    rm -rf "$DIR"
}

wait_for() {  # wait_for SECONDS CMD...
    local t=$1; shift
    for _ in $(seq "$t"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "ceph-rgw: timed out waiting for: $*" >&2
    return 1
}

start() {
    local pkgs=(ceph-mon ceph-mgr ceph-osd radosgw ceph-common uuid-runtime curl python3-rados python3-rbd)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        [[ $(id -u) -eq 0 ]] || { echo "ceph-rgw: missing packages ${missing[*]} (run as root)" >&2; exit 1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    stop
    mkdir -p "$DIR"/{run,log,mon,mgr,osd0,rgw}
    local fsid; fsid=$(uuidgen)
    cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$MON_PORT
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# The monitor refuses to start (exit 28, ENOSPC) when its data disk has under 5% free, and
# warns under 30%: a CI machine's shared disk was that full once. This cluster keeps its
# objects in RAM (memstore) and its monitor store is a few MiB, so the check is switched off.
mon data avail crit = 0
mon data avail warn = 0
osd objectstore = memstore
memstore device bytes = 3221225472
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
keyring = $DIR/keyring
[mon.a]
mon data = $DIR/mon
[mgr.x]
mgr data = $DIR/mgr
[osd.0]
osd data = $DIR/osd0
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$PORT
rgw data = $DIR/rgw
EOF
    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
        --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    monmaptool --create --addv a "[v1:127.0.0.1:$MON_PORT]" --fsid "$fsid" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring"
    ceph-mon -c "$CONF" -i a
    wait_for 30 ceph -c "$CONF" -s
    ceph -c "$CONF" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
        -o "$DIR/mgr/keyring"
    ceph-mgr -c "$CONF" -i x --keyring "$DIR/mgr/keyring"
    local id; id=$(ceph -c "$CONF" osd create)
    ceph -c "$CONF" auth get-or-create "osd.$id" osd 'allow *' mon 'allow profile osd' \
        mgr 'allow profile osd' -o "$DIR/osd0/keyring"
    ceph-osd -c "$CONF" -i "$id" --mkfs --keyring "$DIR/osd0/keyring"
    ceph -c "$CONF" osd crush add-bucket localhost host
    ceph -c "$CONF" osd crush move localhost root=default
    ceph -c "$CONF" osd crush add "osd.$id" 1.0 host=localhost
    ceph-osd -c "$CONF" -i "$id" --keyring "$DIR/osd0/keyring"
    wait_for 60 sh -c "ceph -c '$CONF' osd stat | grep -q '1 up'"
    ceph -c "$CONF" auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' -o "$DIR/rgw/keyring"
    radosgw -c "$CONF" -n client.rgw.a --keyring "$DIR/rgw/keyring"
    wait_for 120 curl -sf "http://127.0.0.1:$PORT/"
    radosgw-admin -c "$CONF" user create --uid=vmbak --display-name=vmbak --access-key="$ACCESS" \
        --secret="$SECRET" >/dev/null
    cat >"$DIR/env" <<EOF
export VMBAK_TEST_S3_ENDPOINT=http://127.0.0.1:$PORT
export VMBAK_TEST_S3_ACCESS_KEY=$ACCESS
export VMBAK_TEST_S3_SECRET_KEY=$SECRET
export VMBAK_TEST_CEPH_CONF=$CONF
EOF
    echo "ceph-rgw: radosgw listening on http://127.0.0.1:$PORT (source $DIR/env)"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
