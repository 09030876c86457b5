"""The benchmark's report: throughput.md (one table per model, notes per path) and the
files written beside it (throughput.json, throughput.parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.benchmarking.history import records_frame
from pipelines.benchmarking.rows import MIXED_STEP_FRACTIONS

PATH_LABEL = {"plain": "plain diffusers", "actor": "diffsweep actor", "ray": "diffsweep Ray job"}


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def _bytes(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"


def configuration(r: dict) -> str:
    if r.get("sweep") == "mixed":
        steps = sorted({max(1, round(r["steps"] * f)) for f in MIXED_STEP_FRACTIONS})
        return (f"{r['height']}x{r['width']}, mixed sweep of {r['rows']} rows: "
                f"{' / '.join(r['schedulers'].split(','))} x {steps} steps x CFG {sorted({1.0, 4.0, r['guidance']})} "
                f"(FLOPs averaged over the rows)")
    return f"{r['height']}x{r['width']}, {r['steps']} {r['scheduler']} steps, CFG {r['guidance']:g}"


def _flops_note(recs: list[dict]) -> str:
    """FLOPs per image, both figures when feature reuse makes the actor's differ from plain diffusers'."""
    by_interval = {r.get("cache_interval") or 1: r["flops_per_image"] for r in recs}
    if len(by_interval) == 1:
        return f"FLOPs per image {next(iter(by_interval.values())) / 1e12:.4g} TFLOP"
    return "FLOPs per image " + ", ".join(f"{v / 1e12:.4g} TFLOP at cache_interval {k}"
                                          for k, v in sorted(by_interval.items()))


def _table_row(r: dict, show_busy: bool) -> str:
    row = (f"| {_label(r)} | {r['batch_size']} | {r['images_per_s']:.3g} | {r['s_per_image']:.3g} | "
           f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% | {_bytes(r['peak_mem_bytes'])} | "
           f"{_fmt(r.get('vs_plain'), '.2f', '-')}x |")
    if show_busy:
        row += f" {_fmt(_busy(r) and 100 * _busy(r), '.0f', '-')}% |"
    return row.replace("| n/a% |", "| n/a |").replace("| -% |", "| - |")


def _reference_line(r: dict, recs: list[dict]) -> str:
    """Half precision: how far the path is from the float32 reference, next to plain diffusers."""
    head = (f"- batch {r['batch_size']}: {_label(r)} ({r['dtype']}): mean |difference| to the float32 reference "
            f"{r['fp32_mean_diff']:.2f} levels over {r['reference_images']} images")
    if r["path"] == "plain":
        return head + " (the precision's own error; the other paths may have up to --half-tolerance x this + 0.5)."
    verdict = {True: "as accurate as plain diffusers", False: "LESS ACCURATE than plain diffusers",
               None: "not checked (no plain diffusers figure)"}[r.get("pixels_match")]
    plain = next((p for p in recs if p["path"] == "plain" and p["batch_size"] == r["batch_size"]), None)
    return (head + (f" (plain diffusers {plain['fp32_mean_diff']:.2f})" if plain and plain.get("fp32_mean_diff")
                    is not None else "") + f" -> {verdict}" + (f" ({r['errors']} error rows)" if r["errors"] else "")
            + ".")


def _busy_legend(recs: list[dict]) -> str:
    """What the busy column means for each kind of path in the table."""
    parts = []
    if any(r.get("device_busy") is not None for r in recs):
        work = "the GPU ran kernels or copies" if recs[0]["device"] == "cuda" else "the CPU was inside top-level aten ops"
        parts.append(f"plain diffusers and the actor: device busy, time {work} / wall time of one extra profiled pass")
    if any(r.get("actor_busy") is not None for r in recs):
        parts.append("Ray job: actor busy, the rows' gen_seconds / (actors x wall time from the first batch to the "
                     "last row committed)")
    return "busy: " + "; ".join(parts) + "."


def _busy(r: dict) -> float | None:
    """The busy figure a path has: device_busy in process, actor_busy for the Ray job."""
    v = r.get("device_busy") if r.get("device_busy") is not None else r.get("actor_busy")
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def _label(r: dict) -> str:
    options = [("continuous batching" if r.get("batching") == "continuous" else None),
               (f"compile {r['compile']}" if r.get("compile") not in (None, "none") else None),
               ("channels_last" if r.get("channels_last") else None),
               ("fused QKV" if r.get("fuse_qkv") else None),
               (f"cache_interval {r['cache_interval']}" if (r.get("cache_interval") or 1) > 1 else None)]
    options = [o for o in options if o]
    return PATH_LABEL[r["path"]] + (f" ({', '.join(options)})" if options else "")


def markdown(records: list[dict], env: dict) -> str:
    lines = [f"# Throughput benchmark ({env['run_id']})", "",
             f"Machine: {env['device_name']} ({env['device']}), host {env['host']}; torch {env['torch_version']}, "
             f"diffusers {env['diffusers_version']}, ray {env['ray_version'] or '-'}; "
             f"commit {env['git_commit'] or '-'}.", ""]
    if env.get("load_avg_at_start") is not None:
        lines += [f"Load average (1 min) at start {env['load_avg_at_start']}, at end {env.get('load_avg_at_end')}, "
                  f"on {env['cpu_count']} cores.", ""]
    if env.get("command"):
        lines += [f"Command: `{env['command']}`", ""]
    by_model: dict[str, list[dict]] = {}
    for r in records:
        by_model.setdefault(r["model"], []).append(r)
    for model, recs in by_model.items():
        lines += _model_section(model, recs)
    if any("baseline_images_per_s" in r for r in records):
        lines += _history_section(records)
    return "\n".join(lines)


def _model_section(model: str, recs: list[dict]) -> list[str]:
    """A model's header, its table and one note per measured figure."""
    r0 = recs[0]
    lines = [f"## {model} ({r0['weights']} weights, {r0['pipeline']})", "",
             f"{configuration(r0)}, "
             f"{r0['dtype']}. {_flops_note(recs)} (UNet step "
             f"{r0['unet_step_flops'] / 1e12:.4g}, VAE decode {r0['vae_decode_flops'] / 1e12:.4g}, text "
             f"{r0['text_flops'] / 1e12:.4g}); peak {_fmt(r0['peak_tflops'], '.4g')} TFLOP/s "
             f"({r0['peak_source']}).",
             ""]
    show_busy = any(_busy(r) is not None for r in recs)
    lines += ["| path | batch | images/s | s/image | MFU | peak mem | vs plain diffusers |" + (" busy |" * show_busy),
              "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" * show_busy)]
    lines += [_table_row(r, show_busy) for r in recs]
    lines.append("")
    if show_busy:
        lines += [_busy_legend(recs), ""]
    for r in recs:
        lines += _record_notes(r, recs)
    lines.append("")
    return lines


