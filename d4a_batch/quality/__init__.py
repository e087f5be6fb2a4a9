"""Quality in one place: what the flags measure, where a fit misses, the rules and their
reasons. numpy only (with scipy, sep and astropy; no torch, no Ray): staging and the
sampling stage both call it.

- ``detection`` (with ``detection_image``, ``point_source``, ``symmetry``): the sources of
  a stamp, the neighbours staging masks, and the BLENDED / TRUNCATED measurements
  (``detection_flag_inputs``: them as flag inputs, from a pack's columns);
- ``regions``: the residual/σ of the re-convolved posterior mean and its excess χ² by
  region of the stamp (the POOR_FIT reason, CORE_MISFIT);
- ``rules``: one check per flag bit, ``(bit, reason | None)``, and the photo-z rule staging
  applies;
- ``reasons``: every rule run on an object's inputs -> bits, names and reasons
  (``flag_objects`` -> ``ObjectFlags``, what the output catalog writes).
"""
