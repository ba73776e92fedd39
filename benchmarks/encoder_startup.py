"""How long an encoder process takes to start: imports plus both encoders constructed, in a
fresh Python process each time, with a warm model cache (what a Serve replica, an upscale or a
bulk-index actor pays before its first batch).

With `--compare DIR`, the same is timed for another checkout of this project (e.g. a git
worktree of an older commit), alternating with this one round by round, so both are measured
under the same load of this shared machine.

    python -m benchmarks.encoder_startup [--rounds 5] [--compare ../old-checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, time
wall, cpu = time.perf_counter(), time.process_time()
from deployments.core.encoders import ImageEncoder, TextEncoder
from deployments.core.settings import load_settings
settings = load_settings()
t0 = time.perf_counter()
ImageEncoder(settings.image_model, num_threads=2)
t1 = time.perf_counter()
TextEncoder(settings.text_model, num_threads=1)
t2 = time.perf_counter()
print(json.dumps({"wall_s": t2 - wall, "cpu_s": time.process_time() - cpu,
                  "image_s": t1 - t0, "text_s": t2 - t1,
                  "torch_imported": "torch" in sys.modules}))
"""


def start_once(checkout: Path) -> dict:
    """One fresh process in `checkout` (its code first on sys.path, its data/model-cache)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=checkout, env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another checkout to time alternately")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    checkouts = {"this": ROOT, **({"compare": args.compare.resolve()} if args.compare else {})}
    for checkout in checkouts.values():  # untimed: fill each checkout's model cache
        start_once(checkout)
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            runs[name].append(start_once(checkout))
    report = {}
    for name, rows in runs.items():
        report[name] = {key: statistics.median(r[key] for r in rows)
                        for key in ("wall_s", "cpu_s", "image_s", "text_s")}
        report[name]["torch_imported"] = rows[0]["torch_imported"]
        print(f"{name:<8} " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in report[name].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": args.rounds, **report}, indent=2))


if __name__ == "__main__":
    main()
