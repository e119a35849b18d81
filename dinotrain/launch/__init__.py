"""Launching runs on clusters: `dinotrain submit` (slurm.py, profiles.py, watch.py) and what runs inside a job (job.py)."""
