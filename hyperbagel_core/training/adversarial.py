"""Stages 4-5 of Hyper-Bagel, the 1-NFE model: adversarial diffusion pre-training (ADP, hyper-bagel.md 2.5)
and, behind ``--reward``, reward feedback learning (ReFL, 2.6).

ADP, per item (prompt, noise x_T, text scale):
  * the 6-NFE expert (``--six``, frozen) runs its 6-step ODE from x_T each iteration: the pair (x_T, x_0);
  * x_t = (1 - t) x_0 + t x_T with t = 1 for half of the draws (the only t the 1-NFE sampler uses) and
    t ~ U(0, 1) otherwise; the generator predicts x̂_0 = x_t - t v(x_t, t) in one pass;
  * two discriminators judge x̂_0 (fake) against x_0 (real): a latent one, heads on the FROZEN teacher's
    hidden states of the latent tokens at a few decoder layers, the input re-noised to tau ~ U(0, 0.5)
    (the multi-head design of DMDX / LADD), and a pixel one, a small conv net on the frozen VAE's decode;
  * hinge losses; the generator also regresses the pair, ``--pair-weight`` * ||x̂_0 - x_0||^2 (our
    addition: the paper names no reconstruction term; docs/TRAINING.md says why it is on by default).
ReFL (``--reward module:function`` or ``path/to/file.py:function``): the reward model is any callable
``reward(images, prompts) -> Tensor[B]`` with images float [B, 3, H, W] in [0, 1] (differentiable), prompts
a list of str; the generator adds ``--reward-weight * relu(alpha_d - reward).mean()`` on its t = 1 output
(Hyper-SD's ReFL form, alpha_d = ``--reward-threshold``, 6.0 in the paper with HPSv3).

    python -m hyperbagel_core.training.adversarial --model DIR --init six.safetensors --out one.safetensors \\
        --prompts-file p.txt --eval-prompts-file held.txt [--reward mypkg.rewards:hps]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from ..image import unpack_latent
from ..sampling.schedules import get_schedule
from .cli import add_common_args, add_distill_args, distill_setup, write_report
from .distributed import init_distributed, make_optimizer
from .evaluation import latent_mse, task_means, training_free_errors
from .loop import Loop, accumulate, lr_at, optimizer_step, step_rng
from .student import (Student, base_tensors, frozen, student_from_file, student_sample, student_trajectory,
                      teacher_block, velocity_with_grad)
from .teacher import Item, Teacher


class LatentDiscriminator(nn.Module):
    """One small MLP head per chosen teacher layer on the latent tokens' hidden states; logits summed."""

    def __init__(self, dim: int, layers: list[int]):
        super().__init__()
        self.layers = list(layers)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1)) for _ in layers)

    def forward(self, feats: list) -> torch.Tensor:
        return sum(h(f.float()).mean() for h, f in zip(self.heads, feats))


class PixelDiscriminator(nn.Module):
    """A small patch discriminator on decoded pixels in [-1, 1]."""

    def __init__(self, ch: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, ch, 4, 2, 1), nn.SiLU(), nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.SiLU(),
                                 nn.Conv2d(2 * ch, 1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels.float()).mean()


class Discriminators(nn.Module):
    def __init__(self, dim: int, layers: list[int], pixel: bool):
        super().__init__()
        self.latent = LatentDiscriminator(dim, layers)
        self.pixel = PixelDiscriminator() if pixel else None


def load_reward(spec: str):
    """``module:function`` or ``file.py:function`` -> the callable."""
    if ":" not in spec:
        raise SystemExit(f"--reward {spec!r}: write it as module:function or path/to/file.py:function")
    mod_name, _, fn = spec.rpartition(":")
    if mod_name.endswith(".py"):
        sp = importlib.util.spec_from_file_location("hyperbagel_user_reward", mod_name)
        mod = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    try:
        return getattr(mod, fn)
    except AttributeError:
        raise SystemExit(f"--reward {spec!r}: {mod_name} has no attribute {fn!r}") from None


