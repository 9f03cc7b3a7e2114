"""7. Sizes: the stripped binary (x86_64 and, when built, aarch64) and the .deb packages."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from hass_edge_tools.bench.harness import Harness


def measure(h: Harness) -> None:
    res = {}
    stripped = h.work / "hass-edge.stripped"
    subprocess.run(["strip", "-o", str(stripped), str(h.bin)], check=True)
    res["x86_64"] = stripped.stat().st_size
    arm = [Path(p) for p in h.args.aarch64] if h.args.aarch64 else []
    for p in arm:
        if p.exists():
            tool = shutil.which("aarch64-linux-gnu-strip")
            if tool:
                out = h.work / "hass-edge.aarch64.stripped"
                subprocess.run([tool, "-o", str(out), str(p)], check=True)
                res["aarch64"] = out.stat().st_size
            else:
                res["aarch64"] = p.stat().st_size
            res["aarch64_path"] = str(p)
            break
    debs = []
    for dirname in h.args.deb_dir or []:
        for deb in sorted(Path(dirname).glob("*.deb")):
            debs.append({"name": deb.name, "bytes": deb.stat().st_size})
    res["debs"] = debs
    h.r["sizes"] = res
