#!/usr/bin/env bash
# Idempotent set-up from a fresh clone: the Debian tools the tests and the result gate use, and a virtual
# environment (.venv) holding the project with its decoders and dev tools. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v dcmdump >/dev/null 2>&1 || need+=(dcmtk)
# pixelmed DicomSRValidator checks every SR in the output gate; the package pulls in a Java runtime
[ -f /usr/share/java/pixelmed.jar ] && command -v java >/dev/null 2>&1 || need+=(pixelmed-apps)
command -v ojph_compress >/dev/null 2>&1 || need+=(openjph-tools)  # HTJ2K reference encoder/decoder (tests)
if ((${#need[@]})); then
  echo "setup: installing Debian packages: ${need[*]}"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.medseg-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the project into .venv (torch 2.13.0 CPU build, MONAI, pydicom, decoders, dev tools)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
