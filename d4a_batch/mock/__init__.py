"""Simulated galaxies (GalSim) and mock HSC surveys."""
