"""Training: one step turns a batch into an update for every recipe (step.py), the per-step draws
(draws.py) and the recipe's optimizer (optimizer.py). The train stage loops over steps; `plan
--calibrate` and bench/train_step.py time the same step."""
