"""The targets, checked, and the Markdown table the README quotes as "Performance".

    python -m bench.report [--results bench/results/latest.json] [--readme README.md]
        [--rejudge]

prints the targets table of a results file, or with `--readme` rewrites the README's block
between `<!-- bench-targets:begin -->` and `<!-- bench-targets:end -->` with it: the
README's Performance table is generated from the results, never edited by hand.
`--rejudge` takes the kept `soak.json` beside the results again (a soak that ended after
the bench did) and rewrites the results file and its `.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

IDLE_RSS_TARGET_MIB = 40.0
IDLE_RSS_HTTPS_SLACK_TARGET_MIB = 45.0
CPU_RATIO_TARGET = 0.5
QUORUM_INTERVAL_MS = 250
SCALE_CPU_TARGET_PCT = 10.0
SOAK_SLOPE_TARGET_KIB_PER_MIN = 10.0
RESULTS = Path(__file__).parent / "results"
# The soak (`make soak SOAK_MINUTES=60`) is not part of `make bench`: its summary is kept here.
SOAK_SUMMARY = RESULTS / "soak.json"
README_BEGIN = "<!-- bench-targets:begin -->"
README_END = "<!-- bench-targets:end -->"


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with the figure it is judged on and whether it was met."""
    s = results["suites"]
    rows: list[dict[str, Any]] = []

    def add(
        name: str, target: str, value: Any, met: bool | None, ratio: float | None = None
    ) -> None:
        # ratio: the figure over its bound (an upper bound is met at <= 1, a lower at >= 1).
        rows.append(
            {
                "target": name,
                "wanted": target,
                "measured": value,
                "met": met,
                "ratio": None if ratio is None else round(ratio, 2),
            }
        )

    for tag in ("200ms", "1000ms"):
        floor = _get(s, "ttr", "settings", tag, "floor")
        p95 = _get(s, "ttr", "settings", tag, "tools", "guardd", "ttr_ms", "p95")
        if floor:
            add(
                f"TTR p95 at {tag} x 3",
                f"<= floor + 100 ms = {floor['target_p95_ms']} ms",
                f"{p95} ms",
                floor["guardd_p95_met"],
                p95 / floor["target_p95_ms"] if p95 else None,
            )
            ex = _get(
                s, "ttr", "settings", tag, "tools", "guardd", "excess_over_own_floor_ms", "p95"
            )
            add(
                f"TTR p95 at {tag} x 3, each trial against its own detection phase",
                "<= floor + 100 ms",
                f"floor + {ex} ms",
                floor["guardd_excess_p95_met"],
                ex / 100.0 if ex is not None else None,
            )
    r = _get(s, "cost", "ratios", "guardd_over_blackbox_exporter")
    if r is not None:
        add(
            "CPU per probe vs blackbox_exporter, fresh connections for both",
            f"ratio <= {CPU_RATIO_TARGET:g}",
            f"{r} x blackbox_exporter",
            r <= CPU_RATIO_TARGET,
            r / CPU_RATIO_TARGET,
        )
    for key, label, bound in (
        ("idle_rss_mib", "plain-HTTP probes, no notification sink", IDLE_RSS_TARGET_MIB),
        (
            "idle_https_slack_rss_mib",
            "HTTPS probes and a Slack sink",
            IDLE_RSS_HTTPS_SLACK_TARGET_MIB,
        ),
    ):
        idle = _get(s, "cost", "subjects", "guardd", key)
        if idle is not None:
            # The plain guard's row also says what its libraries alone take (bench.imports).
            floor = _get(s, "cost", "subjects", "guardd", "idle_libraries_and_a_model_rss_mib")
            add(
                f"idle RSS, {label}",
                f"<= {bound:g} MiB",
                f"{idle} MiB"
                + (
                    f" (its libraries alone, with one pydantic model: {floor} MiB)"
                    if key == "idle_rss_mib" and floor is not None
                    else ""
                ),
                idle <= bound,
                idle / bound,
            )
    for cmd, label in (("status", "guardctl status"), ("qos_status", "guardctl qos status")):
        row = _get(s, "ctl", "results", cmd)
        if row:
            add(
                label,
                f"<= {row['target_ms']:g} ms wall (median)",
                f"{row['median_ms']} ms",
                row["met"],
                row["median_ms"] / row["target_ms"],
            )
    sc = s.get("scale")
    if sc:
        add(
            f"{sc['instances']} instances at 1 s",
            "<= 10 % of one core in total, every instance on cadence",
            f"{sc['total_cpu_pct_of_one_core']} %, {sc['instances_on_cadence']}/"
            f"{sc['instances']} on cadence",
            sc["met"],
            sc["total_cpu_pct_of_one_core"] / SCALE_CPU_TARGET_PCT,
        )
    rows_q = _get(s, "quorum", "intervals") or []
    at = next((q for q in rows_q if q.get("interval_ms") == QUORUM_INTERVAL_MS), None)
    if at is not None:
        add(
            f"100-URL quorum at {QUORUM_INTERVAL_MS} ms",
            "on cadence (>= 95 % of the rounds, p95 period under the interval)",
            f"{at['rounds_per_s']} of {at['target_rounds_per_s']} rounds/s, "
            f"{at['cpu_pct_of_one_core']} % of a core",
            at["on_cadence"],
            at["rounds_per_s"] / at["target_rounds_per_s"],
        )
    ld = s.get("load")
    if ld:
        c = ld["modes"]["close"]
        add(
            "errors caused by the switch, fresh connections",
            "0",
            c["errors_caused_by_switch"] + c["errors_after_switch"],
            ld["met"],
        )
    cpu = _get(s, "traffic", "cpu")
    if cpu:
        c = cpu["cpu_pct_of_one_core"]
        add(
            f"guardd with an access_log signal at {cpu['wanted_rate']:,} logged req/s",
            "<= 5 % of one core",
            f"{c['guardd_with_signal']} % ({cpu['logged_lines_per_s']:,} lines/s)",
            cpu["met"],
            c["guardd_with_signal"] / 5.0,
        )
    dec = _get(s, "traffic", "decision")
    if dec:
        add(
            f"first 500 -> rollback_started at {dec['rate']:g} req/s, "
            f"{dec['error_share']} 5xx, P0 traffic rule",
            "<= 1,000 ms (p95)",
            f"p95 {_get(dec, 'first_500_to_decision_ms', 'p95')} ms ({dec['decided']} decided)",
            dec["met"],
            (_get(dec, "first_500_to_decision_ms", "p95") or 0) / 1000.0 or None,
        )
    parse = s.get("parse")
    if parse:
        add(
            "access-log lines parsed per second, one core, beside a bare json.loads loop",
            ">= 0.5 x the bare loop and >= 100,000 lines/s",
            f"{parse['guardd_lines_per_s']:,} lines/s ({parse['ratio']} x)",
            parse["goals_met"],
            parse["ratio"] / 0.5,
        )
    tk = s.get("tick")
    if tk:
        p = tk["paths"]
        for path, goal, what in (
            ("core", tk.get("core_goal_us", 12.0), "2 observe + decide, pure core"),
            ("guard", tk.get("guard_goal_us", 40.0), "Guard.tick with 2 observes"),
        ):
            worst = max((p[f"{path}_steady"], p[f"{path}_mixed"]), key=lambda r: r["new_us"])
            base = f", {worst['ratio_base_over_new']} x cheaper" if "base_us" in worst else ""
            add(
                f"CPU per decision tick, {what} (decisions identical to before)",
                f"<= {goal:g} us",
                f"{worst['new_us']} us (before: {worst.get('base_us')} us{base})",
                worst["new_us"] <= goal and tk["decisions_identical"],
                worst["new_us"] / goal,
            )
    rp = s.get("replay")
    if rp:
        for case, what in (
            ("probes", "a day of probe history at 200 ms ({n:,} records)"),
            ("access_log", "{n:,} access-log lines at 100 req/s beside probes at 1 s"),
        ):
            r = rp[case]
            n = r["records"] if case == "probes" else r["lines_written"]
            add(
                f"`guardd replay` over {what.format(n=n)}, wall time",
                f"<= {r['target_s']:g} s",
                f"{r['seconds']} s ({r['ratio_to_target']} x the target"
                + (
                    f"; median of {len(r['rounds_s'])} runs, "
                    f"{min(r['rounds_s'])} to {max(r['rounds_s'])} s"
                    if len(r.get("rounds_s", ())) > 1
                    else ""
                )
                + f"), peak RSS {r['peak_rss_mib']} MiB",
                r["met"],
                r["ratio_to_target"],
            )
    sc = s.get("scrape")
    if sc:
        add(
            f"scrape of {sc['series']:,} series every {sc['every_s']:g} s, CPU per scrape",
            "beside Prometheus's own scrape (no target)",
            f"{sc['guardd']['cpu_ms_per_scrape']} ms vs {sc['prometheus']['cpu_ms_per_scrape']} ms "
            f"(x{sc['ratio_cpu_per_scrape_guardd_over_prometheus']}), "
            f"RSS +{sc['guardd']['rss_growth_kib']} KiB",
            None,
        )
    rec = s.get("recording")
    if rec:
        inproc = rec["recorder_in_process"]
        each = [w["overhead_pct"] for w in rec["windows"] if w["overhead_pct"] is not None]
        each = each or [None]
        add(
            "recording observations, CPU per probe on vs off ("
            + (
                f"{rec['daemons_per_side']} daemons a side, "
                if rec.get("daemons_per_side", 1) > 1
                else ""
            )
            + f"{rec['probes_per_s_each']:g} probes/s each, same build, same time)",
            f"overhead <= {rec['target_overhead_pct']:g} %",
            f"{rec['overhead_pct_median']} % (median of {len(rec['windows'])} windows, from "
            f"{min(each, key=lambda v: v or 0)} to {max(each, key=lambda v: v or 0)} %"
            + (
                f"; {rec['overhead_pct_median_on_started_first']} % with a recording daemon "
                f"started first, {rec['overhead_pct_median_off_started_first']} % second"
                if "overhead_pct_median_on_started_first" in rec
                else ""
            )
            + "); "
            "the recorder alone "
            f"{inproc['total_us_per_record']} us/record = "
            f"{rec['overhead_pct_from_recorder_cost']} % of a probe; "
            f"{rec['observations_bytes_per_probe']} bytes/probe on disk",
            rec["met"],
            rec["overhead_pct_median"] / rec["target_overhead_pct"]
            if rec["overhead_pct_median"] is not None
            else None,
        )
    soak = results.get("soak")
    if soak:
        slope = soak.get("rss_slope_after_warmup_kib_per_min")
        blocks = " -> ".join(f"{k / 1024:.1f}" for k in soak.get("rss_kib_max_per_10min", []))
        add(
            f"memory over time: `make soak` {soak['minutes']:g} min at "
            f"{soak['interval_s'] * 1000:g} ms, RSS slope after the first 10 minutes",
            f"< {SOAK_SLOPE_TARGET_KIB_PER_MIN:g} KiB/min",
            f"{slope} KiB/min (highest of each 10 min: {blocks} MiB; "
            f"journal tail cap {soak.get('journal_tail_cap_bytes', 0) // 1024} KiB)"
            if slope is not None
            else "run shorter than 20 min: no slope after warm-up",
            None if slope is None else slope < SOAK_SLOPE_TARGET_KIB_PER_MIN,
            None if slope is None else slope / SOAK_SLOPE_TARGET_KIB_PER_MIN,
        )
    return rows


