"""Training loops: offline multi-task training from a dataset, online single-task training.

Both loops write a :class:`~tdmpc_opt.runs.RunDir` (config, CSV metrics, checkpoints) and can
resume a killed run from its newest valid checkpoint with the same result as an uninterrupted
run: checkpoints hold the model, both optimizers, the running scale, the step counter, the
sampler's and torch's random states (and, online, the replay buffer and environment seeds).

Offline training stopped by Ctrl-C, SIGTERM or SIGHUP (:mod:`tdmpc_opt.stops`) finishes the
update under way and checkpoints it before the interrupt goes on (under torchrun every rank the
same update): no finished update is lost, and the resumed run still equals an uninterrupted
one. Online training checkpoints
the start of the episode under way (kept in memory at every episode start), so only that
episode is played again.

Offline training also runs under ``torchrun`` (:mod:`tdmpc_opt.distributed`): rank 0 alone
evaluates and writes the run directory; its checkpoints also hold every rank's sampler and torch
random states, and a resumed run hands each rank its own.

>>> learner = build_learner(model_cfg, TrainConfig(steps=10_000))
>>> train_offline(learner, SequenceSampler(Dataset("data/mt30"), 256, 3), RunDir("runs/a"))
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from tdmpc_opt import distributed, stops
from tdmpc_opt.config import ModelConfig, PlannerConfig, config_to_dict
from tdmpc_opt.replay import ReplayBuffer, SequenceSampler
from tdmpc_opt.runs import RunDir, RunError, check_finite, check_resume_config, plot_curves
from tdmpc_opt.training import ExtraLosses, TDMPC2Learner, TrainConfig
from tdmpc_opt.world_model import WorldModel

Evaluate = Callable[[WorldModel], dict[str, float]]
"""Evaluation hook: model -> metrics (e.g. ``episode_reward``)."""
_SHOWN = ("consistency_loss", "reward_loss", "value_loss", "pi_loss")


def set_threads(n: int = 0) -> int:
    """Use ``n`` intra-op threads (0: one per available core); returns the number set."""
    if n <= 0:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return torch.get_num_threads()


def build_learner(model_cfg: ModelConfig, cfg: TrainConfig,
                  device: str | torch.device = "cpu") -> TDMPC2Learner:
    """A freshly initialised world model (seeded with ``cfg.seed``) and its learner."""
    torch.manual_seed(cfg.seed)
    return TDMPC2Learner(WorldModel(model_cfg).to(device), cfg)


def run_config(learner: TDMPC2Learner, **extra) -> dict:
    """The resolved configuration of a run, as JSON-ready dict."""
    return {"train": config_to_dict(learner.cfg), "model": config_to_dict(learner.model.cfg),
            **extra}


def _progress(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                dynamic_ncols=True, smoothing=0.05)


def _show(bar: tqdm, metrics: dict[str, float]) -> None:
    bar.set_postfix({k.replace("_loss", ""): f"{metrics[k]:.3g}" for k in _SHOWN
                     if k in metrics}, refresh=False)


def _close(bar: tqdm) -> None:
    """Close a progress bar after a stop; after SIGHUP its terminal may be gone (EIO)."""
    with contextlib.suppress(OSError):
        bar.close()


def _save_model(run: RunDir, learner: TDMPC2Learner, step: int) -> None:
    from tdmpc_opt.checkpoints import save_checkpoint

    try:
        save_checkpoint(run.path / "model.safetensors", learner.model,
                        extra={"step": step, "run": str(run.path)})
    except OSError as e:
        from tdmpc_opt.runs import RunError

        raise RunError(f"could not write {run.path / 'model.safetensors'} ({e.strerror})") \
            from None


# --------------------------------------------------------------------------- offline
def train_offline(learner: TDMPC2Learner, sampler: SequenceSampler, run: RunDir | None, *,
                  extra_losses: ExtraLosses | None = None, evaluate: Evaluate | None = None,
                  resume: bool = False, progress: bool = False,
                  config: dict | None = None, extra_state=None) -> dict[str, float]:
    """Run ``learner.cfg.steps`` updates on batches from ``sampler``.

    Args:
        run: run directory for metrics and checkpoints (None: nothing is written).
        extra_losses: hook adding loss terms (see :class:`TDMPC2Learner.update`).
        evaluate: called every ``eval_freq`` updates; its metrics go to ``eval.csv``.
        resume: continue from the run's newest valid checkpoint, if any; ``config`` must
            then match the stored one (:func:`~tdmpc_opt.runs.check_resume_config`).
        config: resolved configuration written to ``config.json``.
        extra_state: anything else a checkpoint must hold (``state_dict()`` /
            ``load_state_dict()``), e.g. the distiller's latent projection.

    Under torchrun every rank calls this with the same arguments except the sampler, which
    draws the rank's ``batch_size / world_size`` rows with its own seed
    (:func:`~tdmpc_opt.distributed.local_batch`, :func:`~tdmpc_opt.distributed.rank_seed`);
    only rank 0 evaluates, shows progress and writes to ``run``.

    Ctrl-C, SIGTERM or SIGHUP lets the update under way finish, checkpoints it and raises
    ``KeyboardInterrupt``; under torchrun the ranks first agree after every update whether any
    was stopped (:func:`~tdmpc_opt.distributed.any_rank`), so all checkpoint the same update.

    Returns:
        The metrics of the last update (means over ranks).
    Raises:
        TrainingDiverged: a loss became NaN/Inf (names the step and last good checkpoint).
        RunError: a checkpoint could not be written (the previous one is kept); on resume,
            other settings than the run's or no readable checkpoint.
    """
    cfg, main = learner.cfg, distributed.is_main()
    writer = run if main else None  # the only rank that writes
    start = _start_offline(learner, sampler, run, resume, config, extra_state)
    if writer is not None and start == cfg.steps:
        # Finished before. A run of an older version killed between its last checkpoint and
        # the model file has a model file one checkpoint behind: write the final one again.
        _save_model(writer, learner, start)
    metrics: dict[str, float] = {}
    t0, bar = time.perf_counter(), _progress(cfg.steps, start, progress and main, "train")
    done = saved = start  # updates finished; the newest checkpoint's step
    together = distributed.is_active()  # ranks stop at the same update, or none could save
    eval_every = cfg.eval_freq if evaluate is not None else 0

    def checkpoint(step: int) -> None:  # a collective under torchrun: every rank calls it
        state = _state(learner, sampler, extra_state)
        if writer is not None:  # the model file first: it is never older than a checkpoint
            _save_model(writer, learner, step)
            writer.save_checkpoint(step, state)

    def log_and_evaluate(i: int) -> None:
        if i % cfg.log_freq == 0 or i == cfg.steps:
            _show(bar, metrics)
            if writer is not None:
                writer.log("train", i, {**metrics, "elapsed_s": time.perf_counter() - t0})
        if eval_every and i % eval_every == 0:
            _periodic_evaluation(evaluate, learner.model, writer, i)

    try:
        with stops.held_back() if together else contextlib.nullcontext([]) as caught:
            for i in range(start + 1, cfg.steps + 1):
                with contextlib.nullcontext() if together else stops.finish_first():
                    metrics = learner.update(sampler.sample(), extra_losses)
                    check_finite(metrics, i, run)
                    done = i
                bar.update(1)
                log_and_evaluate(i)
                if run is not None and (i % cfg.checkpoint_freq == 0 or i == cfg.steps):
                    checkpoint(i)
                    saved = i
                if together and distributed.any_rank(bool(caught), learner.device):
                    if run is not None and done > saved:
                        checkpoint(done)
                        saved = done
                    break
        stops.act_on(caught)  # this rank's signal, now with the command's own handling
        if together and done < cfg.steps:  # another rank was interrupted
            raise KeyboardInterrupt
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP: keep every finished update
        if run is not None and done > saved and not together:
            checkpoint(done)
        _close(bar)  # ends its line: the command's note follows on a line of its own
        raise
    bar.close()
    distributed.barrier()  # rank 0's last checkpoint is written when every rank returns
    return metrics


def _periodic_evaluation(evaluate: Evaluate, model, writer: RunDir | None, step: int) -> None:
    """Rank 0 evaluates and logs; the others wait for it, however long it takes (a large model
    on MT30 on a CPU: hours), without the collectives' timeout."""
    if distributed.is_main():
        result = evaluate(model)
        if writer is not None:
            writer.log("eval", step, result)
    distributed.wait_for_main()


