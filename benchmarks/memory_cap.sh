#!/usr/bin/env bash
# Prune a checkpoint 4x bigger than the memory the process may use: `optipfair prune --out-of-core`
# inside a cgroup (v1 memory controller, as root) whose limit is a quarter of the checkpoint's bytes.
# Page cache counts against the limit too, and the kernel reclaims it; going over kills the run.
#
#   bash benchmarks/memory_cap.sh benchmarks/scratch/llama-3.1-8b-shape      # built by big_model.py big
set -eu
checkpoint=${1:?checkpoint folder}
output=${2:-$checkpoint-capped-maw-20}
bytes=$(du -cb "$checkpoint"/*.safetensors | tail -1 | cut -f1)
limit=$((bytes / 4))
group=/sys/fs/cgroup/memory/optipfair-cap-$$
mkdir "$group"
trap 'rmdir "$group" 2>/dev/null || true' EXIT
echo "$limit" > "$group/memory.limit_in_bytes"
echo "checkpoint $((bytes / 2**20)) MiB, memory limit $((limit / 2**20)) MiB"
start=$SECONDS
# The subshell joins the cgroup first, so the prune and all it starts are held to the limit.
( echo $BASHPID > "$group/cgroup.procs"
  exec /usr/bin/time -f "peak RSS %M KiB" optipfair prune --model-path "$checkpoint" --output-path "$output" \
       --method MAW --pruning-percentage 20 --out-of-core --quiet )
echo "done in $((SECONDS - start)) s; cgroup peak (RSS + page cache) $(( $(cat "$group/memory.max_usage_in_bytes") / 2**20 )) MiB; the limit was reached $(cat "$group/memory.failcnt") times (page cache reclaimed)"
rm -rf "$output"
