"""The DDP training job for SENet on CIFAR-10: `torchrun -m job.train`."""
