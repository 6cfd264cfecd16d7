"""A resumed run proves it measures as the run it continues: the recorded settings must equal
this run's, or it is refused with one line naming each that differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from evals.errors import ResultsError


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"train": {"max_steps": 2}}`` -> ``{"train.max_steps": 2}`` (so a difference names its leaf)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_settings(old: Optional[dict], new: dict, path: Path | str, *, flag: str = "--resume") -> None:
    """Refuse to resume ``path`` unless its recorded settings ``old`` equal ``new`` on every key of
    ``new`` (values compared as JSON would store them), naming each that differs. A file whose
    settings were not recorded cannot be proved to match and is refused as well."""
    if not isinstance(old, dict):
        raise ResultsError(f"{flag}: {path} records no settings (its sidecar is missing or older), so it cannot be "
                           f"shown that this run measures the same way; start a new output")
    was, now = _flat(json.loads(json.dumps(old, default=str))), _flat(json.loads(json.dumps(new, default=str)))
    differ = [f"{k} {was.get(k)!r} -> {v!r}" for k, v in now.items() if was.get(k) != v]
    if differ:
        raise ResultsError(f"{flag}: {path} was run with other settings ({'; '.join(differ)}); resume with the "
                           f"recorded ones, or start a new output; it was left untouched")
