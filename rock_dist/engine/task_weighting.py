"""Weights of the auxiliary losses (scene, depth, normals) in the training loss: fixed or adapted during training.

Used by the trainer's step (`rock_dist.engine.trainer`): it asks `weights()` before the step's forward passes, builds
the loss `det + Σ_t w_t L_t` with them (engine.normalization), and after the step's all-reduce calls `update()` with
the GLOBAL-batch values of the task losses (and, for GradNorm, the global-batch gradient norms). Every input of
`update()` is identical on every rank, and the weights stay constant within a step, so the weights are identical on
every rank at every step and exact under gradient accumulation: 1 process x batch 4, 2 processes x batch 2 and
1 x 2 with accumulation 2 give the same weights. Detection, the primary task, keeps weight 1 in every strategy.

A task absent from the step's global batch (no sample with that label: `present[t]` False) is skipped by
`update()`: its weight, optimiser moments and history stay as they were. The strategies and their formulas are in
docs/losses.md ("Task weighting").
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

WEIGHTINGS: tuple[str, ...] = ("fixed", "uncertainty", "dwa", "gradnorm")


class _ScalarAdam:
    """Adam on one scalar per task, each with its own step count (a task updates only when present)."""

    def __init__(self, tasks: Sequence[str], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = {t: 0.0 for t in tasks}
        self.v = {t: 0.0 for t in tasks}
        self.steps = {t: 0 for t in tasks}

    def delta(self, task: str, grad: float) -> float:
        """The change Adam makes to the scalar of `task` for gradient `grad`."""
        b1, b2 = self.betas
        self.steps[task] += 1
        n = self.steps[task]
        self.m[task] = b1 * self.m[task] + (1 - b1) * grad
        self.v[task] = b2 * self.v[task] + (1 - b2) * grad * grad
        m_hat = self.m[task] / (1 - b1 ** n)
        v_hat = self.v[task] / (1 - b2 ** n)
        return -self.lr * m_hat / (math.sqrt(v_hat) + self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self.m), "v": dict(self.v), "steps": dict(self.steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m, self.v, self.steps = dict(state["m"]), dict(state["v"]), dict(state["steps"])


class TaskWeighting:
    """Fixed weights (the reference's 3 / 3 / 30); the base class of the adaptive strategies.

    tasks: the trained auxiliary tasks; base: their reference weights (LossConfig), also every strategy's start.
    """

    name = "fixed"
    needs_gradient_norms = False

    def __init__(self, tasks: Sequence[str], base: Mapping[str, float]) -> None:
        self.tasks = tuple(tasks)
        self.base = {t: float(base[t]) for t in self.tasks}

    def weights(self) -> dict[str, float]:
        """The weight of each auxiliary task for the next step."""
        return dict(self.base)

    def update(self, losses: Mapping[str, float], present: Mapping[str, bool],
               gradient_norms: Mapping[str, float] | None = None) -> None:
        """After a step: `losses[t]` the global-batch loss of task t (unweighted), `present[t]` whether the global
        batch had any target for t, `gradient_norms[t]` ||∇_W L_t|| on the shared layer (GradNorm only)."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the checkpoint's task weighting is {state.get('name')!r}, this run's {self.name!r}")


