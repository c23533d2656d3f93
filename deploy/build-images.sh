#!/usr/bin/env bash
# Build every image dlopbox runs on, with or without a container registry.
#
#   deploy/build-images.sh [--auto|--official|--local] [--force] [--env-out FILE]
#
# --official  the dlopbox image FROM python:3.11-slim; nginx, rabbitmq and mongo are
#             the official images (pulled here so that `up` never waits on them).
# --local     nothing from any registry: a Debian base made with mmdebstrap from this
#             machine's apt sources and `docker import`ed, stand-ins for nginx and
#             rabbitmq from Debian's packages and for mongo from SecantusDB (PyPI),
#             and the dlopbox image on that base.
# --auto      (default, or DLOPBOX_IMAGES=auto|official|local) official when every
#             official image can be pulled, local otherwise.
# --force     rebuild even what is up to date.
#
# Every image carries the label org.dlopbox.inputs, a hash of what it was built from;
# a second run skips every image whose inputs did not change. Python packages are
# downloaded on the host as wheels and installed in the image with --no-index, so no
# build step needs the network inside docker. The image variables for compose.yaml
# and docker-run.sh are written to FILE (default deploy/.cache/images.env).
# The host packages a step needs (pip for the wheels, mmdebstrap for the local path)
# are installed when that step runs, by deploy/host-packages.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
cache=${DLOPBOX_CACHE_DIR:-$here/.cache}
python=${PYTHON:-python3}
mode=${DLOPBOX_IMAGES:-auto}
force=0
env_out=$cache/images.env

# What the official path uses; the local path builds stand-ins with these contracts.
official_base=${DLOPBOX_OFFICIAL_BASE_IMAGE:-python:3.11-slim}
official_nginx=${DLOPBOX_OFFICIAL_NGINX_IMAGE:-nginx:stable}
official_rabbitmq=${DLOPBOX_OFFICIAL_RABBITMQ_IMAGE:-rabbitmq:3-management}
official_mongo=${DLOPBOX_OFFICIAL_MONGO_IMAGE:-mongo:7}

suite=bookworm                  # Debian 12: python3 is 3.11, rabbitmq-server 3.10
python_version=3.11             # the wheels' target, for both bases
max_glibc_minor=36              # bookworm's glibc; python:3.11-slim's is newer
secantusdb_version=${SECANTUSDB_VERSION:-0.7.0b3}

# The tags compose.yaml and docker-run.sh run. mydropbox and myclient are the names
# the client's brief greps for in `docker ps`; all three are the same image.
dlopbox_tags=(dlopbox:latest mydropbox:latest myclient:latest)
local_base=dlopbox/debian:$suite
local_nginx=dlopbox/nginx:local
local_rabbitmq=dlopbox/rabbitmq:local
local_mongo=dlopbox/mongo:local

while [ $# -gt 0 ]; do
    case $1 in
        --auto) mode=auto ;;
        --official) mode=official ;;
        --local) mode=local ;;
        --force) force=1 ;;
        --env-out) env_out=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '==> [%3ds] %s\n' "$SECONDS" "$*" >&2; }
# Seconds per step, summed up at the end: what a cold build spends its time on.
timings=()
mark=$SECONDS
timed() {  # step: it took the time since the last mark
    timings+=("$1 $((SECONDS - mark)) s")
    mark=$SECONDS
}
die() { printf 'build-images.sh: %s\n' "$*" >&2; exit 1; }
sha() { sha256sum | cut -c1-16; }

inputs_label() {
    docker image inspect -f '{{ index .Config.Labels "org.dlopbox.inputs" }}' "$1" 2>/dev/null || true
}

up_to_date() {  # image hash
    [ "$force" = 0 ] && [ "$(inputs_label "$1")" = "$2" ]
}

image_id() {
    docker image inspect -f '{{ .Id }}' "$1"
}

tree_hash() {  # the content and names of every file under the given paths
    (cd "$1" && shift && find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum) | sha
}

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine (is it running, may this user use it?)"

# ---------------------------------------------------------------- choose the mode
can_get() {  # an image is here already, or can be pulled
    docker image inspect "$1" >/dev/null 2>&1 || timeout 600 docker pull -q "$1" >/dev/null 2>&1
}

if [ "$mode" = auto ]; then
    mode=official
    for image in "$official_base" "$official_nginx" "$official_rabbitmq" "$official_mongo"; do
        if ! can_get "$image"; then
            log "$image cannot be pulled: building local stand-ins instead (no registry needed)"
            mode=local
            break
        fi
    done
    timed "registry check"
fi
case $mode in
    official)
        for image in "$official_base" "$official_nginx" "$official_rabbitmq" "$official_mongo"; do
            can_get "$image" || die "cannot pull $image; run with --local to build stand-ins"
        done
        base=$official_base nginx=$official_nginx rabbitmq=$official_rabbitmq mongo=$official_mongo ;;
    local)
        base=$local_base nginx=$local_nginx rabbitmq=$local_rabbitmq mongo=$local_mongo ;;
    *) die "DLOPBOX_IMAGES must be auto, official or local, not '$mode'" ;;
