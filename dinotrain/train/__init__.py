"""Training: the one loop and its objectives (pretraining, distillation, head warm-up), the run set-up, the SSL
meta-architecture, schedules, optimizer groups, resume rules and the run directory."""
