"""mnist_cnn: a fast, exact trainer for compact CNNs on MNIST.

    import mnist_cnn
    run = mnist_cnn.train(recipe="fast", epochs=2)      # trains, returns a Run
    model = mnist_cnn.load(run.checkpoint)              # [0, 1] images -> log-probabilities
    mnist_cnn.evaluate(run.checkpoint)                  # `evaluate --json`'s dict
    mnist_cnn.predict(model, ["my_seven.png"])          # `predict --json`'s objects
"""

__version__ = "0.1.0"

from .api import Run, evaluate, load, predict, train  # noqa: E402  (after __version__, which cli imports)

__all__ = ["Run", "evaluate", "load", "predict", "train", "__version__"]
