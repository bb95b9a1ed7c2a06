"""`nitp env`: the toolkit's ds_report — versions, accelerator, and the tested ranges."""

from __future__ import annotations

import importlib.metadata as md
import platform

from packaging.version import Version

# Ranges the test suite has run with AutoEP (see README, "Tested versions").
TESTED = {
    "deepspeed": ("0.19.8", "0.19.9"),
    "transformers": ("5.17.0", "5.23.0"),
}


def version_of(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def in_tested_range(package: str, version: str | None) -> bool | None:
    if package not in TESTED or version is None:
        return None
    low, high = TESTED[package]
    return Version(low) <= Version(version) < Version(high)


def collect() -> dict:
    import torch

    report: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "deepspeed", "transformers", "datasets", "tokenizers", "safetensors"):
        version = version_of(package)
        report[package] = {"version": version, "tested": in_tested_range(package, version)}
    report["cuda_available"] = torch.cuda.is_available()
    report["device_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    report["devices"] = [torch.cuda.get_device_name(i) for i in range(report["device_count"])]
    try:
        from deepspeed.accelerator import get_accelerator

        report["accelerator"] = get_accelerator().device_name()
        report["comm_backend"] = get_accelerator().communication_backend_name()
    except Exception as exc:  # deepspeed missing or broken: say so rather than crash
        report["accelerator"] = f"unavailable ({exc.__class__.__name__})"
    try:
        from deepspeed.module_inject.auto_ep_config import PRESET_MODELS

        report["autoep"] = sorted(PRESET_MODELS)
    except Exception:
        report["autoep"] = None
    return report


def print_env_report() -> None:
    from rich.console import Console
    from rich.table import Table

    report = collect()
    table = Table(title="nitp env", show_header=True)
    table.add_column("item")
    table.add_column("value")
    table.add_column("tested range")
    table.add_row("python", report["python"], "")
    table.add_row("platform", report["platform"], "")
    for package in ("torch", "deepspeed", "transformers", "datasets", "tokenizers", "safetensors"):
        entry = report[package]
        tested = entry["tested"]
        mark = "" if tested is None else ("yes" if tested else f"NO (tested {TESTED[package][0]} to <{TESTED[package][1]})")
        table.add_row(package, entry["version"] or "not installed", mark)
    table.add_row("accelerator", str(report["accelerator"]), "")
    table.add_row("GPUs", f"{report['device_count']} {', '.join(report['devices'])}".strip(), "")
    autoep = report["autoep"]
    table.add_row("AutoEP", ("available: " + ", ".join(autoep)) if autoep else "NOT available (needs deepspeed>=0.19.8)", "")
    Console().print(table)
