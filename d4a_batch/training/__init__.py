"""Training data and the Ray Train loop for the prior."""
