"""A level that stands for a batch of tasks sharing one structure: `TaskBatch`.

Meta-learning steps many tasks that share a model architecture and a loss, each with its own
parameters and data. A `TaskBatch` holds every parameter of a template module stacked on a
leading task dimension (``(tasks, *shape)``), and `TaskBatch.per_task` evaluates a per-task
function on all tasks at once with ``torch.func.vmap`` over the stacked parameters and the
stacked task data: one batched forward pass, not a Python loop over tasks. Gradients and
Hessian-vector products of a sum of per-task losses then come out per task (each task's slice
depends on its own parameters and data only), batched the same way by autograd.

The task level's loss should be the *sum* over tasks of the per-task losses, so that its
gradient in each task's parameters is that task's own gradient, and an optimizer step is the
per-task step. Its Hessian is then block-diagonal over tasks, and ``cg`` solves each task's
system with its own conjugate gradient (batched), as a per-task loop would. Its ``init`` typically broadcasts the meta-parameters to every task
(`TaskBatch.broadcast`)::

    net = MLP()                                        # the meta-parameters, one copy
    tasks = TaskBatch(net, 16)                         # 16 per-task copies of its parameters
    inner = mlo.Problem("tasks", tasks, torch.optim.SGD(tasks.parameters(), lr=0.01), task_batches,
                        steps=0, init=lambda: tasks.broadcast(net),
                        loss=lambda b: tasks.per_task(mse, b.support_x, b.support_y).sum())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ProgramError

__all__ = ["TaskBatch"]

#: ``fn(model, *task_batch)``: one task's value; ``model(*inputs)`` runs the template module
#: with that task's parameters.
PerTask = Callable[..., Tensor]


class TaskBatch(nn.Module):
    """The trainable parameters of ``template``, stacked ``tasks`` times (leading dimension).

    ``template`` gives the structure only: its own parameters are not parameters of this module
    (the meta level usually owns them). Its buffers are shared by every task and read as they
    are; modules that update buffers in their forward pass (BatchNorm in train mode) are not
    supported under ``vmap``.
    """

    def __init__(self, template: nn.Module, tasks: int) -> None:
        super().__init__()
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
            raise ProgramError(f"tasks must be an int >= 1, got {tasks!r}")
        self.tasks = tasks
        self._template = (template,)  # a tuple: not registered as a submodule
        self.names = tuple(name for name, p in template.named_parameters() if p.requires_grad)
        if not self.names:
            raise ProgramError("the template module has no trainable parameters")
        self._keys = tuple(f"task_{name.replace('.', '_')}" for name in self.names)
        for key, p in zip(self._keys, (p for p in template.parameters() if p.requires_grad)):
            self.register_parameter(key, nn.Parameter(p.detach().unsqueeze(0).repeat(tasks, *[1] * p.dim())))

    @property
    def template(self) -> nn.Module:
        return self._template[0]

    def stacked(self) -> dict[str, Tensor]:
        """The template's parameter names -> this module's current stacked values ``(tasks, ...)``.
        Read at every call, so values an engine substitutes for the parameters are seen."""
        values: dict[str, Tensor] = {}
        for name, key in zip(self.names, self._keys):
            value = self._parameters[key]
            assert value is not None
            values[name] = value
        return values

    def per_task(self, fn: PerTask, *batch: Any) -> Tensor:
        """``fn(model, *task_batch)`` for every task at once: ``vmap`` over the stacked parameters
        and over the leading dimension of every tensor in ``batch``; a result per task,
        ``(tasks, ...)``."""
        template = self.template
        buffers = dict(template.named_buffers())

        def one(params: dict[str, Tensor], *task_batch: Any) -> Tensor:
            def model(*inputs: Any) -> Any:
                return torch.func.functional_call(template, (params, buffers), inputs)

            return fn(model, *task_batch)

        return torch.func.vmap(one)(self.stacked(), *batch)

    def broadcast(self, source: nn.Module) -> tuple[Tensor, ...]:
        """``source``'s trainable parameters (the template's structure), each expanded to every
        task, in this module's parameter order: an ``init`` that starts every task from them."""
        values = dict(source.named_parameters())
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ProgramError(f"broadcast: the source module has no parameter(s) {missing}")
        return tuple(values[n].unsqueeze(0).expand(self.tasks, *values[n].shape) for n in self.names)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, template={type(self.template).__name__}"
