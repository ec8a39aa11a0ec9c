"""The data a network sees: the IDX file format, bounded and verified (idx); the MNIST family, one
table of data sets (datasets); fetching their files (download); a data set's splits as tensors on
the training device (splits); train-time augmentation on the device (augment); and the input
contract every entry point shares: [0, 1] images in, normalization and log-softmax in one place
(contract). Knows nothing of networks, training or serving."""
