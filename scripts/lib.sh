# Shared by scripts/demo and scripts/test: make sure the tools the build needs
# are here, installing them with apt-get when we can, or saying in one line what
# to install when we cannot.

die() { echo "error: $*" >&2; exit 1; }

# need COMMAND PACKAGE: install PACKAGE with apt-get if COMMAND is missing.
need() {
  local cmd=$1 pkg=$2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $pkg (needed for $cmd)..." >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg"; } >/dev/null 2>&1 \
      || die "could not install $pkg: run 'apt-get install $pkg' and try again"
    command -v "$cmd" >/dev/null 2>&1 || die "$pkg installed but $cmd is still missing"
  else
    die "$cmd is missing: install it with 'sudo apt-get install $pkg' (or your system's package for $cmd)"
  fi
}

need_build_tools() {
  command -v cargo >/dev/null 2>&1 || die "cargo is missing: install Rust from https://rustup.rs"
  need cmake cmake   # Pingora builds zlib-ng with cmake
  need cc gcc
}
