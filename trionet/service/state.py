"""``--state-file``: what a restarted trionet needs to resume a running guest.

JSON, written atomically (temp file + rename).  ``active_pairs`` is the field
the restart rules read:

* no file                       → cold boot: first activation uses 1 pair;
* a file with ``active_pairs``  → restart: first activation uses that count;
* a file without it (written by a version that did not record the count)
                                → legacy restore: first activation uses all pairs.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

log = logging.getLogger(__name__)

STATE_VERSION = 2


class StateFile:
    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.loaded: dict[str, Any] | None = self._load()

    def _load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("state file %s unreadable (%s): treated as a cold boot", self.path, exc)
            return None
        if not isinstance(data, dict):
            log.error("state file %s is not a JSON object: treated as a cold boot", self.path)
            return None
        return data

    def restore_target(self, max_pairs: int) -> int | None:
        """Pair count for the first activation, or None for a cold boot."""
        if self.loaded is None:
            log.info("no state file at %s: cold boot, 1 active pair", self.path)
            return None
        count = self.loaded.get("active_pairs")
        if not isinstance(count, int) or isinstance(count, bool):
            log.info(
                "state file %s has no active pair count: legacy restore, all %d pairs",
                self.path,
                max_pairs,
            )
            return max_pairs
        restored = max(1, min(count, max_pairs))
        log.info("state file %s: restart, restoring %d active pairs", self.path, restored)
        return restored

    def record(self, **fields: Any) -> None:
        data = dict(self.loaded or {})
        data.update(fields, version=STATE_VERSION, updated=time.time())
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("cannot write state file %s: %s", self.path, exc)
            return
        self.loaded = data