class ADP:
    def __init__(self, pipe, teacher: Teacher, generator: Student, six: Student, disc: Discriminators,
                 conds: list, scale_range=(1.0, 5.0), tau_max: float = 0.5, pair_weight: float = 1.0,
                 reward=None, reward_weight: float = 0.0, reward_threshold: float = 6.0, img_scale_range=(1.0, 2.5)):
        self.pipe, self.model, self.teacher = pipe, pipe.model, teacher
        self.generator, self.six, self.disc, self.conds = generator, six, disc, conds
        self.scale_range, self.tau_max, self.pair_weight = tuple(scale_range), tau_max, pair_weight
        self.img_scale_range = tuple(img_scale_range)
        self.reward, self.reward_weight, self.reward_threshold = reward, reward_weight, reward_threshold
        self.grid6 = get_schedule("hyper-6nfe").timesteps if six.config.schedule != "hyper-6nfe-shift3" \
            else get_schedule("hyper-6nfe-shift3").timesteps
        self.base = base_tensors(self.model, sorted(set(generator.keys) | set(six.keys)))

    def draw(self, rng, gen):
        it = self.teacher.draw(self.conds, rng, gen, self.scale_range, self.img_scale_range)
        t = 1.0 if rng.random() < 0.5 else rng.random()
        tau = rng.uniform(0, self.tau_max)
        eps = torch.randn(it.noise.shape, generator=gen).to(it.noise)
        return it, t, tau, eps

    def pixels(self, it: Item, x: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.config
        lat = unpack_latent(x.float(), it.h, it.w, cfg.latent_channels, cfg.latent_patch_size)[None]
        return self.pipe.vae.decode(lat)

    def features(self, it: Item, x: torch.Tensor, tau: float, eps: torch.Tensor) -> list:
        """Teacher (original weights) hidden states of the latent tokens at the discriminator's layers."""
        feats, hooks = {}, []
        layers = self.model.language_model.model.layers
        for i in self.disc.latent.layers:
            hooks.append(layers[i].register_forward_hook(
                lambda m, args, out, i=i: feats.__setitem__(i, out[0, 1:-1])))
        try:
            with teacher_block(self.model, self.base):
                velocity_with_grad(self.model, it.ctxs.gen, (1 - tau) * x + tau * eps, tau, it.h, it.w)
        finally:
            for h in hooks:
                h.remove()
        return [feats[i] for i in self.disc.latent.layers]

    def d_logits(self, it, x, tau, eps) -> torch.Tensor:
        out = self.disc.latent(self.features(it, x, tau, eps))
        if self.disc.pixel is not None:
            out = out + self.disc.pixel(self.pixels(it, x))
        return out

    @torch.no_grad()
    def pair(self, it: Item):
        traj = student_trajectory(self.six, self.model, it, self.grid6)
        return traj[0], traj[-1]

    def generator_work(self, draw, x_T, x_0, disc):
        it, t, tau, eps = draw
        x_t = (1 - t) * x_0 + t * x_T

        def fn(extra):
            x0_hat = x_t - t * velocity_with_grad(self.model, it.ctxs.gen, x_t, t, it.h, it.w, extra)
            disc.requires_grad_(False)
            try:
                loss = -self.d_logits(it, x0_hat, tau, eps) + self.pair_weight * F.mse_loss(x0_hat, x_0)
                if self.reward is not None and t == 1.0:
                    img = ((self.pixels(it, x0_hat).float() + 1) / 2).clamp(0, 1)
                    r = torch.as_tensor(self.reward(img, [it.prompt])).reshape(-1).float()
                    loss = loss + self.reward_weight * F.relu(self.reward_threshold - r).mean()
            finally:
                disc.requires_grad_(True)
            fn.x0_hat = x0_hat.detach()
            return loss
        return it.scales, fn

    def disc_loss(self, draw, x_0, x0_hat) -> torch.Tensor:
        it, _, tau, eps = draw
        real = self.d_logits(it, x_0, tau, eps)
        fake = self.d_logits(it, x0_hat, tau, eps)
        return F.relu(1 - real) + F.relu(1 + fake)

    @torch.no_grad()
    def evaluate(self, held, refs, per_item: bool = False):
        one = torch.tensor([1.0, 0.0])
        errs = [latent_mse(student_sample(self.generator, self.model, it, one), r) for it, r in zip(held, refs)]
        return errs if per_item else sum(errs) / len(errs)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m hyperbagel_core.training.adversarial",
                                 description=__doc__.split("\n")[0])
    add_common_args(ap)
    add_distill_args(ap)
    ap.add_argument("--six", default=None, help="the 6-NFE expert making the pairs (default: --init)")
    ap.add_argument("--d-lr", type=float, default=1e-4)
    ap.add_argument("--disc-layers", default=None, help="teacher layers the heads read (default: 3 spread)")
    ap.add_argument("--no-pixel-disc", action="store_true")
    ap.add_argument("--pair-weight", type=float, default=1.0)
    ap.add_argument("--reward", default=None, help="enable ReFL with this reward callable (module:function)")
    ap.add_argument("--reward-weight", type=float, default=1e-3)
    ap.add_argument("--reward-threshold", type=float, default=6.0, help="alpha_d of the ReFL loss")
    a = ap.parse_args(argv)
    if not a.init:
        ap.error("the 1-NFE stage starts from the 6-NFE expert: pass --init six.safetensors")
    dist_ = init_distributed(a.distributed, a.shard)
    pipe, teacher, conds, held = distill_setup(a)
    model = pipe.model
    from ..distill.expert import load_distilled_expert
    generator = student_from_file(model, a.init, None)
    six = Student(model, load_distilled_expert(a.six or a.init, model)).requires_grad_(False)
    L = model.config.llm.num_hidden_layers
    layers = [int(x) for x in a.disc_layers.split(",")] if a.disc_layers else sorted({L // 3, (2 * L) // 3, L - 1})
    torch.manual_seed(a.seed)
    disc = Discriminators(model.vae2llm.weight.shape[0], layers, not a.no_pixel_disc).to(model.device)
    reward = load_reward(a.reward) if a.reward else None
    job = ADP(pipe, teacher, generator, six, disc, conds, tuple(a.scale_range), pair_weight=a.pair_weight,
              reward=reward, reward_weight=a.reward_weight, reward_threshold=a.reward_threshold,
              img_scale_range=tuple(a.img_scale_range))
    refs = [teacher.reference(it) for it in held]
    g_ddp = dist_.wrap(generator)   # the discriminators' gradients are averaged by hand (dist_.average_grads)
    g_opt = make_optimizer(generator.parameters(), a.lr, dist_)
    d_opt = make_optimizer(disc.parameters(), a.d_lr, dist_)
    loop = Loop(a.out, a.steps, {"generator": generator, "disc": disc}, {"g": g_opt, "d": d_opt}, dist_,
                "heldout_mse", a.eval_every, a.save_every, not a.no_resume, a.stop_after)

    def step(i):
        rng, gen = step_rng(a.seed, i)
        draws = [job.draw(rng, gen) for _ in range(a.batch)]
        mine = dist_.share(draws)
        pairs = [job.pair(d[0]) for d in mine]
        with frozen(model):
            works = [job.generator_work(d, xT, x0, disc) for d, (xT, x0) in zip(mine, pairs)]
            loss = accumulate(g_ddp, model, works, dist_, a.batch, a.checkpointing)
            optimizer_step(g_opt, generator.parameters(), lr=lr_at(a.lr, i, a.steps))
            scale = dist_.loss_scale(a.batch)
            for d, (_, x0), (_, fn) in zip(mine, pairs, works):
                (job.disc_loss(d, x0, fn.x0_hat) * scale).backward()
            dist_.average_grads(disc.parameters())
            optimizer_step(d_opt, disc.parameters())
        return loss

    hist = loop.run(step, lambda: job.evaluate(held, refs))
    report = {"history": hist}
    if loop.stop_after is None:
        from ..loading import resolve_dtype
        one = get_schedule("hyper-1nfe").timesteps
        stages = tuple(generator.config.stages) + ("adp",) + (("refl",) if reward else ())
        expert = generator.export(resolve_dtype(a.save_dtype) if a.save_dtype else None, stages=stages, nfe=1,
                                  schedule="hyper-1nfe", timesteps=tuple(one.tolist()), shift=1.0)   # every rank
    if dist_.main and loop.stop_after is None:
        expert.save(a.out)
        per_item = {**training_free_errors(teacher, held, refs, 1, ("euler",), (1.0,), per_item=True),
                    **training_free_errors(teacher, held, refs, 2, ("euler",), (1.0, 3.0), per_item=True)}
        report["euler"] = {k: sum(v) / len(v) for k, v in per_item.items()}
        report["student"] = hist["metric"][-1][1]
        if any(it.task == "edit" for it in held):
            per_item["student"] = job.evaluate(held, refs, per_item=True)
            report["by_task"] = {task: {"student": means.pop("student"), "euler": means}
                                 for task, means in task_means(held, per_item).items()}
        print(f"held-out final-latent MSE vs the 50-step teacher: 1-NFE student {report['student']:.5g}; stock "
              f"Euler {', '.join(f'{k} {v:.4g}' for k, v in report['euler'].items())}; wrote {a.out}")
    write_report(a.report, report, dist_)
    return report


if __name__ == "__main__":
    main()
