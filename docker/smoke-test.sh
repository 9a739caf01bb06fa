#!/usr/bin/env bash
# Build docker/Dockerfile (unchanged) with podman and smoke-test the image, from nothing, on a
# machine of CI's kind: Debian 12, root, no container registry (Debian's mirror and the Python
# package sources reachable). Run from the repository root:
#
#     bash docker/smoke-test.sh [--keep-base-images] [--keep-image]
#
# What it does, timing each phase:
#   1. installs podman, runc, debootstrap and curl with apt where missing;
#   2. writes a containers.conf (runc, cgroupfs, file events, ulimits pinned at or below this
#      shell's hard limits) in a temporary folder and exports CONTAINERS_CONF;
#   3. builds localhost/debian:bookworm with debootstrap from the mirror in the host's apt
#      sources, unless that image exists;
#   4. builds a stand-in for python:3.11-slim from it, tagged docker.io/library/python:3.11-slim,
#      unless that image exists (it tests the Dockerfile, not the official image);
#   5. reads the host's pip configuration (`pip config list`, PIP_* variables): local find-links
#      folders, file:// indexes, constraint files and the CA bundle are bind-mounted read-only at
#      the same paths, with a pip.conf naming them at /etc/pip.conf;
#   6. podman build --pull=never --format docker -f docker/Dockerfile;
#   7. runs the image (a named volume on /data, an empty read-only folder on /models, published
#      on 127.0.0.1:<free port>), waits for /readyz, runs its HEALTHCHECK, checks it is not
#      root, /models is read-only and the project is imported from the wheel's install in
#      site-packages (its priors and examples with it), POSTs a real /v1/reconstruct on the
#      embedded phantom-64;
#   8. the durable job store: one job finished, two more submitted, `podman restart` while they
#      run; after the restart the finished job's result is still there, unchanged, and the
#      interrupted jobs finish (succeeded);
#   9. removes what it created (container, volume, temporary folder, the app image, and the base
#      images unless --keep-base-images), on success or failure.
#
# Environment:
#   RECONSERVE_SKIP_IMAGE=1          skip everything (exit 0); without it, a machine where
#                                    podman cannot work fails this script loudly
#   RECONSERVE_KEEP_BASE_IMAGES=1    as --keep-base-images (later runs skip steps 3-4)
#   RECONSERVE_KEEP_IMAGE=1          as --keep-image (keep the app image, tag below)
#   RECONSERVE_SMOKE_IMAGE           the app image's tag (default localhost/reconserve:smoke)
#   RECONSERVE_SMOKE_READY_TIMEOUT   seconds to wait for /readyz (default 300)
#   RECONSERVE_SMOKE_JOB_TIMEOUT     seconds to wait for a job (default 600)
#   RECONSERVE_SMOKE_MIN_FREE_GB     free disk needed under podman's storage (default 20)
set -euo pipefail

KEEP_BASE=${RECONSERVE_KEEP_BASE_IMAGES:-0}
KEEP_IMAGE=${RECONSERVE_KEEP_IMAGE:-0}
IMG=${RECONSERVE_SMOKE_IMAGE:-localhost/reconserve:smoke}
READY_TIMEOUT=${RECONSERVE_SMOKE_READY_TIMEOUT:-300}
JOB_TIMEOUT=${RECONSERVE_SMOKE_JOB_TIMEOUT:-600}
MIN_FREE_GB=${RECONSERVE_SMOKE_MIN_FREE_GB:-20}
BASE_IMG=localhost/debian:bookworm
PY_IMG=docker.io/library/python:3.11-slim

for arg in "$@"; do
    case $arg in
        --keep-base-images) KEEP_BASE=1 ;;
        --keep-image) KEEP_IMAGE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "smoke-test: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

if [[ ${RECONSERVE_SKIP_IMAGE:-0} == 1 ]]; then
    echo "smoke-test: RECONSERVE_SKIP_IMAGE=1: image build and smoke test skipped"
    exit 0
fi

cd "$(dirname "$0")/.."
[[ -f docker/Dockerfile && -f requirements.lock && -f docs/examples/phantom-request.json ]] \
    || { echo "smoke-test: error: run from the reconserve repository (docker/Dockerfile not found)" >&2; exit 1; }

