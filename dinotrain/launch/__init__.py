"""Launching runs on clusters: `dinotrain submit` (submit.py: the flow; slurm.py, profiles.py, watch.py) and what runs
inside a job (job.py)."""
