"""The diffusion prior: UNet, Gaussian diffusion schedules, artifacts. Pure torch."""