# ---------------------------------------------------------------- output, phases, clean-up
T_START=$SECONDS
PHASE="" PHASE_T0=$SECONDS
PHASE_LINES=()
CTR="" VOL="" TMP="" BUILT_IMG=0 CREATED_IMAGES=()

log() { printf 'smoke-test: %s\n' "$*"; }
die() { printf '\nsmoke-test: FAILED (%s): %s\n' "${PHASE:-setup}" "$*" >&2; exit 1; }
end_phase() {
    [[ -n $PHASE ]] && PHASE_LINES+=("$(printf '  %-40s %5d s%s' "$PHASE" $((SECONDS - PHASE_T0)) "${1:-}")")
    PHASE=""
}
phase() {
    end_phase
    PHASE=$1 PHASE_T0=$SECONDS
    printf '\n== %s   [%d s]\n' "$PHASE" $((SECONDS - T_START))
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if ((rc != 0)); then
        end_phase "  <- failed"
        if [[ -n $CTR ]] && podman container exists "$CTR" 2>/dev/null; then
            echo "---- podman logs $CTR (last 200 lines) ----" >&2
            podman logs --tail 200 "$CTR" >&2
            echo "---- state: $(podman inspect -f '{{.State.Status}} exit={{.State.ExitCode}} {{.State.Error}}' "$CTR")" >&2
        fi
    else
        end_phase
    fi
    PHASE="clean-up" PHASE_T0=$SECONDS
    printf '\n== clean-up\n'
    [[ -n $CTR ]] && podman rm -f -t 0 "$CTR" >/dev/null 2>&1
    [[ -n $VOL ]] && podman volume rm -f "$VOL" >/dev/null 2>&1
    if ((BUILT_IMG)); then
        if [[ $KEEP_IMAGE == 1 ]]; then log "kept the app image $IMG"
        else podman rmi -f "$IMG" >/dev/null 2>&1 && log "removed $IMG"; fi
    fi
    for img in "${CREATED_IMAGES[@]}"; do
        if [[ $KEEP_BASE == 1 ]]; then log "kept $img"
        else podman rmi -f "$img" >/dev/null 2>&1 && log "removed $img"; fi
    done
    [[ -n $TMP && -d $TMP ]] && rm -rf "$TMP"
    end_phase
    printf '\n== times\n'
    printf '%s\n' "${PHASE_LINES[@]}"
    printf '  %-40s %5d s\n' "total" $((SECONDS - T_START))
    if ((rc == 0)); then printf 'smoke-test: PASSED\n'; else printf 'smoke-test: FAILED (exit %d)\n' "$rc" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- 1. tools
phase "tools (apt where missing)"
((EUID == 0)) || die "needs root: the image is built and run with rootful podman (uid here: $EUID).
Run as root, or set RECONSERVE_SKIP_IMAGE=1 to skip the image check on purpose."
command -v python3 >/dev/null || die "python3 is needed for the checks"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || [[ -x /usr/sbin/runc ]] || missing+=(runc)
command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
fi
log "$(podman --version), $(runc --version 2>/dev/null | head -n 1)"

TMP=$(mktemp -d /var/tmp/reconserve-smoke.XXXXXX)
chmod 755 "$TMP"

# the checks' helper (host python3, standard library only)
cat > "$TMP/helper.py" <<'PY'
import ast, base64, glob, json, math, os, re, socket, subprocess, sys
from array import array
from urllib.parse import unquote, urlparse


def fail(msg):
    sys.exit(f"smoke-test: error: {msg}")


def mirror():
    """The host's Debian mirror (and security mirror) from its apt sources, for bookworm."""
    entries = []  # (uri, suite)
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for para in re.split(r"\n\s*\n", open(path).read()):
            fields, key = {}, None
            for line in para.splitlines():
                if line.lstrip().startswith("#") or not line.strip():
                    continue
                if line[0] in " \t" and key:
                    fields[key] += " " + line.strip()
                    continue
                key, _, val = line.partition(":")
                key = key.strip().lower()
                fields[key] = val.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    entries.append((uri, suite))
    for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
        if not os.path.isfile(path):
            continue
        for line in open(path):
            line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(line) >= 3 and line[0] == "deb":
                entries.append((line[1], line[2]))
    ok = [(u.rstrip("/"), s) for u, s in entries if urlparse(u).scheme in ("http", "https", "ftp", "file")]
    main = [u for u, s in ok if s == "bookworm"] or [u for u, s in ok if "-" not in s and "/" not in s]
    sec = [u for u, s in ok if s.endswith("-security")]
    if not main:
        fail("no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list")
    print(main[0], sec[0] if sec else "")


PIP_KEYS = ["index-url", "extra-index-url", "find-links", "constraint", "cert", "client-cert",
            "trusted-host", "timeout", "default-timeout", "retries", "proxy", "no-index",
            "prefer-binary", "only-binary", "disable-pip-version-check"]
MULTI = {"extra-index-url", "find-links", "constraint", "trusted-host"}
FORBIDDEN = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys",
             "/usr", "/usr/bin", "/usr/lib", "/usr/local", "/usr/local/bin", "/var", "/tmp", "/app"}


