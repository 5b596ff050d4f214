#!/usr/bin/env bash
# The short forms a lab script can use: every option kdcli can know is left out. Run it in the folder that
# should hold the shards and checkpoints.
#   examples/quickstart.sh RAW [teach options...]
# Try it on phantoms: kdcli synth multieye ./raw && examples/quickstart.sh ./raw --model test_resnet --epochs 10
set -euo pipefail

raw=${1:?usage: quickstart.sh RAW [teach options...]}
shift

kdcli prepare multieye "$raw"                     # -> shards/multieye/ (or $KDCLI_SHARDS/multieye/)
kdcli teach --modality oct --out oct.pt "$@"      # the one dataset under shards/
kdcli distill --teacher oct.pt --student fundus   # the teacher's dataset; coda for unpaired data -> fundus-coda.pt
kdcli evaluate fundus-coda.pt --json > fundus-coda.test.json   # the dataset the student was trained on
