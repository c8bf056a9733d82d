"""Where a whole ``generate`` call's time goes on a GPU: device busy vs wall, the device's idle
gaps, the top kernels (torch.profiler, device activity only), then the host's top functions
(cProfile, a second run, written to ``$OUT/<label>_cprofile.txt``). Used by ``gpu_async.py
--profile`` and ``gpu_cascade.py --profile``."""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import time

import torch


def profile_generate(llm, prompts: list, params, label: str, reset=None) -> None:
    """Profile ``llm.generate(prompts, params)``; ``reset()`` runs before each run (e.g. clearing
    the prefix cache so the run repeats the timed one)."""
    from torch.profiler import ProfilerActivity, profile

    if reset is not None:
        reset()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    busy = sum(e.time_range.end - e.time_range.start for e in kernels) / 1e6
    gaps, end = [], None  # device idle between kernels (us), with the kernel after each gap
    for e in kernels:
        if end is not None and e.time_range.start > end:
            gaps.append((e.time_range.start - end, e.name))
        end = e.time_range.end if end is None else max(end, e.time_range.end)
    span = (end - kernels[0].time_range.start) / 1e6 if kernels else 0.0
    big = [g for g in gaps if g[0] >= 100]
    print(f"\n## {label}: wall {wall * 1e3:.0f} ms (profiled), device busy {busy * 1e3:.0f} ms "
          f"({100 * busy / wall:.0f}%); first to last kernel {span * 1e3:.0f} ms; idle gaps >= 0.1 ms: "
          f"{len(big)}, {sum(g[0] for g in big) / 1e3:.0f} ms; all gaps {sum(g[0] for g in gaps) / 1e3:.0f} ms")
    for us, name in sorted(big, reverse=True)[:8]:
        print(f"  gap {us / 1e3:7.2f} ms before {name[:70]}")
    totals: dict[str, list[float]] = {}
    for e in kernels:
        t = totals.setdefault(e.name, [0.0, 0])
        t[0] += e.time_range.end - e.time_range.start
        t[1] += 1
    for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:32]:
        print(f"  {us / 1e3:8.1f} ms {n:6d}x {us / n:8.1f} us  {name[:100]}")
    if reset is not None:
        reset()
    cp = cProfile.Profile()
    cp.enable()
    llm.generate(prompts, params, use_tqdm=False)
    cp.disable()
    with open(os.path.join(os.environ.get("OUT", "."), f"{label}_cprofile.txt"), "w") as f:
        f.write(host_table(cp, 40))


def host_table(cp: cProfile.Profile, lines: int) -> str:
    """The top ``lines`` host functions of a cProfile run, by own time, then by cumulative time."""
    buf = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(cp, stream=buf).sort_stats(key).print_stats(lines)
    return buf.getvalue()