def pip_settings(listing_path):
    """Effective pip settings: `pip config list` (files and PIP_* variables), else the files."""
    prio = {"global": 1, "install": 2, ":env:": 3}
    found = {}  # key -> (priority, value)
    text = open(listing_path).read() if listing_path and os.path.isfile(listing_path) else ""
    if text.strip():
        for line in text.splitlines():
            m = re.match(r"^(:env:|[A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)=(.*)$", line.strip())
            if not m or m.group(1) not in prio:
                continue
            try:
                val = ast.literal_eval(m.group(3))
            except (ValueError, SyntaxError):
                val = m.group(3).strip("'\"")
            if prio[m.group(1)] >= found.get(m.group(2), (0,))[0]:
                found[m.group(2)] = (prio[m.group(1)], str(val))
    else:  # no pip on the host: read its configuration files in pip's order
        import configparser
        files = [os.path.join(d, "pip", "pip.conf") for d in
                 reversed(os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":"))]
        files += ["/etc/pip.conf", os.path.expanduser("~/.pip/pip.conf"),
                  os.path.expanduser("~/.config/pip/pip.conf")]
        if os.environ.get("PIP_CONFIG_FILE"):
            files.append(os.environ["PIP_CONFIG_FILE"])
        for f in files:
            cp = configparser.RawConfigParser()
            try:
                cp.read(f)
            except configparser.Error:
                continue
            for sec in ("global", "install"):
                if cp.has_section(sec):
                    for k, v in cp.items(sec):
                        found[k] = (prio[sec], v)
    for key in PIP_KEYS:  # the variables win
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env is not None:
            found[key] = (3, env)
    return {k: v for k, (_, v) in found.items() if k in PIP_KEYS}


def local_path(entry):
    u = urlparse(entry)
    if u.scheme == "file":
        return unquote(u.path)
    if u.scheme == "" and entry.startswith("/"):
        return entry
    if u.scheme == "" and os.path.exists(entry):
        return os.path.abspath(entry)
    return None


def index_root(path):
    """The folder to mount for a local PEP 503 index: the index and every file its pages link."""
    targets = set()
    for page in glob.glob(os.path.join(path, "*", "index.html")) + [os.path.join(path, "index.html")]:
        try:
            text = open(page, errors="replace").read()
        except OSError:
            continue
        for href in re.findall(r'href\s*=\s*["\']([^"\'#]+)', text):
            u = urlparse(href)
            if u.scheme in ("http", "https"):
                continue
            t = unquote(u.path) if u.scheme == "file" else (
                href if href.startswith("/") else os.path.join(os.path.dirname(page), unquote(href)))
            targets.add(os.path.dirname(os.path.normpath(t)))
    root = os.path.commonpath([path] + sorted(targets))
    return [root] if root not in FORBIDDEN else [path] + sorted(targets)


