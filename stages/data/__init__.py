"""Getting videos and their annotations in: sources (local folders, URL lists), formats (annotation importers),
fetch (downloads), video (PyAV probing and frame sampling), annotate (transcripts, auto-captions), synthetic (the
embedded moving-shapes set)."""
