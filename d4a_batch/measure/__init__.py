"""Measurements on posterior samples and observed stamps (numpy): see ``morphology``
(the measurements) and ``catalog`` (per-object summaries, units, flags, output columns)."""
