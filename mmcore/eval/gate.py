"""The promotion gate: the candidate becomes champion only if it beats the champion on the same data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmcore import registry, tracking
from mmcore.config import GateConfig, TrackingConfig
from mmcore.stages import STAGES
from mmcore.eval.run import EvalReport, evaluate


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    model_name: str
    candidate_version: str
    champion_version: str | None
    """The champion before the decision."""
    candidate: EvalReport
    champion: EvalReport | None


def promote(name: str, dataset: str, gate: GateConfig | None = None, suites: list[str] | None = None,
            tracking_cfg: TrackingConfig | None = None, classes: str | None = None) -> GateDecision:
    """Evaluate candidate and champion on the same suites and data (`classes`: the zeroshot suite's classes
    file); move the alias only on a clear win."""
    gate = gate or GateConfig()
    gate.validate()
    tracking_uri = tracking.resolve_uri(tracking_cfg or TrackingConfig())
    tracking.check_reachable(tracking_uri)
    candidate_version = registry.resolve_version(f"models:/{name}@{gate.candidate_alias}", tracking_uri)[1]
    champion_version = registry.alias_version(name, gate.champion_alias, tracking_uri)
    if not gate.primary:
        stage = registry.version_tags(name, candidate_version, tracking_uri).get("stage", "contrastive")
        gate = dataclasses.replace(gate, primary=STAGES[stage].primary)
    candidate = evaluate(f"models:/{name}/{candidate_version}", dataset, suites, tracking_cfg, classes)
    champion = None
    if not candidate.ok:
        promoted, reason = False, f"candidate evaluation failed: {candidate.errors}"
    elif candidate.metric(gate.primary) is None:
        promoted, reason = False, f"the evaluation has no {gate.primary!r} (suites run: {sorted(candidate.metrics)})"
    elif champion_version is None:
        promoted, reason = True, f"no {gate.champion_alias!r} yet"
    elif champion_version == candidate_version:
        promoted, reason = False, f"version {candidate_version} already is {gate.champion_alias!r}"
    else:
        champion = evaluate(f"models:/{name}/{champion_version}", dataset, suites, tracking_cfg, classes)
        promoted, reason = _compare(candidate, champion, gate)
    if promoted:
        if champion_version is not None:
            registry.set_alias(name, gate.previous_alias, champion_version, tracking_uri)
        registry.set_alias(name, gate.champion_alias, candidate_version, tracking_uri)
    registry.tag_version(name, candidate_version, {"gate.decision": "promoted" if promoted else "refused",
                                                    "gate.reason": reason}, tracking_uri)
    return GateDecision(promoted, reason, name, candidate_version, champion_version, candidate, champion)


def _compare(candidate: EvalReport, champion: EvalReport, gate: GateConfig) -> tuple[bool, str]:
    if not champion.ok:
        return False, f"champion evaluation failed, nothing to compare with: {champion.errors}"
    new, old = candidate.metric(gate.primary), champion.metric(gate.primary)
    if old is None:
        return False, f"the champion's evaluation has no {gate.primary!r}"
    verdict = f"{gate.primary}: candidate {new:.4f} vs champion {old:.4f} (margin {gate.margin})"
    if new > old and new - old >= gate.margin:
        return True, "better, " + verdict
    return False, "not better by the margin, " + verdict
