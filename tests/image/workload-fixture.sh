#!/usr/bin/env bash
# Fixtures for workload tests: a tiny OCI image, a registry serving it and an NFS server, all
# from Debian packages (umoci, skopeo, busybox-static, docker-registry, nfs-ganesha(-vfs),
# rpcbind, curl). Run as root. Every daemon runs in a network namespace the caller made; its PID
# goes to a pid file so the caller can stop it by PID (`stop`). Nothing listens in the root
# namespace.
#
#   workload-fixture.sh build OUTDIR
#       OCI layout OUTDIR/layout, tag v1 (gzip layer) and, if skopeo can, v1-zstd (the same
#       image with its layer zstd-compressed). Prints "TAG sha256:..." per tag; the last line is
#       v1's manifest digest. Deterministic: the same busybox gives the same digests.
#   workload-fixture.sh registry NETNS ADDR PORT DIR
#       docker-registry (distribution 2.x) on http://ADDR:PORT, storage DIR/storage, config
#       DIR/registry.yml, log DIR/registry.log, PID in DIR/registry.pid. Returns once /v2/ answers.
#   workload-fixture.sh push NETNS OUTDIR ADDR PORT NAME
#       Copies v1 (and v1-zstd) to ADDR:PORT/NAME unchanged (--preserve-digests), checks the
#       registry's Docker-Content-Digest equals the layout's, prints "NAME:TAG@sha256:..." per
#       tag; the last line is "NAME@sha256:..." for v1.
#   workload-fixture.sh ganesha NETNS ADDR EXPORTDIR STATEDIR
#       rpcbind + nfs-ganesha (VFS) exporting EXPORTDIR over NFSv3 and NFSv4.0/4.1/4.2 on every
#       address of NETNS (ready once ADDR answers),
#       (v4 pseudo path /export, no root squash, RW, sec=sys, no grace period). PIDs in
#       STATEDIR/rpcbind.pid and STATEDIR/ganesha.pid, logs STATEDIR/ganesha.log and
#       STATEDIR/*.out. Returns once ADDR:2049 accepts TCP connections.
#   workload-fixture.sh stop FILE|DIR...
#       Kills (TERM, then KILL after 5 s) the PID in each pid file, or in each *.pid of a DIR.
set -euo pipefail

die() { echo "workload-fixture: $*" >&2; exit 1; }
need() { for c in "$@"; do command -v "$c" > /dev/null || die "missing $c (apt-get install the package)"; done; }
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# wait_for SECONDS CMD...: run CMD every 0.2 s until it succeeds
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" > /dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}
alive() { kill -0 "$1" 2> /dev/null; }
# has_addr NETNS ADDR: ADDR is configured on an interface of NETNS
has_addr() {
  ip -n "$1" -o addr show | awk '{ sub("/.*", "", $4); print $4 }' | grep -qxF -- "$2" \
    || die "no address $2 in network namespace $1"
}
# up_or_dead PID CMD...: CMD succeeds, or PID is gone (no point waiting longer)
up_or_dead() { local pid=$1; shift; "$@" || ! alive "$pid"; }

APPLETS=(sh cat dd sha256sum sleep ls mkdir echo ip id head wc grep env hostname yes kill test '[')
EPOCH=1970-01-01T00:00:00Z
OCI_MANIFEST=application/vnd.oci.image.manifest.v1+json

# digest of TAG in LAYOUT's index.json
layout_digest() {
  python3 - "$1" "$2" << 'EOF'
import json, sys
idx = json.load(open(sys.argv[1] + "/index.json"))
for m in idx["manifests"]:
    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == sys.argv[2]:
        print(m["digest"]); break
else:
    sys.exit("no tag " + sys.argv[2])
EOF
}

