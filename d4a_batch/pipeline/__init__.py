"""The Ray Data engine: the only package that imports every stage."""