def load_soak(path: Path = SOAK_SUMMARY) -> dict[str, Any] | None:
    """The kept soak summary without its series, or None when there is none."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    doc.pop("series", None)
    return doc


def targets_table(results: dict[str, Any]) -> list[str]:
    """The targets as Markdown table lines: wanted, measured, the figure over its bound, met."""
    out = [
        "| target | wanted | measured | measured / bound | met |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {r['target']} | {r['wanted']} | {_fmt(r['measured'])} | "
        f"{'-' if r.get('ratio') is None else format(r['ratio'], 'g')} | {_fmt(r['met'])} |"
        for r in results.get("targets", [])
    ]
    return out


def readme_block(results: dict[str, Any]) -> str:
    """The README's generated Performance table, between its markers."""
    met = [r for r in results.get("targets", []) if r["met"] is not None]
    lines = [
        README_BEGIN,
        (
            "<!-- Generated by `python -m bench.report --readme README.md` from "
            "bench/results/latest.json; do not edit by hand. -->"
        ),
        "",
        (
            f"`make bench` of {results['generated_at']} "
            + ("(**--quick**) " if results.get("quick") else "")
            + f"on {results['machine']['cpu_model']}, {results['machine']['cores']} cores: "
            f"{sum(1 for r in met if r['met'])} of {len(met)} targets met."
        ),
        "",
        *targets_table(results),
        README_END,
    ]
    return "\n".join(lines)


