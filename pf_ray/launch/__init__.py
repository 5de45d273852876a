"""The run side, the composition root: baseline -> search (Ray Tune) -> retrain (Ray Train) -> export -> verify.

Only the modules of this package import Ray in ``pf_ray``, and lazily (inside functions), so ``import pf_ray``
and ``import pf_ray.launch`` work without Ray. One module per stage, in the order a run goes through them:

    preflight     every input checked, the learner's config resolved once (``RunSpec``), before anything is written
    cluster       Ray for the run (the configured cluster or a local one), its node types, trial sizes, concurrency
    resources     resources.* -> Ray requests (trials, Train workers, retrain, baseline), impossible GPU requests
    baseline      the given, cached or freshly trained full-precision model (a Ray task on a GPU with use_gpu)
    search        Ray Tune: searcher + ASHA over trials (``trainables/``), the trial records, the choice
    retrain       the chosen candidate on Ray Train with the full budget (``trainables.train_loop``)
    pipeline      ``compress``: the stages in order, then ``pf_ray.export.pipeline`` and the report
    target        the deployment target: the latency table of a latency budget, the end-of-run measurement
    resume        ``resume`` an interrupted run, here or from its storage URI on another machine
    search_state, orphans, atomic_fs
                  Ray 2.60 workarounds: a saved search reconciled before it is restored, placement groups that
                  stopped Ray Train runs leave behind, a local filesystem whose files appear whole

Run folder (``<storage.path>/<storage.name>``; with a remote ``storage.path`` (s3://, gs://) Ray writes search/ and
retrain/ there directly, and the driver writes the rest in ``<storage.staging_path>/<storage.name>`` and uploads
it to ``<storage.path>/<storage.name>`` after writing config.yaml and when the run ends)::

    config.yaml            the resolved experiment (every default filled in)
    command.txt            the command that started the run
    search_space.json      the searched space: its config field, what one value is, the layer names
    latency_table.json     search.budget latency: the target's latency table the budget projects onto
    search/                the Ray Tune experiment (one folder per trial); a Pareto set of target speed-ups:
                           search-<s>x/ per target
    chosen_trial.json      the search's winner, written before the retrain (a resumed run retrains the same one)
    retrain/               the Ray Train run of the best candidate (checkpoints per epoch, progress.log,
                           tensorboard/ with each epoch's metrics); search/<trial>/ has Tune's TensorBoard files
    artifacts/             compressed.pt; baseline and compressed as .onnx, .int8.onnx, .ort, .int8.ort;
                           manifest.json (sizes, SHA-256, inputs, preprocessing, verified figures)
    results.json           machine-readable summary: baseline, every trial, the choice, the artifacts, and the
                           target section (the artifacts and candidates timed side by side on the deployment target)
    report.md, report.html the readable report (plots under report_files/, embedded in the HTML);
                           `pf-ray report RUN_DIR` rebuilds them, also for an interrupted run
"""

from __future__ import annotations

from pf_ray.launch.pipeline import compress
from pf_ray.launch.resume import resume

__all__ = ["compress", "resume"]
