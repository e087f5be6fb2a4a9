"""Diffusion posterior sampling, posterior summaries and quality flags. Pure torch."""
