#!/usr/bin/env bash
# A finished 2-process run must exit 0 every time (experiments/distributed.md, "Leaving the group").
# Runs the same tiny torchrun job N times in a row, optionally beside B busy processes, and counts the runs
# that did not exit 0 or whose output shows a rank's abort.
#   experiments/ddp_exit_stress.sh DATA_DIR [N=50] [BUSY=2]
set -u
data=${1:?usage: ddp_exit_stress.sh DATA_DIR [N] [BUSY]}
runs=${2:-50}
busy=${3:-2}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq "$busy"); do python3 -c "while True: pass" & done
failed=0
for i in $(seq "$runs"); do
  log="$work/run$i.log"
  OMP_NUM_THREADS=1 timeout 300 python -m torch.distributed.run --standalone --nproc_per_node=2 -m lmlab.run \
    dataset=text_dir dataset.path="$data" device=cpu trainer.epochs=1 trainer.limit_train_batches=6 \
    model.hidden_dim=16 model.embed_dim=16 hooks.progress.bar=false hydra.run.dir="$work/out$i" >"$log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ] || grep -q "terminate called" "$log"; then
    failed=$((failed + 1))
    echo "run $i: exit $rc"; tail -5 "$log"
  fi
done
echo "$failed of $runs runs failed (with $busy busy processes beside them)"
[ "$failed" -eq 0 ]