def pipconf(listing_path, out_path):
    """Write the build's pip.conf; print each local path to mount read-only, one a line."""
    s = pip_settings(listing_path)
    mounts, conf = [], {}
    for key, val in s.items():
        if key in ("index-url", "extra-index-url", "find-links"):
            kept = []
            for entry in val.split():
                p = local_path(entry)
                if p is None:
                    kept.append(entry)
                elif os.path.exists(p):
                    kept.append(entry)
                    mounts += index_root(p) if key != "find-links" and os.path.isdir(p) else [p]
                else:
                    print(f"smoke-test: pip {key} {entry}: not on this machine, left out", file=sys.stderr)
            if kept:
                conf[key] = " ".join(kept)
        elif key in ("constraint", "cert", "client-cert"):
            kept = []
            for entry in val.split():
                p = local_path(entry) or entry
                if os.path.exists(p):
                    kept.append(p)
                    mounts.append(p)
                else:
                    print(f"smoke-test: pip {key} {entry}: not on this machine, left out", file=sys.stderr)
            if kept:
                conf[key] = " ".join(kept)
        else:
            conf[key] = val
    if "cert" not in conf and os.path.isfile("/etc/ssl/certs/ca-certificates.crt"):
        conf["cert"] = "/etc/ssl/certs/ca-certificates.crt"  # the host's CA bundle
        mounts.append(conf["cert"])
    mounts = sorted({os.path.realpath(m) if os.path.isdir(m) else m for m in mounts})
    mounts = [m for m in mounts if not any(m != o and m.startswith(o.rstrip("/") + "/") for o in mounts)]
    for m in mounts:
        if m in FORBIDDEN:
            fail(f"pip's configuration names {m}; mounting it over the image's would break the build")
    with open(out_path, "w") as f:
        f.write("# generated by docker/smoke-test.sh from the host's pip configuration\n[global]\n")
        for k, v in conf.items():
            f.write(f"{k} = {v}\n")
    shown = re.sub(r"//[^/@\s]+@", "//***@", open(out_path).read())
    print("smoke-test: build pip.conf:\n" + "".join("    " + l for l in shown.splitlines(True)), file=sys.stderr)
    print("\n".join(mounts))


def request(src, steps, samples, seed):
    r = json.load(open(src))
    r["method"] = dict(r.get("method") or {}, steps=int(steps))
    r["num_samples"], r["seed"] = int(samples), int(seed)
    r["return"] = ["mean", "std"]
    print(json.dumps(r))


def npy(a, name):
    """A float32 .npy array of the API's {"npy": base64} form: (shape, values)."""
    if not isinstance(a, dict) or "npy" not in a:
        fail(f"{name}: not an {{'npy': ...}} array: {str(a)[:120]}")
    raw = base64.b64decode(a["npy"])
    if raw[:6] != b"\x93NUMPY":
        fail(f"{name}: not a .npy file")
    hlen, off = (int.from_bytes(raw[8:10], "little"), 10) if raw[6] == 1 else (int.from_bytes(raw[8:12], "little"), 12)
    head = ast.literal_eval(raw[off:off + hlen].decode("latin1"))
    shape = list(head["shape"])
    if head["descr"] != "<f4" or head["fortran_order"]:
        fail(f"{name}: dtype {head['descr']}, expected little-endian float32")
    vals = array("f", raw[off + hlen:])
    if len(vals) != math.prod(shape):
        fail(f"{name}: {len(vals)} values for shape {shape}")
    if not all(math.isfinite(v) for v in vals):
        fail(f"{name}: non-finite values")
    if a.get("shape") is not None and list(a["shape"]) != shape:
        fail(f"{name}: shape field {a['shape']} but the .npy holds {shape}")
    return shape, vals


