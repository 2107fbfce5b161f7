"""What a suite run writes: ratios against fastflow, the markdown table, PNG bar charts, and the
comparison of two runs (``fastflow bench --compare A.json B.json``).
"""

from __future__ import annotations

import json
import math
import os
import statistics

from fastflow.bench._common import write_json

METHOD = (
    "Times: after warm-up calls, interleaved rounds in which fastflow and every peer take turns "
    "(order alternating), each round the median of several calls; value = median over rounds, "
    "min/max over rounds; CUDA: events after a synchronisation. Ratio = peer / fastflow per "
    "round (paired: both saw the same load), reported as median [min-max] over rounds; above 1 "
    "fastflow is faster (or smaller). Memory: peak bytes beyond those live before one training "
    "step (CPU: resident-set high-water mark; CUDA: max_memory_allocated). Likelihood: test NLL "
    "after a fixed budget (same steps, Adam, batch, data order, seed), mean over seeds, spread = "
    "max - min over seeds."
)

LOWER_IS_BETTER = ("ms", "MiB", "nats", "bits/dim")


def _groups(rows):
    g: dict[tuple, list[dict]] = {}
    for r in rows:
        g.setdefault((r["bench"], r["case"], r["metric"]), []).append(r)
    return g


def ratios(rows: list[dict]) -> list[dict]:
    """``peer / fastflow`` for every timed or memory measurement that has a fastflow row:
    ``median``/``min``/``max`` over the paired rounds where both have per-round values, else the
    ratio of the values.

    Example:
        >>> rows = [
        ...     {"bench": "b", "case": "c", "metric": "m", "impl": "fastflow", "unit": "ms",
        ...      "value": 1.0, "rounds": [1.0, 2.0]},
        ...     {"bench": "b", "case": "c", "metric": "m", "impl": "zuko", "unit": "ms",
        ...      "value": 3.0, "rounds": [3.0, 3.0]}]
        >>> r = ratios(rows)[0]
        >>> r["peer"], r["median"], r["min"], r["max"]
        ('zuko', 2.25, 1.5, 3.0)
    """
    out = []
    for (b, c, m), rs in _groups(rows).items():
        ff = next((r for r in rs if r["impl"] == "fastflow"), None)
        if ff is None or ff["unit"] not in ("ms", "MiB") or not _finite(ff["value"]):
            continue
        for r in rs:
            if r is ff or not _finite(r["value"]):
                continue
            a, p = ff.get("rounds"), r.get("rounds")
            if a and p and len(a) == len(p) and all(v > 0 for v in a):
                per = [y / x for x, y in zip(a, p)]
                med, lo, hi = statistics.median(per), min(per), max(per)
            elif ff["value"] > 0:
                med = lo = hi = r["value"] / ff["value"]
            else:
                continue
            out.append(
                {
                    "bench": b,
                    "case": c,
                    "metric": m,
                    "unit": ff["unit"],
                    "peer": r["impl"],
                    "fastflow": ff["value"],
                    "peer_value": r["value"],
                    "params_fastflow": ff.get("params"),
                    "params_peer": r.get("params"),
                    "median": med,
                    "min": lo,
                    "max": hi,
                }
            )
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _num(v, unit="") -> str:
    if not _finite(v):
        return "-"
    if unit == "ms" and v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _list(v) -> list:
    """A row's per-seed field as a list (modules may store one value)."""
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _f4(v) -> str:
    return f"{v:.4f}" if _finite(v) else "-"


FLOOR_NAMES = ("true density", "per-pixel histogram")


def is_floor(r: dict) -> bool:
    """A floor/baseline row of a likelihood case (``floor=True`` or a floor's name)."""
    return bool(r.get("floor")) or r["impl"] in FLOOR_NAMES


def likelihood_rows(rows: list[dict]) -> list[dict]:
    """Test NLL rows (metric ``test_...`` in nats or bits/dim) and their floors."""
    return [r for r in rows if r["unit"] in ("nats", "bits/dim") and r["metric"].startswith("test")]


