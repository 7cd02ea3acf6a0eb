"""Measurement utilities: parameters, FLOPs, latency, size and memory of a model.

One module per kind of measurement: :mod:`~autosparse.measure.counting` (parameters, bytes, FLOPs),
:mod:`~autosparse.measure.timing` (latency), :mod:`~autosparse.measure.memory` (resident memory),
:mod:`~autosparse.measure.summary` (all of them in one record); every name is importable from here.

Independent of the rest of autosparse, so they measure dense, gated and compacted models alike.
Functions that run the model take its positional arguments as a tuple ``example_inputs`` (else
:class:`~autosparse.errors.ExampleInputsError`) and run it in eval mode, restoring each submodule's
own ``training`` flag afterwards, also when the run raises.

Example:
    >>> import torch
    >>> summarize(torch.nn.Linear(10, 20), (torch.randn(4, 10),)).flops
    1600
"""

from __future__ import annotations

from autosparse.measure.counting import (
    check_inputs,
    count_flops,
    count_params,
    eval_mode,
    flops_by_module,
    model_size_bytes,
)
from autosparse.measure.memory import RssPeak, peak_rss_mb, track_peak_rss
from autosparse.measure.summary import BINARY_UNITS, SI_UNITS, Summary, compare, human, summarize
from autosparse.measure.timing import LatencyReport, LatencyStats, latency_report, measure_latency

__all__ = [
    "BINARY_UNITS",
    "SI_UNITS",
    "LatencyReport",
    "LatencyStats",
    "RssPeak",
    "Summary",
    "check_inputs",
    "compare",
    "count_flops",
    "count_params",
    "eval_mode",
    "flops_by_module",
    "human",
    "latency_report",
    "measure_latency",
    "model_size_bytes",
    "peak_rss_mb",
    "summarize",
    "track_peak_rss",
]