def check_result(path, model, shape, steps, samples):
    """The Result of docs/API.md: mean (and std with samples > 1), metrics, nfe, model, method."""
    try:
        r = json.load(open(path))
    except ValueError:
        fail(f"{path}: not JSON: {open(path, errors='replace').read()[:300]}")
    shape = json.loads(shape)
    for k in ("mean", "std", "samples", "metrics", "nfe", "elapsed_s", "seed", "model", "method"):
        if k not in r:
            fail(f"result lacks {k!r}: keys {sorted(r)}")
    ms, mean = npy(r["mean"], "mean")
    if ms != shape:
        fail(f"mean has shape {ms}, expected {shape}")
    if int(samples) > 1:
        ss, std = npy(r["std"], "std")
        if ss != shape or min(std) < 0:
            fail(f"std: shape {ss} (expected {shape}), min {min(std)}")
    if r["model"] != model:
        fail(f"model {r['model']!r}, expected {model!r}")
    if int(r["method"].get("steps", -1)) != int(steps):
        fail(f"method.steps {r['method'].get('steps')}, expected {steps}")
    if not (isinstance(r["nfe"], int) and r["nfe"] > 0):
        fail(f"nfe {r['nfe']!r}")
    res = r["metrics"].get("data_residual")
    if not (isinstance(res, (int, float)) and math.isfinite(res) and 0 <= res < 1):
        fail(f"metrics.data_residual {res!r}")
    print(f"{model} {r['method'].get('name')} steps={steps} samples={samples}: mean {ms} in "
          f"[{min(mean):.3f}, {max(mean):.3f}], data_residual {res:.2e}, nfe {r['nfe']}, "
          f"elapsed {r['elapsed_s']:.1f} s")


def get(path, dotted):
    v = json.load(open(path))
    for k in dotted.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    print("" if v is None else v)


def same(a, b):
    ra, rb = json.load(open(a)), json.load(open(b))
    for k in ("mean", "std", "nfe", "seed", "model", "method"):
        if ra.get(k) != rb.get(k):
            fail(f"the result read after the restart differs from before it in {k!r}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"mirror": mirror, "pipconf": pipconf, "request": request, "check-result": check_result,
     "get": get, "same": same, "free-port": free_port}[cmd](*args)
PY
helper() { python3 "$TMP/helper.py" "$@"; }

# ---------------------------------------------------------------- 2. podman configuration
phase "podman configuration"
nofile=$(ulimit -Hn); [[ $nofile == unlimited ]] && nofile=1048576
nproc=$(ulimit -Hu); if [[ $nproc == unlimited ]] || ((nproc > 32768)); then nproc=32768; fi
cat > "$TMP/containers.conf" <<EOF
# docker/smoke-test.sh: crun cannot raise limits here (no CAP_SYS_RESOURCE) nor run in hybrid
# cgroups; runc with the limits pinned at or below the hard ones can.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$TMP/containers.conf
podman info >"$TMP/podman-info.txt" 2>&1 || { cat "$TMP/podman-info.txt" >&2; die "podman does not work on this machine (podman info failed)"; }
graphroot=$(podman info --format '{{.Store.GraphRoot}}')
mkdir -p "$graphroot"
free_gb=$(( $(df -Pk "$graphroot" | awk 'NR==2 {print $4}') / 1024 / 1024 ))
log "storage $graphroot: $free_gb GB free; ulimits nofile=$nofile nproc=$nproc; runtime runc"
((free_gb >= MIN_FREE_GB)) || die "only $free_gb GB free under $graphroot; the build needs about $MIN_FREE_GB GB (RECONSERVE_SMOKE_MIN_FREE_GB)"

# ---------------------------------------------------------------- 3. debian:bookworm
phase "base image $BASE_IMG"
if podman image exists "$BASE_IMG"; then
    log "present, not rebuilt"
else
    read -r MIRROR SECURITY < <(helper mirror) || die "no Debian mirror found in the host's apt sources"
    log "debootstrap --variant=minbase bookworm from $MIRROR"
    rootfs=$TMP/rootfs
    if ! debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$TMP/debootstrap.log" 2>&1; then
        tail -n 30 "$TMP/debootstrap.log" "$rootfs/debootstrap/debootstrap.log" 2>/dev/null >&2
        die "debootstrap from $MIRROR failed"
    fi
    {
        echo "deb $MIRROR bookworm main"
        echo "deb $MIRROR bookworm-updates main"
        [[ -n $SECURITY ]] && echo "deb $SECURITY bookworm-security main"
    } > "$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$BASE_IMG" >/dev/null 2>"$TMP/import.log" \
        || { cat "$TMP/import.log" >&2; die "podman import failed"; }
    CREATED_IMAGES+=("$BASE_IMG")
    rm -rf "$rootfs"
    log "imported $BASE_IMG ($(podman image inspect -f '{{.Size}}' "$BASE_IMG" | awk '{printf "%.0f MB", $1/1e6}'))"
