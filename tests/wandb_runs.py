"""Reading a run's offline W&B log back without a server, as a user would: `wandb leet inspect`."""
import json
import subprocess
import sys
from pathlib import Path


def wandb_inspect(run_dir: Path) -> dict:
    """`wandb leet inspect --summary --json` of the run's one offline W&B log: state, config and summary."""
    logs = list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert len(logs) == 1, logs
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json",
                           str(logs[0])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)
