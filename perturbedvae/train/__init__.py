"""Training with HuggingFace Accelerate: experiment config, batches, the loop, and run directories."""