esac
log "building the $mode images"
mkdir -p "$cache"
# One build at a time: concurrent test sessions share the cache and the tags.
exec 9>"$cache/.lock"
flock 9

# ---------------------------------------------------------------- wheels on the host
# pip downloads for the image's platform, not the host's: any python3 with pip works.
pip_target=(--only-binary=:all: --python-version "$python_version" --implementation cp
            --abi "cp${python_version/./}" --abi abi3 --abi none)
arch=$(uname -m)
for minor in $(seq 5 "$max_glibc_minor"); do pip_target+=(--platform "manylinux_2_${minor}_${arch}"); done
pip_target+=(--platform "manylinux2014_${arch}")
[ "$arch" = x86_64 ] && pip_target+=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64)

fresh_dir() { rm -rf "$1" && mkdir -p "$1"; }

# ---------------------------------------------------------------- Debian root filesystems
# One mmdebstrap run per image, from the apt sources this machine is configured with
# (no mirror's name is written anywhere in the repo). The runs go in parallel; each
# keeps its downloaded .debs in the cache, so later runs download only what changed.
apt_sources() {
    if [ -n "${DLOPBOX_APT_SOURCES:-}" ]; then
        echo "$DLOPBOX_APT_SOURCES"; return
    fi
    local f
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [ -s "$f" ] && grep -qE "^[^#]*\b$suite\b" "$f"; then echo "$f"; return; fi
    done
    # Not a Debian bookworm host: DLOPBOX_APT_MIRROR, or mmdebstrap's own default.
    echo "${DLOPBOX_APT_MIRROR:-}"
}

