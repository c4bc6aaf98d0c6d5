"""The Markdown reports pyadaq's commands write (docs/BENCHMARKS.md and its sections)."""

from __future__ import annotations

__all__ = ["MATRIX", "fixed", "kv_grid", "render_bench", "upsert_preamble", "upsert_section"]


def _no_negative_zero(text: str) -> str:
    """A formatted number without the sign of "-0.000..." (a KL of -1e-9 is float rounding,
    not a negative divergence)."""
    return text[1:] if text.startswith("-") and text.strip("-0.") == "" else text


def fixed(x: float, digits: int) -> str:
    """x with `digits` decimals, never "-0.000..."."""
    return _no_negative_zero(f"{x:.{digits}f}")


# the cache types of the K x V matrix in docs/RESULTS.md
MATRIX = ["f16", "q8_0", "q4_0", "kvq3", "kvq2"]


def _mean_sd(r: dict, key: str) -> str:
    m, sd = r[f"{key}_mean"], r[f"{key}_std"]
    if m is None:
        return "–"
    return f"{m:.1f}" if sd is None else f"{m:.1f} ± {sd:.1f}"


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _mib(v: int | None) -> str:
    return "–" if v is None else f"{v / 2**20:.1f}"


def render_bench(res: dict, command: str, mem_bandwidth_gbps: float | None = None,
                    heading: str = "# Speed and memory of the KV-cache configurations") -> str:
    """docs/BENCHMARKS.md from a bench run: speed and memory per config and depth, and how to
    rerun. mem_bandwidth_gbps: the device's peak memory bandwidth, for tg against its bound
    (bytes read per generated token / bandwidth). heading: the first line (a section of a
    longer document with ``## ...``)."""
    s = res["settings"]
    rows = res["results"]
    reps = res["reps"]
    spread = "mean ± sd" if reps > 1 else "one repetition, so no spread is given"
    out = [
        heading,
        "",
        (f"Model `{s['model_name']}`, {s['machine']}, backend {res['backend']}; {s['native']}; measured "
        f"{s['date']} in {s['seconds']:.0f} s. pp{res['n_prompt']}: prompt processing of {res['n_prompt']} tokens "
        f"in batches of {res['n_batch']}; tg{res['n_gen']}: {res['n_gen']} tokens generated one at a time; both "
        f"with `depth` tokens already in the cache, {reps} repetition{'s' if reps != 1 else ''} ({spread}), "
        "flash attention on"
        + ("" if res.get("swa_full", True) else "; sliding-window layers keep only their window (--no-swa-full)")
        + ". The ratios are to f16/f16 at the same depth in the same run. Peak RSS growth: "
        "the process's peak resident memory over the context's life (cache, compute buffers, scratch), above "
        "what it was before the context was created."),
        "",
        f"Rerun: `{command}`",
        "",
        "| config | depth | KV MiB | KV / f16 | peak RSS growth MiB | memory / f16 | pp t/s | pp / f16 | tg t/s "
        "| tg / f16 | MB read / token | tg GB/s |" + (" tg / bound |" if mem_bandwidth_gbps else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if mem_bandwidth_gbps else ""),
    ]
    for r in rows:
        bpt = r.get("tg_bytes_per_token")
        gbps = r.get("tg_gbps")
        line = (f"| {r['config']} | {r['depth']} | {r['kv_bytes'] / 2**20:.2f} | {_ratio(r.get('kv_vs_f16'))} | "
                f"{_mib(r.get('peak_rss_growth_bytes'))} | {_ratio(r.get('memory_vs_f16'))} | "
                f"{_mean_sd(r, 'pp')} | {_ratio(r['pp_vs_f16'])} | {_mean_sd(r, 'tg')} | {_ratio(r['tg_vs_f16'])} | "
                f"{'–' if bpt is None else f'{bpt / 1e6:.1f}'} | {'–' if gbps is None else f'{gbps:.1f}'} |")
        if mem_bandwidth_gbps:
            line += " – |" if gbps is None else f" {gbps / mem_bandwidth_gbps:.2f} |"
        out.append(line)
    deepest = max(r["depth"] for r in rows)
    base = next((r for r in rows if r["config"] == "f16:f16" and r["depth"] == deepest), None)
    saved = []
    for r in rows:
        if base is None or r is base or r["depth"] != deepest:
            continue
        mem, ref = r.get("peak_rss_growth_bytes"), base.get("peak_rss_growth_bytes")
        if mem is not None and ref is not None:
            saved.append(f"- {r['config']}: {(ref - mem) / 2**20:.1f} MiB less peak memory than f16/f16, against "
                         f"{(base['kv_bytes'] - r['kv_bytes']) / 2**20:.1f} MiB less KV cache")
    if saved:
        out += ["", f"At depth {deepest}, what each config saves against f16/f16:", "", *saved]
    for n in res.get("noisy_baseline", []):
        out += ["", (f"Note: at depth {n['depth']} f16/f16's {n['test']} varied by {100 * n['f16_relative_sd']:.0f} % "
                    f"(sd / mean) against {100 * n['others_min']:.0f} % for the steadiest config: the {n['test']} "
                    "ratios at that depth are mostly the machine's noise.")]
    out.append("")
    return "\n".join(out)


def upsert_section(document: str, section: str) -> str:
    """``document`` with the ``## `` section that has ``section``'s heading replaced by it, or
    with it appended."""
    heading = section.splitlines()[0]
    lines = document.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = [*section.rstrip("\n").splitlines(), ""]
        return "\n".join(lines).rstrip("\n") + "\n"
    return document.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"


def upsert_preamble(document: str, preamble: str) -> str:
    """``document`` with everything before its first ``## `` section replaced by ``preamble``
    (the sections are kept)."""
    lines = document.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    rest = "\n".join(lines[first:]).strip("\n")
    return preamble.rstrip("\n") + "\n" + ("\n" + rest + "\n" if rest else "")


def kv_grid(by: dict, key: str, fmt: str, ks: list | None = None, vs: list | None = None) -> list[str]:
    """A Markdown K x V table of one figure of the results ``by[(k, v)]``; rows ks and columns vs
    (default: the matrix's types)."""
    ks, vs = ks or MATRIX, vs or MATRIX
    rows = ["| K \\ V | " + " | ".join(vs) + " |", "|---|" + "---:|" * len(vs)]
    for k in ks:
        cells = []
        for v in vs:
            r = by.get((k, v))
            ok = r is not None and r.get(key) is not None
            cells.append(_no_negative_zero(fmt.format(r[key])) if ok else "–")
        rows.append(f"| **{k}** | " + " | ".join(cells) + " |")
    return rows
