#!/usr/bin/env bash
# The main job on embedded data, from a fresh clone: set-up, then show what the reader makes of real
# hospital-style folders (a localizer, a secondary capture, DICOMDIR files and a gantry-tilted series with
# uneven spacing), and convert them, tilt resampled on request, to NIfTI with geometry sidecars.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data=../shared/data
out=${1:-demo-output}
.venv/bin/medseg inspect "$data/dcm_qa_ct/In" "$data/TotalSegmentator/tests/reference_files/example_ct_dicom"
.venv/bin/medseg convert "$data/dcm_qa_ct/In" "$data/TotalSegmentator/tests/reference_files/example_ct_dicom" \
  --resample-tilt --resample-spacing -o "$out"
echo "demo: NIfTI volumes and JSON sidecars are in $out/"
