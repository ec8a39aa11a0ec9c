"""Training: the epoch loop over one network or a stack of seeds (loop, stack), one run's
lifecycle over its run folder(s) (run, rundir), repeated seeds and their statistics (seeds),
torchrun / DistributedDataParallel (distributed) and TensorBoard logs (tensorboard)."""
