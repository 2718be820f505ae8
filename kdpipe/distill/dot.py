"""DOT: Zhao et al. 2023, "DOT: A Distillation-Oriented Trainer", as mdistiller's `engine/dot.py` and its DOT
trainer run it. Not a loss: an optimiser that steps the task loss (gamma * CE) and the distillation loss (every
other term) with momenta of their own, momentum - delta and momentum + delta, so the distillation gradient
dominates the update. On its own (`--method dot`) it is KD+DOT, its published row (KD from `dot`'s gamma, alpha
and temperature); combined (`kd+dot`, `dkd+dot`, ...) it trains the other methods' losses. Main phase only (an
init stage keeps SGD); plain SGD's options it lacks (nesterov) are refused."""

import torch
from pydantic import Field

from ..config.distill import MethodParams, logit_std_field
from ..config.errors import ParamsError
from .base import Term, register


class DistillationOrientedTrainer(torch.optim.Optimizer):
    """mdistiller's DistillationOrientedTrainer with one parameter group. Per step: `backward(terms)` (the
    distillation loss's backward, its gradients kept aside, the task loss's backward), then `step()`. A parameter with
    both gradients: task buffer at momentum - delta, distillation buffer at momentum + delta; with one of them:
    that buffer at their mean. Weight decay is added once, to the task gradient (to the distillation gradient of
    a parameter without a task one, after the first step, as there); each buffer starts as its first gradient.
    The update is p -= lr * task buffer, then p -= lr * distillation buffer."""

    def __init__(self, params, lr: float, momentum: float, delta: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError("dot: one parameter group only (as mdistiller's)")
        self._distill_grads: dict = {}

    def backward(self, terms: dict) -> torch.Tensor:
        """The step's backward passes (the engine's protocol for a term's own optimiser): the distillation loss's
        (every term but `ce`), its gradients kept aside, then the task loss's (`ce`). Returns the loss."""
        task = terms["ce"]
        distill = torch.zeros((), device=task.device)
        for name, value in terms.items():
            if name != "ce":
                distill = distill + value
        if distill.requires_grad:
            distill.backward(retain_graph=True)
        self._distill_grads = {p: p.grad for p in self.param_groups[0]["params"] if p.grad is not None}
        self.zero_grad(set_to_none=True)
        task.backward()
        return (task + distill).detach()

    @torch.no_grad()
    def step(self, closure=None):
        g = self.param_groups[0]
        lr, wd = g["lr"], g["weight_decay"]
        m_task, m_kd = g["momentum"] - g["delta"], g["momentum"] + g["delta"]
        m_one = (m_kd + m_task) / 2.0
        for p in g["params"]:
            task, kd, state = p.grad, self._distill_grads.get(p), self.state[p]
            if task is not None:
                d = task.add(p, alpha=wd) if wd else task
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(m_task if kd is not None else m_one).add_(d)
                p.add_(buf, alpha=-lr)
            if kd is not None:
                buf = state.get("momentum_kd_buffer")
                if buf is None:
                    buf = state["momentum_kd_buffer"] = kd.clone()
                elif task is not None:
                    buf.mul_(m_kd).add_(kd)
                else:
                    buf.mul_(m_one).add_(kd.add(p, alpha=wd) if wd else kd)
                p.add_(buf, alpha=-lr)
        self._distill_grads = {}


class DOTParams(MethodParams):
    """KD+DOT on its own; with other methods only `delta` counts (gamma, alpha, T come from the first method)."""

    gamma: float = Field(0.1, ge=0)
    alpha: float = Field(0.9, ge=0)
    temperature: float = Field(4.0, gt=0)
    delta: float = Field(0.075, ge=0, description="task momentum = optim.momentum - delta, distillation "
                                                  "momentum = optim.momentum + delta")
    logit_std: bool = logit_std_field()


@register("dot", DOTParams)
class DOT(Term):
    label = "DOT"
    supports_ddp = False  # two backward passes per step; DDP reduces gradients once per forward
    # measured: "This backward function was compiled with non-empty donated buffers which requires ...
    # retain_graph=False"
    runs_eager = ("runs two backward passes through one forward (retain_graph), which torch.compile's backward refuses "
                  "(AOTAutograd's donated buffers, on by default)")
    has_loss = False

    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.delta = cfg.delta

    def optimizer(self, params, train_cfg):
        o = train_cfg.optim
        if o.nesterov:
            raise ParamsError(["dot: mdistiller's DOT has no Nesterov momentum; set optim.nesterov: false"])
        if o.no_decay != "none":
            raise ParamsError(["dot: mdistiller's DOT has one parameter group; set optim.no_decay: none"])
        return DistillationOrientedTrainer(params, train_cfg.lr, o.momentum, self.delta, o.weight_decay)
