"""Diffusion posterior sampling and posterior summaries. Pure torch (the quality flags: ``quality``)."""