def _start_offline(learner: TDMPC2Learner, sampler: SequenceSampler, run: RunDir | None,
                   resume: bool, config: dict | None, extra_state) -> int:
    """Restore the newest checkpoint when resuming, or give every rank the same start; write
    ``config.json``. Returns the number of updates already done."""
    if resume and run is not None:
        check_resume_config(run, config)
    start = _restore(run, learner, sampler, extra_state) if resume and run else 0
    if start == 0 and distributed.is_active():  # same start, then each rank its own noise
        distributed.broadcast_module(learner.model)
        torch.manual_seed(distributed.rank_seed(learner.cfg.seed))
    if run is not None and distributed.is_main() and config is not None:
        run.write_config(config)
    return start


def _cpu_copy(obj):
    """A copy of a state (nested dicts and lists) with every tensor copied to the CPU, so that
    a copy kept aside takes no accelerator memory (checkpoints are loaded from the CPU anyway)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _state(learner: TDMPC2Learner, sampler: SequenceSampler, extra_state=None) -> dict:
    state = {"learner": learner.state_dict(), "sampler": sampler.state_dict(),
             "torch_rng": torch.get_rng_state(), "step": learner.step}
    if extra_state is not None:
        state["extra"] = extra_state.state_dict()
    if distributed.is_active():  # every rank's own random states, in rank order
        state["ranks"] = distributed.all_gather_object(
            {"sampler": state["sampler"], "torch_rng": state["torch_rng"]})
    return state


def _rank_state(state: dict) -> dict:
    """This rank's sampler and torch random states in a checkpoint."""
    ranks, world = state.get("ranks"), distributed.world_size()
    written = len(ranks) if ranks else 1
    if written != world:
        raise RunError(f"the checkpoint of step {state['step']} was written by {written} "
                       f"process(es), this run has {world}: resume with {written}")
    return ranks[distributed.rank()] if ranks else state


