"""Training the PCH towers: batches, the training loop and multi-process training."""
