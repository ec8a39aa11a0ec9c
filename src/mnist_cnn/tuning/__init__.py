"""`mnist-cnn tune`: hyperparameter search with Optuna on a validation split (study)."""