class UncertaintyWeighting(TaskWeighting):
    """Homoscedastic uncertainty (Kendall et al., 2018): one learnable log-variance s_t per task,
    loss_t = base_t · exp(-s_t) · L_t + s_t, so w_t = base_t · exp(-s_t) and ∂loss/∂s_t = 1 - w_t · L_t.

    s_t is updated by Adam (lr `lr`) from that gradient on the global-batch L_t after each step; the gradient is
    exact (not autograd through one rank's micro-batch), which is what keeps s identical on every rank.
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[str], base: Mapping[str, float], lr: float) -> None:
        super().__init__(tasks, base)
        self.log_var = {t: 0.0 for t in self.tasks}
        self.adam = _ScalarAdam(self.tasks, lr)

    def weights(self) -> dict[str, float]:
        return {t: self.base[t] * math.exp(-self.log_var[t]) for t in self.tasks}

    def update(self, losses: Mapping[str, float], present: Mapping[str, bool],
               gradient_norms: Mapping[str, float] | None = None) -> None:
        weights = self.weights()
        for t in self.tasks:
            if present[t]:
                self.log_var[t] += self.adam.delta(t, 1.0 - weights[t] * losses[t])

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "log_var": dict(self.log_var), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.log_var = dict(state["log_var"])
        self.adam.load_state_dict(state["adam"])


class DynamicWeightAverage(TaskWeighting):
    """Dynamic Weight Average (Liu et al., 2019): w_t = base_t · T · softmax_t(r_t / temperature), with
    r_t = L̄_t(k-1) / L̄_t(k-2) the ratio of the task's mean loss over the last two windows of `window` iterations
    (the paper's epochs; a window mean counts only the steps where the task was present) and T the number of tasks.
    Until a task has two window means its r_t is 1. A task absent for a whole window keeps its weight; the others
    share out the rest.
    """

    name = "dwa"

    def __init__(self, tasks: Sequence[str], base: Mapping[str, float], temperature: float, window: int) -> None:
        super().__init__(tasks, base)
        self.temperature, self.window = temperature, window
        self.sums = {t: 0.0 for t in self.tasks}
        self.counts = {t: 0 for t in self.tasks}
        self.history: dict[str, list[float]] = {t: [] for t in self.tasks}  # last two window means
        self.steps_in_window = 0
        self._current = dict(self.base)

    def weights(self) -> dict[str, float]:
        return dict(self._current)

    def update(self, losses: Mapping[str, float], present: Mapping[str, bool],
               gradient_norms: Mapping[str, float] | None = None) -> None:
        for t in self.tasks:
            if present[t]:
                self.sums[t] += losses[t]
                self.counts[t] += 1
        self.steps_in_window += 1
        if self.steps_in_window < self.window:
            return
        updated = [t for t in self.tasks if self.counts[t]]
        for t in updated:
            self.history[t] = (self.history[t] + [self.sums[t] / self.counts[t]])[-2:]
        for t in self.tasks:
            self.sums[t], self.counts[t] = 0.0, 0
        self.steps_in_window = 0
        if not updated:
            return
        # The softmax runs over the tasks seen in this window and shares out the part of the total that they held,
        # so that a task absent for a whole window keeps its weight (with every task seen: the paper's formula).
        ratios = {t: (h[1] / h[0] if len(h) == 2 and h[0] > 0 else 1.0)
                  for t, h in self.history.items() if t in updated}
        top = max(r / self.temperature for r in ratios.values())  # shift for a stable softmax
        exp = {t: math.exp(r / self.temperature - top) for t, r in ratios.items()}
        held = sum(self._current[t] / self.base[t] for t in updated) if len(updated) < len(self.tasks) \
            else float(len(self.tasks))
        total = sum(exp.values())
        for t in updated:
            self._current[t] = self.base[t] * held * exp[t] / total

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sums": dict(self.sums), "counts": dict(self.counts),
                "history": {t: list(h) for t, h in self.history.items()}, "steps_in_window": self.steps_in_window,
                "current": dict(self._current)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
        self.history = {t: list(h) for t, h in state["history"].items()}
        self.steps_in_window = int(state["steps_in_window"])
        self._current = dict(state["current"])


class GradNorm(TaskWeighting):
    """GradNorm (Chen et al., 2018) over the auxiliary tasks, on the shared ROCK encoder's last layer W (its
    BatchNorm's affine parameters). With w_t = base_t · u_t, G_t = w_t · ||∇_W L_t||, L̃_t = L_t / L_t(first step
    the task was present), r_t = L̃_t / mean(L̃) and target_t = mean(G) · r_t^alpha (means over the present tasks,
    target held constant), u_t follows Adam (lr `lr`) on ∂ Σ|G - target| / ∂u_t = sign(G_t - target_t) · base_t ·
    ||∇_W L_t||, then the present tasks' u are rescaled to keep their sum: the total auxiliary weight stays the
    reference's and an absent task's weight does not move.
    """

    name = "gradnorm"
    needs_gradient_norms = True

    def __init__(self, tasks: Sequence[str], base: Mapping[str, float], lr: float, alpha: float) -> None:
        super().__init__(tasks, base)
        self.alpha = alpha
        self.scale = {t: 1.0 for t in self.tasks}
        self.initial_loss: dict[str, float] = {}
        self.adam = _ScalarAdam(self.tasks, lr)

    def weights(self) -> dict[str, float]:
        return {t: self.base[t] * self.scale[t] for t in self.tasks}

    def update(self, losses: Mapping[str, float], present: Mapping[str, bool],
               gradient_norms: Mapping[str, float] | None = None) -> None:
        if gradient_norms is None:
            raise ValueError("GradNorm needs the gradient norms of the task losses on the shared layer")
        live = [t for t in self.tasks if present[t] and losses[t] > 0]
        for t in live:
            self.initial_loss.setdefault(t, losses[t])
        if len(live) < 2:  # with one task there is nothing to balance
            return
        weights = self.weights()
        norms = {t: weights[t] * gradient_norms[t] for t in live}
        relative = {t: losses[t] / self.initial_loss[t] for t in live}
        mean_relative = sum(relative.values()) / len(live)
        mean_norm = sum(norms.values()) / len(live)
        before = sum(self.scale[t] for t in live)
        for t in live:
            target = mean_norm * (relative[t] / mean_relative) ** self.alpha
            sign = (norms[t] > target) - (norms[t] < target)
            grad = sign * self.base[t] * gradient_norms[t]
            # Floor: a weight driven to zero or below would switch its task off for good.
            self.scale[t] = max(self.scale[t] + self.adam.delta(t, grad), 1e-3)
        after = sum(self.scale[t] for t in live)
        for t in live:
            self.scale[t] *= before / after

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scale": dict(self.scale), "initial_loss": dict(self.initial_loss),
                "adam": self.adam.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.scale = dict(state["scale"])
        self.initial_loss = dict(state["initial_loss"])
        self.adam.load_state_dict(state["adam"])


def build_task_weighting(name: str, tasks: Sequence[str], base: Mapping[str, float], *, lr: float = 0.025,
                         dwa_temperature: float = 2.0, dwa_window: int = 50,
                         gradnorm_alpha: float = 1.5) -> TaskWeighting:
    """The strategy `name` (one of WEIGHTINGS) over `tasks`, starting from the weights `base`."""
    if name == "fixed":
        return TaskWeighting(tasks, base)
    if name == "uncertainty":
        return UncertaintyWeighting(tasks, base, lr)
    if name == "dwa":
        return DynamicWeightAverage(tasks, base, dwa_temperature, dwa_window)
    if name == "gradnorm":
        return GradNorm(tasks, base, lr, gradnorm_alpha)
    raise ValueError(f"unknown task weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")


__all__ = ["WEIGHTINGS", "TaskWeighting", "UncertaintyWeighting", "DynamicWeightAverage", "GradNorm",
           "build_task_weighting"]
