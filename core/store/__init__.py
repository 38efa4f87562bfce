"""Run folders: the one place that writes them (create, list, load, lock, checkpoints, bounded IO, exports, reports)."""
