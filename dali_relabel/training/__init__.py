"""What a training loop needs besides the data: models by name, soft-target losses, accuracy
counting (top-k, ReaL) and evaluation of a checkpoint."""
