"""Survey inputs and outputs: HSC FITS readers/writers, HATS catalogs, staging."""
