"""Render the results (``bench/results/*.json``) into BENCHMARKS.md tables and PNG plots.

BENCHMARKS.md is partly written by hand (method, analysis) and partly generated: each
benchmark owns the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``,
which this module replaces; everything else is kept as it is.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procs import REPO
from bench.stats import fmt_spread

logger = logging.getLogger(__name__)

REPORT = REPO / "BENCHMARKS.md"
PLOTS = REPO / "bench" / "plots"
DPI = 90


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` in ``results_dir``, by benchmark name."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        out[str(data.get("benchmark") or path.stem)] = data
    return out


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _ms(s: dict[str, Any] | None, signed: bool = False) -> str:
    return fmt_spread(s, "{:+.1f}" if signed else "{:.1f}")


def _x(s: dict[str, Any] | None) -> str:
    return fmt_spread(s, "{:.2f}", "×")


def _meta(data: dict[str, Any]) -> str:
    m = data.get("machine_before") or {}
    after = data.get("machine_after") or {}
    return (
        f"_{data.get('date', '?')} · setting `{data.get('setting')}` · {data.get('duration_s', '?')} s · commit {data.get('git_commit') or '?'} · "
        f"{m.get('cpus', '?')} CPUs ({m.get('cpu', '?')}) · load average {m.get('load_avg_1_5_15', ['?'])[0]} before, "
        f"{after.get('load_avg_1_5_15', ['?'])[0]} after_"
    )


def _image(name: str, plots_rel: str) -> str:
    return f"![{name}]({plots_rel}/{name}.png)"


# -- gateway overhead ------------------------------------------------------------------


def gateway_section(data: dict[str, Any], plots_rel: str) -> str:
    summary = data["summary"]
    goals = data["goals"]
    others = _gateway_targets(data)
    head = "| cell | direct p50 / p99 (ms) | direct req/s |"
    rule = "|---|---|---|"
    for t in others:
        head += f" {t}: added p50 (ms) | {t}: added p99 (ms) | {t}: throughput × direct |"
        rule += "---|---|---|"
    lines = [_meta(data), "", head, rule]
    for cell, row in summary.items():
        d = row["direct"]
        line = f"| {cell} | {_ms(d['p50_ms'])} / {_ms(d['p99_ms'])} | {fmt_spread(d['requests_per_s'], '{:.0f}')} |"
        for t in others:
            r = row[t]
            line += f" {_ms(r['p50_added_ms'], True)} | {_ms(r['p99_added_ms'], True)} | {_x(r['throughput_ratio'])} |"
        lines.append(line)
    rounds = data.get("rounds_done", data.get("settings", {}).get("rounds"))
    lines += [
        "",
        f"Cells: `unary`/`stream` × concurrency. Each figure is the median over {rounds} round(s) (range in brackets); "
        "direct's columns are absolute, the others are differences from direct in the same round.",
        "",
    ]
    # CPU per request: the steadier figure on a shared machine (waiting for a core costs no CPU).
    head = "| cell | fake worker CPU ms/request |" + "".join(f" {t} CPU ms/request |" for t in others)
    rule = "|---|---|" + "---|" * len(others)
    if "litellm" in others:
        head += " LiteLLM ÷ forgeline |"
        rule += "---|"
    lines += [head, rule]
    for cell, row in summary.items():
        cpu = {t: row[t].get("server_cpu_ms_per_request") for t in ["direct", *others]}
        line = f"| {cell} |" + "".join(f" {fmt_spread(cpu[t], '{:.2f}')} |" for t in ["direct", *others])
        if "litellm" in others:
            f, ll = (cpu["forgeline"] or {}).get("median"), (cpu["litellm"] or {}).get("median")
            line += f" {ll / f:.1f}× |" if f and ll else " n/a |"
        lines.append(line)
    lines.append("")
    lines.append("| goal | forgeline (worst cell) | verdict |")
    lines.append("|---|---|---|")
    checks = goal_checks(data)
    lines.append(f"| p50 added ≤ {goals['p50_added_ms']:g} ms at concurrency 1 | {checks['p50_worst']:+.1f} ms | {_verdict(checks['p50_ok'])} |")
    lines.append(f"| p99 added ≤ {goals['p99_added_ms']:g} ms | {checks['p99_worst']:+.1f} ms | {_verdict(checks['p99_ok'])} |")
    lines.append(f"| throughput ≥ {goals['throughput_ratio']:g}× direct at concurrency ≥ 16 | {checks['thr_worst']:.2f}× | {_verdict(checks['thr_ok'])} |")
    if checks["vs_litellm"] is not None:
        lines.append(
            f"| lower overhead than LiteLLM | lower added p50 in {checks['vs_litellm_cells']} of {len(summary)} cells | {_verdict(checks['vs_litellm'])} |"
        )
        ratio = checks["cpu_vs_litellm_worst"]
        lines.append(f"| ≤ 1/5 of LiteLLM's CPU per request, every cell | LiteLLM ÷ forgeline ≥ {ratio:.1f}× | {_verdict(ratio >= 5)} |")
    else:
        lines.append("| lower overhead than LiteLLM | LiteLLM not measured | n/a |")
    cpu_worst = checks["cpu_worst"]
    lines.append(f"| ≤ 1 ms gateway CPU per request | {cpu_worst:.2f} ms | {_verdict(cpu_worst <= 1.0)} |")
    for note in data.get("notes", []):
        lines.append(f"\n> {note}")
    lines += ["", _image("gateway_overhead", plots_rel)]
    return "\n".join(lines)


def _gateway_targets(data: dict[str, Any]) -> list[str]:
    """The targets compared with direct: forgeline, its multi-process runs, LiteLLM."""
    extra = sorted(t for t in data["targets"] if t.startswith("forgeline-"))
    return [t for t in ("forgeline", *extra, "litellm") if t in data["targets"]]


def goal_checks(data: dict[str, Any]) -> dict[str, Any]:
    """Worst forgeline cell against each goal, and cells where forgeline beats LiteLLM."""
    goals = data["goals"]
    cells = data["summary"].values()
    # As issue 15 states them: added p50 at concurrency 1, throughput at concurrency 16 and up.
    single = [c for k, c in data["summary"].items() if k.endswith("-c1")]
    loaded = [c for k, c in data["summary"].items() if not k.endswith("-c1")] or single
    p50 = [c["forgeline"]["p50_added_ms"]["median"] for c in single if c["forgeline"]["p50_added_ms"]["median"] is not None]
    p99 = [c["forgeline"]["p99_added_ms"]["median"] for c in cells if c["forgeline"]["p99_added_ms"]["median"] is not None]
    thr = [c["forgeline"]["throughput_ratio"]["median"] for c in loaded if c["forgeline"]["throughput_ratio"]["median"] is not None]
    out: dict[str, Any] = {
        "p50_worst": max(p50, default=float("nan")),
        "p99_worst": max(p99, default=float("nan")),
        "thr_worst": min(thr, default=float("nan")),
    }
    out["p50_ok"] = bool(p50) and out["p50_worst"] <= goals["p50_added_ms"]
    out["p99_ok"] = bool(p99) and out["p99_worst"] <= goals["p99_added_ms"]
    out["thr_ok"] = bool(thr) and out["thr_worst"] >= goals["throughput_ratio"]
    cpu = [(c["forgeline"].get("server_cpu_ms_per_request") or {}).get("median") for c in cells]
    out["cpu_worst"] = max((v for v in cpu if v is not None), default=float("nan"))
    if "litellm" in data["targets"]:
        ratios = [
            c["litellm"]["server_cpu_ms_per_request"]["median"] / c["forgeline"]["server_cpu_ms_per_request"]["median"]
            for c in cells
            if c.get("litellm")
            and (c["litellm"].get("server_cpu_ms_per_request") or {}).get("median")
            and (c["forgeline"].get("server_cpu_ms_per_request") or {}).get("median")
        ]
        out["cpu_vs_litellm_worst"] = min(ratios, default=float("nan"))
        better = [
            c["forgeline"]["p50_added_ms"]["median"] < c["litellm"]["p50_added_ms"]["median"]
            for c in cells
            if c.get("litellm") and c["litellm"]["p50_added_ms"]["median"] is not None
        ]
        out["vs_litellm_cells"] = sum(better)
        out["vs_litellm"] = bool(better) and all(better)
    else:
        out["vs_litellm"] = None
        out["vs_litellm_cells"] = 0
    return out


def gateway_plot(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    summary = data["summary"]
    cells = list(summary)
    others = _gateway_targets(data)
    colors = {"forgeline": "#2b6cb0", "litellm": "#c05621", "forgeline-2p": "#2f855a"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / max(1, len(others))
    for i, t in enumerate(others):
        xs = [k + (i - (len(others) - 1) / 2) * width for k in range(len(cells))]
        for ax, key, floor in ((ax1, "p50_added_ms", 0.1), (ax2, "throughput_ratio", 0.0)):
            # Latency on a log axis (1 ms and 4 s in one plot): clip at a floor above zero.
            med = [max(summary[c][t][key]["median"] or 0, floor) for c in cells]
            lo = [m - max(summary[c][t][key]["min"] or m, floor) for m, c in zip(med, cells, strict=True)]
            hi = [max((summary[c][t][key]["max"] or m) - m, 0) for m, c in zip(med, cells, strict=True)]
            ax.bar(xs, med, width, yerr=[[max(x, 0) for x in lo], hi], capsize=2, label=t, color=colors.get(t, "#718096"))
    ax1.axhline(data["goals"]["p50_added_ms"], color="green", linestyle="--", linewidth=1, label="goal")
    ax1.set_yscale("log")
    ax1.set_ylabel("added p50 latency (ms, log)")
    ax2.axhline(data["goals"]["throughput_ratio"], color="green", linestyle="--", linewidth=1, label="goal")
    ax2.axhline(1.0, color="grey", linewidth=0.5)
    ax2.set_ylabel("throughput × direct")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels(cells, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle("Gateway overhead over a fake worker (median of rounds, range as error bars)", fontsize=10)
    _save(fig, path)


# -- engine batching -------------------------------------------------------------------


def batching_section(data: dict[str, Any], plots_rel: str) -> str:
    s = data["summary"]
    ratio = s["tokens_per_s_ratio"]
    ok = ratio["median"] is not None and ratio["median"] >= data["goal_ratio"]
    params = data["model"].get("parameters")
    lines = [
        _meta(data),
        "",
        f"Model: `{data['model']['name']}` Llama ({params / 1e6:.1f}M parameters, random weights), "
        f"{data['settings']['requests']} requests × {data['settings']['max_tokens']} new tokens, greedy, "
        f"{data['cpu_threads']} CPU thread(s) each, {len(data['rounds']['batched'])} round(s).",
        "",
        "| | tokens/s | TTFT p50 / p90 / p99 (ms) | inter-token p50 / p90 / p99 (ms) |",
        "|---|---|---|---|",
    ]
    for key, label in (("one_by_one", "one-by-one `generate`"), ("batched", "TorchEngine, batched")):
        r = s[key]
        lines.append(
            f"| {label} | {fmt_spread(r['tokens_per_s'], '{:.0f}')} | "
            f"{_ms(r['ttft_p50_ms'])} / {_ms(r['ttft_p90_ms'])} / {_ms(r['ttft_p99_ms'])} | "
            f"{_ms(r['itl_p50_ms'])} / {_ms(r['itl_p90_ms'])} / {_ms(r['itl_p99_ms'])} |"
        )
    lines += [
        "",
        f"Batched over one-by-one: **{_x(ratio)}** tokens/s (goal ≥ {data['goal_ratio']:g}×: {_verdict(ok)}).",
        "",
        _image("engine_batching", plots_rel),
    ]
    return "\n".join(lines)


def batching_plot(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    s = data["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = ["one-by-one", "batched"]
    vals = [s["one_by_one"]["tokens_per_s"]["median"] or 0, s["batched"]["tokens_per_s"]["median"] or 0]
    ax1.bar(labels, vals, color=["#a0aec0", "#2b6cb0"])
    ax1.set_ylabel("tokens/s")
    ax1.set_title(f"throughput ({_x(s['tokens_per_s_ratio'])})", fontsize=9)
    qs = ["p50", "p90", "p99"]
    for i, (key, color) in enumerate((("one_by_one", "#a0aec0"), ("batched", "#2b6cb0"))):
        ax2.bar([k + (i - 0.5) * 0.4 for k in range(3)], [s[key][f"ttft_{q}_ms"]["median"] or 0 for q in qs], 0.4, label=labels[i], color=color)
    ax2.set_xticks(range(3))
    ax2.set_xticklabels([f"TTFT {q}" for q in qs])
    ax2.set_ylabel("ms (from submission)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"PyTorch engine: {data['settings']['requests']} concurrent requests", fontsize=10)
    _save(fig, path)


# -- open-loop engine load ---------------------------------------------------------------

OPEN_LOOP_LABELS = {"static": "static engine", "continuous": "continuous engine", "transformers_serve": "`transformers serve`"}


def _r(x: float | None, fmt: str = "{:.2f}×") -> str:
    return "n/a" if x is None else fmt.format(x)


def _span(x: Any) -> str:
    return f"{x[0]}–{x[1]} (uniform per request)" if isinstance(x, list) else str(x)


def _open_loop_requests(cfg: dict[str, Any]) -> str:
    text = f"{cfg['requests']} requests per rate"
    if cfg.get("saturating_rates"):
        rates = " and ".join(f"{r:g}" for r in cfg["saturating_rates"])
        text += f" ({cfg['saturating_requests']} at {rates} requests/s, to average over more static batches)"
    return text


def open_loop_section(data: dict[str, Any], plots_rel: str) -> str:
    cfg = data["settings"]
    lines = [
        _meta(data),
        "",
        f"Model: `{cfg['model']}` Llama (random weights), {_open_loop_requests(cfg)}, max_tokens {_span(cfg['max_tokens'])}, "
        f"greedy, Poisson arrivals (same schedule and prompts for every target), {cfg['threads']} CPU thread(s) per server, "
        f"max_batch_size {cfg.get('max_batch_size', 16)} for our engines. "
        "The 1-minute load average when each rate finished is in the last column.",
        "",
        "| target | rate (req/s) | tokens/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) | e2e p50 / p99 (ms) | errors | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, result in data["targets"].items():
        label = OPEN_LOOP_LABELS.get(target, target)
        if not result.get("rates"):
            lines.append(f"| {label} | did not run: {str(result.get('error', '?')).splitlines()[0][:120]} | | | | | | |")
            continue
        for r in result["rates"]:
            ttft, itl, e2e = r["ttft_ms"], r["itl_ms"], r["e2e_ms"]
            lines.append(
                f"| {label} | {r['rate_per_s']:g} | {r['tokens_per_s']:.0f} | {_r(ttft['p50'], '{:.0f}')} / {_r(ttft['p99'], '{:.0f}')} "
                f"| {_r(itl['p50'], '{:.0f}')} / {_r(itl['p99'], '{:.0f}')} | {_r(e2e['p50'], '{:.0f}')} / {_r(e2e['p99'], '{:.0f}')} "
                f"| {r['errors']} | {r.get('load_avg_1m', '?')} |"
            )
    lines += [
        "",
        "Continuous engine against the others (below 1 is better for TTFT and e2e, above 1 for tokens/s):",
        "",
        "| rate (req/s) | vs static: TTFT p99 | tokens/s | e2e p99 | vs `transformers serve`: TTFT p99 | tokens/s | e2e p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data.get("ratios", []):
        st, ts = row.get("vs_static") or {}, row.get("vs_transformers_serve") or {}
        lines.append(
            f"| {row['rate_per_s']:g} | {_r(st.get('ttft_p99'))} | {_r(st.get('tokens_per_s'))} | {_r(st.get('e2e_p99'))} "
            f"| {_r(ts.get('ttft_p99'))} | {_r(ts.get('tokens_per_s'))} | {_r(ts.get('e2e_p99'))} |"
        )
    prefix = data.get("prefix_reuse")
    if prefix:
        off, on = prefix["off"], prefix["on"]
        lines += [
            "",
            f"Prefix reuse (in process, requests one after another sharing a system prompt; {on['prompt_tokens']}-token prompts): "
            f"TTFT p50 {_r(off['ttft_ms']['p50'], '{:.0f}')} ms with the prefix cache off, {_r(on['ttft_ms']['p50'], '{:.0f}')} ms "
            f"on (**{_r(prefix['ttft_p50_ratio_on_vs_off'])}**; {on['reused_tokens']} prompt tokens reused).",
        ]
    cost = data.get("step_cost")
    if cost:
        steps, long = cost["by_rows"], cost["long_context"]
        lines += [
            "",
            f"The model's own cost on this CPU (thread CPU time, {steps[0]['context']}-column context, the engine's KV cache): "
            "a decode step by batch rows, and prefill per prompt column.",
            "",
            "| rows | decode step (ms) | per token (ms) | prefill per column (ms) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {s['rows']} | {s['step_ms']:.1f} | {s['ms_per_token']:.2f} | {s['prefill_ms_per_column']:.2f} |"
            for s in steps
        ]
        lines += [
            "",
            f"A decode step of {long['rows']} rows at a {long['context']}-column context: {long['dynamic_cache_step_ms']:.1f} ms "
            f"on transformers' `DynamicCache` (a concatenation per layer per step), {long['engine_cache_step_ms']:.1f} ms on the "
            f"engine's in-place growable layers (**{_r(long['engine_cache_step_ms'] / long['dynamic_cache_step_ms'])}**).",
        ]
    lines += ["", _image("open_loop", plots_rel)]
    return "\n".join(lines)


def open_loop_plot(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    colors = {"static": "#a0aec0", "continuous": "#2b6cb0", "transformers_serve": "#dd6b20"}
    for target, result in data["targets"].items():
        rates = result.get("rates") or []
        if not rates:
            continue
        xs = [r["rate_per_s"] for r in rates]
        label = OPEN_LOOP_LABELS.get(target, target).strip("`")
        ax1.plot(xs, [r["ttft_ms"]["p99"] or 0 for r in rates], marker="o", label=label, color=colors.get(target))
        ax2.plot(xs, [r["tokens_per_s"] for r in rates], marker="o", label=label, color=colors.get(target))
    ax1.set_xlabel("arrival rate (req/s)")
    ax1.set_ylabel("TTFT p99 (ms)")
    ax2.set_xlabel("arrival rate (req/s)")
    ax2.set_ylabel("tokens/s")
    ax1.legend(fontsize=8)
    fig.suptitle("PyTorch engines under Poisson arrivals", fontsize=10)
    _save(fig, path)


# -- multi-LoRA ------------------------------------------------------------------------


def multi_lora_section(data: dict[str, Any], plots_rel: str) -> str:
    s = data["summary"]
    ratio = s["tokens_per_s_ratio"]
    ok = ratio["median"] is not None and ratio["median"] >= data["goal_ratio"]
    cfg = data["settings"]
    params = data["model"].get("parameters")
    size = f"{params / 1e6:.1f}M parameters" if params else "the tiny base"
    lines = [
        _meta(data),
        "",
        f"Model: `{data['model']['name']}` Llama ({size}); {cfg['adapters']} LoRA adapters (r={cfg['rank']}, every linear layer); "
        f"{cfg['requests']} requests × {cfg['max_tokens']} tokens from {cfg['concurrency']} closed-loop clients, "
        f"{data['distinct_adapters_in_traffic']} distinct adapters in the traffic; {data['cpu_threads']} CPU thread(s); "
        f"{len(data['rounds'])} round(s).",
        "",
        "| | tokens/s |",
        "|---|---|",
        f"| 1 merged model | {fmt_spread(s['merged_tokens_per_s'], '{:.0f}')} |",
        f"| {cfg['adapters']} adapters on one base, mixed | {fmt_spread(s['lora_tokens_per_s'], '{:.0f}')} |",
        "",
        f"Adapters over merged: **{_x(ratio)}** (goal ≥ {data['goal_ratio']:g}×: {_verdict(ok)}). "
        f"Cold start: the first request of each of the {data['loaded_adapters']} adapters, its load and its prefill, "
        f"{s['cold_start_s']:.1f} s (loading alone is timed below).",
        "",
        *_multi_lora_loading(data),
        _image("multi_lora", plots_rel),
    ]
    return "\n".join(lines)


def _multi_lora_loading(data: dict[str, Any]) -> list[str]:
    loading = data.get("loading")
    if not loading:
        return []
    names = {"base": f"`{data['model']['name']}`", "tiny": "tiny base"}
    lines = [
        f"Loading {data['settings']['adapters']} adapters alone, same run (old: through PEFT; new: files into stacked slots):",
        "",
        "| base | PEFT (old) | stacked (new) | speed-up |",
        "|---|---|---|---|",
    ]
    for key, t in loading.items():
        old, speedup = (f"{t['peft_s']:.2f} s", f"{t['speedup']:.0f}×") if "peft_s" in t else ("not measured", "")
        lines.append(f"| {names.get(key, key)} | {old} | {t['stacked_s']:.2f} s | {speedup} |")
    step = data.get("decode_step")
    if step:
        lines = [
            f"The model's decode step alone (no engine), {step['rows']} rows each with its own adapter: merged "
            f"{fmt_spread(step['merged_ms'], '{:.1f}')} ms, stacked {fmt_spread(step['lora_ms'], '{:.1f}')} ms, "
            f"speed ratio **{_x(step['speed_ratio'])}** (the closed loop's ratio also carries the engine's per-token "
            "work, the same for both).",
            *_weight_reads(step),
            "",
            *lines,
        ]
    tiny = loading.get("tiny", loading.get("base"))
    goal = data.get("goal_load_s")
    if goal is not None and tiny is not None and data["settings"]["adapters"] >= 50:  # the goal is 50 adapters'
        lines += ["", f"Goal: ≤ {goal:g} s on the tiny base: {_verdict(tiny['stacked_s'] <= goal)}."]
    return [*lines, ""]


def _weight_reads(step: dict[str, Any]) -> list[str]:
    reads = step.get("weight_reads")
    if not reads:
        return []
    return [
        f"Such a step reads the base's {reads['base'] / 1e6:.1f}M weights once and {step['rows']} adapters' "
        f"{reads['lora'] / 1e6:.1f}M LoRA weights, one per row (**{reads['lora_over_base']:.2f}×** the base's): "
        "a CPU decode step is mostly these reads, so its speed ratio follows this share (the step's other work, such as "
        "attention, is the same for both)."
    ]


def multi_lora_plot(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    s = data["summary"]
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = ["merged", f"{data['settings']['adapters']} adapters"]
    keys = ["merged_tokens_per_s", "lora_tokens_per_s"]
    med = [s[k]["median"] or 0 for k in keys]
    err = [[m - (s[k]["min"] or m) for m, k in zip(med, keys, strict=True)], [(s[k]["max"] or m) - m for m, k in zip(med, keys, strict=True)]]
    ax.bar(labels, med, yerr=err, capsize=3, color=["#a0aec0", "#2b6cb0"])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Multi-LoRA, mixed traffic ({_x(s['tokens_per_s_ratio'])} of merged)", fontsize=10)
    _save(fig, path)


# -- lead time -------------------------------------------------------------------------


def _follow(data: dict[str, Any]) -> str:
    """How the gateway followed the alias in that run (results before the watcher lack it)."""
    watch = data.get("watch_interval_s")
    poll = f"alias re-read every {data['poll_interval_s']:g} s"
    return f"audit-log watch every {watch:g} s, {poll}" if watch else f"gateway {poll}, no watch"


def lead_time_section(data: dict[str, Any], plots_rel: str) -> str:
    p1 = data["recipe_to_endpoint"]
    p2 = data["promotion_to_serving"]["summary"]
    lines = [_meta(data), "", f"Recipe: `{data['recipe']}`.", "", "| stage | seconds |", "|---|---|"]
    for stage, seconds in p1["stages_s"].items():
        lines.append(f"| {stage} | {seconds:.1f} |")
    lines += [
        f"| **recipe → first answer** | **{p1['total_s']:.1f}** |",
        "",
        f"Training is {p1['train_share'] * 100:.0f} % of the lead time ({p1['stages_s']['train']:.1f} s of {p1['total_s']:.1f} s); "
        "`serve` is `forgeline serve` starting as a process until its first answer.",
        "",
        "Promotion → first answer from the new version (" + _follow(data) + "):",
        "",
        "| | seconds | failed requests meanwhile |",
        "|---|---|---|",
        f"| hot swap (gateway follows the alias) | {fmt_spread(p2['hot_swap_s'], '{:.1f}')} | {p2['failed_requests_during_hot_swaps']} |",
        f"| restart (promote, stop, start `forgeline serve`) | {fmt_spread(p2['restart_s'], '{:.1f}')} | every request until it is up |",
    ]
    if p2.get("hot_swap_over_restart"):
        lines += ["", f"Hot swap takes {p2['hot_swap_over_restart']:.2f}× the time of a restart, without dropping requests."]
    lines += ["", _image("lead_time", plots_rel)]
    return "\n".join(lines)


def lead_time_plot(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    p1 = data["recipe_to_endpoint"]["stages_s"]
    p2 = data["promotion_to_serving"]["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 2.8), gridspec_kw={"width_ratios": [3, 2]})
    left = 0.0
    palette = ["#718096", "#2b6cb0", "#38a169", "#d69e2e", "#805ad5", "#c05621", "#319795"]
    for i, (stage, seconds) in enumerate(p1.items()):
        ax1.barh([0], [seconds], left=left, color=palette[i % len(palette)], label=stage)
        left += seconds
    ax1.set_yticks([])
    ax1.set_xlabel("seconds")
    ax1.set_title("recipe → first answer", fontsize=9)
    ax1.legend(fontsize=7, ncol=len(p1), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    labels, vals = [], []
    for key, label in (("hot_swap_s", "hot swap"), ("restart_s", "restart")):
        if p2[key]["median"] is not None:
            labels.append(label)
            vals.append(p2[key]["median"])
    ax2.bar(labels, vals, color=["#2b6cb0", "#a0aec0"][: len(vals)])
    ax2.set_ylabel("seconds")
    ax2.set_title(f"promotion → new version answers (poll {data['poll_interval_s']:g} s)", fontsize=9)
    _save(fig, path)


# -- training overhead (bench/train_overhead.py, another benchmark's own JSON) -------------


def train_overhead_section(data: dict[str, Any], plots_rel: str) -> str:
    """Generic: every repeated figure (``{"median", "min", "max", ...}``) at the top level or in ``summary``."""
    lines = [_meta(data), ""]
    if data.get("what"):
        lines += [f"Figure: {data['what']}.", ""]
    figures = {**{k: v for k, v in data.items() if isinstance(v, dict) and "median" in v}, **(data.get("summary") or {})}
    lines += ["| figure | median (range) |", "|---|---|"]
    for key, value in figures.items():
        if isinstance(value, dict) and "median" in value:
            lines.append(f"| {key} | {fmt_spread(value, '{:.3f}')} |")
    if data.get("goal"):
        lines += ["", f"Goal: {data['goal']}."]
    return "\n".join(lines)


SECTIONS: dict[str, tuple[Callable[[dict[str, Any], str], str], Callable[[dict[str, Any], Path], None] | None]] = {
    "gateway_overhead": (gateway_section, gateway_plot),
    "engine_batching": (batching_section, batching_plot),
    "open_loop": (open_loop_section, open_loop_plot),
    "multi_lora": (multi_lora_section, multi_lora_plot),
    "train_overhead": (train_overhead_section, None),
    "lead_time": (lead_time_section, lead_time_plot),
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    logger.info("wrote %s (%d KB)", path, path.stat().st_size // 1024)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def render(results_dir: Path, report: Path = REPORT, plots_dir: Path = PLOTS) -> list[str]:
    """Update the generated sections of ``report`` and the plots from ``results_dir``; returns the sections updated."""
    results = load_results(results_dir)
    try:
        plots_rel = str(plots_dir.resolve().relative_to(report.resolve().parent))
    except ValueError:
        plots_rel = str(plots_dir.resolve())
    text = report.read_text() if report.is_file() else _skeleton()
    updated = []
    for name, (section, plot) in SECTIONS.items():
        data = results.get(name)
        if data is None:
            continue
        try:
            body = section(data, plots_rel)
            if plot is not None:
                plot(data, plots_dir / f"{name}.png")
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("could not render %s: %s", name, exc)
            continue
        start, end = _markers(name)
        block = f"{start}\n{body}\n{end}"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _m, b=block: b, text) if pattern.search(text) else text.rstrip() + f"\n\n## {name}\n\n{block}\n"
        updated.append(name)
    gpu = results_dir / "gpu-bench.md"  # written by bench/gpu.sh on a GPU machine
    start, end = _markers("gpu")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if gpu.is_file() and pattern.search(text):
        block = f"{start}\n{gpu.read_text().strip()}\n{end}"
        text = pattern.sub(lambda _m: block, text)
        updated.append("gpu")
    report.write_text(text)
    logger.info("updated %s: %s", report, ", ".join(updated) or "nothing")
    return updated


def _skeleton() -> str:
    parts = ["# forgeline benchmarks", "", "Generated by `make bench` (`python -m bench`).", ""]
    for name in SECTIONS:
        start, end = _markers(name)
        parts += [f"## {name}", "", start, "_not run yet_", end, ""]
    return "\n".join(parts)
