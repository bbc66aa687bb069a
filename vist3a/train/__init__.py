"""Training of the video generator: reward fine-tuning (align)."""