fi
podman run --rm --network none "$BASE_IMG" true >"$TMP/run.log" 2>&1 \
    || { cat "$TMP/run.log" >&2; die "podman cannot run a container on this machine"; }

# ---------------------------------------------------------------- 4. python:3.11-slim
phase "python:3.11-slim stand-in"
if podman image exists "$PY_IMG"; then
    log "$PY_IMG present, not rebuilt"
else
    mkdir -p "$TMP/python-slim"
    cat > "$TMP/python-slim/Containerfile" <<EOF
# a stand-in for the official python:3.11-slim (no registry here): Debian's Python 3.11 in a
# venv first on PATH, so that python and pip are the image's own as in the official one
FROM $BASE_IMG
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
        python3 python3-venv ca-certificates netbase tzdata \\
    && rm -rf /var/lib/apt/lists/* \\
    && python3 -m venv /usr/local/py
ENV PATH=/usr/local/py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
CMD ["python3"]
EOF
    podman build --pull=never --format docker -t "$PY_IMG" "$TMP/python-slim" >"$TMP/python-slim.log" 2>&1 \
        || { tail -n 40 "$TMP/python-slim.log" >&2; die "building the python:3.11-slim stand-in failed"; }
    CREATED_IMAGES+=("$PY_IMG")
    log "built $PY_IMG: $(podman run --rm "$PY_IMG" python --version 2>&1), pip $(podman run --rm "$PY_IMG" pip --version | awk '{print $2}')"
fi

# ---------------------------------------------------------------- 5. pip's sources
phase "pip sources"
: > "$TMP/pip-config-list.txt"
for pip in "python3 -m pip" pip3 pip; do
    if $pip --version >/dev/null 2>&1; then
        $pip config list > "$TMP/pip-config-list.txt" 2>/dev/null || true
        break
    fi
done
mapfile -t PIP_MOUNTS < <(helper pipconf "$TMP/pip-config-list.txt" "$TMP/pip.conf")
BUILD_MOUNTS=(-v "$TMP/pip.conf:/etc/pip.conf:ro")
for m in "${PIP_MOUNTS[@]}"; do
    [[ -n $m ]] || continue
    BUILD_MOUNTS+=(-v "$m:$m:ro")
    log "mounted read-only in the build: $m"
done

# ---------------------------------------------------------------- 6. the app image
phase "build docker/Dockerfile"
# --layers=false: no intermediate images left behind (nothing to cache on a fresh machine)
log "podman build --pull=never --format docker --layers=false -f docker/Dockerfile -t $IMG ."
BUILT_IMG=1
if ! podman build --pull=never --format docker --layers=false "${BUILD_MOUNTS[@]}" \
        -f docker/Dockerfile -t "$IMG" . 2>&1 \
        | tee "$TMP/build.log" | while IFS= read -r line; do
            if [[ $line =~ ^(\[[0-9]+/[0-9]+\]\ )?(STEP\ [0-9]+|COMMIT|Successfully) ]]; then
                printf '[%4d s] %.160s\n' $((SECONDS - T_START)) "$line"
            fi
        done; then
    echo "---- podman build (last 60 lines) ----" >&2
    tail -n 60 "$TMP/build.log" >&2
    die "podman build -f docker/Dockerfile failed"
fi
size=$(podman image inspect -f '{{.Size}}' "$IMG")
log "image $IMG: $(awk -v s="$size" 'BEGIN {printf "%.2f GB", s/1e9}')"
[[ $(podman image inspect -f '{{.Config.User}}' "$IMG") == 1000 ]] || die "the image's USER is not 1000"
podman image inspect "$IMG" | grep -q '/healthz' \
    || die "the image has no HEALTHCHECK (built without --format docker?)"

# ---------------------------------------------------------------- 7. run it
phase "start: wait for /readyz"
PORT=$(helper free-port)
URL=http://127.0.0.1:$PORT
CTR=reconserve-smoke-$$
VOL=reconserve-smoke-data-$$
mkdir -p "$TMP/models" && chmod 755 "$TMP/models"   # outside models: none (empty)
podman volume create "$VOL" >/dev/null
podman run -d --name "$CTR" -p "127.0.0.1:$PORT:8000" \
    -v "$VOL:/data" -v "$TMP/models:/models:ro" --stop-timeout 30 "$IMG" >/dev/null \
    2> >(grep -v 'unable to get systemd connection' >&2) \
    || die "podman run failed"

wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT)) code state
    while :; do
        code=$(curl -s -o "$TMP/readyz.json" -w '%{http_code}' --max-time 5 "$URL/readyz" || true)
        [[ $code == 200 ]] && break
        if grep -q 'starting failed' "$TMP/readyz.json" 2>/dev/null; then
            die "the server could not start: $(cat "$TMP/readyz.json")"
        fi
        state=$(podman inspect -f '{{.State.Status}}' "$CTR" 2>/dev/null || echo gone)
        [[ $state == running ]] || die "the container stopped ($state) before /readyz answered 200"
        ((SECONDS < deadline)) || die "/readyz not 200 after ${READY_TIMEOUT} s (last: $code $(cat "$TMP/readyz.json" 2>/dev/null))"
        sleep 1
    done
    log "/readyz 200 after $((SECONDS - PHASE_T0)) s: $(cat "$TMP/readyz.json")"
}
wait_ready
for m in phantom-64 grf-32; do
    grep -q "\"$m\"" "$TMP/readyz.json" || die "/readyz does not list the embedded model $m"
done

phase "checks: health, user, volumes"
code=$(curl -s -o "$TMP/healthz.json" -w '%{http_code}' --max-time 5 "$URL/healthz" || true)
[[ $code == 200 ]] || die "/healthz answered $code"
podman healthcheck run "$CTR" >"$TMP/hc.log" 2>&1 \
    || { cat "$TMP/hc.log" >&2; die "podman healthcheck run $CTR: unhealthy"; }
log "HEALTHCHECK: healthy"
uid=$(podman exec "$CTR" id -u) || die "podman exec id -u failed"
[[ $uid != 0 ]] || die "the server runs as root"
log "runs as uid $uid"
if podman exec "$CTR" touch /models/.probe 2>/dev/null; then die "/models is writable (expected read-only)"; fi
podman exec "$CTR" sh -c 'test -w /data && test -n "$(ls -A /data)"' \
    || die "/data is not writable by the server or holds no job store"
log "/models read-only, job store on /data: $(podman exec "$CTR" ls /data | tr '\n' ' ')"
# the project comes from its wheel: imported from site-packages, the priors and examples with it
where=$(podman exec -w / "$CTR" python -c 'import service, models.checkpoint as c, service.settings as s; \
print(service.__file__, c.default_checkpoint_dir(), s.examples_dir())') || die "importing the project failed"
[[ $where == */site-packages/service/__init__.py\ */site-packages/models/checkpoints\ */site-packages/service/examples ]] \
    || die "the project is not the wheel's install: $where"
