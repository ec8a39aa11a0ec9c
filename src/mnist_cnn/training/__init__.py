"""Training: the one epoch loop, over a single network or a stack of seeds (loop, stack), or the whole
step as one compiled function over the epoch's up-front draws (graph, run.compile = "step"); what a
run carries from step to step and into its checkpoint (state); the keys every random draw derives
from (keys); the epoch's running sums (sums); a teacher's soft targets (distill); a learning-rate
range test (lr_find);
the run lifecycle -- start, resume, signals, clean-up -- over one run folder or several (run, rundir);
repeated seeds and their statistics, and tune's seeds per trial (seeds); torchrun /
DistributedDataParallel (distributed); TensorBoard logs (tensorboard); MODEL_CARD.md and the final
evaluation.json, written from the run folder's own files (card)."""
