"""cl-flat: continual LoRA learning with flatness methods."""

__version__ = "0.1.0"
