"""Distillation methods behind a registry: one file per method, one objective that combines them.

loss = gamma * CE(student, labels) + alpha * KD(T) + sum over the other methods of beta * term.
Each method file registers a `Term` (an `nn.Module`) built as `Term(cfg, s_shapes, t_shapes, data)` (the `Shapes`
of the student's and the teacher's features) whose
`forward(b: Batch)` returns its unweighted loss; its trainable parts (regressors, embeddings, CRD's
memory) are its submodules and buffers, optimised and checkpointed with the student's run, never
exported with the student. Its weight is its params' `weight_param` (beta; KD's alpha; None: 1, DKD weighs its
parts inside). KD is a term like the others; any method whose params say alpha > 0 brings one (with kd's params
when `kd` is among the methods). A term with `runs_alone` (its reason) admits no other beside it (OFD); one with
`runs_eager` (its reason) keeps its student out of torch.compile (`runtime.compile`), the reason logged (DOT).

Init stage (RepDistiller's `init()`): a term whose params have `init_epochs > 0` first trains alone for that
many epochs, unweighted, on `init_loss(b)` (default: `forward`). What trains there and after is the term's
declaration, not a special case in the engine:
- `init_trains_student` (default True): the student's layers train in the init stage (FSP, AB, FitNets);
  False: the student is left untouched, run in eval mode without gradients (FT trains its paraphraser alone);
- `loss_after_init` (default False): whether the term is still in the main phase's loss (FT: True; FSP and
  AB: False, the student then trains with CE alone, as RepDistiller);
- `trainable_parts(phase)` (default: all its parameters): its own parameters the optimiser updates in that
  phase (AB's connectors train in the init stage only; FT's paraphraser there, its translator after).
A term that reads the pre-ReLU taps sets `uses_preact = True` (AB, ReviewKD, OFD); one that reads the teacher's
weights or a file written for it once has `from_teacher(teacher, teacher_file)` (OFD's margins, WKD's class costs);
`teacher_batch_stats = True` runs the
teacher's BN on each batch's statistics (OFD); `uses_classifier = True` brings into the batch both models' final
maps (`Features.final`) and their classifier layers (`models.classifier`; the student's trains through the term's
loss as through CE), to classify other pooled features than the global one (SDD's regions). A term may bring the main phase's
optimiser (`optimizer(params, train_cfg)`; one with `backward(terms)` runs the step's backward passes from the
named terms itself: DOT's steps the task loss, `ce`, and the distillation loss, the sum of the others, apart) and
have no loss (`has_loss = False`).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import config  # noqa: F401  (first: it imports every method's file for its schema, before any of them runs)
from ..models import Features, classifier
from . import functional as Fd
from .base import Batch, KDTerm, Shapes, TrainData, batch_statistics, feature_shapes, get  # noqa: F401  (the package's public names)


class TeacherPass:
    """The teacher's outputs on the batch at hand, one forward per teacher mode (BN on batch statistics or not; the
    extra views or not), shared by the students that train on the same batches (engine.train_group). It keeps the
    last batch's outputs only."""

    def __init__(self):
        self.batch, self.version, self.outputs = None, None, {}

    def __call__(self, x, mode, forward):
        # a new batch: another tensor (held here, so its identity cannot be reused meanwhile) or one written since
        if x is not self.batch or x._version != self.version:
            self.batch, self.version, self.outputs = x, x._version, {}
        if mode not in self.outputs:
            self.outputs[mode] = forward()
        return self.outputs[mode]