def _restore(run: RunDir, learner: TDMPC2Learner, sampler: SequenceSampler,
             extra_state=None) -> int:
    """Load the newest valid checkpoint; returns its step (0 when there is none).

    Under torchrun rank 0 reads it and sends it to the others (no shared filesystem needed).
    """
    found = distributed.broadcast_object(run.latest_checkpoint() if distributed.is_main()
                                         else None)
    if found is None:
        return 0
    _, state = found
    own = _rank_state(state)
    learner.load_state_dict(state["learner"])
    if extra_state is not None and state.get("extra"):
        extra_state.load_state_dict(state["extra"])
    sampler.load_state_dict(own["sampler"])
    torch.set_rng_state(own["torch_rng"])
    if distributed.is_main():
        run.truncate_metrics(int(state["step"]))
    return int(state["step"])


# ---------------------------------------------------------------------------- online
def default_seed_steps(episode_length: int) -> int:
    """TD-MPC2's random-action seeding: max(1000, 5 * episode length) steps."""
    return max(1000, 5 * episode_length)


def episode_seed(seed: int, episode: int) -> int:
    """Environment seed of training episode ``episode`` (reproducible after a resume)."""
    return (seed * 1_000_003 + episode * 7919) % (2**31 - 1)


@dataclasses.dataclass
class OnlineState:
    """Counters of an online run (saved with checkpoints)."""

    step: int = 0
    """Environment steps taken."""
    episode: int = 0
    """Episodes finished."""
    eval_next: bool = False
    """An evaluation is due at the next episode boundary."""
    pretrained: bool = False
    """The burst of ``seed_steps`` updates after seeding has been done."""
    last_ckpt: int = 0
    """Step of the last checkpoint."""


