"""What a plan costs: the jobs Snakemake would run, the work each does, and device-hours.

`dryrun` reads the job list from `snakemake --dry-run`; `model` turns each job into counts of
calibrated work units (training steps, image forwards, feature extractions, ...) and multiplies
them by the seconds per unit measured on a device (`python -m pipeline plan --calibrate`).
"""
