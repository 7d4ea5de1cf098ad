"""A self-contained HTML certificate of one unlearning event, in the audit certificate's style.

What was removed (count and fingerprint, never names), when, by which method, whether it is
exact, the result of re-running it from its record, utility before and after, and the
membership audit when one was run. Inline CSS, every text escaped, no external resources.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from scvi_unlearn.audit._certificate import _CSS, _SCRIPT, VERDICT_COLORS
from scvi_unlearn.train import METHODS


def write_unlearning_certificate(
    model, path: str | Path, verification=None, event_index: int = -1
) -> Path:
    """Write one unlearning event of ``model`` as a self-contained HTML certificate.

    Parameters
    ----------
    model
        An unlearned :class:`~scvi_unlearn.model.SCVI` (its ``provenance`` holds the event).
    path
        The ``.html`` file to write; its folder is created.
    verification
        A :class:`~scvi_unlearn.model.VerificationResult` of the event, if it was verified.
    event_index
        Which event of the provenance (default: the last).

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    ValueError
        If the model records no unlearning.
    """
    events = (getattr(model, "unlearning_provenance_", None) or {}).get("events") or []
    if not events:
        raise ValueError("The model records no unlearning event to certify.")
    event = events[event_index]
    metrics = event.get("metrics") or {}
    produced_by = metrics.get("accepted_method", event["method"])
    exact = produced_by in METHODS and METHODS[produced_by].exact
    audit = event.get("audit")
    if verification is not None:
        status, color = (
            ("re-run from the record: bit-identical", VERDICT_COLORS["no evidence of leak"])
            if verification.verified
            else ("re-run from the record: NOT reproduced", VERDICT_COLORS["leak"])
        )
    elif audit is not None:
        status, color = f"audit: {audit['verdict']}", VERDICT_COLORS.get(audit["verdict"], "#555")
    else:
        status, color = (
            ("exact: not verified here" if exact else "approximate: not audited"),
            "#555",
        )
    forgotten = event.get("forgotten") or {}
    facts = [
        ("cells removed", event["n_forgotten"]),
        ("fingerprint of their sorted names (SHA-256)", forgotten.get("sha256", "")),
        ("started (UTC)", event.get("started_at", "")),
        (
            "method",
            event["method"] + ("" if produced_by == event["method"] else f" (ran {produced_by})"),
        ),
        (
            "exact",
            "yes: the forgotten cells are not in the data it trained on"
            if exact
            else "no: approximate, judged by its audit only",
        ),
        ("training cells before / after", f"{event['n_train_before']} / {event['n_train_after']}"),
        ("seed", event.get("seed")),
        ("wall time of the method (s)", _num(event.get("wall_time_s"), 1)),
        (
            "scvi-unlearn / scvi-tools",
            f"{event.get('scvi_unlearn_version')} / {event.get('scvi_tools_version')}",
        ),
    ]
    sections = [
        "<h2>What was removed, and how</h2>" + _table(facts),
        "<h2>Utility</h2>" + _utility(event.get("utility") or {}),
    ]
    guarantee = metrics.get("certificate")
    if guarantee is not None:
        sections.append("<h2>Certified unlearning guarantee</h2>" + _table([
            ("(epsilon, delta)", f"({guarantee['epsilon']:g}, {guarantee['delta']:.3g})"),
            ("theorem", guarantee.get("theorem", "")),
            ("noise per weight and step (SD)", f"{guarantee['noise_std']:.4g}"),
            ("noisy steps", guarantee["steps"]),
            ("projection radius C0 (source)",
             f"{guarantee['radius']:.4g} ({guarantee.get('radius_source', '')})"),
            ("gradient clip C1, step size, weight decay",
             f"{guarantee['grad_clip']:g}, {guarantee['lr']:g}, {guarantee['weight_decay']:g}"),
            ("accumulated noise / weights' RMS", f"{guarantee['noise_to_weights']:.3g}"),
        ]))  # fmt: skip
    reproduce = event.get("reproduce")
    if reproduce is not None:
        sections.append("<h2>Reproducibility record</h2>" + _table([
            ("weights (SHA-256)", reproduce["weights_sha256"]),
            ("retained training cells", f"{reproduce['training_cells']['n']} cells, "
                                        f"{reproduce['training_cells']['sha256']}"),
            ("their counts (SHA-256)", reproduce["counts_sha256"]),
            ("versions", ", ".join(f"{k} {v}" for k, v in reproduce["versions"].items())),
            ("device", reproduce.get("device")),
            ("what is bit-reproducible", reproduce.get("reproducibility")),
        ]))  # fmt: skip
    if verification is not None:
        rows = [("verified", "yes" if verification.verified else "no")]
        rows += [(f"input: {k}", "matches" if v else "differs")
                 for k, v in verification.inputs.items()]  # fmt: skip
        rows += [("problem", p) for p in verification.problems]
        sections.append("<h2>Re-run from the record</h2>" + _table(rows))
    if audit is not None:
        sections.append("<h2>Membership audit of the result</h2>" + _table([
            ("verdict", audit["verdict"]),
            ("members / non-members", f"{audit.get('n_members')} / {audit.get('n_nonmembers')}"),
            ("explanation", audit.get("explanation", "")),
        ]))  # fmt: skip
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>Unlearning certificate</title>"
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>"
        "<h1>Unlearning certificate</h1>"
        f"<div class='banner' style='background:{color}' id='status'>{_e(status)}</div>"
        + "".join(sections)
        + "<p class='small'>Forgotten cells are identified by count and fingerprint only; the "
        "lab's own withdrawal list reproduces the fingerprint.</p></body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _utility(utility: dict[str, Any]) -> str:
    if not utility.get("n_held_out_cells"):
        return "<p>No held-out cells: utility was not measured.</p>"
    return _table(
        [
            ("held-out cells", utility["n_held_out_cells"]),
            ("neg. ELBO before", _num(utility.get("neg_elbo_before"), 2)),
            ("neg. ELBO after", _num(utility.get("neg_elbo_after"), 2)),
            (
                "change",
                "not finite"
                if utility.get("change") is None
                else f"{100 * utility['change']:+.1f}%",
            ),
        ]
    )


def _table(rows) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value, digits: int) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"
