"""mnist_cnn: a fast, exact trainer for compact CNNs on MNIST and its family.

    import mnist_cnn
    run = mnist_cnn.train(recipe="fast", epochs=2)      # trains, returns a Run
    model = mnist_cnn.load(run.checkpoint)              # [0, 1] images -> log-probabilities
    mnist_cnn.evaluate(run.checkpoint)                  # `evaluate --json`'s dict
    mnist_cnn.predict(model, ["my_seven.png"])          # `predict --json`'s objects
    mnist_cnn.train_seeds("seed", "0-7", together="yes")  # `train --seeds`: a Seeds with the statistics
    mnist_cnn.lr_find("seed").suggestion                # `lr-find`: the range test's suggested rate

Every command of `mnist-cnn` is one of these functions (mnist_cnn.api) and its printing.
The parts, each a sub-package: data, networks, training, inference, serving, tuning.
"""

from mnist_cnn.api import (
    Run,
    Seeds,
    TuneOptions,
    build,
    check,
    compare,
    download,
    evaluate,
    export,
    load,
    lr_find,
    plot,
    predict,
    recipes,
    resume,
    serve,
    train,
    train_seeds,
    tune,
    tune_report,
)
from mnist_cnn.version import __version__

__all__ = [
    "Run",
    "Seeds",
    "TuneOptions",
    "build",
    "check",
    "compare",
    "download",
    "evaluate",
    "export",
    "load",
    "lr_find",
    "plot",
    "predict",
    "recipes",
    "resume",
    "serve",
    "train",
    "train_seeds",
    "tune",
    "tune_report",
    "__version__",
]
