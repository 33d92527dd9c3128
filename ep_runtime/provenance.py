"""What every result file records: the device, the date, the commit and the torch version."""
from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def commit(repo: Path = REPO) -> str:
    """EP_COMMIT when set, else `git rev-parse HEAD` of the work tree that tracks this package's files, with "-dirty"
    appended where tracked files differ from it ("unknown" where none tracks them).

    GPU machines receive the work tree copied over a checkout of the session's first commit, so there HEAD alone
    names a stale commit; the suffix keeps a result from claiming code it did not run."""
    if os.environ.get("EP_COMMIT"):
        return os.environ["EP_COMMIT"]
    try:
        git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                           cwd=repo).stdout.strip()
        if not git("ls-files", "--", "."):
            return "unknown"  # installed (untracked) inside another project's work tree: its commit is not this code's
        head = git("rev-parse", "HEAD")
        return head + "-dirty" if git("status", "--porcelain", "--untracked-files=no") else head
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: torch.device | None = None) -> dict[str, str]:
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    return {"gpu" if device.type == "cuda" else "device":
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "torch": torch.__version__}
