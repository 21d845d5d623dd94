"""Backend-neutral core of loopgolf: spec, parameters, weights, data, bpb, artifacts, training loop.

Never imports mlx or torch.
"""
