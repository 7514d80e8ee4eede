"""The scheduler's view: ``squeue`` for live jobs, ``sacct`` for jobs that left the queue."""
from __future__ import annotations

import subprocess
from typing import Optional

# ----------------------------------------------------------------------------- scheduler
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
        "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}


def squeue() -> Optional[dict[str, dict]]:
    """{job id ('123_4' for array tasks): {state, restarts, reason}} of this user's jobs, or None
    when the scheduler does not answer (never 'gone' because of a hiccup)."""
    try:
        r = subprocess.run(["squeue", "--me", "-h", "-r", "-O", "JobArrayID:64,State:24,RestartCnt:8,Reason:64"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 2:
            out[parts[0]] = {"state": parts[1],
                             "restarts": int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0,
                             "reason": parts[3].strip() if len(parts) > 3 else ""}
    return out


def sacct(job_ids: list[str]) -> dict[str, str]:
    """{job id: final state} from accounting (empty when accounting is off)."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(arrays), "-o", "JobID,State"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in r.stdout.splitlines():
        if "|" in line:
            jid, st = line.split("|", 1)
            out[jid.strip()] = st.split()[0] if st.split() else st
    return out
