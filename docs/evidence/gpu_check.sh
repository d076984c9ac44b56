#!/usr/bin/env bash
# GPU evidence for issue #13 in one command, on a GPU box that has torch, torchvision, pyarrow,
# PyYAML and scipy but no Ray, no pydantic and no network. Run from the repository root:
#
#   bash docs/evidence/gpu_check.sh [all|doctor|probes|axes|diverge]  (default all; ~2 + ~5 + ~3 minutes on one H100, estimated)
#
# Writes $OUT/<date>-<gpu>/ (OUT defaults to docs/evidence): node.txt (date, nvidia-smi, the exact
# commands and their exit codes), doctor.{txt,json}, overhead_gpu.{txt,json}, axes.{txt,json},
# diverge_<arch>.{txt,json}. Missing Python
# packages come from wheels in $WHEELS (default results/wheels-gpu), unpacked into a temp folder on
# PYTHONPATH (no pip needed, nothing installed system-wide); see docs/evidence/README.md.
set -uo pipefail
PY=${PYTHON:-$(command -v python || command -v python3)}
STEP=${1:-all}
ARCHS=${ARCHS:-small_cnn,resnet18,resnet50,mobilenet_v2}  # overhead_gpu.yaml workloads to probe
WHEELS=${WHEELS:-results/wheels-gpu}

DEPS=$(mktemp -d)
if ! "$PY" -c "import pydantic, safetensors" 2>/dev/null; then
  for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$DEPS"; done
fi
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"

GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-gpu')")
DEST="${OUT:-docs/evidence}/$(date -u +%Y-%m-%d)-$(echo "$GPU" | tr -c 'A-Za-z0-9.\n-' '_')"
mkdir -p "$DEST"
{ date -u +"%Y-%m-%d %H:%M:%S UTC"; echo "device: $GPU"; nvidia-smi 2>&1 | head -20
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} >> "$DEST/node.txt"

record() {  # record NAME CMD...: run, keep stdout+stderr, note the exact command and its exit code
  local name=$1; shift
  echo "\$ $*" >> "$DEST/node.txt"
  ( time "$@" ) > "$DEST/$name.txt" 2>&1
  echo "exit $? ($name)" >> "$DEST/node.txt"
  tail -n 25 "$DEST/$name.txt"
}
if [[ $STEP == all || $STEP == doctor ]]; then
  record doctor "$PY" -m orchestrator.doctor --device cuda --json "$DEST/doctor.json"
fi
if [[ $STEP == all || $STEP == probes ]]; then
  record overhead_gpu "$PY" -m orchestrator.doctor --device cuda --probes sweeps/overhead_gpu.yaml \
    --arch "$ARCHS" --json "$DEST/overhead_gpu.json"
fi
if [[ $STEP == all || $STEP == axes ]]; then  # attention kernels, world size 1 vs 2 on one GPU (issues #20, #21)
  record axes "$PY" docs/evidence/axes_check.py --device cuda --json "$DEST/axes.json"
fi
if [[ $STEP == all || $STEP == diverge ]]; then  # first nondeterministic kernel of impl replicas (issue #31)
  # The core of orchestrator/diverge.py (the command's run selection needs pandas, absent here): one impl run
  # of each model replayed twice for 2 steps, each time in a fresh process, and the first op whose bits differ.
  for ARCH in small_cnn resnet18; do
    record "diverge_$ARCH" "$PY" -c "import json, sys, yaml
from orchestrator import diverge, spec
run = next(r for r in spec.expand(spec.parse(yaml.safe_load(open(sys.argv[1])))) if r.workload.arch == sys.argv[2])
a, b = (diverge.replay_elsewhere(run, 2, diverge.MAX_OPS) for _ in range(2))
parting = diverge.first_parting(a, b)
print(run.run_id, len(a), 'ops;', parting.describe())
json.dump({'run_id': run.run_id, **parting.row()}, open(sys.argv[3], 'w'), indent=1)" \
      docs/evidence/diverge_gpu.yaml "$ARCH" "$DEST/diverge_$ARCH.json"
  done
fi
echo "evidence in $DEST"
