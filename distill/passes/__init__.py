"""Passes of a model over data before a student trains: curation of class-balanced extra data
(`distill/curate.py`) and offline teacher labels on stored augmented views (`distill/label_views.py`).

Both are resumable, multi-process loops over units of work (shards) with DataLoader workers doing the CPU
side; the pieces they share live here.
"""
