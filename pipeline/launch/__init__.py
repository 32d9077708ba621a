"""Job start-up without the import tax: a fork server that has imported torch and the stages once,
and the small client the rules run (`python -m pipeline.launch <stage> ...`).

The client imports nothing heavy. With a server for this machine (started by the Snakefile's
onstart on a local run) it hands the server its argv, cwd, environment and standard file
descriptors, and the server forks a child that runs the stage; without one (SLURM, plain shells,
a server started from other code) the client runs the stage in its own process as
`python -m pipeline` does.
"""
