#!/usr/bin/env bash
# Cut a cached file into parts small enough for one device call each (the carry limit is 64 MiB with
# the working tree), for scripts/gpu_check.sh's `assemble NAME TARGET`:
#   scripts/split_asset.sh NAME FILE [MIB]   ->  .gpu_assets_NAME_00/NAME.part0 (+ NAME.nparts, NAME.sha256),
#                                               .gpu_assets_NAME_01/NAME.part1, ...
# Carry one .gpu_assets_NAME_II folder per call, all calls to the same warm machine.
#   e.g. scripts/split_asset.sh qwen15b ~/.cache/lowbit/assets/qwen2.5-coder-1.5b/*.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 file=$2 mib=${3:-58}
[ -f "$file" ] || { echo "no such file: $file" >&2; exit 1; }
tmp=$(mktemp -d)
split -d -a 2 -b "${mib}M" "$file" "$tmp/p"
n=$(ls "$tmp" | wc -l)
rm -rf .gpu_assets_"$name"_*
i=0
for part in $(ls "$tmp" | sort); do
  dir=$(printf ".gpu_assets_%s_%02d" "$name" "$i")
  mkdir -p "$dir" && mv "$tmp/$part" "$dir/$name.part$i"
  i=$((i + 1))
done
first=$(printf ".gpu_assets_%s_00" "$name")
echo "$n" > "$first/$name.nparts"
sha256sum < "$file" | cut -d' ' -f1 > "$first/$name.sha256"
rmdir "$tmp"
echo "$n parts of $mib MiB: .gpu_assets_${name}_00 .. $(printf '%02d' $((n - 1)))"
