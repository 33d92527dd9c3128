"""Per-kernel SASS facts of the grouped GEMMs: tensor-core instructions, wgmma batching, local memory.

Usage: python bench/sass_report.py <cuobjdump --dump-sass output> [ptxas/build log]
A wgmma kernel whose HGMMAs are not serialized has one WARPGROUP.ARRIVE and one WARPGROUP.DEPBAR per stage
however many HGMMAs it issues; ptxas says why when it serializes them (C75xx lines in the build log).
"""
from __future__ import annotations

import re
import sys

COUNTS = {"HGMMA": r"\bHGMMA\.", "HMMA": r"\bHMMA\.", "WARPGROUP.ARRIVE": r"WARPGROUP\.ARRIVE",
          "WARPGROUP.DEPBAR": r"WARPGROUP\.DEPBAR", "STL": r"\bSTL\b", "LDL": r"\bLDL\b"}


def main() -> None:
    sass = open(sys.argv[1]).read()
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        m = re.search(r"grouped_gemm_kernelILi(\d+)ELi(\d+)E", body.split("\n", 1)[0])
        if m:
            facts = " ".join(f"{k} {len(re.findall(p, body))}" for k, p in COUNTS.items())
            print(f"grouped_gemm_kernel<BM={m.group(1)}, BN={m.group(2)}>: {facts}")
    if len(sys.argv) > 2:
        notes = sorted({line.split("in the function")[0].strip() for line in open(sys.argv[2]) if "(C75" in line})
        print(f"ptxas C75xx notes: {len(notes)}", *notes, sep="\n  ")


if __name__ == "__main__":
    main()
