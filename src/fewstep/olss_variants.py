"""The OLSS scheduler variants fit_olss writes, by file-name prefix: which is the paper's method and
which goes beyond it. One table: fewstep.olss_fit fits them, fewstep.samplers names their row
families, and dvc.yaml's fit_olss outs are olss_fit.variant_files (tests/unit/test_olss.py checks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    """One fitted variant: its file-name prefix (``<prefix>-<N>.json``), meta["variant"], basis
    (fewstep.math.olss.BASES), method ("paper" or "beyond-paper") and the label of its rows."""

    prefix: str
    variant: str
    basis: str
    method: str
    label: str

    @property
    def key(self) -> str:
        """Its key in metrics' rmse_vs_full_step (olss-paper -> olss_paper)."""
        return self.prefix.replace("-", "_")


VARIANTS = (  # in order of preference on a held-out tie: the paper first
    Variant("olss-paper", "paper", "output", "paper", "OLSS (paper)"),
    Variant("olss-p", "olss-p", "output", "paper", "OLSS-P (paper, uniform path)"),
    Variant("olss-open", "open-loop", "x", "beyond-paper", "OLSS x-hat, open loop (beyond paper)"),
    Variant("olss-closed", "closed-loop", "x", "beyond-paper", "OLSS x-hat, closed loop (beyond paper)"),
    Variant("olss-ridge", "ridge", "x", "beyond-paper", "OLSS x-hat, ridge (beyond paper)"),
)
BY_PREFIX = {v.prefix: v for v in VARIANTS}
HEADLINE = "olss"  # olss-N: a copy of the variant with the lowest held-out RMSE
HEADLINE_LABEL = "OLSS (best held-out variant)"


def variant_of(artifact: str) -> Variant | None:
    """The variant of a scheduler file name (``olss-paper-4.json`` -> olss-paper), None for the
    headline ``olss-N.json`` (or any other name)."""
    stem = Path(artifact).stem
    return next((v for v in VARIANTS if stem.startswith(v.prefix + "-")), None)
