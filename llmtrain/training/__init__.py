"""One run: the model and its loss, the optimizer, the loop, its state, checkpoints, evaluation and records."""
