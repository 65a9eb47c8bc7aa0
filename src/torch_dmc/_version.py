"""The package version, in its own module so that core modules need not import the package."""

__version__ = "0.1.0"
