"""Benchmark report: speed-ups against each section's reference row, the Rich table, and the JSON document.

Called by `rock_dist.bench` once all sections have run. Rows are plain dicts made by the section benchmarks
(`train_bench`, `infer_bench`, and `data_rows` here for `perf.data_bench`'s result), so the JSON carries everything
that was measured (per-window timings included) and the table is only a view of it.
"""

from __future__ import annotations

import math
import platform
import statistics
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from rock_dist.perf.data_bench import cpu_name

if TYPE_CHECKING:
    from rich.console import JustifyMethod

SECTION_TITLES = {
    "data": "data pipeline (samples/s per worker, 1 thread)",
    "step": "training step, in-memory batch (img/s)",
    "e2e": "training end to end from shards (img/s)",
    "infer": "inference incl. decoding + NMS (img/s)",
    "eval": "evaluation of the test split (wall s)",
}


def device_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: device name, memory, versions, CPU, threads."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                            "cpu": cpu_name(), "cpu_count": _cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    capability=f"{props.major}.{props.minor}")
    else:
        info["device_name"] = f"CPU: {info['cpu']} ({info['cpu_count']} cores)"
    return info


def _cpu_count() -> int:
    try:
        import os

        return len(os.sched_getaffinity(0))
    except AttributeError:
        import os

        return os.cpu_count() or 1


def data_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Table rows of a `perf.data_bench.run_data_benchmark` result (reference-style first: it is the baseline)."""
    ref, ours = result["reference_style"], result["ours"]
    rows = [
        {"recipe": "reference", "describe": "pickle per image, PIL transforms, per-sample CPU matching",
         "batch_size": result.get("batch_size"), "samples_per_s": ref["samples_per_s"]},
        {"recipe": "fast", "describe": f"rock_dist shard reader (decode {ours.get('decode_ms', float('nan')):.1f} "
                                       f"ms + augment {ours.get('augment_ms', float('nan')):.1f} ms per sample)",
         "batch_size": result.get("batch_size"), "samples_per_s": ours["samples_per_s"]},
    ]
    if "ours_npy" in result:
        npy = result["ours_npy"]
        rows.append({"recipe": "fast, npy aux", "describe": f"rock_dist shard reader on --aux_format npy shards "
                     f"(decode {npy.get('decode_ms', float('nan')):.1f} ms per sample)",
                     "batch_size": result.get("batch_size"), "samples_per_s": npy["samples_per_s"]})
    if "loader" in result:
        ld = result["loader"]
        rows.append({"recipe": "fast (DataLoader)", "describe": f"rock_dist DataLoader, {ld['workers']} worker "
                     f"process(es), per worker (total {ld['samples_per_s']:.1f}/s)",
                     "batch_size": result.get("batch_size"), "samples_per_s": ld["samples_per_s_per_worker"]})
    return rows


def _value(section: str, row: Mapping[str, Any]) -> float:
    """The number a row is compared on: throughput (higher is better), or for eval 1 / seconds."""
    if section == "data":
        return float(row["samples_per_s"])
    if section == "eval":
        return 1.0 / float(row["seconds"]) if row.get("seconds") else float("nan")
    return float(row["img_per_s"])


def add_speedups(section: str, rows: list[dict[str, Any]]) -> None:
    """Set `speedup` of every row relative to the section's first row (the reference recipe), and for the ladder
    sections `step_gain`, the gain of each row over the row before it (what that one change bought)."""
    if not rows:
        return
    base = _value(section, rows[0])
    prev: dict[Any, float] = {}  # per batch size: inference rows alternate batch 1 / batched
    for row in rows:
        value = _value(section, row)
        key = row.get("batch_size") if section == "infer" else None
        if row.get("speedup_rounds"):  # interleaved rounds: the median per-round ratio resists load changes
            row["speedup"] = statistics.median(row["speedup_rounds"])
        else:
            row["speedup"] = value / base if base and not math.isnan(base) else float("nan")
        before = prev.get(key, 1.0)
        row["step_gain"] = row["speedup"] / before if before and not math.isnan(before) else float("nan")
        prev[key] = row["speedup"]


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _memory(row: Mapping[str, Any]) -> str:
    if row.get("peak_gpu_mib") is not None:
        return f"{row['peak_gpu_mib']:.0f}"
    return f"n/a (RSS {row['rss_mib']:.0f})" if row.get("rss_mib") is not None else "n/a"


def render(report: Mapping[str, Any]) -> list[Any]:
    """Rich renderables: one table with every section's rows, and a summary table."""
    from rich.table import Table

    meta = report["meta"]
    title = (f"rock_dist benchmark on {meta['device_info']['device_name']} — {meta['model']['backbone']} "
             f"{meta['model']['image_size'][0]}x{meta['model']['image_size'][1]}, torch {meta['device_info']['torch']}")
    table = Table(title=title, show_lines=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("section", "left"), ("configuration", "left"), ("batch", "right"), ("throughput", "right"),
        ("vs ref", "right"), ("this change", "right"), ("peak GPU MiB", "right"), ("details", "left"))
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for section, data in report["sections"].items():
        rows = data.get("rows", [])
        if data.get("skipped"):
            table.add_row(section, "skipped", "", "", "", "", "", data["skipped"])
            continue
        for i, row in enumerate(rows):
            if section == "eval":
                value = f"{row['seconds']:.2f} s ({row['img_per_s']:.1f} img/s)"
            elif section == "data":
                value = f"{row['samples_per_s']:.1f}/s"
            else:
                value = f"{row['img_per_s']:.2f} img/s"
            if "speedup_spread" in row:
                value += f" ±{100 * row['speedup_spread'] / 2:.0f}%"
            details = row.get("describe", "")
            if section == "e2e":
                details += f"; {row.get('loader')} loader, {row.get('loader_workers')} workers"
            if section == "infer":
                details += f"; {row.get('detections_per_image', 0):.0f} det/img"
            table.add_row(section if i == 0 else "", row["recipe"], _fmt(row.get("batch_size")), value,
                          f"{row.get('speedup', float('nan')):.2f}x", f"{row.get('step_gain', float('nan')):.2f}x",
                          _memory(row) if section != "data" else "-", details)
        table.add_section()
    out: list[Any] = [table]
    summary = report.get("summary") or {}
    if summary:
        s = Table(title="summary")
        s.add_column("measure")
        s.add_column("value", justify="right")
        s.add_column("target (issue 6)", justify="left")
        for item in summary.get("items", []):
            s.add_row(item["name"], item["value"], item.get("target", ""))
        out.append(s)
    return out