cmd_build() {
  [ $# -eq 1 ] || die "usage: build OUTDIR"
  need umoci skopeo python3
  [ -x /bin/busybox ] || die "no /bin/busybox (apt-get install busybox-static)"
  case "$(ldd /bin/busybox 2>&1 || true)" in *"not a dynamic"*) ;; *) die "/bin/busybox is not static (busybox-static)" ;; esac
  local out=$1 layout=$1/layout bundle=$1/bundle
  mkdir -p "$out"
  rm -rf "$layout" "$bundle"
  umoci init --layout "$layout"
  umoci new --image "$layout:v1"
  umoci unpack --image "$layout:v1" "$bundle" > /dev/null
  local r=$bundle/rootfs
  mkdir -p "$r/bin" "$r/etc" "$r/tmp" "$r/root"
  chmod 1777 "$r/tmp"; chmod 0700 "$r/root"
  install -m 0755 -o 0 -g 0 /bin/busybox "$r/bin/busybox"
  # WORKLOAD_EXTRA_BIN: more static programs for /bin, separated by spaces (the tests put
  # appliance and a raw control-socket client there, to try the socket from the workload).
  for b in ${WORKLOAD_EXTRA_BIN:-}; do install -m 0755 -o 0 -g 0 "$b" "$r/bin/"; done
  local applets; applets=$(/bin/busybox --list)
  for a in "${APPLETS[@]}"; do
    grep -qxF -- "$a" <<< "$applets" || die "busybox has no $a applet"
    ln -sfn busybox "$r/bin/$a"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$r/etc/passwd"
  printf 'root:x:0:\n' > "$r/etc/group"
  chmod 0644 "$r/etc/passwd" "$r/etc/group"
  chown -hR 0:0 "$r"
  # fixed timestamps: the layer's tar headers carry them
  find "$r" -exec touch -h -d "@0" {} +
  umoci repack --image "$layout:v1" --history.created "$EPOCH" --history.author "" \
    --history.created_by "tests/image/workload-fixture.sh build" "$bundle" > /dev/null
  umoci config --no-history --image "$layout:v1" --created "$EPOCH" --author "" \
    --config.cmd /bin/sh --config.cmd -c --config.cmd "echo hello" \
    --config.env PATH=/bin --config.workingdir /
  umoci gc --layout "$layout"
  rm -rf "$bundle"
  # The same image with its layer recompressed as zstd. Through a second layout: copying
  # within one layout, skopeo finds the gzip blob already there and reuses it (no recompression).
  local zstd="" tmp=$out/layout-zstd
  rm -rf "$tmp"
  if skopeo copy --help 2>&1 | grep -q -- --dest-compress-format; then
    if skopeo copy -q --dest-compress-format zstd "oci:$layout:v1" "oci:$tmp:v1-zstd" 2> "$out/zstd.err" \
      && skopeo copy -q --preserve-digests "oci:$tmp:v1-zstd" "oci:$layout:v1-zstd" 2>> "$out/zstd.err"; then
      zstd=$(layout_digest "$layout" v1-zstd)
      grep -q 'tar+zstd' "$layout/blobs/${zstd/://}" || die "v1-zstd has no zstd layer"
      rm -f "$out/zstd.err"
    else
      echo "workload-fixture: no zstd tag: $(cat "$out/zstd.err")" >&2
    fi
    rm -rf "$tmp"
  fi
  [ -z "$zstd" ] || echo "v1-zstd $zstd"
  echo "v1 $(layout_digest "$layout" v1)"
}

