"""Training logs: the ``o2f`` logger (console, and ``train.log`` in the work folder) and
the event files (``log.jsonl``, ``metrics.jsonl``, TensorBoard), written by rank 0 only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from o2f import distributed as du

log = logging.getLogger("o2f")


def setup_logging(work_dir: Path | None) -> None:
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    if work_dir is not None and du.is_main():
        path = str(work_dir / "train.log")
        if not any(getattr(h, "baseFilename", None) == os.path.abspath(path)
                   for h in log.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(fh)


class EventWriter:
    """JSON-lines logs, plus TensorBoard events when tensorboard is installed; rank 0 only."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir, self.tb = work_dir, None
        if not du.is_main():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(work_dir / "tb"))
        except ImportError:
            pass

    def write(self, file: str, record: dict[str, Any], step: int) -> None:
        if not du.is_main():
            return
        with open(self.work_dir / file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "iter"):
                    self.tb.add_scalar(f"{Path(file).stem}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
