"""PCH: the user and item towers, their losses, per-kind settings, the item catalogue and the model registry."""
