"""Training, one concept per module: step.py turns a batch into an update for every recipe (the
only such code); draws.py makes a step's random draws from (seed, step); optimizer.py builds the
recipe's optimizer; setup.py builds the model, diffusion and averages from the run's settings;
signals.py turns SIGTERM and SIGINT into a checkpoint at the next step boundary. The train stage
loops over steps; `plan --calibrate` and bench/train_step.py time the same step."""
