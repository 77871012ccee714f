"""A study narrowed for one sitting (the CLI's `--base`, `--geometry`, `--group`, `--arm`): a study too long
for one session runs geometry by geometry or group by group, each analysed on its own (levels and fronts
are per geometry and group), and resumes where it stopped."""

from __future__ import annotations

from pathlib import Path

from titan_mem.study.spec import StudyError, StudySpec


def with_base(spec: StudySpec, checkpoint: str | Path) -> StudySpec:
    """The study started from an existing checkpoint instead of its [base] (`--base`)."""
    if not Path(checkpoint).is_dir():
        raise StudyError(f"--base: {checkpoint} is not a checkpoint folder")
    if len(spec.geometries) > 1 or len(spec.base_seeds) > 1:
        raise StudyError("--base: one checkpoint cannot stand for several geometries or base seeds")
    spec.base_checkpoint, spec.pretrain_config, spec.pretrain_overrides = Path(checkpoint), None, []
    spec.base_study, spec.hf_model = None, None
    return spec


def only_geometries(spec: StudySpec, names: list[str]) -> StudySpec:
    """The study restricted to some geometries (`--geometry`), in the order given."""
    known = {g.name: g for g in spec.geometries}
    for name in names:
        if name not in known:
            raise StudyError(f"--geometry: {name!r} is not a geometry of {spec.path} ({', '.join(known)})")
    spec.geometries = [known[n] for n in dict.fromkeys(names)]
    spec.arms = [a for a in spec.arms if a.geometry in names]
    return spec


def only_groups(spec: StudySpec, names: list[str]) -> StudySpec:
    """The study restricted to some groups of arms (`--group`)."""
    for name in names:
        if name not in spec.groups:
            raise StudyError(f"--group: {name!r} is not a group of {spec.path} ({', '.join(spec.groups)})")
    spec.arms = [a for a in spec.arms if a.group in names]
    return spec


def only_arms(spec: StudySpec, names: list[str]) -> StudySpec:
    """The study restricted to some arms by name (`--arm`, as `--dry-run` and the report name them): one
    configuration and seed rerun on its own, with what it waits for (facts, heal, counts)."""
    known = {a.name for a in spec.arms}
    for name in names:
        if name not in known:
            close = sorted(n for n in known if n.split("-")[0] == name.split("-")[0])[:4]
            raise StudyError(
                f"--arm: {name!r} is not an arm of {spec.path} (e.g. {', '.join(close or known)})"
            )
    spec.arms = [a for a in spec.arms if a.name in names]
    return spec
