"""What ``bitrain bench --inference`` reports of its race: the machine, the library versions, and per batch
size a row per engine (median img/s, paired ratios, agreement), as text or as one JSON document."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from bitrain.cli.race_worker import ENGINES
from bitrain.cli.timing import paired_ratio

_LIBRARIES = ("torch", "numba", "openvino", "onnxruntime", "onnx")
_FLAGS = ("avx", "avx2", "fma", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")  # and every avx512*
OV_BINARY = "openvino-binary"


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name, family and model numbers, logical cores and its vector flags (/proc/cpuinfo)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    first: dict[str, str] = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    flags = first.get("flags", "").split()
    vector = [f for f in flags if f in _FLAGS or f.startswith("avx512")]
    return {
        "model_name": first.get("model name") or platform.processor() or platform.machine(),
        "family": first.get("cpu family"),
        "model": first.get("model"),
        "logical_cores": os.cpu_count(),
        "flags": vector,
        "avx512": any(f.startswith("avx512") for f in flags),
        "vnni": any("vnni" in f for f in flags),
        "bf16": any("bf16" in f for f in flags),
    }


def versions() -> dict[str, str]:
    """Python's and each library's installed version (package metadata; 'not installed' where none)."""
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def label(name: str, status: dict) -> str:
    info = status.get("info") or {}
    text = ENGINES[name].label
    if name == "packed" and info.get("kernel") == "torch":
        text = "bitrain packed engine (torch reference kernel: numba missing or --kernel torch)"
    if name.startswith("openvino-float") and info.get("precision"):
        text += f" (compiled: {info['precision']})"
    return text


def summarize(batch: int, result: dict) -> dict:
    """Per engine: img/s per round and their median, and the paired ratios (the median over rounds of its
    img/s / the strongest float engine's in the same round, and / OpenVINO binary's)."""
    ips = {n: [batch * result["ks"][n] / s for s in secs] for n, secs in result["seconds"].items()}
    floats = [n for n in ips if ENGINES[n].group == "float"]
    rounds = len(next(iter(ips.values()), []))
    best = [max(floats, key=lambda n, r=r: ips[n][r]) for r in range(rounds)] if floats else []
    best_ips = [ips[n][r] for r, n in enumerate(best)]
    rows = {}
    for n, v in ips.items():
        rows[n] = {
            "images_per_s": statistics.median(v),
            "ms_per_batch": 1e3 * batch / statistics.median(v),
            "batches_per_turn": result["ks"][n],
            "per_round_images_per_s": v,
            "x_strongest_float": paired_ratio(v, best_ips) if best_ips else None,
            "x_openvino_binary": paired_ratio(v, ips[OV_BINARY]) if OV_BINARY in ips else None,
            "agreement": result["agreement"].get(n),
            "idle_cpu_s": result["idle_cpu_s"].get(n, 0.0),
        }
    return {
        "batch": batch,
        "rounds": rounds,
        "strongest_float_per_round": best,
        "strongest_float_images_per_s": best_ips,
        "rows": rows,
    }


def document(head: dict, race: dict, batches: list[int]) -> dict:
    """The whole report as one JSON-able dict: ``head`` (model, options, sizes) + machine + engines + batches."""
    engines = {n: {"label": label(n, s), "group": ENGINES[n].group, **s} for n, s in race["status"].items()}
    return {
        **head,
        "cpu": cpu_info(),
        "versions": versions(),
        "load_average": race.get("load_average"),
        "engines": engines,
        "batches": [summarize(b, race["batches"][b]) for b in batches],
    }


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _agree(a: dict | None) -> str:
    if a is None:
        return "-"
    flag = "" if a["argmax_equal"] == a["images"] else " (DISAGREES)"
    return f"{a['argmax_equal']}/{a['images']} = {a['reference']}, max {a['max_abs_logit_diff']:.3g}{flag}"


def cpu_line(cpu: dict) -> str:
    numbers = f" (family {cpu['family']}, model {cpu['model']})" if cpu["family"] else ""
    missing = [k for k in ("avx512", "vnni", "bf16") if not cpu[k]]
    return (
        f"cpu: {cpu['model_name']}{numbers}, {cpu['logical_cores']} logical cores; vector flags: "
        + (" ".join(cpu["flags"]) or "none")
        + (f" (no {', no '.join(missing)})" if missing else "")
    )


def machine_lines(doc: dict) -> list[str]:
    """The CPU, the library versions and the machine's load around the race."""
    lines = [cpu_line(doc["cpu"]), "versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items())]
    load = doc.get("load_average") or {}
    if load.get("start") and load.get("end"):
        lines.append(
            "load average (1, 5, 15 min): "
            + " / ".join(f"{' '.join(f'{v:.2f}' for v in load[k])} at the {k}" for k in ("start", "end"))
        )
    return lines


def table_lines(doc: dict) -> list[str]:
    """The skipped engines, then per batch size a markdown table and its notes."""
    lines = []
    for n, e in doc["engines"].items():
        if e["status"] == "skipped":
            lines.append(f"skipped: {n} ({e['label']}): {e['reason']}")
    for b in doc["batches"]:
        lines += [
            "",
            f"batch {b['batch']}: img/s the median over {b['rounds']} rounds; x: the median over rounds of the "
            "engine's img/s / the strongest float engine's (or OpenVINO binary's) in the same round",
            "| engine | what it runs | img/s | ms/batch | x strongest float | x OpenVINO binary | per turn "
            "| argmax equal, max abs logit diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, r in b["rows"].items():
            lines.append(
                f"| {n} | {doc['engines'][n]['label']} | {r['images_per_s']:.1f} | {r['ms_per_batch']:.2f} | "
                f"{_x(r['x_strongest_float'])} | {_x(r['x_openvino_binary'])} | {r['batches_per_turn']} | "
                f"{_agree(r['agreement'])} |"
            )
        counts = {n: b["strongest_float_per_round"].count(n) for n in dict.fromkeys(b["strongest_float_per_round"])}
        if counts:
            lines.append(
                f"batch {b['batch']}: strongest float engine per round: "
                + ", ".join(f"{n} {c}" for n, c in sorted(counts.items(), key=lambda t: -t[1]))
            )
        idle = sum(r["idle_cpu_s"] for r in b["rows"].values())
        lines.append(f"batch {b['batch']}: CPU the waiting engines used while another ran: {idle:.2f} s in all")
    return lines
