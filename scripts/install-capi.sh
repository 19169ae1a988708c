#!/usr/bin/env bash
# Installs libhlfs: the shared and static libraries, the header and a
# pkg-config file.
#
# Usage: scripts/install-capi.sh [PREFIX]      (default /usr/local)
#
#   PREFIX/lib/libhlfs.so.VERSION, libhlfs.so.0 and libhlfs.so (links)
#   PREFIX/lib/libhlfs.a
#   PREFIX/include/hlfs.h
#   PREFIX/lib/pkgconfig/hlfs.pc
#
# Environment: DESTDIR (staged installs, as make install takes it);
# HLFS_LIB_DIR, a directory holding libhlfs.so and libhlfs.a already built
# (default: cargo build --release -p hlfs-capi, then target/release).
# Then: cc my.c $(pkg-config --cflags --libs hlfs)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${1:-/usr/local}
case $prefix in /*) ;; *) echo "install-capi: PREFIX must be an absolute path" >&2; exit 2 ;; esac
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
lib_dir=${HLFS_LIB_DIR:-}
if [[ -z $lib_dir ]]; then
    (cd "$repo" && "${CARGO:-cargo}" build --release -p hlfs-capi)
    lib_dir=$repo/target/release
fi
for f in libhlfs.so libhlfs.a; do
    [[ -f $lib_dir/$f ]] || { echo "install-capi: $lib_dir/$f not found" >&2; exit 1; }
done
dest=${DESTDIR:-}$prefix
install -d "$dest/lib/pkgconfig" "$dest/include"
install -m 0755 "$lib_dir/libhlfs.so" "$dest/lib/libhlfs.so.$version"
ln -sf "libhlfs.so.$version" "$dest/lib/libhlfs.so.0"
ln -sf "libhlfs.so.0" "$dest/lib/libhlfs.so"
install -m 0644 "$lib_dir/libhlfs.a" "$dest/lib/libhlfs.a"
install -m 0644 "$repo/crates/hlfs-capi/include/hlfs.h" "$dest/include/hlfs.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" \
    "$repo/crates/hlfs-capi/hlfs.pc.in" > "$dest/lib/pkgconfig/hlfs.pc"
echo "installed libhlfs $version in $dest"
