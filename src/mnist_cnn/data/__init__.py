"""The data a network sees: IDX files on disk (idx), the MNIST family (datasets), train-time
augmentation on the device (augment) and the input contract every entry point shares (inputs).
Knows nothing of networks, training or serving."""
