"""Many runs: a sweep's Hydra callback (jobs checked first, summaries, thread split) and run-directory reports."""
