"""The command line's worker factory."""

import os
import subprocess
import sys

from kvstore.cli import GC_YOUNG_THRESHOLD

# Run in a child: the factory changes the collector for the whole process.
PROBE = """
import gc
from kvstore.cli import worker_app

app = worker_app()
print(app.name, gc.get_threshold()[0])
"""


def test_a_worker_app_collects_young_garbage_less_often() -> None:
    env = {**os.environ, "KVSTORE_REDIS_URL": "redis://127.0.0.1:1/0"}

    completed = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert completed.stdout.split() == ["kvstore", str(GC_YOUNG_THRESHOLD)]