def _ratio_cell(median: float) -> str:
    """A ratio peer / fastflow for the table: bold where fastflow is ahead (>= 1), marked where
    it is behind."""
    return f"**{median:.2f}x**" if median >= 1 else f"{median:.2f}x (slower)"


def markdown(result: dict) -> str:
    """The run as markdown: the machine, the speed/memory ratios, and the likelihood table."""
    env = result.get("environment", {})
    rows = result.get("rows", [])
    cfg = result.get("config", {})
    dev = env.get("cuda_device") if str(cfg.get("device", "cpu")).startswith("cuda") else None
    lines = [
        f"`{result.get('command', 'fastflow bench')}` on {dev or env.get('cpu_model')} "
        f"({env.get('cpu_count')} cores, {', '.join(env.get('cpu_isa') or [])}; "
        f"threads: {cfg.get('threads')}), torch {env.get('torch')}, fastflow "
        f"{(env.get('fastflow') or {}).get('version')} (git {env.get('git_revision')}), "
        f"{env.get('date')}"
        + (
            f", {result['seconds']['total']:.0f} s."
            if "total" in result.get("seconds", {})
            else "."
        ),
        "",
    ]
    rat = ratios(rows)
    if rat:
        lines += [
            "Ratio = peer / fastflow (above 1: fastflow faster or smaller), median [min-max] "
            "over interleaved rounds.",
            "",
            "| benchmark | case | metric | fastflow | peer | peer value | params fastflow / peer "
            "| ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rat:
            pf, pp = r["params_fastflow"], r["params_peer"]
            params = f"{pf} / {pp}" if pf and pp else "-"
            spread = f" [{r['min']:.2f}-{r['max']:.2f}]" if r["min"] != r["max"] else ""
            lines.append(
                f"| {r['bench']} | {r['case']} | {r['metric']} | {_num(r['fastflow'], r['unit'])} "
                f"{r['unit']} | {r['peer']} | {_num(r['peer_value'], r['unit'])} {r['unit']} | "
                f"{params} | {_ratio_cell(r['median'])}{spread} |"
            )
        lines.append("")
    lik = likelihood_rows(rows)
    if lik:
        lines += [
            "Likelihood after a fixed budget: test NLL, mean over seeds (spread = max - min), "
            "lower is better; floors are the true density (2-D toys) or the per-pixel histogram "
            "(images, a baseline every flow should beat).",
            "",
            "| case | library | params | test NLL | spread | above the floor | seeds | "
            "wall s per run | steps |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        floors = {r["case"]: r for r in lik if is_floor(r)}
        for r in lik:
            seeds = _list(r.get("seeds_values"))
            wall = _list(r.get("wall_s"))
            f = floors.get(r["case"])
            gap = "-" if f is None or r is f else f"{r['value'] - f['value']:+.3f}"
            spread = r.get("spread")
            fin = [v for v in seeds if _finite(v)]
            if spread is None and len(fin) > 1:
                spread = max(fin) - min(fin)
            lines.append(
                f"| {r['case']} | {r['impl']} | {r.get('params') or '-'} | "
                f"{_f4(r['value'])} {r['unit']} | {_f4(spread)} | {gap} | "
                f"{', '.join(_f4(v) for v in seeds) if seeds else '-'} | "
                f"{', '.join(f'{w:.1f}' for w in wall if _finite(w)) if wall else '-'} | "
                f"{'-' if is_floor(r) else r.get('steps') or '-'} |"
            )
        lines.append("")
    other = [
        r
        for r in rows
        if r not in lik
        and not any(
            (q["bench"], q["case"], q["metric"]) == (r["bench"], r["case"], r["metric"])
            for q in rat
        )
    ]
    if other:
        lines += ["Other measurements:", "", "| benchmark | case | metric | impl | value |"]
        lines.append("|---|---|---|---|---|")
        for r in other:
            lines.append(
                f"| {r['bench']} | {r['case']} | {r['metric']} | {r['impl']} | "
                f"{_num(r['value'], r['unit'])} {r['unit']} |"
            )
        lines.append("")
    secs = {k: v for k, v in result.get("seconds", {}).items() if k != "total"}
    if secs:
        lines.append("Seconds per benchmark: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
        lines.append("")
    if result.get("errors"):
        lines.append("Failed: " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items()))
        lines.append("")
    return "\n".join(lines)


# -- charts ---------------------------------------------------------------------------------------


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def speed_chart(result: dict, path: str) -> str | None:
    """Horizontal bars of peer / fastflow per measurement (min-max whiskers), a log axis when
    the ratios span more than a decade; time and memory in separate panels."""
    plt = _plt()
    rat = ratios(result["rows"])
    if plt is None or not rat:
        return None
    panels = [(u, [r for r in rat if r["unit"] == u]) for u in ("ms", "MiB")]
    panels = [(u, rs) for u, rs in panels if rs]
    heights = [max(1.5, 0.22 * len(rs) + 0.8) for _, rs in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(9, sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    colors = {}
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
    for ax, (unit, rs) in zip(axes[:, 0], panels):
        labels = [f"{r['bench']} {r['case']} {r['metric']} vs {r['peer']}" for r in rs]
        med = [r["median"] for r in rs]
        lo = [r["median"] - r["min"] for r in rs]
        hi = [r["max"] - r["median"] for r in rs]
        cs = [colors.setdefault(r["peer"], palette[len(colors) % len(palette)]) for r in rs]
        y = list(range(len(rs)))[::-1]
        ax.barh(y, med, xerr=[lo, hi], color=cs, height=0.7, capsize=2)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        pos = [v for r in rs for v in (r["min"], r["max"]) if v > 0]
        if pos and max(pos) / min(pos) > 10:
            from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

            ax.set_xscale("log")
            ticks = [m * 10.0**e for e in range(-3, 4) for m in (1, 2, 5)]
            ticks = [t for t in ticks if min(pos) / 2 <= t <= max(pos) * 2]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticklabels([f"{t:g}" for t in ticks])
        what = "time" if unit == "ms" else "peak memory"
        ax.set_xlabel(f"peer {what} / fastflow {what} (above 1: fastflow better)")
    env = result.get("environment", {})
    fig.suptitle(f"fastflow vs peers: {env.get('cuda_device') or env.get('cpu_model')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def likelihood_chart(result: dict, path: str) -> str | None:
    """One panel per likelihood case: a bar per library (mean, seed min-max whiskers), the
    floor (true density or per-pixel histogram) drawn as a dashed line."""
    plt = _plt()
    lik = likelihood_rows(result["rows"])
    if plt is None or not lik:
        return None
    cases: dict[str, list[dict]] = {}
    for r in lik:
        cases.setdefault(r["case"], []).append(r)
    n = len(cases)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    for ax, (case, rs) in zip(axes.flat, cases.items()):
        libs = [r for r in rs if not is_floor(r)]
        floors = [r for r in rs if is_floor(r)]
        vals = [r["value"] for r in libs]
        lo = [r["value"] - min(_list(r.get("seeds_values")) or [r["value"]]) for r in libs]
        hi = [max(_list(r.get("seeds_values")) or [r["value"]]) - r["value"] for r in libs]
        ax.bar(range(len(libs)), vals, yerr=[lo, hi], color="#4c72b0", capsize=3)
        ax.set_xticks(range(len(libs)))
        ax.set_xticklabels([r["impl"] for r in libs], fontsize=8, rotation=20)
        for f, style in zip(floors, ("--", ":", "-.")):
            ax.axhline(f["value"], color="#c44e52", ls=style, lw=1.2, label=f["impl"])
        finite = [v for v in vals + [f["value"] for f in floors] if _finite(v)]
        if finite:
            lo_y, hi_y = min(finite), max(finite)
            pad = 0.15 * (hi_y - lo_y) + 1e-3 * max(1.0, abs(hi_y))
            ax.set_ylim(lo_y - pad if lo_y - pad > 0 or lo_y < 0 else 0, hi_y + pad)
        ax.set_title(case, fontsize=9)
        ax.set_ylabel(f"test NLL ({rs[0]['unit']})", fontsize=8)
        if floors:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, base: str, charts: bool = True) -> list[str]:
    """``base.json``, ``base.md`` and (when matplotlib is installed) ``base-speed.png`` and
    ``base-likelihood.png``; returns the paths written."""
    files = [write_json(base + ".json", result)]  # first: a report bug must not lose the run
    md = base + ".md"
    with open(md + ".tmp", "w") as f:
        f.write(markdown(result))
    os.replace(md + ".tmp", md)
    files.append(md)
    if charts:
        for fn, suffix in ((speed_chart, "-speed.png"), (likelihood_chart, "-likelihood.png")):
            p = fn(result, base + suffix)
            if p:
                files.append(p)
    return files


def render(path: str, charts: bool = True) -> list[str]:
    """Write the markdown and charts of a saved run ``path`` (``.json``) again, next to it."""
    with open(path) as f:
        result = json.load(f)
    base = path[: -len(".json")] if path.endswith(".json") else path
    return write_outputs(result, base, charts)[1:]


# -- comparing two runs ---------------------------------------------------------------------------


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise ValueError(f"--compare: cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--compare: {path} is not JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("rows"), list) or "fastflow_bench" not in d:
        raise ValueError(f"--compare: {path} is not a result file of fastflow bench")
    return d


def compare(a_path: str, b_path: str) -> str:
    """The change from run A to run B: every measurement both have (B / A, lower is better for
    all units), then the peer / fastflow ratios of both. Returns the text (markdown tables).

    Raises:
        ValueError: a file that is missing or not a ``fastflow bench`` result.
    """
    a, b = _load(a_path), _load(b_path)
    key = lambda r: (r["bench"], r["case"], r["metric"], r["impl"])  # noqa: E731
    av = {key(r): r for r in a["rows"]}
    lines = []
    for tag, d, p in (("A", a, a_path), ("B", b, b_path)):
        env = d.get("environment", {})
        lines.append(
            f"{tag}: {p}: {env.get('date')}, {env.get('cuda_device') or env.get('cpu_model')}, "
            f"{d.get('config', {}).get('threads')} threads, git {env.get('git_revision')}"
        )
    lines += [
        "",
        "| benchmark | case | metric | impl | A | B | B / A |",
        "|---|---|---|---|---|---|---|",
    ]
    common = 0
    for r in b["rows"]:
        ra = av.get(key(r))
        if ra is None:
            continue
        common += 1
        x, y = ra["value"], r["value"]
        ch = f"{y / x:.3f}" if _finite(x) and _finite(y) and x != 0 else "-"
        lines.append(
            f"| {r['bench']} | {r['case']} | {r['metric']} | {r['impl']} | "
            f"{_num(x, r['unit'])} {r['unit']} | {_num(y, r['unit'])} {r['unit']} | {ch} |"
        )
    rk = lambda r: (r["bench"], r["case"], r["metric"], r["peer"])  # noqa: E731
    ra_ = {rk(r): r for r in ratios(a["rows"])}
    both = [(ra_[rk(r)], r) for r in ratios(b["rows"]) if rk(r) in ra_]
    if both:
        lines += [
            "",
            "| benchmark | case | metric | vs peer | ratio A | ratio B |",
            "|---|---|---|---|---|---|",
        ]
        for x, y in both:
            lines.append(
                f"| {y['bench']} | {y['case']} | {y['metric']} | {y['peer']} | "
                f"{x['median']:.2f}x | {y['median']:.2f}x |"
            )
    only_a = len(av) - common
    only_b = len(b["rows"]) - common
    lines += ["", f"{common} measurements in both; {only_a} only in A, {only_b} only in B."]
    return "\n".join(lines)
