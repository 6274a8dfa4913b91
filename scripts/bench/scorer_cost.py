"""What judging costs next to sampling: each scorer's seconds as a ratio to the sampling it judges.

One run: the verifier report's own machinery samples `prompts` × `sampler.n` completions once, then
runs every scorer on those same samples, each timed on its own (none reuses another's forward pass),
and this prints seconds per 1000 samples and the ratio scorer / sampling. Run alone on the machine.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/scorer_cost.py [model=tiny] [prompts=32]
      [sampler.n=8] [verifiers=self_certainty,ptrue,...] [any config override]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from selfimprove.compose import pop_option
from selfimprove.sample import session_options
from selfimprove.verify_report import run


def main(argv: list[str]) -> None:
    overrides = list(argv)
    if not any(a.startswith("model=") for a in overrides):
        overrides.append("model=smollm2_135m")
    requested = pop_option(overrides, "verifiers")
    options = session_options(overrides, prompts="32")
    with tempfile.TemporaryDirectory(prefix="scorer-cost-") as out:
        report = run(None, overrides, out=Path(out), requested=requested, command="bench", **options)
    sampling = report["reference"]["sampling_seconds"]
    print(
        f"\n{report['model']}, {report['task']}: {report['n_samples']} samples, "
        f"sampling {sampling:.2f} s ({report['reference']['sampling_s_per_1000']:.2f} s per 1000)"
    )
    print(f"{'scorer':<24}{'s per 1000':>12}{'× sampling':>12}")
    for row in sorted(report["scorers"], key=lambda r: r["seconds"]):
        print(f"{row['name']:<24}{row['s_per_1000']:>12.3f}{row['seconds'] / sampling:>12.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