def write_readme(readme: Path, results: dict[str, Any]) -> None:
    """Replace the block between the markers in `readme`; ValueError if they are missing."""
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} block")
    readme.write_text(text[:begin] + readme_block(results) + text[end + len(README_END) :])


def main(argv: list[str] | None = None) -> int:
    """Print the targets of a results file, or write them into the README's block."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--readme", type=Path, help="rewrite this file's generated block")
    parser.add_argument(
        "--rejudge",
        action="store_true",
        help="take the kept soak.json beside the results again (a soak that ended after the "
        "bench) and rewrite the results file and its .md",
    )
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        print(f"{args.results}: {e}", file=sys.stderr)
        return 2
    # Judged again from the figures, so that the table's form is this code's.
    if args.rejudge or "soak" not in results:
        results["soak"] = load_soak(args.results.parent / "soak.json")
    results["targets"] = targets(results)
    if args.rejudge:
        args.results.write_text(json.dumps(results, indent=1) + "\n")
        args.results.with_suffix(".md").write_text(markdown(results))
    if args.readme is None:
        print("\n".join(targets_table(results)))
        return 0
    try:
        write_readme(args.readme, results)
    except (OSError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    print(f"wrote the targets of {args.results} into {args.readme}")
    return 0


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v}{unit}"


def markdown(results: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    m = results["machine"]
    v = m["versions"]
    s = results["suites"]
    out = [
        "# guardd performance",
        "",
        f"Generated {results['generated_at']} by `make bench`"
        + (" (**--quick**: fewer trials, shorter windows)" if results["quick"] else "")
        + f" in {results.get('duration_s', 0):.0f} s.",
        (
            f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, "
            f"{m['os']}, Linux {m['kernel']}; load average at start "
            f"{', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}."
        ),
        (
            f"guardd {v['guardd']} (Python {v['python']}, httpx {v['httpx']}), nginx {v['nginx']}, "
            f"blackbox_exporter {v['blackbox_exporter']}, monit {v['monit']}, curl {v['curl']}, "
            f"wrk {v['wrk']}, hyperfine {v['hyperfine']}."
        ),
        f"guardd measured as installed: {results.get('guardd_install', {}).get('kind', '?')}.",
        "Every comparison runs in the same run on the same machine; ratios are what to read.",
        "",
        "## Targets",
        "",
        *targets_table(results),
    ]
    out += _ttr(s.get("ttr"))
    out += _fleet(s.get("fleet"))
    out += _cost(s.get("cost"))
    out += _scale(s.get("scale"), s.get("quorum"))
    out += _load(s.get("load"))
    out += _traffic(s.get("traffic"))
    out += _ctl(s.get("ctl"))
    if results.get("errors"):
        out += ["", "## Suites that failed", ""]
        out += [f"- {k}: {e}" for k, e in results["errors"].items()]
    return "\n".join(out) + "\n"


def _ttr(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return []
    ref = t["reference_switch_ms"]
    out = [
        "",
        "## Time to rollback",
        "",
        (
            "From green's first 503 until nginx serves only blue for "
            f"{t['hold_s']:g} s, on fresh connections; 3 failures in a row; the same faults for "
            "every guard (monit only at its 1 s minimum)."
        ),
        "",
        (
            "| interval | guard | trials | median | p95 | max | detection phase (mean) | "
            "confirmed → blue only (median) | median / floor | over own floor p95 |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tag, st in t["settings"].items():
        fl = st.get("floor", {})
        for tool, r in st["tools"].items():
            ttr = r["ttr_ms"]
            out.append(
                f"| {tag} | {tool} | {ttr['n']}"
                + (f" ({r['timeouts']} timed out)" if r["timeouts"] else "")
                + f" | {_fmt(ttr['median'], ' ms')} | {_fmt(ttr['p95'], ' ms')} | "
                f"{_fmt(ttr['max'], ' ms')} | {_fmt(r['detection_phase_ms']['mean'], ' ms')} | "
                f"{_fmt(r['confirmed_to_blue_only_ms']['median'], ' ms')} | "
                f"{_fmt(fl.get(f'{tool}_median_over_floor'))} | "
                f"{_fmt(_get(r, 'excess_over_own_floor_ms', 'p95'), ' ms')} |"
            )
    out += [
        "",
        (
            "| interval | floor | = failures after the first | + detection phase | "
            "+ switch | + reload settle | guardd decision (median) | guardd switch + verify |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for tag, st in t["settings"].items():
        fl = st.get("floor") or {}
        p = fl.get("parts_ms", {})
        g = st["tools"]["guardd"]
        out.append(
            f"| {tag} | {_fmt(fl.get('floor_ms'), ' ms')} | "
            f"{_fmt(p.get('failures_after_the_first'), ' ms')} | "
            f"{_fmt(p.get('mean_detection_phase'), ' ms')} | {_fmt(p.get('switch'), ' ms')} | "
            f"{_fmt(p.get('reload_settle'), ' ms')} | "
            f"{_fmt(g['decision_ms']['median'], ' ms')} | "
            f"{_fmt(g['switch_and_verify_ms']['median'], ' ms')} |"
        )
    out += [
        "",
        (
            "The floor is what any guard at that interval and threshold must take: the failures "
            "after the first at the interval, the mean wait for the first probe after the fault "
            "(guardd's, measured), and the switch and reload settling of the reference switch "
            'below. "Over own floor" puts each trial\'s own detection phase in place of the mean, '
            "so that where in the cadence the fault fell (up to a whole interval) does not count."
        ),
        "",
        _reference_line(ref),
    ]
    return out


def _fleet(f: dict[str, Any] | None) -> list[str]:
    if not f:
        return []
    out = [
        "",
        "## Time to rollback: a fleet beside one node",
        "",
        (
            "From green's first 503 until every nginx serves only blue for "
            f"{f['hold_s']:g} s: three guardd nodes, each with its own nginx, coordinated "
            "through a 3-member etcd cluster (the slowest node counts), beside one node alone; "
            "trials interleaved, each setup started afresh."
        ),
        "",
        "| setup | trials | median | p95 | max |",
        "|---|---|---|---|---|",
    ]
    for name, key in (("one node alone", "one_node_ms"), ("3-node fleet", "fleet_ms")):
        st = f[key]
        out.append(
            f"| {name} | {st['n']} | {_fmt(st['median'], ' ms')} | {_fmt(st['p95'], ' ms')} | "
            f"{_fmt(st['max'], ' ms')} |"
        )
    out += ["", f"Fleet median / one node's: {_fmt(f.get('fleet_over_one_node_median'))}."]
    return out


def _reference_line(ref: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return _fmt(ref[key]["median"], " ms")

    return (
        f"Reference switch (ln + rename + `nginx -t` + reload, {ref['total_s']['n']} times): "
        f"{ms('total_s')} median (`nginx -t` {ms('test_s')}, reload {ms('reload_s')}); "
        f"the first answer from the new color came {ms('first_new_after_reload_s')} after "
        f"the reload returned; old workers answered for {ms('old_answering_after_reload_s')}."
    )


def _cost(c: dict[str, Any] | None) -> list[str]:
    if not c or "subjects" not in c:
        return []  # (`--only ctl` starts the cost suite's daemons for the soak alone)
    subj = c["subjects"]
    names = {
        "guardd": "guardd (2 colors + front door, 300 ms)",
        "blackbox_exporter": "blackbox_exporter via /probe",
        "shell_loop": "shell loop (bash + curl -fsS -m 2)",
        "httpx_floor": "bare httpx.AsyncClient loop (floor of guardd's client)",
        "asyncio_floor": "bare asyncio-streams loop (floor of any Python prober)",
        "monit": "monit, 1 check, 1 s cycle",
    }
    out = [
        "",
        "## Cost per probe and memory",
        "",
        (
            f"All at {c['rate_per_s']:g} probes/s (monit: 1/s), at the same time, over "
            f"{c['window_s']:g} s; idle cost subtracted where an idle twin ran. "
            "RSS in MiB at the end of the window."
        ),
        "",
        "| prober | probes | CPU per probe | guardd / this | RSS |",
        "|---|---|---|---|---|",
    ]
    for k, label in names.items():
        r = subj[k]
        ratio = "-" if k == "guardd" else _fmt(c["ratios"].get(f"guardd_over_{k}"))
        out.append(
            f"| {label} | {r['probes']} | {_fmt(r['cpu_per_probe_us'], ' µs')} | {ratio} | "
            f"{_fmt(r['rss_mib'])} |"
        )
    g = subj["guardd"]
    soak = c.get("soak") or {}
    out += [
        "",
        (
            f"guardd idle (interval 1 h): RSS {_fmt(g['idle_rss_mib'], ' MiB')} "
            f"(PSS {_fmt(g['idle_pss_mib'], ' MiB')}; the modules it loaded but guardd's own, "
            f"imported alone: {_fmt(g.get('idle_libraries_rss_mib'), ' MiB')}, and with one "
            f"pydantic model built: {_fmt(g.get('idle_libraries_and_a_model_rss_mib'), ' MiB')}), "
            f"CPU {g['idle_cpu_ms_per_s']} ms per second "
            f"(blackbox_exporter idle: {subj['blackbox_exporter']['idle_cpu_ms_per_s']} ms/s); "
            f"CPU per probe with the idle cost left in: "
            f"{_fmt(g['cpu_per_probe_us_idle_included'], ' µs')}."
        ),
    ]
    if soak:
        out.append(
            f"After {soak['duration_s'] / 60:.1f} minutes of probing "
            f"({soak['guardd_probes_logged']} probes): guardd RSS "
            f"{_fmt(soak['guardd_rss_mib'], ' MiB')} (peak {_fmt(soak['guardd_peak_rss_mib'])}, "
            f"PSS {_fmt(soak['guardd_pss_mib'])}), blackbox_exporter "
            f"{_fmt(soak['blackbox_exporter_rss_mib'], ' MiB')}."
        )
    return out


def _scale(sc: dict[str, Any] | None, q: dict[str, Any] | None) -> list[str]:
    out: list[str] = []
    if sc:
        out += [
            "",
            "## Scale",
            "",
            (
                f"{sc['instances']} guardd instances at {sc['interval_s']:g} s, each its own pair "
                f"(state-file switcher), over {sc['window_s']:g} s: "
                f"**{sc['total_cpu_pct_of_one_core']} %** of one core in total "
                f"({sc['cpu_pct_per_instance']} % each), RSS {sc['total_rss_mib']} MiB in total "
                f"(PSS {sc['total_pss_mib']} MiB; {sc['rss_per_instance_mib']} MiB each); "
                f"{sc['instances_on_cadence']}/{sc['instances']} on cadence, probe gap median "
                f"{_fmt(sc['probe_gap_ms']['median'], ' ms')}, worst {sc['worst_gap_ms']} ms; "
                f"all started and READY in {sc['startup_s']} s."
            ),
        ]
    if q:
        out += [
            "",
            f"One instance whose active color has {q['urls']} URLs (quorum {q['quorum']}):",
            "",
            (
                "| interval | rounds/s (wanted) | round duration p50 / p95 | CPU per round | "
                "CPU (% of a core) | on cadence |"
            ),
            "|---|---|---|---|---|---|",
        ]
        for r in q["intervals"]:
            out.append(
                f"| {r['interval_ms']} ms | {r['rounds_per_s']} ({r['target_rounds_per_s']}) | "
                f"{_fmt(r['round_ms']['median'])} / {_fmt(r['round_ms']['p95'], ' ms')} | "
                f"{_fmt(r['cpu_per_round_ms'], ' ms')} | {r['cpu_pct_of_one_core']} | "
                f"{_fmt(r['on_cadence'])} |"
            )
        out.append("")
        out.append(
            f"Keeps cadence down to {_fmt(q['shortest_interval_on_cadence_ms'], ' ms')}"
            + (
                f"; loses it at {q['first_interval_off_cadence_ms']} ms."
                if q["first_interval_off_cadence_ms"]
                else "."
            )
        )
    return out


def _load(ld: dict[str, Any] | None) -> list[str]:
    if not ld:
        return []
    out = [
        "",
        "## Switch under load",
        "",
        (
            "wrk through the guarded nginx while guardd rolls back from a failing green; phases "
            "from guardd's journal (before `rollback_started`, switch, after "
            "`rollback_completed`)."
        ),
        "",
        (
            "| clients | req/s | failing green's 5xx | errors during the switch | errors after | "
            "socket errors (wrk) | fault → decision | switch + verify |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in ld["modes"].items():
        se = ", ".join(f"{k} {n}" for k, n in r["socket_errors"].items() if n) or "0"
        out.append(
            f"| {mode} | {r['requests_per_s']:,} | {r['failing_green_5xx']} | "
            f"{r['errors_caused_by_switch']} | {r['errors_after_switch']} | {se} | "
            f"{_fmt(r['fault_to_rollback_started_ms'], ' ms')} | "
            f"{_fmt(r['switch_phase_ms'], ' ms')} |"
        )
    out += [
        "",
        (
            "Errors during and after the switch are requests that got no answer or a non-2xx "
            "answer not from green: on kept-alive connections, requests lost when nginx's old "
            "worker closed the connection under them; wrk's read errors also count kept-alive "
            "connections closed while idle, which lose nothing."
        ),
    ]
    return out


def _traffic(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return []
    out = ["", "## Real traffic (access_log signal)", ""]
    cpu = t.get("cpu")
    if cpu:
        c = cpu["cpu_pct_of_one_core"]
        out += [
            (
                f"wrk at {cpu['wanted_rate']:,} req/s through nginx logging in guardd's "
                f"log_format ({cpu['logged_lines_per_s']:,} lines/s logged), "
                f"{cpu['span_s']:g} s, CPU % of one core:"
            ),
            "",
            (
                "| guardd with the signal | the same guardd without it | the signal alone | "
                "nginx's worker |"
            ),
            "|---|---|---|---|",
            (
                f"| {c['guardd_with_signal']} % | {c['guardd_without_signal']} % | "
                f"{c['signal_alone']} % | {c['nginx_worker']} % |"
            ),
            "",
            f"Lines guardd counted: {cpu.get('guardd_lines')}.",
        ]
    dec = t.get("decision")
    if dec:
        r = dec["rule"]

        def ms(key: str, stat: str) -> str:
            return _fmt(_get(dec, key, stat), " ms")

        out += [
            "",
            (
                f"{dec['rate']:g} req/s on fresh connections, {dec['warm_s']:g} s healthy, then "
                f"{dec['error_share']} of green's `/api` answers 500 (`/healthz` stays UP); rule "
                f"`error_ratio >= {r['above']}`, P0, min_samples {r['min_samples']}, window "
                f"{r['window_s']} s, no `for`. {dec['decided']} trials decided."
            ),
            "",
            "| | median | p95 | max |",
            "|---|---|---|---|",
        ]
        for key, label in (
            ("first_500_to_decision_ms", "first 500 → `rollback_started`"),
            ("first_500_to_floor_ms", "first 500 → floor (the rule met by the answers themselves)"),
            ("floor_to_decision_ms", "floor → `rollback_started` (what guardd adds)"),
        ):
            out.append(f"| {label} | {ms(key, 'median')} | {ms(key, 'p95')} | {ms(key, 'max')} |")
    return out


def _ctl(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    out = [
        "",
        "## guardctl",
        "",
        f"Process start to exit, hyperfine, {c['runs']} runs against a live guardd.",
        "",
        "| command | median | mean ± sd | min | target |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "status": "guardctl status",
        "status_json": "guardctl status --json",
        "qos_status": "guardctl qos status",
        "python_startup": "python3 -c pass (the interpreter alone)",
    }
    for k, label in labels.items():
        r = c["results"].get(k)
        if r:
            out.append(
                f"| {label} | {r['median_ms']} ms | {r['mean_ms']} ± {r['stddev_ms']} ms | "
                f"{r['min_ms']} ms | {_fmt(r.get('target_ms'), ' ms')} |"
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
