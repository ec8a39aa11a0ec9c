"""A trained network at work: evaluation on the test set (evaluate), people's own images
(predict), files and folders of them (image_files, output), self-checking exports (export), and
finished runs side by side (compare). Needs no training or run-folder code: a checkpoint is all it reads."""