def _find(rows: Sequence[Mapping[str, Any]], recipe: str, batch: int | None = None) -> Mapping[str, Any] | None:
    for row in rows:
        if row["recipe"] == recipe and (batch is None or row.get("batch_size") == batch):
            return row
    return None


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers next to the issue's targets (GPU targets are stated for one H100, ResNet-50, 480x640)."""
    sections = report["sections"]
    items: list[dict[str, str]] = []
    on_gpu = report["meta"]["device_info"]["device"].startswith("cuda")
    model = report["meta"]["model"]
    full_size = model["backbone"] == "resnet50" and tuple(model["image_size"]) == (480, 640)
    gpu_note = "" if on_gpu and full_size else " (target is for one H100, ResNet-50 480x640)"
    data = sections.get("data", {})
    if data.get("result"):
        r = data["result"]
        items.append({"name": "data: shard reader vs reference-style, per core",
                      "value": f"{r['speedup_per_core']:.2f}x", "target": ">= 3x (CPU)"})
        if "speedup_per_core_npy" in r:
            items.append({"name": "data: shard reader on npy aux shards, per core",
                          "value": f"{r['speedup_per_core_npy']:.2f}x", "target": ">= 3x (CPU)"})
    for name in ("step", "e2e"):
        rows = sections.get(name, {}).get("rows", [])
        ref, fast = _find(rows, "reference"), _find(rows, "fast")
        if ref and fast:
            items.append({"name": f"{name}: fast img/s (vs reference)",
                          "value": f"{fast['img_per_s']:.2f} ({fast['img_per_s'] / ref['img_per_s']:.2f}x)",
                          "target": (">= 700 img/s and >= 4x" + gpu_note) if name == "e2e" else ""})
    rows = sections.get("infer", {}).get("rows", [])
    batched = [r for r in rows if r["recipe"] == "fast" and r["batch_size"] > 1]
    if batched:
        best = max(batched, key=lambda r: r["img_per_s"])
        items.append({"name": f"infer: fast batch {best['batch_size']} img/s incl. NMS",
                      "value": f"{best['img_per_s']:.2f}", "target": ">= 1500 img/s" + gpu_note})
    rows = sections.get("eval", {}).get("rows", [])
    ref, fast = _find(rows, "reference"), _find(rows, "fast")
    if ref and fast:
        items.append({"name": f"eval: wall time of {fast['num_images']} images",
                      "value": f"{ref['seconds']:.2f} s -> {fast['seconds']:.2f} s", "target": ""})
    e2e = sections.get("e2e", {}).get("rows", [])
    step = sections.get("step", {}).get("rows", [])
    fe, fs = _find(e2e, "fast"), _find(step, "fast")
    if fe and fs and fe.get("batch_size") == fs.get("batch_size"):
        ratio = fe["img_per_s"] / fs["img_per_s"]
        items.append({"name": "data-bound? fast e2e / fast in-memory step", "value": f"{ratio:.2f}",
                      "target": "~1.0 = loading is not the bottleneck"})
    return {"items": items}


__all__ = ["SECTION_TITLES", "device_info", "data_rows", "add_speedups", "render", "summarize"]
