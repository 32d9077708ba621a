#!/usr/bin/env bash
# Regenerate docs/cpu-study from a run of the CPU study: runs (or resumes) the study, then copies its
# report here. Usage, from the repository root:
#   bash docs/cpu-study/regenerate.sh [RESULTS_DIR]     (default /tmp/cpu-study-results)
# The results folder lives outside the work tree; an interrupted run resumes where it stopped
# (Snakemake reruns only what is missing). The pilot (config/cpu-pilot.yaml) is run first in the same
# folder: its jobs are the study's own, so the study reuses them and the pilot's report is kept.
# README.md here is written by hand from answers.md; this script never touches it.
set -euo pipefail
results=${1:-/tmp/cpu-study-results}
here=docs/cpu-study
mkdir -p "$results"
overlay="$results/where.yaml"
printf 'results: %s\n' "$results" > "$overlay"

if [ ! -f "$results/pilot-report/index.md" ]; then
    snakemake --cores all --configfile config/cpu-study.yaml config/cpu-pilot.yaml "$overlay"
    rm -rf "$results/pilot-report" && cp -r "$results/report" "$results/pilot-report"
fi
snakemake --cores all --configfile config/cpu-study.yaml "$overlay"
snakemake --cores all --configfile config/cpu-study.yaml "$overlay" --report "$results/snakemake-report.html"

rm -rf "$here/tables" "$here/figures" "$here/pilot"
mkdir -p "$here/tables" "$here/figures" "$here/pilot"
report="$results/report"
for table in "$report"/*.md; do
    name=$(basename "$table")
    # index.md is the README's source; claims and power sit at the top of docs/cpu-study already.
    case "$name" in index.md|claims.md|power.md) ;; *) cp "$table" "$here/tables/$name" ;; esac
done
cp "$report"/*.png "$here/figures/"
cp "$report/claims.csv" "$report/claims.md" "$here/"
cp "$report/power.md" "$report/power.csv" "$here/"
cp "$results/pilot-report/power.md" "$results/pilot-report/power.csv" "$results/pilot-report/claims.csv" "$here/pilot/"
# The Answers section of the report, as the README quotes it.
awk '/^## Answers/{on=1} on && /^## / && !/^## Answers/{exit} on' "$report/index.md" > "$here/answers.md"
echo "docs/cpu-study regenerated from $report"
