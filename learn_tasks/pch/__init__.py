"""PCH: the user and item towers, their losses, the item catalogue they read and the model registry."""
