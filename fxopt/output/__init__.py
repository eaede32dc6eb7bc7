"""fxopt.output: the report, the output folder and its manifest, atomic files, progress bars."""