class Distiller(nn.Module):
    """The training objective of a distilled student (same interface as engine.CrossEntropy). Its named terms
    are the weighted parts of the loss: `ce` (gamma * CE), `kd` (alpha * KD) and each method's (beta * term);
    in an init stage, each init term's own loss.

    The teacher is held outside the module tree: it is not optimised, not checkpointed with the
    student, and stays in eval mode. It runs under `torch.inference_mode()`; its outputs are cloned
    into ordinary tensors because autograd may save them for the backward pass (e.g. KD's target).
    """

    def __init__(self, teacher: nn.Module, methods: list[str], params, s_shapes, t_shapes,
                 data: TrainData | None = None, teacher_input: tuple[torch.Tensor, torch.Tensor] | None = None,
                 teacher_pass: TeacherPass | None = None, teacher_file=None, teacher_forward: nn.Module | None = None):
        super().__init__()
        self._teacher_pass = teacher_pass or TeacherPass()  # shared by a group's students: one teacher forward
        # (scale, shift) re-normalising the batch for a teacher trained with other input statistics
        # (an imported one): x_teacher = x * scale + shift, per channel
        self._teacher_input = teacher_input
        # gamma (and alpha, T without kd) from the first method with a loss of its own: dkd+dot = dot+dkd
        classes = {m: get(m) for m in methods}  # imports each method's file (its stage depends on it), no other
        lead = next((m for m in methods if classes[m].has_loss), methods[0])
        first = getattr(params, lead)
        self.methods = methods
        self.gamma = first.gamma
        self._teacher = (teacher.eval().requires_grad_(False),)
        # what runs the teacher's forward: `teacher`, or it compiled (runtime.compile), shared by a group's students
        self._teacher_forward = (teacher if teacher_forward is None else teacher_forward,)
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.init_stage: dict[str, int] = {}  # method -> its init epochs
        # KD first in the loss: the `kd` method, or the KD term any method whose alpha > 0 brings (with its params)
        kd = [("kd", classes.pop("kd", KDTerm), params.kd if "kd" in methods else first)]
        for name, cls, cfg in kd + [(m, c, getattr(params, m)) for m, c in classes.items()]:
            weight = 1.0 if cls.weight_param is None or not cls.has_loss else getattr(cfg, cls.weight_param)
            if name == "kd" and weight == 0:  # alpha 0: no KD term
                continue
            term = self.terms[name] = cls(cfg, s_shapes, t_shapes, data)
            term.from_teacher(teacher, teacher_file)
            if term.has_loss:
                self.weights[name] = weight
            if name in methods and getattr(cfg, "init_epochs", 0) > 0:
                self.init_stage[name] = cfg.init_epochs
        self.init_trains_student = any(self.terms[m].init_trains_student for m in self.init_stage)
        self.uses_preact = any(t.uses_preact for t in self.terms.values())
        self.uses_classifier = any(t.uses_classifier for t in self.terms.values())
        self.teacher_batch_stats = any(t.teacher_batch_stats for t in self.terms.values())
        alone = next((n for n, t in self.terms.items() if t.runs_alone), None)
        if alone and len(self.terms) > 1:
            raise ValueError(f"{'+'.join(methods)}: {alone} {self.terms[alone].runs_alone}; run it alone (alpha 0)")
        self.views = tuple(sorted({v for t in self.terms.values() for v in t.views}))
        self.runs_eager = next((f"{n} {t.runs_eager}" for n, t in self.terms.items() if t.runs_eager), "")

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def init_epochs(self) -> int:
        return max(self.init_stage.values(), default=0)

    def optimizer(self, phase: str):
        """The optimiser a term brings for `phase` (a builder, `engine.make_optimizer`'s `custom`), or None: SGD."""
        own = [t.optimizer for t in self.terms.values() if t.optimizer is not None]
        if len(own) > 1:
            raise ValueError("more than one method brings its own optimiser")
        return own[0] if own and phase == "main" else None

    def trainable(self, model: nn.Module, phase: str) -> list[nn.Parameter]:
        """What the optimiser updates in `phase`: the student (unless no init term trains it) and the
        terms' declared parts (in the init stage only the init terms')."""
        params = list(model.parameters()) if phase == "main" or self.init_trains_student else []
        for n, term in self.terms.items():
            if phase == "main" or n in self.init_stage:
                params += list(term.trainable_parts(phase))
        return params

    def forward(self, model, x, y, phase: str = "main", index=None, epoch: int = 0):
        views = dict(zip(self.views, x[1:])) if self.views else {}  # x: (the batch, its extra views)
        x = x[0] if self.views else x

        def teacher_input(v):
            return v if self._teacher_input is None else v * self._teacher_input[0] + self._teacher_input[1]

        def teacher_forward():
            run = self._teacher_forward[0]
            with torch.inference_mode(), batch_statistics(self.teacher, self.teacher_batch_stats):
                return (run(teacher_input(x), features=True),
                        {k: run(teacher_input(v)) for k, v in views.items()} if phase == "main" else {})

        mode = (self.teacher_batch_stats, tuple(views) if phase == "main" else ())
        t, t_views = self._teacher_pass(x, mode, teacher_forward)
        stages = [f.clone() for f in t.stages]
        final = None
        if self.uses_classifier and t.final is not None:  # the last stage itself in most families: cloned once
            final = stages[-1] if t.final is t.stages[-1] else t.final.clone()
        t = Features(t.logits.clone(), stages, t.embedding.clone(),
                     [f.clone() for f in t.preact] if self.uses_preact else None, final)
        if phase == "init" and not self.init_trains_student:  # RepDistiller: model_s.eval(), not updated
            was_training = model.training
            model.eval()
            with torch.no_grad():
                s = model(x, features=True)
            model.train(was_training)
        else:
            s = model(x, features=True)
        # each extra view: the student's logits after the batch's (its BN sees them in that order, as MLKD's)
        b = Batch(s, t, y, index, epoch,
                  {k: (model(v), t_views[k].clone()) for k, v in views.items()} if phase == "main" else {},
                  (classifier(model), classifier(self.teacher)) if self.uses_classifier else None)
        if phase == "init":  # RepDistiller's init(): the init terms' own losses, unweighted
            init = {n: self.terms[n].init_loss(b) for n in self.init_stage}
            return sum(init.values()), s.logits, init
        loss = self.gamma * Fd.cross_entropy(s.logits, y)
        terms = {"ce": loss}
        for n, w in self.weights.items():
            if n not in self.init_stage or self.terms[n].loss_after_init:
                terms[n] = w * self.terms[n](b)
                loss = loss + terms[n]  # summed in this order: ce, kd, the methods'
        return loss, s.logits, terms
