#!/usr/bin/env bash
# Lab pipeline: MultiEYE raw download -> shards -> OCT teacher -> fundus baseline and CoDA student ->
# evaluation gate -> explanations. Usage: examples/multieye.sh RAW WORKDIR [MODEL] [EPOCHS]
# Try it on phantoms: kdcli synth multieye /tmp/raw && examples/multieye.sh /tmp/raw /tmp/run test_resnet 10
set -euo pipefail

raw=${1:?usage: multieye.sh RAW WORKDIR [MODEL] [EPOCHS]}
work=${2:?usage: multieye.sh RAW WORKDIR [MODEL] [EPOCHS]}
model=${3:-resnet50}
epochs=${4:-100}
shards="$work/shards"
mkdir -p "$work"

# --resume makes the whole script restartable after a crash or a pre-empted job.
if [[ -d "$shards" ]]; then prep_mode=--resume; else prep_mode=; fi
kdcli prepare multieye "$raw" --out "$shards" --size 224 --workers "$(nproc)" $prep_mode
kdcli inspect "$shards" --json > "$work/inspect.json"

common=(--data "$shards" --model "$model" --epochs "$epochs")
kdcli teach "${common[@]}" --modality oct --out "$work/oct.pt"
kdcli teach "${common[@]}" --modality fundus --out "$work/fundus-baseline.pt"
kdcli distill "${common[@]}" --teacher "$work/oct.pt" --student fundus --method coda --out "$work/fundus.pt"

for name in fundus-baseline fundus; do
  kdcli evaluate "$work/$name.pt" --data "$shards" --split test --json \
    --predictions "$work/$name.test.csv" > "$work/$name.test.json"
done

# Gate the pipeline on the result: stdout of --json is pure JSON, so any JSON tool can read it.
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
base = json.load(open(f"{work}/fundus-baseline.test.json"))["metrics"]["macro_f1"]
student = json.load(open(f"{work}/fundus.test.json"))["metrics"]["macro_f1"]
print(f"macro-F1 baseline {base:.3f} -> CoDA student {student:.3f} ({student - base:+.3f})")
PY

kdcli explain "$work/fundus.pt" --data "$shards" --out "$work/explain"
echo "open $work/explain/index.html"
