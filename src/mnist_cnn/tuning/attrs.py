"""The user attributes a `tune` trial carries in the study's storage: what Optuna Dashboard shows
(docs/guide/tuning.md has the table), what --report and the workers read.

    trial.set_user_attr(STATE_REASON, "trained 20 epochs")
    counted = FAIL_REASON in frozen.user_attrs   # failed in training: one of --trials
"""

# why the trial ended as it did (while it runs: what it waits for)
STATE_REASON = "state_reason"
FAIL_REASON = "fail_reason"  # failed in training (a diverging loss): it counts towards --trials
OVER_LIMIT = "over_max_params"  # pruned for its network's size: not trained, not counted
SKIPPED = "skipped"  # pruned untrained (the study held its --trials, or --timeout passed): not counted
RUN_DIR = "run_dir"  # the trial's run folder, relative to where its worker ran
BASELINE = "baseline"  # the --baseline trial: the recipe's own values
TRIAL_CONFIG = "config"  # the trial's whole config, for best.toml without its run folder
# its network's size, its training time, epochs trained, the final validation accuracy and loss (seed mean)
PARAMETERS, SECONDS, EPOCHS = "parameters", "seconds", "epochs"
VAL_ACC, VAL_LOSS = "val_acc", "val_loss"
VAL_ACCS, VAL_SEM = "val_accs", "val_acc_sem"  # a --val-seeds trial: each seed's accuracy, the standard error