cmd_registry() {
  [ $# -eq 4 ] || die "usage: registry NETNS ADDR PORT DIR"
  need docker-registry curl
  local ns=$1 addr=$2 port=$3 dir=$4
  has_addr "$ns" "$addr"
  mkdir -p "$dir/storage"
  cat > "$dir/registry.yml" << EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $addr:$port
  secret: workload-fixture
health:
  storagedriver:
    enabled: false
EOF
  ip netns exec "$ns" docker-registry serve "$dir/registry.yml" < /dev/null > "$dir/registry.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$dir/registry.pid"
  if ! wait_for 20 up_or_dead "$pid" inns "$ns" curl -fsS -o /dev/null "http://$addr:$port/v2/" || ! alive "$pid"; then
    alive "$pid" && kill "$pid"
    tail -n 20 "$dir/registry.log" >&2
    die "registry did not answer on http://$addr:$port/v2/"
  fi
}

# registry's digest for NAME:TAG (HEAD, OCI manifest accepted)
registry_digest() {
  local ns=$1 addr=$2 port=$3 name=$4 tag=$5
  inns "$ns" curl -fsS -I \
    -H "Accept: $OCI_MANIFEST" -H "Accept: application/vnd.docker.distribution.manifest.v2+json" \
    "http://$addr:$port/v2/$name/manifests/$tag" \
    | tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" { print $2 }'
}

cmd_push() {
  [ $# -eq 5 ] || die "usage: push NETNS OUTDIR ADDR PORT NAME"
  need skopeo curl python3
  local ns=$1 layout=$2/layout addr=$3 port=$4 name=$5 tags=(v1) t want got v1=""
  if grep -q '"v1-zstd"' "$layout/index.json"; then tags=(v1-zstd v1); fi
  for t in "${tags[@]}"; do
    want=$(layout_digest "$layout" "$t")
    inns "$ns" skopeo copy -q --preserve-digests --dest-tls-verify=false \
      "oci:$layout:$t" "docker://$addr:$port/$name:$t" >&2
    got=$(registry_digest "$ns" "$addr" "$port" "$name" "$t")
    [ "$got" = "$want" ] || die "$name:$t: registry says ${got:-nothing}, layout has $want"
    echo "$name:$t@$got"
    [ "$t" != v1 ] || v1=$got
  done
  echo "$name@$v1"
}

cmd_ganesha() {
  [ $# -eq 4 ] || die "usage: ganesha NETNS ADDR EXPORTDIR STATEDIR"
  need rpcbind ganesha.nfsd
  [ -e /usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so ] || [ -n "$(find /usr/lib -name 'libfsalvfs.so' -print -quit 2> /dev/null)" ] \
    || die "no VFS FSAL (apt-get install nfs-ganesha-vfs)"
  local ns=$1 addr=$2 export=$3 state=$4
  has_addr "$ns" "$addr"
  mkdir -p "$export" "$state/recovery"
  export=$(cd "$export" && pwd -P); state=$(cd "$state" && pwd -P)
  cat > "$state/ganesha.conf" << EOF
NFS_CORE_PARAM {
  Protocols = 3, 4;
  # Every address of NETNS (the caller's own): the tests reach one server at several
  # addresses, one NFS client each.
  Enable_RQUOTA = false;
}
NFSV4 {
  Minor_Versions = 0, 1, 2;
  Graceless = true;
  Lease_Lifetime = 10;
  Grace_Period = 0;
  RecoveryBackend = fs;
  RecoveryRoot = $state/recovery;
}
NFS_KRB5 { Active_krb5 = false; }
EXPORT {
  Export_Id = 1;
  Path = $export;
  Pseudo = /export;
  Access_Type = RW;
  Squash = No_Root_Squash;
  Protocols = 3, 4;
  Transports = TCP, UDP;
  SecType = sys;
  FSAL { Name = VFS; }
}
LOG {
  Default_Log_Level = EVENT;
}
EOF
  rm -f "$state/rpcbind.pid" "$state/ganesha.pid"
  # One mount namespace (ip netns exec makes a private one) with a fresh tmpfs on /run for
  # both: rpcbind's socket (/run/rpcbind.sock) and state (/run/rpcbind), ganesha's
  # /run/ganesha, and no host D-Bus socket. Another rpcbind (the host's, or another
  # namespace's) is neither clobbered nor registered with.
  ip netns exec "$ns" sh -c '
    state=$1
    mount -t tmpfs -o mode=0755 fixture-run /run
    mkdir -p /run/rpcbind /run/ganesha /run/lock
    chown _rpc /run/rpcbind 2> /dev/null || true
    rpcbind -f -w < /dev/null > "$state/rpcbind.out" 2>&1 &
    echo $! > "$state/rpcbind.pid"
    i=0; until [ -S /run/rpcbind.sock ] || [ $i -ge 50 ]; do sleep 0.1; i=$((i + 1)); done
    ganesha.nfsd -F -f "$state/ganesha.conf" -L "$state/ganesha.log" -p "$state/ganesha.pid.own" \
      < /dev/null > "$state/ganesha.out" 2>&1 &
    echo $! > "$state/ganesha.pid"
  ' sh "$state"
  local gpid rpid
  rpid=$(cat "$state/rpcbind.pid"); gpid=$(cat "$state/ganesha.pid")
  if ! wait_for 30 up_or_dead "$gpid" inns "$ns" bash -c "exec 3<>/dev/tcp/$addr/2049" || ! alive "$gpid"; then
    tail -n 30 "$state/ganesha.log" "$state/ganesha.out" >&2 || true
    alive "$gpid" && kill "$gpid"; alive "$rpid" && kill "$rpid"
    die "ganesha does not accept on $addr:2049"
  fi
  alive "$rpid" || die "rpcbind died: $(cat "$state/rpcbind.out")"
}

cmd_stop() {
  local f files=() pids=() p
  for f in "$@"; do
    if [ -d "$f" ]; then
      for p in "$f"/*.pid; do [ -f "$p" ] && files+=("$p"); done
    else
      files+=("$f")
    fi
  done
  for f in "${files[@]}"; do
    [ -f "$f" ] || continue
    p=$(tr -dc 0-9 < "$f")
    if [ -n "$p" ] && alive "$p"; then kill "$p"; pids+=("$p"); fi
    rm -f "$f"
  done
  local deadline=$((SECONDS + 5))
  for p in "${pids[@]}"; do
    while alive "$p" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if alive "$p"; then kill -KILL "$p" 2> /dev/null || true; fi
  done
}

sub=${1:-}
[ $# -gt 0 ] && shift
case "$sub" in
  build) cmd_build "$@" ;;
  registry) cmd_registry "$@" ;;
  push) cmd_push "$@" ;;
  ganesha) cmd_ganesha "$@" ;;
  stop) cmd_stop "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
