"""Distributed runtime: process-group set-up, FSDP2 sharding, sharded checkpoints."""
