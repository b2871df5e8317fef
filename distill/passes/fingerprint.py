"""A digest of the settings that decide a pass's output: saved with its progress, a resumed run must match it."""
from __future__ import annotations

import hashlib
import json


def fingerprint(**settings) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