log "installed from the wheel: $where"

phase "POST /v1/reconstruct"
helper request docs/examples/phantom-request.json 10 2 0 > "$TMP/req-sync.json"
code=$(curl -s -o "$TMP/res-sync.json" -w '%{http_code}' --max-time 600 -X POST "$URL/v1/reconstruct" \
    -H 'Content-Type: application/json' --data-binary @"$TMP/req-sync.json" || true)
[[ $code == 200 ]] || die "POST /v1/reconstruct answered $code: $(head -c 400 "$TMP/res-sync.json" 2>/dev/null)"
helper check-result "$TMP/res-sync.json" phantom-64 '[1, 64, 64]' 10 2 || die "the /v1/reconstruct result is malformed"

# ---------------------------------------------------------------- 8. jobs across a restart
phase "jobs across podman restart"
submit() {  # submit NAME STEPS SAMPLES SEED -> prints the job id
    helper request docs/examples/phantom-request.json "$2" "$3" "$4" > "$TMP/req-$1.json"
    local code
    code=$(curl -s -o "$TMP/sub-$1.json" -w '%{http_code}' --max-time 60 -X POST "$URL/v1/jobs" \
        -H 'Content-Type: application/json' --data-binary @"$TMP/req-$1.json" || true)
    [[ $code == 202 ]] || die "POST /v1/jobs ($1) answered $code: $(head -c 400 "$TMP/sub-$1.json")"
    helper get "$TMP/sub-$1.json" id
}
status() {  # status ID -> prints "status step"
    local code
    code=$(curl -s -o "$TMP/st.json" -w '%{http_code}' --max-time 10 "$URL/v1/jobs/$1" || true)
    [[ $code == 200 ]] || die "GET /v1/jobs/$1 answered $code: $(head -c 400 "$TMP/st.json")"
    echo "$(helper get "$TMP/st.json" status) $(helper get "$TMP/st.json" progress.step)"
}
wait_job() {  # wait_job ID NAME: until succeeded
    local deadline=$((SECONDS + JOB_TIMEOUT)) st step
    while :; do
        read -r st step < <(status "$1")
        case $st in
            succeeded) log "job $2 ($1) succeeded"; return 0 ;;
            failed|cancelled|expired) die "job $2 ($1) $st: $(cat "$TMP/st.json")" ;;
        esac
        ((SECONDS < deadline)) || die "job $2 ($1) still $st after ${JOB_TIMEOUT} s"
        sleep 1
    done
}
result() {  # result ID FILE
    local code
    code=$(curl -s -o "$2" -w '%{http_code}' --max-time 60 "$URL/v1/jobs/$1/result" || true)
    [[ $code == 200 ]] || die "GET /v1/jobs/$1/result answered $code: $(head -c 400 "$2")"
}
JOB_A=$(submit a 10 1 1)
log "job a ($JOB_A): 10 steps, to finish before the restart"
wait_job "$JOB_A" a
result "$JOB_A" "$TMP/res-a-before.json"
helper check-result "$TMP/res-a-before.json" phantom-64 '[1, 64, 64]' 10 1
JOB_B=$(submit b 30 2 2)
JOB_C=$(submit c 30 2 3)
log "jobs b ($JOB_B), c ($JOB_C): 30 steps x 2 samples, to be interrupted"
deadline=$((SECONDS + JOB_TIMEOUT))
while :; do
    read -r st step < <(status "$JOB_B")
    [[ $st == running && ${step:-0} -ge 1 ]] && break
    [[ $st == succeeded ]] && { log "warning: job b finished before the restart (a fast machine?)"; break; }
    [[ $st == queued || $st == running ]] || die "job b is $st: $(cat "$TMP/st.json")"
    ((SECONDS < deadline)) || die "job b did not start within ${JOB_TIMEOUT} s"
    sleep 0.5
