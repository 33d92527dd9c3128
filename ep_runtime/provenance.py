"""What every result file records: the device, the date, the commit and the torch version."""
from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def commit() -> str:
    """EP_COMMIT when set (GPU machines receive the work tree without .git), else `git rev-parse HEAD`."""
    if os.environ.get("EP_COMMIT"):
        return os.environ["EP_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: torch.device | None = None) -> dict[str, str]:
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    return {"gpu" if device.type == "cuda" else "device":
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "torch": torch.__version__}
