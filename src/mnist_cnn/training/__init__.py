"""Training: the one epoch loop, over a single network or a stack of seeds (loop, stack); what a
run carries from step to step and into its checkpoint (state); the run lifecycle -- start, resume,
signals, clean-up -- over one run folder or several (run, rundir); repeated seeds and their
statistics (seeds); torchrun / DistributedDataParallel (distributed); TensorBoard logs (tensorboard)."""
