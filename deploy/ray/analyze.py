"""The analyzer as a ``ray submit`` entry point: runs on the head node, joins its cluster.

    ray submit deploy/ray/cluster.yaml deploy/ray/analyze.py -- \
        /data/stores/JOB_ID --out /data/reports/JOB_ID

Arguments are those of ``python -m analyzer run`` (``--address auto`` is added).
"""

from __future__ import annotations

import sys

from analyzer.__main__ import app

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]
    sys.exit(app(["run", *args]))
