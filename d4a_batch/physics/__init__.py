"""The HSC observation model: cosmology scaling, stretch, resampling, PSF, likelihood. Pure torch + astropy."""
