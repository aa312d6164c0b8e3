"""Evaluation metrics of the diffusion stages: latent MSE to the teacher's reference, the Fréchet distance of
two sample sets, and the training-free solvers' errors at a given budget (the baselines a stage must beat)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .teacher import Item, Teacher


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between two sets of vectors [N, d] (Gaussian fits; the FID formula, float64)."""
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.mse_loss(a.float(), b.float()))


def training_free_errors(teacher: Teacher, items: list[Item], refs: list[torch.Tensor], budget: int,
                         methods=("euler", "heun", "unipc", "dpmpp_2m"), shifts=(1.0, 3.0),
                         unit: str = "evaluations", per_item: bool = False) -> dict:
    """Mean final-latent MSE vs the reference of each training-free solver within ``budget`` guided
    evaluations (``unit="evaluations"``, keys ``euler-6eval@shift1``) or network passes (``"passes"``, keys
    ``euler-6pass@shift1``; the distilled student spends one pass per step, so this is the equal-NFE match).
    ``per_item``: the list of per-item errors instead of their mean (``task_means`` splits them by task)."""
    out = {}
    tag = "eval" if unit == "evaluations" else "pass"
    one_per_task = {it.task: it for it in items}.values()   # the grid depends on the task's CFG branches
    for m in methods:
        if m == "heun" and budget < 2:
            continue
        for s in shifts:
            try:
                for it in one_per_task:
                    teacher.solver_grid(it, m, budget, s, unit)
            except ValueError:  # e.g. Heun needs two evaluations, which may cost more passes than the budget
                continue
            errs = [latent_mse(teacher.solver(it, m, budget, s, unit), r) for it, r in zip(items, refs)]
            out[f"{m}-{budget}{tag}@shift{s:g}"] = errs if per_item else sum(errs) / len(errs)
    return out


def task_means(items: list[Item], per_item: dict) -> dict:
    """``{task: {key: mean over that task's items}}`` of per-item values ``{key: [value per item]}``."""
    out: dict = {}
    for task in dict.fromkeys(it.task for it in items):
        mask = [it.task == task for it in items]
        out[task] = {k: sum(x for x, m in zip(v, mask) if m) / sum(mask) for k, v in per_item.items()}
    return out
