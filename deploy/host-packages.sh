#!/usr/bin/env bash
# Install the Debian packages an entry point needs on this machine, those missing only.
#
#   deploy/host-packages.sh [--dry-run] [--package NAME]... PROFILE...
#
# Profiles (what each entry point calls on the host):
#   images        python3 with pip (wheels are downloaded on the host), ca-certificates:
#                 deploy/build-images.sh, either image path
#   local-images  images, and mmdebstrap for the Debian base and the stand-ins (no registry)
#   tests         RabbitMQ and nginx (the host suite runs real servers), python3-venv, and Chromium
#                 with its driver (the dashboard's tests drive a headless browser): tests/run
#   bench         tests, and lsyncd, rsync, curl, openssl: tests/bench/run
#
# Installs with apt-get (through sudo when not root), with Debian's services kept from
# starting (a policy-rc.d for the time of the install) and waiting for another apt's lock.
# --dry-run prints the commands it would run, one a line, and runs none. --package NAME
# adds one package to those of the profiles. Where it cannot install (not root and no
# sudo, or no apt-get) it prints one line saying what to run and exits 1. Whether a
# package is installed is read from dpkg's database (dpkg-query).
set -euo pipefail

die() { printf 'host-packages.sh: %s\n' "$1" >&2; exit "${2:-1}"; }

profile_packages() {
    case $1 in
        images) echo python3 python3-pip ca-certificates ;;
        local-images) echo "$(profile_packages images) mmdebstrap" ;;
        tests) echo rabbitmq-server nginx-light python3-venv ca-certificates chromium chromium-driver ;;
        bench) echo "$(profile_packages tests) lsyncd rsync curl openssl" ;;
        *) die "unknown profile '$1' (images, local-images, tests, bench)" 2 ;;
    esac
}

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

dry_run=0
profiles=()
wanted=()
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --package) [[ ${2:-} =~ ^[a-z0-9][a-z0-9.+-]+$ ]] || die "--package wants a Debian package name" 2
                   wanted+=("$2"); shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" 2 ;;
        *) profiles+=("$1") ;;
    esac
    shift
done
[ $((${#profiles[@]} + ${#wanted[@]})) -gt 0 ] || die "which profile? (images, local-images, tests, bench; see --help)" 2

for profile in "${profiles[@]}"; do
    packages=$(profile_packages "$profile") || exit
    wanted+=($packages)
done
missing=()
for package in "${wanted[@]}"; do
    [[ " ${missing[*]} " == *" $package "* ]] || installed "$package" || missing+=("$package")
done
[ ${#missing[@]} -gt 0 ] || exit 0

command -v dpkg-query >/dev/null && command -v apt-get >/dev/null \
    || die "needs ${missing[*]} and this machine has no apt-get: install them with its package manager"
sudo=
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "needs ${missing[*]}: run as root: apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
    sudo="sudo "
fi

policy=/usr/sbin/policy-rc.d
lock=(-o DPkg::Lock::Timeout=600)
plan=("${sudo}apt-get ${lock[*]} update -qq")
[ -e "$policy" ] || plan+=("${sudo}sh -c 'printf \"#!/bin/sh\\nexit 101\\n\" > $policy && chmod 755 $policy'")
plan+=("${sudo}env DEBIAN_FRONTEND=noninteractive apt-get ${lock[*]} install -y -qq --no-install-recommends ${missing[*]}")
[ -e "$policy" ] || plan+=("${sudo}rm -f $policy")

if [ "$dry_run" = 1 ]; then
    printf '%s\n' "${plan[@]}"
    exit 0
fi
printf 'host-packages.sh: installing %s\n' "${missing[*]}" >&2
status=0
for step in "${plan[@]}"; do
    # The policy-rc.d is removed even when the install failed.
    if [ "$status" = 0 ] || [[ $step == *"rm -f $policy" ]]; then
        eval "$step" >/dev/null || status=$?
    fi
done
[ "$status" = 0 ] || die "apt-get failed (exit $status); the commands were: $(IFS=';'; echo "${plan[*]}")"
