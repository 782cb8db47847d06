#!/usr/bin/env bash
# Run the embedded DAG (config/slurm-ci.yaml, a cut of the CI configuration) through a real Slurm: `snakemake --executor slurm` with
# the project's SLURM profile, the pretrain rule asking for a GPU (a fake one, see single-node.sh).
#
#   tools/slurm/run-dag.sh            (root; `make slurm-test` runs it with the project's .venv)
#
# The DAG runs in a scratch copy of the tracked files, as experiment "slurmci", so the checkout's
# results and tables are untouched. The cluster is stopped on exit, whatever happens. Checks: the
# table has the slurmci rows, and every pretrain log shows it ran as a Slurm job that was given a
# GPU (CUDA_VISIBLE_DEVICES set by Slurm).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
project=$(cd "$here/../.." && pwd)
timeout_s=${SLURM_DAG_TIMEOUT:-1500}
command -v snakemake >/dev/null || { echo "run-dag.sh: snakemake not on PATH (use make slurm-test)" >&2; exit 1; }

work=$(mktemp -d /tmp/cribo-slurm-dag.XXXXXX)
cleanup() { "$here/single-node.sh" down; }
trap cleanup EXIT
(cd "$project" && git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work")

"$here/single-node.sh" up

cd "$work"
# Snakemake merges --configfile into config/config.yaml (runs and grids would add up), so the
# scratch copy's embedded default is replaced by the Slurm CI configuration instead.
cp config/slurm-ci.yaml config/config.yaml
start=$(date +%s)
# The profile's resources are sized for a GPU cluster; this node has 2 CPUs and one fake GPU, so
# the resources are scaled down here (on the command line, these replace the profile's maps).
timeout -k 10 "$timeout_s" snakemake --workflow-profile profiles/slurm --configfile config/config.yaml \
  --jobs 2 --cores 2 \
  --default-resources mem_mb=3000 runtime=60 \
  --set-resources pretrain:gpu=1 pretrain:cpus_per_gpu=1 pretrain:mem_mb=4000 pretrain:runtime=60 \
                  pretrain_srun:mem_mb=4000 pretrain_srun:runtime=60 \
  --set-threads pretrain=1 pretrain_srun=1 extract=1 eval_incontext=1 \
  --slurm-init-seconds-before-status-checks 5 --latency-wait 10
echo "DAG through Slurm finished in $(( $(date +%s) - start )) s"

grep -q '^slurmci,' results/tables/incontext.csv || { echo "no slurmci rows in the table" >&2; exit 1; }
logs=(logs/slurmci/*/pretrain.log)
[ "${#logs[@]}" -ge 1 ] && [ -e "${logs[0]}" ] || { echo "no pretrain logs" >&2; exit 1; }
# the run with the srun layout (two tasks, CPU): the multi-node code path on one node
srun_id=$(cribo config runs --config config/config.yaml | awk '$1 == "cribo_srun" {print $2}')
for log in "${logs[@]}"; do
  grep -Eq 'SLURM_JOB_ID=[0-9]+' "$log" || { echo "$log: pretrain did not run as a Slurm job" >&2; exit 1; }
  if [ "$log" = "logs/slurmci/$srun_id/pretrain.log" ]; then
    grep -q 'launch: 2 process(es)' "$log" && grep -q 'SLURM_NTASKS=2' "$log" \
      || { echo "$log: the srun layout did not start two tasks" >&2; exit 1; }
  else
    grep -q 'CUDA_VISIBLE_DEVICES=0' "$log" || { echo "$log: Slurm gave the pretrain job no GPU" >&2; exit 1; }
  fi
done
grep -h 'SLURM_JOB_ID=' "${logs[@]}"
cat results/tables/incontext.md
cd / && rm -rf "$work"
