#!/usr/bin/env bash
# Joins the shards of an experiment and writes its report:
#   experiments/slurm/merge.sh experiments/table1.toml 16
set -euo pipefail
EXPERIMENT=${1:?usage: merge.sh EXPERIMENT.toml SHARD_COUNT}
COUNT=${2:?usage: merge.sh EXPERIMENT.toml SHARD_COUNT}
NAME=$(basename "$EXPERIMENT" .toml)
shards=()
for ((i = 0; i < COUNT; i++)); do shards+=("results/runs/$NAME/shard-$i-of-$COUNT"); done
pnd merge "${shards[@]}" --out "results/runs/$NAME/merged"
pnd report "results/runs/$NAME/merged"
