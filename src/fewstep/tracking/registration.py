"""Registration: model dirs, the evaluator and OLSS schedulers become pyfunc versions in the
MLflow registry, each tagged with its lineage.

Every version carries lineage tags (data_hash, weights_sha256, params_hash, git_commit, role,
sample_steps, nfe, parent_model + parent_version) and is found again by its weights / scheduler
hash, so registering is idempotent. All three kinds go through one path (:func:`_register`): under
the registry lock, return the version with the same identifying tags if there is one, else build
the lineage tags, log the pyfunc and create the version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import mlflow
from mlflow.exceptions import MlflowException

from fewstep import provenance
from fewstep.errors import UserError
from fewstep.tracking.names import (evaluator_registry_name, model_name, model_registry_name,
                                    scheduler_registry_name)
from fewstep.tracking.store import Tracking, configure, store_lock

if TYPE_CHECKING:
    from fewstep.models import ModelCard

# fewstep.models / fewstep.storage import torch: they are imported where needed.

SAMPLER_ARTIFACT = "sampler"
SAMPLER_MODULE = "fewstep.sampler_pyfunc"
EVALUATOR_MODULE = "fewstep.evaluator_pyfunc"


class LineageError(UserError, RuntimeError):
    """A model or scheduler cannot be registered with complete lineage (unregistered parent,
    weights that do not match their config, a scheduler fitted on another model version)."""


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    created: bool  # False: an existing version with the same hash was found
    tags: dict[str, str]


@dataclass(frozen=True)
class Source:
    """Where the lineage of a registration comes from: the repository (git commit) and its dvc.lock.
    ``git_commit`` None = ``git rev-parse HEAD`` in ``repo``; ``dvc_lock`` None = ``<repo>/dvc.lock``."""

    repo: Path = Path(".")
    dvc_lock: Path | None = None
    git_commit: str | None = None

    @property
    def lock(self) -> Path:
        return self.dvc_lock or self.repo / "dvc.lock"

    def commit(self) -> str | None:
        return self.git_commit or provenance.git_commit(self.repo)

    def tags(self, path: Path) -> dict[str, Any]:
        """git_commit, source_dir and the DVC stage that produced ``path`` (when dvc.lock names it)."""
        return {"git_commit": self.commit(), "source_dir": str(path), **(provenance.dvc_producer(path, self.lock) or {})}


def _source(repo: str | Path, dvc_lock: str | Path | None, git_commit: str | None) -> Source:
    return Source(Path(repo), Path(dvc_lock) if dvc_lock else None, git_commit)


@dataclass(frozen=True)
class _Version:
    """One registration: the name, the tags that identify an existing version, the lineage tags of
    a new one (built under the lock and only when new: parents are looked up there) and the pyfunc."""

    name: str
    key: Mapping[str, str]
    tags: Callable[[], Mapping[str, Any]]
    artifacts: Mapping[str, str]
    model_config: Mapping[str, Any]
    module: str = SAMPLER_MODULE
    kind: str = "sampler"
    requires: tuple[str, ...] = ()  # distributions the pyfunc needs beyond _pip_requirements' own


def _register(t: Tracking, v: _Version, run_id: str | None) -> Registered:
    with store_lock(t.uri):
        existing = find_version(v.name, v.key, t)
        if existing is not None:
            return Registered(v.name, str(existing.version), False, dict(existing.tags))
        tags = _clean(v.tags())
        model_id = _log_pyfunc(t, dict(v.artifacts), dict(v.model_config), run_id, tags, v.module, v.requires)
        mv = _create_version(t, v.name, model_id, run_id, tags, v.kind)
    return Registered(v.name, str(mv.version), True, tags)


# --------------------------------------------------------------------------------------------
# lookup and the pyfunc artifact


def _quote(v: str) -> str:
    if "'" in v:
        raise ValueError(f"quote in a registry filter value: {v!r}")
    return f"'{v}'"


def find_version(name: str, tags: Mapping[str, str], tracking: Tracking | None = None):
    """The oldest version of ``name`` whose tags include ``tags`` (ModelVersion), or None."""
    t = tracking or configure()
    filt = " and ".join([f"name = {_quote(name)}"] + [f"tags.`{k}` = {_quote(str(v))}" for k, v in tags.items()])
    found = list(t.client.search_model_versions(filt))
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _pip_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    """Explicit pins (requirement inference is slow and adds stray packages: mlops.md 4a)."""
    reqs = []
    for dist in ("mlflow", "torch", "numpy", "safetensors", "tqdm", "pillow", *extra):
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _log_pyfunc(t: Tracking, artifacts: dict[str, str], model_config: dict[str, Any], run_id: str | None,
                tags: dict[str, str], module: str, requires: tuple[str, ...] = ()) -> str:
    """Save the pyfunc (models from code: ``module``'s file, with fewstep as code_paths), upload it
    as a logged model; returns its model id."""
    code_file = importlib.util.find_spec(module).origin
    pkg_dir = Path(code_file).parent
    with tempfile.TemporaryDirectory(prefix="fewstep-pyfunc-") as tmp:
        pkg_copy = Path(tmp) / "code" / "fewstep"
        shutil.copytree(pkg_dir, pkg_copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        local = Path(tmp) / SAMPLER_ARTIFACT
        mlflow.pyfunc.save_model(path=str(local), python_model=code_file, artifacts=artifacts,
                                 code_paths=[str(pkg_copy)], pip_requirements=_pip_requirements(requires),
                                 model_config=model_config)
        lm = t.client.create_logged_model(t.experiment_id, name=SAMPLER_ARTIFACT, source_run_id=run_id,
                                          tags={k: v for k, v in tags.items() if not k.startswith("mlflow.")})
        try:
            t.client.log_model_artifacts(lm.model_id, str(local))
        except BaseException:
            t.client.finalize_logged_model(lm.model_id, "FAILED")
            raise
        t.client.finalize_logged_model(lm.model_id, "READY")
    return lm.model_id


def _create_version(t: Tracking, name: str, model_id: str, run_id: str | None, tags: dict[str, str], kind: str):
    try:
        t.client.create_registered_model(name, tags={"fewstep": kind})
    except MlflowException as e:
        if "ALREADY_EXISTS" not in str(e.error_code):
            raise
    return t.client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                         model_id=model_id)


def _clean(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items() if v is not None and v != ""}


def _verified_weights(model_dir: Path, recorded: str | None) -> str:
    """The weights' sha256 of a model dir, which must be the one its config.json records."""
    from fewstep import models, storage

    weights = model_dir / models.WEIGHTS
    sha = storage.sha256_file(weights)
    if sha != recorded:
        raise LineageError(f"{weights}: sha256 {sha[:12]} does not match config.json ({str(recorded)[:12]})")
    return sha


def _verified(model_dir: Path) -> tuple[ModelCard, str]:
    """(card, weights sha256) of a model dir whose weights match its card."""
    from fewstep import models

    card = models.load_card(model_dir)
    return card, _verified_weights(model_dir, card.weights_sha256)


def _source_tags(card: ModelCard) -> dict[str, Any]:
    """family, and for an imported teacher or anything made from one (its students, their OLSS
    schedulers) the source it descends from: source_sha256 (searchable: every version made from one
    source), source_kind and source_url."""
    from fewstep.teacher_source import card_source_sha256

    source = getattr(card.lineage, "source", None) or {}
    return {"family": card.family, "source_sha256": card_source_sha256(card), "source_kind": source.get("kind"),
            "source_url": source.get("url") or source.get("path")}


def _requires(card: ModelCard) -> tuple[str, ...]:
    """A diffusers-family network needs diffusers where the pyfunc is served."""
    return ("diffusers",) if card.family.startswith("diffusers") else ()


def _model_artifacts(model_dir: Path) -> dict[str, str]:
    from fewstep import models

    return {"weights": str(model_dir / models.WEIGHTS), "config": str(model_dir / models.CONFIG)}


def _registered_parent(pname: str, weights_sha256: str, what: str, t: Tracking) -> str:
    """The version of ``pname`` with these weights; LineageError when it is not registered."""
    mv = find_version(pname, {"weights_sha256": weights_sha256}, t)
    if mv is None:
        raise LineageError(f"{what} ({pname}, weights {weights_sha256[:12]}) is not registered; register it first")
    return str(mv.version)


# --------------------------------------------------------------------------------------------
# the three kinds


def register_model_dir(
    model_dir: str | Path,
    *,
    default_steps: int | None = None,
    run_id: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    git_commit: str | None = None,
    tracking: Tracking | None = None,
) -> Registered:
    """Register a teacher or student model dir as a pyfunc sampler version (idempotent: an existing
    version with the same weights_sha256 is returned). A student's parent must be registered.
    ``default_steps``: the predict default when the request has no "steps" (default: the config's
    sample_steps)."""
    t = tracking or configure()
    src, model_dir = _source(repo, dvc_lock, git_commit), Path(model_dir)
    card, sha = _verified(model_dir)
    lin = card.lineage
    steps = int(default_steps or card.sample_steps)

    def tags() -> dict[str, Any]:
        out = {"role": card.role, "model": model_dir.name, "dataset": lin.dataset,
               "data_hash": lin.data_hash, "weights_sha256": sha, "params_hash": lin.params_hash,
               "run_hash": lin.run_hash, "parameterization": card.parameterization,
               "image_size": card.image_size, "sample_steps": card.sample_steps, "nfe": steps,
               **_source_tags(card)}
        if card.role == "student":
            p = lin.parent
            if p is None:
                raise LineageError(f"{model_dir}: a student's config.json needs its parent")
            pname = model_name(lin.dataset, p.role, p.sample_steps, p.variant)
            pver = _registered_parent(pname, p.weights_sha256, f"parent {p.path}", t)
            out.update(parent_model=pname, parent_version=pver, parent_weights_sha256=p.weights_sha256)
        return {**out, **src.tags(model_dir)}

    return _register(t, _Version(model_registry_name(card), {"weights_sha256": sha}, tags,
                                 _model_artifacts(model_dir), {"default_steps": steps}, requires=_requires(card)),
                     run_id)


def register_evaluator(
    model_dir: str | Path,
    dataset: str,
    *,
    run_id: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    git_commit: str | None = None,
    tracking: Tracking | None = None,
) -> Registered:
    """Register the evaluator (the feature network of FD/KID) as ``<dataset>-evaluator``: a pyfunc
    from uint8 images to features (fewstep/evaluator_pyfunc.py), with its reference statistics,
    tagged with the data it was trained on and its test accuracy. Idempotent by weights_sha256."""
    t = tracking or configure()
    src, model_dir = _source(repo, dvc_lock, git_commit), Path(model_dir)
    from fewstep import models, storage

    cfg = storage.read_json(model_dir / models.CONFIG)  # the evaluator's own config (no denoiser, no card)
    sha = _verified_weights(model_dir, cfg.get("weights_sha256"))
    artifacts = _model_artifacts(model_dir)
    if (model_dir / "ref_stats.safetensors").exists():
        artifacts["ref_stats"] = str(model_dir / "ref_stats.safetensors")

    def tags() -> dict[str, Any]:
        return {"role": "evaluator", "model": model_dir.name, "dataset": dataset, "data_hash": cfg.get("data_hash"),
                "weights_sha256": sha, "test_accuracy": cfg.get("test_accuracy"),
                "feature_dim": cfg.get("feature_dim"), **src.tags(model_dir)}

    return _register(t, _Version(evaluator_registry_name(dataset), {"weights_sha256": sha}, tags, artifacts, {},
                                 module=EVALUATOR_MODULE, kind="evaluator"), run_id)


def register_scheduler(
    scheduler_path: str | Path,
    model_dir: str | Path,
    *,
    run_id: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    git_commit: str | None = None,
    tracking: Tracking | None = None,
) -> Registered:
    """Register an OLSS scheduler JSON (with its model's weights) as ``<dataset>-olss-<model>-<n>step``.
    Idempotent by the scheduler file's sha256; the model's registered version must exist."""
    from fewstep import models, storage
    from fewstep.math.olss import OLSSScheduler

    t = tracking or configure()
    src, path, model_dir = _source(repo, dvc_lock, git_commit), Path(scheduler_path), Path(model_dir)
    with storage.open_read(path) as f:
        sched = OLSSScheduler.from_json(f.read().decode())
    card = models.load_card(model_dir)
    wsha, dataset = card.weights_sha256, card.lineage.dataset
    meta = sched.meta or {}
    if meta.get("model_weights_sha256") not in (None, wsha):
        raise LineageError(f"{path} was fitted on weights {meta['model_weights_sha256'][:12]}, but {model_dir} has "
                           f"{str(wsha)[:12]}; re-run fit_olss")
    model = meta.get("model") or model_dir.name
    ssha = storage.sha256_file(path)

    def tags() -> dict[str, Any]:
        pname = model_registry_name(card)
        pver = _registered_parent(pname, wsha, f"the model of {path}", t)
        return {
            "role": "olss", "model": model, "dataset": dataset, "data_hash": card.lineage.data_hash,
            "weights_sha256": wsha, "params_hash": storage.sha256_json(meta),
            "scheduler_sha256": ssha, "scheduler_file": path.name, "olss_variant": meta.get("variant"),
            "olss_basis": sched.basis, "olss_method": meta.get("method"), "olss_chosen_from": meta.get("chosen_from"),
            "sample_steps": sched.steps, "nfe": sched.steps, "timesteps": json.dumps(sched.timesteps),
            "reference_steps": meta.get("reference_steps"), "parent_model": pname, "parent_version": pver,
            "parent_weights_sha256": wsha, "trajectories_path": meta.get("trajectories"),
            "trajectories_hash": provenance.trajectories_hash(meta, src.repo, src.lock), **_source_tags(card),
            **src.tags(path),
        }

    name = scheduler_registry_name(dataset, model, sched.steps)
    key = {"scheduler_sha256": ssha, "weights_sha256": wsha}
    artifacts = {**_model_artifacts(model_dir), "scheduler": str(path)}
    return _register(t, _Version(name, key, tags, artifacts, {"default_steps": sched.steps}, requires=_requires(card)),
                     run_id)


def register_all(
    models_root: str | Path = "models",
    schedulers_root: str | Path = "schedulers",
    *,
    default_steps: Mapping[str, int] | None = None,
    dataset: str | None = None,
    run_id: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    git_commit: str | None = None,
    tracking: Tracking | None = None,
) -> list[Registered]:
    """Every model dir (teachers first, then students from most to fewest steps, so a parent is
    registered before its student), the evaluator (``<dataset>-evaluator``; ``dataset`` defaults to
    the teachers') and every ``<schedulers_root>/<model>/olss-*.json``."""
    from fewstep import models

    t = tracking or configure()
    kw: dict[str, Any] = dict(run_id=run_id, repo=repo, dvc_lock=dvc_lock, git_commit=git_commit, tracking=t)
    root = Path(models_root)
    found = [d for d in sorted(root.iterdir()) if not d.name.startswith(".") and (d / models.CONFIG).exists()] \
        if root.is_dir() else []
    roles = {d: models.config_role(d) for d in found}
    dirs = [d for d in found if roles[d] in ("teacher", "student")]  # samplers
    cards = {d: models.load_card(d) for d in dirs}
    dirs.sort(key=lambda d: (cards[d].role != "teacher", -cards[d].sample_steps, d.name))
    out = [register_model_dir(d, default_steps=(default_steps or {}).get(d.name), **kw) for d in dirs]
    for d in (d for d in found if roles[d] == "evaluator"):
        ds = dataset or next((c.lineage.dataset for c in cards.values() if c.lineage.dataset), None)
        if ds is None:
            raise LineageError(f"{d}: no dataset name for the evaluator (pass dataset=, or register a teacher)")
        out.append(register_evaluator(d, ds, **kw))
    sroot = Path(schedulers_root)
    for f in sorted(sroot.glob("*/olss-*.json")) if sroot.is_dir() else []:
        out.append(register_scheduler(f, root / f.parent.name, **kw))
    return out


def lineage(name: str, version: str | int, tracking: Tracking | None = None) -> list[tuple[str, str, dict[str, str]]]:
    """[(name, version, tags), parent's, grandparent's, ...] following parent_model/parent_version."""
    t = tracking or configure()
    chain, seen = [], set()
    cur: tuple[str, str] | None = (name, str(version))
    while cur and cur not in seen:
        seen.add(cur)
        mv = t.client.get_model_version(*cur)
        chain.append((cur[0], cur[1], dict(mv.tags)))
        cur = (mv.tags["parent_model"], mv.tags["parent_version"]) if "parent_version" in mv.tags else None
    return chain


# --------------------------------------------------------------------------------------------
# download (the export command's --version)


@dataclass(frozen=True)
class DownloadedVersion:
    """A registered version's files, downloaded: its model dir and, for an OLSS version, its scheduler."""

    name: str
    version: str
    model_dir: Path
    scheduler: Path | None
    tags: dict[str, str]


def parse_version_ref(ref: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) from ``NAME/VERSION``, ``NAME@ALIAS`` or the same behind ``models:/``."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise LineageError(f"bad model version {ref!r}; expected NAME/VERSION, NAME@ALIAS or models:/NAME/VERSION")


def download_version(ref: str, dst: str | Path, tracking: Tracking | None = None) -> DownloadedVersion:
    """Download the version ``ref`` (see parse_version_ref) into ``dst``: ``dst/model`` is a model dir
    (model.safetensors + config.json, checked against the version's weights_sha256) and, for an
    OLSS version, ``dst/<scheduler file>``."""
    from fewstep import models
    from mlflow.models import Model

    t = tracking or configure()
    name, version, alias = parse_version_ref(ref)
    try:
        mv = t.client.get_model_version_by_alias(name, alias) if alias else t.client.get_model_version(name, version)
    except MlflowException as e:
        raise LineageError(f"no registered version {ref!r} in {t.uri}: {e.message}") from None
    dst = Path(dst)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst / "pyfunc"),
                                                     tracking_uri=t.uri))
    arts = Model.load(str(local)).flavors["python_function"].get("artifacts", {})

    def file(key: str) -> Path | None:
        entry = arts.get(key)
        return None if entry is None else local / entry["path"]

    weights, config = file("weights"), file("config")
    if weights is None or config is None:
        raise LineageError(f"{name} version {mv.version} has no model weights and config (is it the evaluator?)")
    model_dir = dst / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, model_dir / models.WEIGHTS)
    shutil.copyfile(config, model_dir / models.CONFIG)
    tags = dict(mv.tags)
    _verified_weights(model_dir, tags.get("weights_sha256"))
    sched = file("scheduler")
    if sched is not None:
        sched = Path(shutil.copyfile(sched, dst / (tags.get("scheduler_file") or sched.name)))
    return DownloadedVersion(name, str(mv.version), model_dir, sched, tags)
