"""The benchmark report: the table (rows of measure, hass-edge, HA, ratio, goal), printed
plain and written as the generated part of BENCHMARKS.md with the run's conditions and the
profiles."""
from __future__ import annotations

from pathlib import Path


def fmt_ms(x: float) -> str:
    return f"{x:.3f} ms" if x < 1 else f"{x:.2f} ms"


def fmt_n(x: float) -> str:
    return f"{x:,.0f}"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    """(measure, hass-edge, HA, ratio, goal) rows."""
    out = []
    reads = r.get("reads")
    if reads:
        for conns, x in reads["by_conns"].items():
            e, h = x["edge"], x["ha"]
            ratio = e["rps"] / h["rps"]
            out.append((f"GET /api/states/{{entity_id}}, {conns} conn: req/s", fmt_n(e["rps"]), fmt_n(h["rps"]), f"{ratio:.1f}×", f"≥ 20× — {verdict(ratio >= 20)}"))
            out.append((f"  … p50 latency", fmt_ms(e["p50_ms"]), fmt_ms(h["p50_ms"]), f"1/{h['p50_ms'] / e['p50_ms']:.1f}", ""))
            cpu = h["server_cpu_us_per_req"] / e["server_cpu_us_per_req"]
            out.append((f"  … server CPU per request", f"{e['server_cpu_us_per_req']:.1f} µs", f"{h['server_cpu_us_per_req']:.0f} µs", f"1/{cpu:.1f}", ""))
            r99 = h["p99_ms"] / e["p99_ms"]
            out.append((f"  … p99 latency", fmt_ms(e["p99_ms"]), fmt_ms(h["p99_ms"]), f"1/{r99:.1f}", f"≤ 1/10 — {verdict(r99 >= 10)}"))
            n = x.get("nginx")
            if n:
                out.append((f"  … nginx, same JSON as a static file (1 worker, same core): req/s / p99", f"{fmt_n(n['rps'])} / {fmt_ms(n['p99_ms'])}", "—", f"edge/nginx {e['rps'] / n['rps']:.2f}×", ""))
            if int(conns) > 1 and e["client_cpu_pct"] > 0:
                ceiling = e["rps"] / (e["client_cpu_pct"] / 100)
                out.append((f"  … wrk's own ceiling on its core (req/s at 100 % of it)", fmt_n(ceiling), "—", f"20× HA = {fmt_n(20 * h['rps'])}", ""))
    ing = r.get("ingest")
    if ing:
        eps = ing["mixed_events_per_sec"]
        out.append(("Ingest in-process (mixed frames): events per CPU-second", fmt_n(eps), "—", "—", f"≥ 300,000 — {verdict(eps >= 300000)}"))
        out.append(("  … events per wall-clock second (shared core)", fmt_n(ing["mixed_wall_events_per_sec"]), "—", "—", ""))
        out.append(("  … ns/event (mixed / single / coalesced)", f"{ing['mixed_ns_per_event']:.0f} / {ing['single_ns_per_event']:.0f} / {ing['coalesced_ns_per_event']:.0f}", "—", "—", ""))
        out.append(("  … instructions/event (callgrind)", fmt_n(ing["ir_per_event"]), "—", "—", ""))
    e2e = r.get("ingest_e2e")
    if e2e:
        out.append(("Ingest end to end: HA's change rate", "—", f"{e2e['ha_rate']:,.0f}/s", "—", ""))
        out.append(("  … hass-edge CPU (% of one core)", f"{e2e['edge_cpu_pct']:.2f} %", f"{e2e['ha_cpu_pct']:.0f} %", f"1/{e2e['ha_cpu_pct'] / max(e2e['edge_cpu_pct'], 0.01):.0f}", f"≤ 5 % — {verdict(e2e['edge_cpu_pct'] <= 5)}"))
        out.append(("  … events lost (states ≠ HA's at the end)", f"{e2e['differ'] + e2e['extra']} (reconnects {e2e['reconnects']:.0f})", "—", "—", f"0 — {verdict(e2e['lost'] == 0 and e2e['reconnects'] == 0)}"))
    f = r.get("freshness")
    if f:
        out.append(("Freshness p50 / p99: HA's own WS client", "—", f"{f['ha_ws']['p50']:.2f} / {f['ha_ws']['p99']:.2f} ms", "—", ""))
        out.append(("  … our SSE /api/stream", f"{f['sse']['p50']:.2f} / {f['sse']['p99']:.2f} ms", "—", f"{f['sse_minus_ws']['p50']:+.2f} / {f['sse_minus_ws']['p99']:+.2f} ms", f"p99 ≤ +5 ms — {verdict(f['sse_minus_ws']['p99'] <= 5)}"))
        out.append(("  … our GET (tight poll)", f"{f['get']['p50']:.2f} / {f['get']['p99']:.2f} ms", f"(WS {f['ha_ws_b']['p50']:.2f} / {f['ha_ws_b']['p99']:.2f})", f"{f['get_minus_ws']['p50']:+.2f} / {f['get_minus_ws']['p99']:+.2f} ms", f"p99 ≤ +5 ms — {verdict(f['get_minus_ws']['p99'] <= 5)}"))
    m = r.get("memory")
    if m:
        for row in m["rows"]:
            n = row["entities"]
            goal = ""
            if n == 1000:
                goal = f"RSS ≤ 5 MiB — {verdict(row['rss_kib'] <= 5 * 1024)}"
            elif n == 20000:
                goal = f"peak ≤ 32 MiB — {verdict(row['hwm_kib'] <= 32 * 1024)}"
            out.append((f"RSS / peak, {n:,} entities ({row['tracked']:,} tracked)", f"{mib(row['rss_kib'])} / {mib(row['hwm_kib'])}", mib(row["ha_rss_kib"]), f"1/{row['ha_rss_kib'] / row['rss_kib']:.0f}", goal))
            out.append(("  … RssAnon (heap, stacks) / RssFile (binary, libc)", f"{mib(row['anon_kib'])} / {mib(row['file_kib'])}", "—", "—", ""))
            out.append(("  … PSS / USS (private pages only)", f"{mib(row['pss_kib'])} / {mib(row['uss_kib'])}", "—", "—", ""))
            out.append(("  … RSS / peak after one GET /api/states (whole list)", f"{mib(row['rss_after_list_kib'])} / {mib(row['hwm_after_list_kib'])}", "—", "—", ""))
    idle = r.get("idle")
    if idle:
        out.append((f"Idle: CPU per minute ({idle['seconds']:.0f} s window)", f"{idle['cpu_ms_per_min']:.1f} ms", "—", "—", f"≤ 30 ms — {verdict(idle['cpu_ms_per_min'] <= 30)}"))
        per = ", ".join(f"{k} {v}" for k, v in idle.get("by_thread", {}).items())
        out.append((f"  … wake-ups/s (context switches; {per})", f"{idle['wakeups_per_s']:.2f}", "—", "—", f"≤ 1 — {verdict(idle['wakeups_per_s'] <= 1)}"))
        out.append(("  … events received in the window", f"{idle['events']:.0f}", "—", "—", ""))
    hl = r.get("ha_load")
    if hl:
        out.append(("HA REST requests/h, 10 entities polled every 10 s", fmt_n(hl["per_hour_at_10s"]), fmt_n(hl["direct_per_hour"]), "—", f"0 — {verdict(hl['rest_requests'] == 0)}"))
    sz = r.get("sizes")
    if sz:
        out.append(("Stripped binary x86_64", f"{sz['x86_64'] / 1e6:.2f} MB", "—", "—", ""))
        if "aarch64" in sz:
            out.append(("Stripped binary aarch64", f"{sz['aarch64'] / 1e6:.2f} MB", "—", "—", ""))
        for deb in sz["debs"]:
            out.append((f".deb {deb['name']}", f"{deb['bytes'] / 1e6:.2f} MB", "—", "—", ""))
    return out


