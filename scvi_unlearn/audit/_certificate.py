"""A self-contained HTML audit certificate: verdict, numbers, figures and fingerprints.

One file a lab can attach to a consent-withdrawal record: no external resources (inline CSS,
figures as base64 PNG), every text escaped, and the SHA-256 fingerprints that tie the verdict
to the exact model weights, cell lists and counts it judged.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from scvi_unlearn._verdict import MAX_DETECTABLE_AUC
from scvi_unlearn.pl import roc_curves

#: Banner colour per verdict.
VERDICT_COLORS = {
    "leak": "#c0392b",
    "below reference": "#d35400",
    "underpowered": "#7f8c8d",
    "no evidence of leak": "#1e8449",
}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:60em;color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em}
.banner{color:#fff;padding:.8em 1em;border-radius:6px;font-size:1.35em;font-weight:600}
.explain{background:#f4f6f7;padding:.8em 1em;border-radius:6px}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #ccd1d1;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#eaeded} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.85em;word-break:break-all} .figs img{max-width:48%;margin-right:1%}
.small{color:#555;font-size:.85em}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = 0;
  imgs.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { ok += 1; } });
  document.body.dataset.figuresLoaded = String(ok);
  document.body.dataset.figuresTotal = String(imgs.length);
});
"""


def write_certificate(report, path: str | Path, title: str | None = None) -> Path:
    """Write an :class:`~scvi_unlearn.AuditReport` as one self-contained HTML certificate.

    Parameters
    ----------
    report
        The audit report (its metadata should hold the fingerprints that
        :meth:`~scvi_unlearn.MembershipInference.audit` records).
    path
        The ``.html`` file to write; its folder is created.
    title
        Heading of the certificate; a default names the audit.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = report.metadata
    verdict = report.verdict
    heading = title or "Membership-inference audit certificate"
    color = VERDICT_COLORS.get(verdict, "#555")
    roc_caption = (
        "ROC curves of every attack (log axes, drawn down to the smallest FPR the non-members "
        "can measure)"
    )
    body = [
        f"<h1>{_e(heading)}</h1>",
        f"<p class='small'>Created {_e(meta.get('created_at', 'unknown time'))} by "
        f"scvi-unlearn {_e((meta.get('versions') or {}).get('scvi_unlearn', ''))}.</p>",
        f"<div class='banner' id='verdict' style='background:{color}'>"
        f"Verdict: {_e(verdict.upper())}</div>",
        f"<p class='explain' id='explanation'>{_e(report.explain())}</p>",
        "<h2>How to read this</h2>",
        "<p>Each attack tries to tell the audited <em>members</em> (cells the model trained on, "
        "or was asked to forget) from <em>non-members</em> of the same population that it never "
        "saw. Its ROC AUC is compared with the <em>reference band</em>: the AUCs of models that "
        "never trained on these cells. An attack says <b>leak</b> when its AUC's 95% CI lies "
        "entirely above the band and <b>below reference</b> when entirely below it; the overall "
        "verdict judges every attack at a Bonferroni-corrected level (the family CI), so running "
        "several attacks does not raise the chance of a false leak. When the audit could not "
        f"have detected an AUC below {MAX_DETECTABLE_AUC:g} (80% power) it says "
        "<b>underpowered</b>, never <b>no evidence of leak</b>. A TPR at an FPR below "
        "1/n<sub>non-members</sub> cannot be measured and is left blank.</p>",
        "<h2>Attacks</h2>",
        _attack_table(report),
        "<h2>Figures</h2>",
        "<div class='figs'>",
        _img(_roc_png(report), roc_caption),
        _img(_band_png(report), "Each attack's AUC with its 95% CI against its reference band"),
        "</div>",
        "<h2>What was audited</h2>",
        _provenance_table(meta),
    ]
    document = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(heading)}: {_e(verdict)}</title><style>{_CSS}</style>"
        f"<script>{_SCRIPT}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path.write_text(document, encoding="utf-8")
    return path


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float, digits: int = 3) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _ci(ci) -> str:
    if ci is None or not all(np.isfinite(v) for v in ci):
        return ""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _attack_table(report) -> str:
    head = (
        "<tr><th>attack</th><th>AUC</th><th>95% CI</th><th>family CI</th>"
        "<th>TPR at 1% FPR</th><th>reference band</th><th>detectable AUC</th>"
        "<th>CI half-width</th><th>verdict</th><th>family verdict</th></tr>"
    )
    rows = []
    for r in report.results.values():
        tpr = (
            f"not measurable ({r.n_nonmembers} non-members &lt; 100)"
            if not np.isfinite(r.tpr_at_1pct_fpr)
            else f"{r.tpr_at_1pct_fpr:.3f} {_ci(r.tpr_at_1pct_fpr_ci)}"
        )
        low, high = r.reference_band
        band = "none (chance, 0.5)" if not np.isfinite(low) else f"{low:.3f}-{high:.3f}"
        family = r.family_verdict or r.verdict
        rows.append(
            f"<tr><td>{_e(r.attack)}</td><td class='num'>{_num(r.auc)}</td>"
            f"<td class='num'>{_ci(r.auc_ci)}</td><td class='num'>{_ci(r.auc_ci_family)}</td>"
            f"<td>{tpr}</td><td class='num'>{_e(band)}</td>"
            f"<td class='num'>{_num(r.detectable_auc, 2)}</td>"
            f"<td class='num'>{_num(r.ci_half_width)}</td><td>{_e(r.verdict)}</td>"
            f"<td>{_e(family)}</td></tr>"
        )
    skipped = report.metadata.get("skipped_attacks") or {}
    note = "".join(
        f"<p class='small'>Not run: {_e(name)}: {_e(why)}</p>" for name, why in skipped.items()
    )
    return f"<table id='attacks'>{head}{''.join(rows)}</table>{note}"


def _provenance_table(meta: dict) -> str:
    fingerprints = meta.get("fingerprints") or {}
    rows = [
        ("members (cells)", meta.get("n_members")),
        ("non-members (cells)", meta.get("n_nonmembers")),
        ("shadow models", meta.get("n_shadows")),
        ("reference models", meta.get("n_reference_models")),
        ("seed", meta.get("seed")),
        ("SHA-256 of the model weights", fingerprints.get("model_weights")),
        ("SHA-256 of the member cell list", fingerprints.get("members")),
        ("SHA-256 of the non-member cell list", fingerprints.get("nonmembers")),
        ("SHA-256 of the AnnData (names and counts)", fingerprints.get("adata_counts")),
        ("recipe fingerprint", fingerprints.get("recipe")),
        ("reference model weights", ", ".join(fingerprints.get("reference_models") or []) or None),
        ("recipe", json.dumps(meta.get("recipe"), sort_keys=True, default=str)),
        ("recipe overrides for the shadows", json.dumps(meta.get("recipe_overrides") or {})),
        ("package versions", json.dumps(meta.get("versions") or {}, sort_keys=True)),
    ]
    cells = "".join(
        f"<tr><th>{_e(k)}</th><td><code>{_e('not recorded' if v is None else v)}</code></td></tr>"
        for k, v in rows
    )
    return f"<table id='provenance'>{cells}</table>"


def _img(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{_e(caption)}' title='{_e(caption)}'>"


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _roc_png(report) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    roc_curves(report, ax=ax, show=False)
    return _png(fig)


def _band_png(report) -> bytes:
    import matplotlib.pyplot as plt

    results = list(report.results.values())
    fig, ax = plt.subplots(figsize=(max(3.6, 0.9 * len(results) + 1.5), 4.2))
    for i, r in enumerate(results):
        low, high = r.reference_band
        if np.isfinite(low):
            ax.fill_between([i - 0.35, i + 0.35], low, high, color="#9bc1e6", alpha=0.6, lw=0)
        color = VERDICT_COLORS.get(r.verdict, "#555")
        ax.errorbar(i, r.auc, yerr=[[r.auc - r.auc_ci[0]], [r.auc_ci[1] - r.auc]], fmt="o",
                    color=color, capsize=3)  # fmt: skip
    ax.axhline(0.5, ls="--", c="grey", lw=0.8)
    ax.set_xticks(range(len(results)), [r.attack for r in results], rotation=30, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("AUC (members vs non-members)")
    ax.set_title("AUC and 95% CI vs reference band (blue)", fontsize=9)
    return _png(fig)
