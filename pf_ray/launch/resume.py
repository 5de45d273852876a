"""``pf-ray resume``: continue an interrupted run from its folder, here or (by its URI) on another machine."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pf_ray.config import ExperimentConfig
from pf_ray.data import load_data
from pf_ray.errors import ConfigError
from pf_ray.launch.baseline import cached_baseline, given_state_dict, imported_baseline_path
from pf_ray.launch.cluster import check_cluster, check_storage, ray_for
from pf_ray.launch.pipeline import run_stages
from pf_ray.launch.preflight import Prepared, check_local_resources
from pf_ray.report import COMMAND_FILE
from pf_ray.spec import RunSpec
from pf_ray.storage import (
    RETRAIN_DIR,
    RUN_CONFIG,
    URI_SCHEMES,
    RunConfigFile,
    RunLocation,
    copy_file,
    filesystem_of,
    is_remote,
    is_search_dir,
    join_uri,
    read_run_config,
    unsupported_scheme,
    write_run_config,
)
from pf_ray.strict import from_dict

Log = Callable[[str], None]


def resume(run_dir: str | Path, *, log: Log = print, staging_path: str | None = None) -> dict[str, Any]:
    """Continue an interrupted run (``pf-ray resume RUN_DIR``) from where it stopped.

    The baseline is reused from its cache, the search continues from Tune's last experiment checkpoint (finished
    trials kept, the searcher's state restored), the retrain from its last epoch checkpoint; export, verification
    and the report run again. The run folder is trusted input: Tune unpickles its saved state.

    ``run_dir`` is the local run folder; with a remote storage.path (in its config.yaml) the search and retrain
    are found at ``<storage.path>/<folder name>``. It may also be that remote folder's URI (resuming on another
    machine than the one that started the run): its driver files are fetched into ``<staging>/<name>`` first,
    ``staging`` being ``staging_path`` if given, else the run's storage.staging_path.
    """
    started = time.time()
    if is_remote(str(run_dir)):
        run_dir = fetch_run(str(run_dir), staging_path, log=log)
    elif staging_path is not None:
        raise ConfigError(f"--staging: got {staging_path!r} with the local run folder {str(run_dir)!r}; it is "
                          f"only for a run given by its storage URI (s3://..., gs://...)")
    run_dir = Path(run_dir).expanduser().resolve()
    if (run_dir / RUN_CONFIG).is_file() and (run_dir / "results.json").is_file():
        log(f"resume: {run_dir} already finished (results.json); nothing to do "
            f"(`pf-ray report {run_dir}` rebuilds its report)")
        return json.loads((run_dir / "results.json").read_text())
    run_config = read_run_config(run_dir)
    spec = _spec(run_config)
    config = spec.experiment
    run_storage = join_uri(config.storage.path, run_dir.name) if is_remote(config.storage.path) else str(run_dir)
    data = load_data(config.dataset, seed=config.seed)
    baseline_path: Path | None = None
    if config.baseline.checkpoint:
        baseline_path = Path(config.baseline.checkpoint)
        if not baseline_path.is_file():
            raise ConfigError(f"baseline.checkpoint: {str(baseline_path)!r} (in {run_config.location}) no longer "
                              "exists")
        if given_state_dict(config) is not None:  # the user's weights: their imported baseline, if made
            imported = imported_baseline_path(config)
            baseline_path = imported if imported.exists() else None
    else:
        baseline_path = cached_baseline(config, log=log)
    command_file = run_dir / COMMAND_FILE
    command = command_file.read_text().strip() if command_file.is_file() else None
    if config.resources.ray_address is None:  # this machine's local Ray may differ from the one that started it
        check_local_resources(config, log=log)
    with ray_for(config, log=log):
        check_storage(config)
        check_cluster(config, log=log)
        log(f"resume: {run_dir}" + (f" (search and retrain in {run_storage})" if run_storage != str(run_dir)
                                    else ""))
        prepared = Prepared(spec, data, baseline_path, RunLocation(run_dir, run_storage))
        return run_stages(prepared, log=log, command=command, started=started, resume=True)


def fetch_run(uri: str, staging_path: str | None, *, log: Log = print) -> Path:
    """The local run folder for a run in remote storage, its driver files fetched from ``uri`` if not here yet.

    The driver's files (config.yaml, command.txt, chosen_trial.json, and whatever was uploaded when it stopped)
    are copied into ``<staging>/<name>``; Ray's folders (search/, or a Pareto set's search-<target>x/, and
    retrain/) stay in the storage, where the resumed run reads and continues them. A staging path given here
    replaces the one in the fetched config.yaml (the first machine's folder)."""
    import pyarrow.fs

    scheme = unsupported_scheme(uri)
    if scheme is not None:
        raise ConfigError(f"run_dir: got {uri!r}; pf-ray cannot read {scheme} URIs; allowed: a local run folder or "
                          f"a URI starting {', '.join(URI_SCHEMES)}")
    name = uri.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]
    run_config = read_run_config(uri)
    spec = _spec(run_config)  # one this version cannot read: refused before anything is written
    if not is_remote(spec.experiment.storage.path):
        raise ConfigError(f"run_dir: {uri!r} holds a run whose storage.path is {spec.experiment.storage.path!r}, "
                          "not a URI; resume it from its local folder")
    staging = Path(staging_path or spec.experiment.storage.staging_path).expanduser().resolve()
    local = staging / name
    if local.exists():
        log(f"resume: using the local run folder {local}")
        return local
    config = run_config.data
    if staging_path is not None:
        config["storage"] = {**(config.get("storage") or {}), "staging_path": str(staging)}
    partial = staging / f".{name}.fetching"  # renamed to the run folder once whole
    shutil.rmtree(partial, ignore_errors=True)
    filesystem, root = filesystem_of(uri)
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
        relative = info.path[len(root):].lstrip("/")
        top = relative.split("/", 1)[0]
        if info.type != pyarrow.fs.FileType.File or is_search_dir(top) or top == RETRAIN_DIR:
            continue
        copy_file(join_uri(uri, *relative.split("/")), str(partial / relative))
    write_run_config(partial, config)
    partial.rename(local)
    log(f"resume: fetched {uri} into {local}")
    return local


def _spec(run_config: RunConfigFile) -> RunSpec:
    """The run's spec from its config.yaml; a ConfigError names the file."""
    try:
        return RunSpec.resolve(from_dict(ExperimentConfig, run_config.data))
    except ConfigError as error:
        raise run_config.error(str(error)) from None
