"""Training: helpers that run slices of the frozen base model, shared by every trainer, and the worker."""
