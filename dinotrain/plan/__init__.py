"""`dinotrain plan`: a run's step on fake tensors for N ranks, from any machine: per-GPU memory and its breakdown,
the largest batch that fits, FLOPs and predicted images/s, and the GPU code path traced on fake CUDA tensors.

- `fake_world.py`: fake tensors + the fake process group, and what lets the run's own code run there;
- `meter.py`: live tensor bytes (and their peak per phase) and FLOPs, operation by operation;
- `step.py`: one step of the run's objective profiled; `planner.py`: the plan and how it is printed;
- `cuda_trace.py`: the run built and stepped on fake CUDA tensors (all but the backward).
"""
