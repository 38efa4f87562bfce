"""Training: the Trainer and its loop, torchrun / DDP."""