done
log "job b: $st at step ${step:-0}; job c: $(status "$JOB_C"); podman restart"
t0=$SECONDS
podman restart -t 30 "$CTR" >/dev/null 2> >(grep -v 'unable to get systemd connection' >&2) \
    || die "podman restart failed"
log "restarted in $((SECONDS - t0)) s"
PHASE_T0_SAVED=$PHASE_T0; PHASE_T0=$t0
wait_ready
PHASE_T0=$PHASE_T0_SAVED
log "after the restart: job a: $(status "$JOB_A"), job b: $(status "$JOB_B"), job c: $(status "$JOB_C")"
[[ $(status "$JOB_A") == succeeded* ]] || die "job a is no longer succeeded after the restart"
result "$JOB_A" "$TMP/res-a-after.json"
helper same "$TMP/res-a-before.json" "$TMP/res-a-after.json"
log "job a's result is unchanged after the restart"
wait_job "$JOB_B" b
wait_job "$JOB_C" c
result "$JOB_B" "$TMP/res-b.json"
helper check-result "$TMP/res-b.json" phantom-64 '[1, 64, 64]' 30 2
result "$JOB_C" "$TMP/res-c.json"
helper check-result "$TMP/res-c.json" phantom-64 '[1, 64, 64]' 30 2
podman logs "$CTR" 2>&1 | grep -iE 'recover|resum|queued again' | tail -n 5 | sed 's/^/    /' || true
