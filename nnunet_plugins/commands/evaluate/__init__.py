"""``nnunet-plugins evaluate``: Dice, NSD and HD95 per case and label, across trainers, with paired tests.

Modules: :mod:`.metrics` (one case: reading, the geometry check, the metrics on a crop, their definitions),
:mod:`.discovery` (which prediction folders, cases and references: a dataset's cross-validation or folders
named on the command line), :mod:`.statistics` (means per fold and overall, Wilcoxon signed-rank tests),
:mod:`.report` (JSON, CSV, Markdown, written atomically), :mod:`.figures` (box plots for a few labels, paged heat
maps for many) and :mod:`.command` (the command).
"""