rootfs_recipe=(--variant=minbase --aptopt='APT::Install-Recommends "false"'
               --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
               --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
               --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias')

rootfs_hash() {  # packages
    local sources
    sources=$(apt_sources)
    { echo "rootfs-v1 $suite $arch $1"; printf '%s\n' "${rootfs_recipe[@]}";
      if [ -f "$sources" ]; then cat "$sources"; else echo "$sources"; fi; } | sha
}

rootfs_tarball() {  # tag packages
    echo "$cache/rootfs/${1//[\/:]/-}-$(rootfs_hash "$2").tar"
}

mmdebstrap_rootfs() {  # tag packages: write its tarball
    local tag=$1 packages=$2 sources tarball name
    sources=$(apt_sources)
    tarball=$(rootfs_tarball "$tag" "$packages")
    name=${tag//[\/:]/-}
    mkdir -p "$cache/rootfs" "$cache/debs/$name"
    rm -f "$cache/rootfs/$name-"*.tar
    mmdebstrap --quiet --format=tar --include="$packages" "${rootfs_recipe[@]}" \
        --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
        --setup-hook="sync-in $cache/debs/$name /var/cache/apt/archives/" \
        --customize-hook="sync-out /var/cache/apt/archives $cache/debs/$name" \
        "$suite" "$tarball.part" ${sources:+"$sources"}
    mv "$tarball.part" "$tarball"
}

rootfs_images() {  # tag=packages...: each image up to date, from a cached or a new tarball
    local spec tag packages sources failed=0
    local -A jobs=()
    for spec in "$@"; do
        tag=${spec%%=*} packages=${spec#*=}
        if up_to_date "$tag" "$(rootfs_hash "$packages")"; then
            continue
        elif [ ! -s "$(rootfs_tarball "$tag" "$packages")" ] || [ "$force" = 1 ]; then
            if [ ${#jobs[@]} = 0 ]; then
                "$here/host-packages.sh" local-images
                timed "host packages"
            fi
            sources=$(apt_sources)
            log "mmdebstrap $suite with $packages, in the background (from ${sources:-the default mirror of mmdebstrap})"
            mkdir -p "$cache/rootfs"
            mmdebstrap_rootfs "$tag" "$packages" > "$cache/rootfs/${tag//[\/:]/-}.log" 2>&1 &
            jobs[$tag]=$!
        fi
    done
    for tag in "${!jobs[@]}"; do
        if ! wait "${jobs[$tag]}"; then
            cat "$cache/rootfs/${tag//[\/:]/-}.log" >&2
            failed=1
        fi
    done
    [ "$failed" = 0 ] || die "mmdebstrap failed"
    [ ${#jobs[@]} = 0 ] || timed "mmdebstrap (${#jobs[@]} in parallel)"
    for spec in "$@"; do
        tag=${spec%%=*} packages=${spec#*=}
        if up_to_date "$tag" "$(rootfs_hash "$packages")"; then
            log "$tag is up to date"; continue
        fi
        log "docker import $(rootfs_tarball "$tag" "$packages") as $tag"
        docker import --change "LABEL org.dlopbox.inputs=$(rootfs_hash "$packages")" \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
            --change 'CMD ["bash"]' "$(rootfs_tarball "$tag" "$packages")" "$tag" >/dev/null
        timed "docker import $tag"
    done
}

# ---------------------------------------------------------------- docker build with a hash
build() {  # tag hash context dockerfile [build-arg...]; the first tag gets the label
    local tag=$1 hash=$2 context=$3 dockerfile=$4; shift 4
    local args=() extra
    for extra in "$@"; do args+=(--build-arg "$extra"); done
    log "docker build $tag"
    local output
    if ! output=$(docker build --label "org.dlopbox.inputs=$hash" -t "$tag" -f "$dockerfile" "${args[@]}" "$context" 2>&1); then
        printf '%s\n' "$output" >&2
        die "docker build $tag failed"
    fi
    timed "docker build $tag"
}

# ---------------------------------------------------------------- the local stand-ins
if [ "$mode" = local ]; then
    rootfs_images "$local_base=python3,python3-venv,netbase,procps" \
                  "dlopbox/rootfs-nginx:$suite=nginx,gettext-base,curl,netbase,procps" \
                  "dlopbox/rootfs-rabbitmq:$suite=rabbitmq-server,netbase,procps"

    for name in nginx rabbitmq; do
        tag_var=local_$name
        rootfs_id=$(image_id dlopbox/rootfs-$name:$suite)
        hash=$( { echo "$rootfs_id"; tree_hash "$here/images/$name" .; } | sha)
        if up_to_date "${!tag_var}" "$hash"; then
            log "${!tag_var} is up to date"
        else
            build "${!tag_var}" "$hash" "$here/images/$name" "$here/images/$name/Dockerfile" \
                "ROOTFS=dlopbox/rootfs-$name:$suite"
        fi
    done

    hash=$( { image_id "$local_base"; echo "secantusdb==$secantusdb_version"; tree_hash "$here/images/mongo" .; } | sha)
    if up_to_date "$local_mongo" "$hash"; then
        log "$local_mongo is up to date"
    else
        context=$cache/context/mongo
        fresh_dir "$context"
        cp -a "$here/images/mongo/." "$context/"
        "$here/host-packages.sh" images
        log "pip download secantusdb==$secantusdb_version and its dependencies"
        "$python" -m pip download --quiet "${pip_target[@]}" -d "$context/wheels" "secantusdb==$secantusdb_version"
        timed "pip download secantusdb"
        build "$local_mongo" "$hash" "$context" "$context/Dockerfile" "BASE_IMAGE=$local_base"
    fi
fi

# ---------------------------------------------------------------- the dlopbox image
# Built from the working tree: the package, its metadata and the Dockerfile.
hash=$( { image_id "$base"; tree_hash "$repo" pyproject.toml dlopbox; tree_hash "$here" Dockerfile .dockerignore; } | sha)
if up_to_date "${dlopbox_tags[0]}" "$hash"; then
    log "${dlopbox_tags[0]} is up to date"
else
    wheels=$cache/wheels/dlopbox
    src=$cache/src
    fresh_dir "$wheels"
    fresh_dir "$src"
    # Build the wheel from a copy, so the working tree gets no build/ or egg-info.
    cp -a "$repo/pyproject.toml" "$repo/dlopbox" "$src/"
    [ -f "$repo/README.md" ] && cp "$repo/README.md" "$src/"
    [ -f "$repo/LICENSE" ] && cp "$repo/LICENSE" "$src/"
    "$here/host-packages.sh" images
    log "pip wheel dlopbox, pip download its dependencies"
    "$python" -m pip wheel --quiet --no-deps -w "$wheels" "$src"
    "$python" -m pip download --quiet "${pip_target[@]}" -d "$wheels" "$wheels"/dlopbox-*.whl
    timed "pip wheel and download dlopbox"
    rm -rf "$src"
    build "${dlopbox_tags[0]}" "$hash" "$here" "$here/Dockerfile" "BASE_IMAGE=$base"
fi
for tag in "${dlopbox_tags[@]:1}"; do
    docker tag "${dlopbox_tags[0]}" "$tag"
done

# ---------------------------------------------------------------- what to run
mkdir -p "$(dirname "$env_out")"
cat > "$env_out" <<EOF
# Images for compose.yaml and docker-run.sh, written by deploy/build-images.sh ($mode).
DLOPBOX_IMAGES=$mode
DLOPBOX_BASE_IMAGE=$base
DLOPBOX_NGINX_IMAGE=$nginx
DLOPBOX_RABBITMQ_IMAGE=$rabbitmq
DLOPBOX_MONGO_IMAGE=$mongo
EOF
[ ${#timings[@]} = 0 ] || log "time per step: $(IFS=';'; echo "${timings[*]}" | sed 's/;/; /g')"
log "done: ${dlopbox_tags[*]} on $base; $nginx, $rabbitmq, $mongo (variables in $env_out)"
