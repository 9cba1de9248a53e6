"""Reading a finished run's files in tests."""

import json

from dsd.train import TIMING_KEYS


def metrics_rows(run_dir) -> list[dict]:
    """The rows of run_dir/metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def untimed_rows(run_dir) -> list[dict]:
    """metrics.jsonl without the keys that time the machine: equal for equal runs."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS}
            for row in metrics_rows(run_dir)]
