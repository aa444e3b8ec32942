"""The commands (``kdad-train``, ``kdad-eval``, ...): each composes its config and runs one task."""
