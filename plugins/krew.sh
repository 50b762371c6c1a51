#!/bin/sh
# krew.sh VERSION SHA256SUMS: prints plugins/detour.yaml with the version and each platform's
# archive checksum filled in (the archives and SHA256SUMS are what `make release` writes to dist/).
set -eu
[ $# -eq 2 ] || { echo "usage: $0 VERSION SHA256SUMS" >&2; exit 2; }
version=$1 sums=$2
dir=$(dirname "$0")
script="s|\${VERSION}|$version|g"
for p in linux_amd64 linux_arm64 darwin_amd64 darwin_arm64 windows_amd64; do
  ext=tar.gz
  [ "$p" = windows_amd64 ] && ext=zip
  file="detour_${version}_${p}.${ext}"
  sum=$(awk -v f="$file" '{ n = $2; sub(/^\*/, "", n) } n == f { print $1 }' "$sums")
  case "$sum" in
    [0-9a-f][0-9a-f][0-9a-f][0-9a-f]*) [ ${#sum} -eq 64 ] || { echo "krew.sh: bad checksum for $file in $sums" >&2; exit 1; } ;;
    *) echo "krew.sh: no checksum for $file in $sums" >&2; exit 1 ;;
  esac
  script="$script;s|\${SHA256_$p}|$sum|g"
done
sed "$script" "$dir/detour.yaml"
