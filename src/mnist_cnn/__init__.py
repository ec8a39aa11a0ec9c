"""mnist_cnn: a fast, exact trainer for compact CNNs on MNIST."""

__version__ = "0.1.0"
