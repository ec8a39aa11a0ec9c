"""The tool's version, in one ground module that any part may import (the package root imports the API)."""

__version__ = "0.6.0"
