"""mnist_cnn: a fast, exact trainer for compact CNNs on MNIST.

    import mnist_cnn
    run = mnist_cnn.train(recipe="fast", epochs=2)      # trains, returns a Run
    model = mnist_cnn.load(run.checkpoint)              # [0, 1] images -> log-probabilities
    mnist_cnn.evaluate(run.checkpoint)                  # `evaluate --json`'s dict
    mnist_cnn.predict(model, ["my_seven.png"])          # `predict --json`'s objects
    mnist_cnn.train_seeds("seed", "0-7", together="yes")  # `train --seeds`: a Seeds with the statistics
"""

__version__ = "0.1.0"

from mnist_cnn.api import Run, Seeds, evaluate, load, predict, train, train_seeds  # noqa: E402  (after __version__, which cli imports)

__all__ = ["Run", "Seeds", "evaluate", "load", "predict", "train", "train_seeds", "__version__"]
