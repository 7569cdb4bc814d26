"""llmtrain: train and evaluate small language models from the command line with Hydra configs."""