def table(r: dict) -> str:
    head = ("Measure", "hass-edge", "Home Assistant", "ratio", "goal")
    body = rows(r)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(x) + " |" for x in body]
    return "\n".join(lines)


def plain_table(r: dict) -> str:
    head = ("Measure", "hass-edge", "Home Assistant", "ratio", "goal")
    body = [head] + rows(r)
    widths = [max(len(row[i]) for row in body) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in body)


def generated_section(r: dict) -> str:
    m = r["machine"]
    t = r["timings"]
    la = lambda x: " ".join(f"{v:.2f}" for v in x)
    lines = [
        f"Run: {m['date']}{' — **smoke run** (short windows, not figures to quote)' if r['smoke'] else ''}; "
        f"`measure/bench.sh{' --smoke' if r['smoke'] else ''}` took {t['total'] / 60:.1f} min of measuring (+ build).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; load average {la(m['load_start'])} at the start, "
        f"{la(m['load_end'])} at the end (the machine is shared: other engineers' builds and tests ran alongside, "
        "so absolute figures are pessimistic; the ratios against HA come from the same minutes). "
        f"Home Assistant {r['ha_version']} (the test peer, tests/ha-peer), {m['rustc']}, hass-edge release build (fat LTO, opt-level s)"
        + (", run with the packaged unit's environment (" + ", ".join(f"`{k}={v}`" for k, v in r.get("unit_env", {}).items()) + ")" if r.get("unit_env") else "") + ".",
        "",
        "Busiest processes (% of one core over 1 s, top) at the start: " + (", ".join(f"{c} {p:.0f} %" for p, c in r.get("busy_start", [])) or "none")
        + "; at the end: " + (", ".join(f"{c} {p:.0f} %" for p, c in r.get("busy_end", [])) or "none") + ".",
        "",
        table(r),
    ]
    rp = r.get("reads_profile")
    if rp:
        x = r["reads"]["by_conns"]
        e16 = x.get(16, x.get("16"))
        runs = e16["edge"].get("runs", 1)
        each = "; ".join(f"{c} conn: hass-edge " + " / ".join(f"{v:.3f}" for v in x[c]["edge"].get("p99_each_ms", [])) + ", HA " + " / ".join(f"{v:.3f}" for v in x[c]["ha"].get("p99_each_ms", []))
                         for c in x)
        lines += ["", f"Reads: wrk (one thread, keep-alive) pinned to one core, the server to the other; each figure is the median of {runs} run(s) "
                  f"of {r['reads']['seconds'] / runs:.0f} s (p99 of each run in ms, {each})."]
        lines += ["", f"Reads, 16 connections: hass-edge used {e16['edge']['server_cpu_pct']:.0f} % of its core ({e16['edge']['server_cpu_us_per_req']:.1f} µs CPU per request), "
                  f"wrk {e16['edge']['client_cpu_pct']:.0f} % of its core; HA used {e16['ha']['server_cpu_pct']:.0f} % ({e16['ha']['server_cpu_us_per_req']:.0f} µs per request). "
                  f"`perf record -e cpu-clock` of hass-edge during that run: {rp['kernel_pct']:.0f} % of its samples in the kernel (loopback TCP, epoll); top user-space symbols: "
                  + ", ".join(f"`{n}` {p:.1f} %" for p, n in rp["user_top"][:6]) + "."]
    for n, ms in (r.get("massif") or {}).items():
        lines += ["", f"Heap of hass-edge synced with {int(n):,} entities (valgrind massif, until 2 s after the sync): peak {ms['peak_heap'] / 1048576:.2f} MiB "
                  f"({ms['peak_heap_useful'] / 1048576:.2f} MiB requested, the rest malloc overhead) at {ms.get('peak_at', 0):.0%} of the run. "
                  "Bytes live at the peak by the innermost interesting frame of the allocation's stack (ours, or `bytes`/`tungstenite`/… then ← ours; "
                  "decoded states are allocated in `Session::handle_message` and then moved into the store; LTO inlines the executor's tasks into `main`):", ""]
        lines += ["| bytes | function |", "|---:|---|"] + [f"| {b:,} | `{name}` |" for name, b in ms["top"]]
    ing = r.get("ingest")
    if ing and ing.get("hot"):
        lines += ["", f"Where the instructions of one event go (callgrind, self cost per function, {ing['callgrind_events'] * 3:,}-event run minus {ing['callgrind_events']:,}-event run):", ""]
        lines += ["| share | Ir/event | function |", "|---:|---:|---|"]
        lines += [f"| {p:.1f} % | {ir:,.0f} | `{name}` |" for p, ir, name in ing["hot"]]
    lines += ["", "Time per section (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items() if k != "total")]
    return "\n".join(lines)


BEGIN, END = "<!-- measure/bench.sh: begin generated -->", "<!-- measure/bench.sh: end generated -->"


def write_markdown(path: Path, r: dict) -> None:
    section = f"{BEGIN}\n{generated_section(r)}\n{END}"
    if path.exists() and BEGIN in path.read_text():
        text = path.read_text()
        pre, _, rest = text.partition(BEGIN)
        _, _, post = rest.partition(END)
        path.write_text(pre + section + post)
    else:
        path.write_text("# Benchmarks\n\nThe section below is written by `measure/bench.sh`; text outside its markers is kept.\n\n" + section + "\n")
