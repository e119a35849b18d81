"""Training: the SSL meta-architecture, schedules, optimizer groups, batches and the loop."""
