"""The offline distillation loop: TD-MPC2 training of a student with teacher targets.

Teacher targets come either from the live teacher (one frozen forward pass per batch) or from a
:class:`~tdmpc_opt.teacher_cache.TeacherCache` looked up by the sampled dataset rows; both give
the same numbers, so a cached run equals a live one.

Under torchrun each rank samples its own share of the batch (as ``train offline``) and the
latent projection's gradients are averaged over ranks like the student's; rank 0 builds a
missing teacher cache while the others wait.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tdmpc_opt import distributed
from tdmpc_opt.distillation import DistillConfig, Distiller, teacher_targets
from tdmpc_opt.replay import SequenceSampler
from tdmpc_opt.teacher_cache import TeacherCache, build_cache
from tdmpc_opt.trainer import evaluate_model, train_offline
from tdmpc_opt.training import Batch, Rollout, TDMPC2Learner
from tdmpc_opt.world_model import WorldModel


class RowSampler(SequenceSampler):
    """A :class:`SequenceSampler` that remembers the rows of its last batch (cache lookups)."""

    last_rows: np.ndarray | None = None

    def sample(self) -> Batch:
        rows, tasks = self.sample_rows()
        self.last_rows = rows
        return self.batch_at(rows, tasks)


class DistillHook:
    """The ``extra_losses`` hook of a distillation run.

    It also steps the latent projection's optimizer: the projection's gradients of update
    ``k`` are applied when update ``k + 1`` asks for its losses (and by :meth:`finish`).
    """

    def __init__(self, distiller: Distiller, teacher: WorldModel | None,
                 cache: TeacherCache | None, sampler: RowSampler):
        self.distiller, self.teacher, self.cache, self.sampler = distiller, teacher, cache, sampler

    def targets(self, batch: Batch):
        latent = self.distiller.cfg.needs_latent
        if not self.distiller.cfg.uses_targets:
            return None
        if self.cache is not None:
            return self.cache.targets(self.sampler.last_rows, batch.obs.device)
        return teacher_targets(self.teacher, batch.obs[:-1], batch.action, batch.task, latent)

    def __call__(self, batch: Batch, ro: Rollout):
        self.finish()
        return self.distiller.losses(batch, ro, self.targets(batch))

    def finish(self) -> None:
        """Step the latent projection with its gradients averaged over ranks."""
        if self.distiller.projection is not None:
            distributed.all_reduce_grads(self.distiller.projection.parameters())
        self.distiller.after_update()

    def state_dict(self) -> dict:
        """The latent projection and its optimizer, pending gradients applied first (so a
        run resumed from this checkpoint continues exactly like an uninterrupted one)."""
        self.finish()
        return self.distiller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.distiller.load_state_dict(state)


def prepare_cache(teacher: WorldModel, teacher_sha256: str, dataset, task_map,
                  cache_dir: Path, latent: bool, progress: bool = False) -> TeacherCache:
    """Open the cache at ``cache_dir`` if it matches teacher and dataset, else build it."""
    from tdmpc_opt.errors import DataError

    if (cache_dir / "meta.json").is_file():
        cache = TeacherCache(cache_dir)
        try:
            cache.check(teacher_sha256, dataset)
            if latent and not cache.has_latent:
                raise DataError("cache has no teacher latents")
            return cache
        except DataError as e:
            print(f"rebuilding the teacher cache: {e}")
    from tqdm import tqdm

    with tqdm(total=dataset.obs.shape[0], unit="row", desc="teacher cache",
              disable=not progress) as bar:
        return build_cache(teacher, teacher_sha256, dataset, cache_dir, task_map, latent,
                           progress=bar.update)


def distill_offline(learner: TDMPC2Learner, teacher: WorldModel, teacher_sha256: str, dataset,
                    task_map, dcfg: DistillConfig, run, *, planner=None,
                    cache_dir: Path | None = None, resume: bool = False,
                    progress: bool = False, config: dict | None = None) -> dict[str, float]:
    """Train ``learner``'s student for ``learner.cfg.steps`` updates with distillation terms.

    Returns the metrics of the last update (``distill_*_loss`` included).
    """
    cfg = learner.cfg
    sampler = RowSampler(dataset, distributed.local_batch(cfg.batch_size), cfg.horizon,
                         seed=distributed.rank_seed(cfg.seed), device=learner.device,
                         task_map=task_map)
    cache = None
    if cache_dir is not None and dcfg.uses_targets:
        def open_cache():
            return prepare_cache(teacher, teacher_sha256, dataset, task_map, Path(cache_dir),
                                 dcfg.needs_latent, progress and distributed.is_main())

        cache = open_cache() if distributed.is_main() else None
        distributed.wait_for_main()  # the others open rank 0's cache (or build their own)
        if cache is None:
            cache = open_cache()
    distiller = Distiller(learner.model, dcfg, cfg.rho, teacher.cfg.latent_dim, teacher)
    if distiller.projection is not None:
        distributed.broadcast_module(distiller.projection)
    hook = DistillHook(distiller, teacher, cache, sampler)
    present = tuple(t for t in learner.model.cfg.tasks if t in dataset.tasks)

    def evaluate(model):
        return evaluate_model(model, present, cfg.eval_episodes, cfg.seed, planner)

    last = train_offline(learner, sampler, run, extra_losses=hook if dcfg.any_term else None,
                         evaluate=evaluate, resume=resume, progress=progress, config=config,
                         extra_state=hook)
    hook.finish()
    return last
