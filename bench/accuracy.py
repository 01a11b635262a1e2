"""Accuracy of the exported model on real-world forms of the test images (bench/realistic_inputs.py)."""
from __future__ import annotations

from pathlib import Path

from bench.common import log
from contract.paths import DATA_DIR


def bench_framing(build: Path, count: int = 1000) -> dict:
    """Accuracy of the exported model on the same test images sent as paper photos, canvas
    drawings and phone JPEGs, framing off and auto, next to the data set's own form."""
    from bench.realistic_inputs import framing_report

    report = framing_report(build, DATA_DIR, count)
    log("framing: " + ", ".join(f"{form} {100 * row['framing_auto']:.1f}% (off {100 * row['framing_off']:.1f}%)"
                                for form, row in report["forms"].items()))
    from bench.forms import forms_report

    report["per_form"] = forms_report(build, DATA_DIR, min(count, 500))  # every form that applies
    log("forms: " + ", ".join(f"{form} {100 * a:.1f}%" for form, a in report["per_form"]["accuracy"].items()))
    return report