def _record_notes(r: dict, recs: list[dict]) -> list[str]:
    """The notes under the table for one record: busy, Ray overhead, warm-up, pixel check."""
    lines = []
    if r.get("device_busy") is not None:
        lines.append(f"- batch {r['batch_size']}: {_label(r)}: device busy {100 * r['device_busy']:.0f}% over "
                     f"a profiled pass of {r['profiled_s']:.1f} s (timed pass {r['seconds']:.1f} s).")
    if r.get("actor_busy") is not None:
        lines.append(f"- batch {r['batch_size']}: {_label(r)}: actor busy {100 * r['actor_busy']:.0f}% "
                     f"from the first batch to the last row committed.")
    if r["path"] == "ray" and r.get("ray_overhead_ratio") is not None:
        lines.append(f"- batch {r['batch_size']}: Ray job / actor loop = {r['ray_overhead_ratio']:.3f} end to "
                     f"end ({r['rows']} rows, {r['startup_s']:.1f} s from submit to the first batch), "
                     f"{r['ray_steady_ratio']:.3f} after start-up.")
    if r.get("warmup_s") is not None:
        lines.append(f"- batch {r['batch_size']}: {_label(r)} warm-up (model load, its warm-up call and "
                     f"compile if on, one batch) {r['warmup_s']:.1f} s, outside the timed passes.")
    if r.get("fp32_mean_diff") is not None:
        lines.append(_reference_line(r, recs))
    elif r.get("pixels_match") is not None:
        other = "plain diffusers" if r["path"] == "actor" else "the actor"
        lines.append(f"- batch {r['batch_size']}: {_label(r)} vs {other}: max pixel difference "
                     f"{_fmt(r['pixels_max_diff'], 'd')}/255 over {r['pixels_compared']} images -> "
                     f"{'same pixels' if r['pixels_match'] else 'MISMATCH'}"
                     + (f" ({r['errors']} error rows)" if r["errors"] else "") + ".")
    return lines


def _history_section(records: list[dict]) -> list[str]:
    lines = ["## Against history", ""]
    for r in records:
        if r.get("baseline_images_per_s") is not None:
            lines.append(f"- {r['model']} {_label(r)} batch {r['batch_size']}: {r['images_per_s']:.3g} "
                         f"images/s vs median {r['baseline_images_per_s']:.3g} of {r['baseline_runs']} runs"
                         + (" -> REGRESSION" if r.get("regression") else ""))
    regressed = any(r.get("regression") for r in records)
    return lines + ["", f"Verdict: {'REGRESSION' if regressed else 'ok'}.", ""]


def write_outputs(records: list[dict], env: dict, out_dir: Path) -> None:
    """throughput.json (environment and records), throughput.parquet, throughput.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "records": records}
    (out_dir / "throughput.json").write_text(json.dumps(doc, indent=2, default=str))
    records_frame(records).to_parquet(out_dir / "throughput.parquet", index=False)
    (out_dir / "throughput.md").write_text(markdown(records, env))