class OnlineTrainer:
    """TD-MPC2's online single-task loop: random seed steps, then planning with exploration
    noise and one update per environment step; evaluation every ``eval_freq`` steps.

    Args:
        task: task name; ``make_env(task, seed)`` builds its environment.
        learner: a single-task learner.
        planner: MPPI settings for acting (its horizon follows ``cfg.horizon``).
        evaluate: ``model -> metrics`` (default: :func:`evaluate_model` on this task).
    """

    def __init__(self, task: str, learner: TDMPC2Learner, run: RunDir | None,
                 planner: PlannerConfig | None = None, make_env=None,
                 evaluate: Evaluate | None = None):
        from tdmpc_opt.agent import Agent

        if make_env is None:
            from tdmpc_opt.envs import make_env
        self.task, self.learner, self.run, self.cfg = task, learner, run, learner.cfg
        self.env = make_env(task, self.cfg.seed)
        self.length = getattr(getattr(self.env, "task_spec", None), "episode_length", 500)
        self.seed_steps = self.cfg.seed_steps if self.cfg.seed_steps is not None else \
            default_seed_steps(self.length)
        planner = dataclasses.replace(planner or PlannerConfig(), horizon=self.cfg.horizon)
        self.agent = Agent(learner.model, planner, learner.device)
        self.agent.discounts = learner.discounts  # the planner uses the training discount
        mc = learner.model.cfg
        rows = min(self.cfg.buffer_size, self.cfg.steps) * (self.length + 1) // self.length
        self.buffer = ReplayBuffer(rows + 2 * (self.length + 1), mc.obs_dim, mc.action_dim)
        self.sampler = SequenceSampler(self.buffer, self.cfg.batch_size, self.cfg.horizon,
                                       seed=self.cfg.seed)
        self.rng = np.random.default_rng(self.cfg.seed)
        self.state = OnlineState()
        self._fallback: dict | None = None  # a checkpoint's state at the episode's start
        self._stops: list[int] = []  # stop signals seen during train() (stops.noted)
        self.evaluate = evaluate or (lambda m: evaluate_model(
            m, (task,), self.cfg.eval_episodes, self.cfg.seed, planner, make_env))
        self.last: dict[str, float] = {}

    # -------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {**self._state_but_buffer(), "buffer": self.buffer.state_dict()}

    def _state_but_buffer(self) -> dict:
        return {**_state(self.learner, self.sampler), "online": dataclasses.asdict(self.state),
                "action_rng": _json_rng(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        import json

        self.learner.load_state_dict(state["learner"])
        self.sampler.load_state_dict(state["sampler"])
        self.buffer.load_state_dict(state["buffer"])
        self.rng.bit_generator.state = json.loads(state["action_rng"])
        self.state = OnlineState(**state["online"])
        torch.set_rng_state(state["torch_rng"])

    # --------------------------------------------------------------------- loop
    def train(self, resume: bool = False, progress: bool = False,
              config: dict | None = None) -> dict[str, float]:
        """Run until ``cfg.steps`` environment steps; returns the last train metrics."""
        if resume and self.run is not None:
            check_resume_config(self.run, config)
        if resume and self.run is not None and (found := self.run.latest_checkpoint()):
            self.load_state_dict(found[1])
            self.run.truncate_metrics(self.state.step)
        if self.run is not None and config is not None:
            self.run.write_config(config)
        st, bar = self.state, _progress(self.cfg.steps, self.state.step, progress, self.task)
        self._t0 = time.perf_counter()
        if st.step == 0 and self.cfg.eval_freq:
            st.eval_next = True
        try:
            with stops.noted(self._stops):  # a stop a __del__ dropped: raised at the next step
                while st.step <= self.cfg.steps:
                    self._boundary()  # after a resume: what the interrupted boundary had left
                    # What an interrupted episode falls back to: the replay buffer changes
                    # only when the episode ends, so this copy and the buffer make a checkpoint.
                    self._fallback = _cpu_copy(self._state_but_buffer())
                    obs, _ = self.env.reset(seed=episode_seed(self.cfg.seed, st.episode))
                    self._episode(obs, bar)
                self._boundary(final=True)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP: keep the finished episodes
            self._save_fallback()
            _close(bar)
            raise
        bar.close()
        return self.last

    def _save_fallback(self) -> None:
        """Checkpoint the state the interrupted work started from, unless a checkpoint of its
        step is on disk: the start of the episode under way, or of the evaluation between two
        episodes, or the state after that evaluation. On resume that work is done again, so
        the resumed run equals an uninterrupted one."""
        fallback, self._fallback = self._fallback, None
        if self.run is None or fallback is None:
            return
        step = int(fallback["online"]["step"])
        if step > 0 and not self.run.checkpoint_path(step).is_file():
            self.run.save_checkpoint(step, {**fallback, "buffer": self.buffer.state_dict()})

    def _boundary(self, final: bool = False) -> None:
        """Between episodes: evaluate when due, checkpoint when due. Nothing here changes the
        learner, so the fallback states are the live ones (no copy); the random state is taken
        before the evaluation draws from it."""
        st, cfg, run = self.state, self.cfg, self.run
        self._fallback = self._state_but_buffer()
        if st.eval_next or final:
            result = self.evaluate(self.learner.model)
            with stops.finish_first():  # the evaluation's record and its fallback
                st.eval_next = False
                if run is not None:
                    run.log("eval", st.step, {**result, "episode": st.episode,
                                              "elapsed_s": time.perf_counter() - self._t0})
                self._fallback = self._state_but_buffer()
            if run is not None:
                plot_curves(run.path)
        due = final or st.step - st.last_ckpt >= cfg.checkpoint_freq
        if run is not None and st.step > 0 and due:
            st.last_ckpt = st.step
            _save_model(run, self.learner, st.step)  # first: never older than a checkpoint
            run.save_checkpoint(st.step, self.state_dict())

    def _act(self, obs: np.ndarray, t: int) -> np.ndarray:
        if self.state.step > self.seed_steps:
            return self.agent.act(obs, t0=t == 0, eval_mode=False).numpy()
        return self.rng.uniform(-1, 1, self.env.action_space.shape).astype(np.float32)

    def _episode(self, obs: np.ndarray, bar: tqdm) -> None:
        """Play one episode, updating after every step once seeding is over."""
        st, cfg = self.state, self.cfg
        obs_l, act_l, rew_l, term_l = [obs], [np.full(self.env.action_space.shape, np.nan)], \
            [np.nan], [0]
        done = False
        while not done:
            action = self._act(obs, len(obs_l) - 1)
            obs, reward, terminated, truncated, _ = self.env.step(action)
            done = terminated or truncated
            obs_l.append(obs)
            act_l.append(action)
            rew_l.append(reward)
            term_l.append(int(terminated))
            if st.step >= self.seed_steps and self.buffer.num_episodes:
                n = 1 if st.pretrained else max(self.seed_steps, 1)
                st.pretrained = True
                for _ in range(n):
                    self.last = self.learner.update(self.sampler.sample())
                check_finite(self.last, st.step, self.run)
            st.step += 1
            bar.update(1)
            stops.raise_noted(self._stops)
            if cfg.eval_freq and st.step % cfg.eval_freq == 0:
                st.eval_next = True
            if self.last and st.step % cfg.log_freq == 0:
                _show(bar, self.last)
                if self.run is not None:
                    self.run.log("train", st.step, self.last)
        with stops.finish_first():  # the buffer and the fallback change together
            self.buffer.add(np.stack(obs_l), np.stack(act_l), np.array(rew_l, np.float32),
                            np.array(term_l, np.uint8))
            self._fallback = None
        st.episode += 1
        if self.run is not None:
            self.run.log("episode", st.step, {"episode": st.episode,
                                              "episode_reward": float(np.nansum(rew_l)),
                                              "elapsed_s": time.perf_counter() - self._t0})


def _json_rng(rng: np.random.Generator) -> str:
    import json

    return json.dumps(rng.bit_generator.state)


# ------------------------------------------------------------------------ evaluation
def evaluate_model(model: WorldModel, tasks: tuple[str, ...], episodes: int, seed: int,
                   planner: PlannerConfig | None = None, make_env=None) -> dict[str, float]:
    """Mean return per task (and over tasks) of ``episodes`` planning episodes per task.

    Uses its own random generators (per-episode seeds), never the training RNG.
    """
    from tdmpc_opt.agent import Agent
    from tdmpc_opt.evaluation import episode_specs, run_episodes

    was_training = model.training
    agent = Agent(model, planner or PlannerConfig(), next(model.parameters()).device)
    specs = episode_specs(tasks, episodes, seed)
    results = run_episodes(agent, specs, batch_size=len(specs), make_env=make_env)
    model.train(was_training)
    out = {}
    for task in tasks:
        rs = [r.episode_return for r in results if r.task == task]
        out[f"episode_reward/{task}" if len(tasks) > 1 else "episode_reward"] = float(
            np.mean(rs))
    if len(tasks) > 1:
        out["episode_reward"] = float(np.mean(list(out.values())))
    return out
