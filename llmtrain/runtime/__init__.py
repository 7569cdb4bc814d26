"""Processes and devices: hardware set-up, data-parallel ranks, the run directory's lock and record checks."""
