"""Build the embedded default model `tiny-digits` and its judge, reproducibly, from sklearn's load_digits().

    python tools/tiny_digits.py --out DIR [--seed 0] [--dit-steps N] [--vae-steps N]
                                [--judge-steps N] [--guidance G] [--eval-per-class 50] [--threads 2]

(`make tiny-digits` runs it into formats/assets/tiny-digits.)

Writes into DIR (atomically, replacing it):
    model_index.json, transformer/, vae/, scheduler/   a diffusers DiTPipeline (fp32 safetensors)
    judge/                                             the digit judge (ditkit.formats.judge)
    ditkit.json                                        the manifest: config, measured report, defaults

Data: the 1797 8x8 digits (values 0..16), split 70/30 stratified by class with `--seed`:
  "gen-train" (70%) trains the VAE, the DiT and the judge; "held-out" (30%) is seen by none of them and
  gives the judge's accuracy and the FD reference statistics. Images are upscaled to 32x32 (bicubic,
  clamped), replicated to 3 channels, WHITE digits on a BLACK background: [0, 1] for the judge,
  [-1, 1] for the VAE (the pipeline's output (x / 2 + 0.5) is then judge-ready).
Progress goes to stderr; the final report (JSON) to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

LABEL_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 32

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
)

# 6 blocks of width 96 (4 heads x 24). Width 128 (4 x 32) would be 2.88M params = 11.5 MB in fp32, over
# the 10 MB budget: every block carries its own 1001-row label table (ids 0..9 + the null class 1000
# DiTPipeline uses for classifier-free guidance; rows 10..999 are never trained).
DIT_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    patch_size=2,
    num_layers=6,
    num_attention_heads=4,
    attention_head_dim=24,
    num_embeds_ada_norm=1000,
    norm_num_groups=32,
)

# Noise schedule used for training; the saved DDIM scheduler shares it.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)

# DDIM sampling config (measured, see docs/tiny-digits.md): no x0 clipping (latents are not in [-1, 1]),
# "trailing" spacing so the first step starts at t=999 (pure noise), alpha_1 = 1 on the last step.
DDIM_CONFIG = dict(
    NOISE_SCHEDULE,
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    timestep_spacing="trailing",
    prediction_type="epsilon",
)

# Alternatives measured in the report (same model, chosen guidance): the diffusers DDIMScheduler defaults
# (clip_sample=True, "leading" spacing) and "leading" spacing alone.
SCHEDULER_VARIANTS = {
    "diffusers_defaults": {"clip_sample": True, "timestep_spacing": "leading"},
    "leading_spacing": {"timestep_spacing": "leading"},
}

JUDGE_ARCH = {
    "arch": "cnn3",
    "in_channels": 3,
    "image_size": IMAGE_SIZE,
    "channels": [32, 64, 64],
    "feature_dim": 64,
    "num_classes": 10,
    "dropout": 0.2,
}

# Optimiser settings (recorded in the manifest's config).
JUDGE_TRAIN = dict(batch=128, lr=2e-3)
VAE_TRAIN = dict(batch=32, lr=1e-3, kl_weight=1e-4)
DIT_TRAIN = dict(batch=128, lr=1e-3, ema_decay=0.999, snr_gamma=5.0)

GUIDANCE_GRID = (1.0, 1.5, 2.0, 3.0)
EVAL_STEPS = (10, 25, 50)
DEFAULT_STEPS = 25


def default_out() -> Path:
    import ditkit.formats

    return Path(ditkit.formats.__file__).resolve().parent / "assets" / "tiny-digits"


def log(msg: str) -> None:
    print(f"[tiny-digits {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int, threads: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ----------------------------------------------------------------------------------------------- data
def upscale(images8: np.ndarray):
    """(N, 8, 8) values 0..16 -> (N, 3, 32, 32) float32 in [0, 1], white digit on black."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(images8, dtype=np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous()


def load_split(seed: int, held_out: float = 0.3) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    tr, ho = train_test_split(idx, test_size=held_out, stratify=d.target, random_state=seed)
    tr, ho = np.sort(tr), np.sort(ho)
    return {
        "x_train": upscale(d.images[tr]), "y_train": d.target[tr].astype(np.int64),
        "x_held": upscale(d.images[ho]), "y_held": d.target[ho].astype(np.int64),
        "n_train": int(len(tr)), "n_held": int(len(ho)),
    }


def augment(x, max_rot_deg=10.0, scale=(0.9, 1.1), max_shift=0.125):
    """Random small affine (rotation, scale, shift) of a (N, C, H, W) batch with a black background."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    ang = (torch.rand(n) * 2 - 1) * math.radians(max_rot_deg)
    s = torch.empty(n).uniform_(*scale)
    tx, ty = ((torch.rand(n) * 2 - 1) * max_shift for _ in range(2))
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def n_params(m) -> int:
    return int(sum(p.numel() for p in m.parameters()))


# ---------------------------------------------------------------------------------------------- judge
def train_judge(data: dict, steps: int, batch: int, lr: float) -> tuple:
    import torch
    import torch.nn.functional as F

    from ditkit.ops.judge import Judge, feature_stats, judge_features

    judge = Judge(JUDGE_ARCH)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    x, y = data["x_train"], torch.from_numpy(data["y_train"])
    judge.train()
    t0, run = time.time(), []
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, lr, warmup=50, floor=0.02))
        idx = torch.randint(0, len(x), (batch,))
        xb = augment(x[idx])
        # Generated digits come through a VAE: train on slightly blurred / noisy variants too.
        if step % 2 == 1:
            xb = F.avg_pool2d(F.pad(xb, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        xb = (xb + 0.03 * torch.randn_like(xb)).clamp(0, 1)
        loss = F.cross_entropy(judge(xb), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.append(loss.item())
        if (step + 1) % 200 == 0 or step + 1 == steps:
            log(f"judge step {step + 1}/{steps} loss {np.mean(run[-200:]):.4f}")
    judge.eval()
    _, lg_tr = judge_features(judge, x)
    f_ho, lg_ho = judge_features(judge, data["x_held"])
    acc_tr = float((lg_tr.argmax(1) == data["y_train"]).mean())
    acc_ho = float((lg_ho.argmax(1) == data["y_held"]).mean())
    mu, sigma = feature_stats(f_ho)
    judge.set_reference(mu, sigma)
    info = {
        "params": n_params(judge),
        "train_accuracy": acc_tr,
        "held_out_accuracy": acc_ho,
        "final_loss": float(np.mean(run[-100:])),
        "seconds": round(time.time() - t0, 1),
    }
    log(f"judge: train acc {acc_tr:.4f}, held-out acc {acc_ho:.4f} ({info['seconds']}s)")
    return judge, info


# ------------------------------------------------------------------------------------------------ vae
def train_vae(data: dict, steps: int, batch: int, lr: float, kl_weight: float) -> tuple:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    x = data["x_train"]
    vae.train()
    t0, rec_run, kl_run = time.time(), [], []
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, lr, warmup=50, floor=0.05))
        idx = torch.randint(0, len(x), (batch,))
        xb = augment(x[idx], max_rot_deg=8.0, scale=(0.95, 1.05), max_shift=0.0625) * 2 - 1
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = F.mse_loss(rec, xb)
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec_run.append(rec_loss.item())
        kl_run.append(kl.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"vae step {step + 1}/{steps} mse {np.mean(rec_run[-100:]):.5f} kl {np.mean(kl_run[-100:]):.3f}")
    vae.eval()
    with torch.no_grad():
        post_tr = vae.encode(x * 2 - 1).latent_dist
        # scaling_factor = 1 / std of the training latents (posterior samples, as Stable Diffusion does)
        z = post_tr.sample()
        sf = float(1.0 / z.std())
        rec_ho = vae.decode(vae.encode(data["x_held"] * 2 - 1).latent_dist.mode()).sample
        mse_ho = float(F.mse_loss(rec_ho, data["x_held"] * 2 - 1))
    vae.register_to_config(scaling_factor=sf)
    info = {
        "params": n_params(vae),
        "final_mse": float(np.mean(rec_run[-100:])),
        "final_kl_per_element": float(np.mean(kl_run[-100:])),
        "held_out_mse": mse_ho,
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
        "scaling_factor": sf,
        "seconds": round(time.time() - t0, 1),
    }
    log(f"vae: held-out mse {mse_ho:.5f}, latent std {info['latent_std']:.4f} -> scaling_factor {sf:.4f} "
        f"({info['seconds']}s)")
    return vae, post_tr.mean.clone(), post_tr.std.clone(), rec_ho, info


# ------------------------------------------------------------------------------------------------ dit
def train_dit(lat_mu, lat_std, labels: np.ndarray, sf: float, steps: int, batch: int, lr: float,
              ema_decay: float, snr_gamma: float | None) -> tuple:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    model = DiTTransformer2DModel(**DIT_CONFIG)
    sched = DDPMScheduler(**NOISE_SCHEDULE)
    acp = sched.alphas_cumprod
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    y = torch.from_numpy(labels)
    model.train()  # in train mode the label embedding drops labels to the null class 1000 with p=0.1
    t0, run, hist = time.time(), [], []
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, lr, warmup=200, floor=0.1))
        idx = torch.randint(0, len(y), (batch,))
        z0 = (lat_mu[idx] + lat_std[idx] * torch.randn_like(lat_mu[idx])) * sf
        noise = torch.randn_like(z0)
        t = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (batch,), dtype=torch.int64)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = model(zt, timestep=t, class_labels=y[idx]).sample
        per = min_snr((pred - noise).pow(2).mean(dim=(1, 2, 3)), a, snr_gamma)
        denoiser_step_(model, opt, ema, ema_decay, per.mean(), step, steps, run, hist, t0, "dit")
    return finish_denoiser(model, ema, run, hist, t0, steps)


def min_snr(per, a, snr_gamma: float | None):
    """Min-SNR-gamma weighting of the per-image epsilon loss (Hang et al. 2023): low-noise steps, dominated by
    unpredictable noise, stop swamping the gradient. `a`: (B, 1, 1, 1) alphas_cumprod of the drawn steps."""
    if not snr_gamma:
        return per
    snr = a.view(-1) / (1 - a.view(-1))
    return per * (snr.clamp(max=snr_gamma) / snr)


def denoiser_step_(model, opt, ema: dict, ema_decay: float, loss, step: int, steps: int, run: list, hist: list,
                   t0: float, what: str, say=None) -> None:
    """One optimizer step of a denoiser (grad-norm clipped at 1), its EMA (warmed-up decay), and the loss log
    every 250 steps (the DiT of tiny-digits and the transformer of tiny-digits-text train alike)."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    d = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                ema[k].copy_(v)
    run.append(loss.item())
    if (step + 1) % 250 == 0 or step + 1 == steps:
        m = float(np.mean(run[-250:]))
        hist.append([step + 1, round(m, 5)])
        el = time.time() - t0
        (say or log)(f"{what} step {step + 1}/{steps} loss {m:.4f} ({el / (step + 1):.3f} s/step, "
                     f"eta {el / (step + 1) * (steps - step - 1):.0f}s)")


def finish_denoiser(model, ema: dict, run: list, hist: list, t0: float, steps: int) -> tuple:
    """The EMA weights loaded, eval mode, and the training info of the manifest."""
    model.load_state_dict(ema)
    model.eval()
    info = {
        "params": n_params(model),
        "final_loss": float(np.mean(run[-250:])),
        "loss_history": hist,
        "seconds": round(time.time() - t0, 1),
        "seconds_per_step": round((time.time() - t0) / max(1, steps), 4),
    }
    return model, info


# ----------------------------------------------------------------------------------------------- eval
def generate(pipe, labels: list[int], steps: int, guidance: float, seed: int = 0, batch: int = 250) -> np.ndarray:
    """Images (N, 32, 32, 3) uint8 from the pipeline, one torch.Generator seeded once for all batches."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(labels), batch):
        imgs = pipe(class_labels=labels[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                    generator=g, output_type="np").images
        out.append(np.asarray(imgs))
    return (np.concatenate(out) * 255).round().clip(0, 255).astype(np.uint8)


def eval_labels(per_class: int) -> list[int]:
    return [c for _ in range(per_class) for c in range(10)]


def pick_guidance(sweep: dict) -> float:
    """Lowest FD among guidance scales reaching accuracy >= 0.99; otherwise the most accurate one."""
    good = [(v["fd"], g) for g, v in sweep.items() if v["accuracy"] >= 0.99]
    if good:
        return float(min(good)[1])
    return float(max((v["accuracy"], -v["fd"], g) for g, v in sweep.items())[2])


def to_uint8(x01) -> np.ndarray:
    return (x01.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python tools/tiny_digits.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output directory (default: ditkit/formats/assets/tiny-digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dit-steps", type=int, default=3000)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--judge-steps", type=int, default=300)
    p.add_argument("--guidance", type=float, default=None,
                   help=f"default guidance scale to record; default: picked from {list(GUIDANCE_GRID)} at 25 steps")
    p.add_argument("--eval-per-class", type=int, default=50, help="generated images per class for the report")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed, for reproducibility)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out is not None else default_out()
    t_start = time.time()
    seed_everything(args.seed, args.threads)

    import torch
    from diffusers import DDIMScheduler, DiTPipeline
    from diffusers.utils import logging as dlogging

    from ditkit.formats.atomic import atomic_dir
    from ditkit.formats.judge import load_judge, save_judge
    from ditkit.formats.manifest import new_manifest, write_manifest
    from ditkit.ops.judge import score

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()

    data = load_split(args.seed)
    log(f"data: {data['n_train']} gen-train / {data['n_held']} held-out digits (seed {args.seed})")

    torch.manual_seed(args.seed + 1)
    judge, judge_info = train_judge(data, args.judge_steps, **JUDGE_TRAIN)
    torch.manual_seed(args.seed + 2)
    vae, lat_mu, lat_std, rec_ho, vae_info = train_vae(data, args.vae_steps, **VAE_TRAIN)
    torch.manual_seed(args.seed + 3)
    dit, dit_info = train_dit(lat_mu, lat_std, data["y_train"], vae_info["scaling_factor"], args.dit_steps,
                              **DIT_TRAIN)

    # Real-data baselines for the FD scale: real gen-train digits (all of them, and as many per class as the
    # generated evaluation set, since FD is biased upwards at small n) and VAE reconstructions of held-out ones.
    sub = np.concatenate([np.flatnonzero(data["y_train"] == c)[:args.eval_per_class] for c in range(10)])
    baselines = {
        "real_gen_train": score(judge, to_uint8(data["x_train"]), data["y_train"].tolist()).to_dict(),
        "real_gen_train_eval_n": score(judge, to_uint8(data["x_train"][sub]), data["y_train"][sub].tolist()).to_dict(),
        "vae_recon_held_out": score(judge, to_uint8((rec_ho / 2 + 0.5).clamp(0, 1)),
                                    data["y_held"].tolist()).to_dict(),
    }
    log(f"baselines: {json.dumps(baselines)}")

    scheduler = DDIMScheduler(**DDIM_CONFIG)
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler, id2label=dict(enumerate(LABEL_NAMES)))

    with atomic_dir(out, force=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # DiTPipeline does not save id2label; from_pretrained passes it to __init__ from model_index.json.
        mi_path = tmp / "model_index.json"
        mi = json.loads(mi_path.read_text())
        mi["id2label"] = {str(i): n for i, n in enumerate(LABEL_NAMES)}
        mi_path.write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
        save_judge(judge, judge.ref_mu, judge.ref_sigma, tmp / "judge", extra={
            "training": {"data": "sklearn load_digits, gen-train split (70%)", "steps": args.judge_steps,
                         "seed": args.seed},
            "train_accuracy": judge_info["train_accuracy"],
            "held_out_accuracy": judge_info["held_out_accuracy"],
            "reference": f"feature mean/covariance of the {data['n_held']} held-out real digits",
        })

        # Evaluate what was written, through diffusers' own loader and pipeline.
        t_eval = time.time()
        pipe = DiTPipeline.from_pretrained(tmp)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.get_label_ids(["seven"]) == [7], "id2label did not round-trip"
        judge = load_judge(tmp / "judge").judge
        labels = eval_labels(args.eval_per_class)
        sweep = {}
        for g in GUIDANCE_GRID:
            t1 = time.time()
            sweep[g] = score(judge, generate(pipe, labels, DEFAULT_STEPS, g, seed=args.seed), labels).to_dict()
            sweep[g]["seconds"] = round(time.time() - t1, 2)
            log(f"guidance {g} @ {DEFAULT_STEPS} steps: {sweep[g]}")
        guidance = float(args.guidance) if args.guidance is not None else pick_guidance(sweep)
        log(f"default guidance: {guidance}")
        by_steps = {}
        for s in EVAL_STEPS:
            t1 = time.time()
            if s == DEFAULT_STEPS and guidance in sweep:  # same seed, labels and settings: same images
                by_steps[s] = dict(sweep[guidance])
            else:
                by_steps[s] = score(judge, generate(pipe, labels, s, guidance, seed=args.seed), labels).to_dict()
                by_steps[s]["seconds"] = round(time.time() - t1, 2)
            log(f"{s} steps, guidance {guidance}: {by_steps[s]}")
        # The same model under other DDIM configs, to show why the saved one was chosen.
        variants = {}
        for vname, over in SCHEDULER_VARIANTS.items():
            pipe.scheduler = DDIMScheduler(**dict(DDIM_CONFIG, **over))
            for s in (DEFAULT_STEPS, 50):
                variants[f"{vname}@{s}"] = score(judge, generate(pipe, labels, s, guidance, seed=args.seed),
                                                 labels).to_dict()
                log(f"scheduler variant {vname} ({over}) @ {s} steps: {variants[f'{vname}@{s}']}")
        eval_seconds = round(time.time() - t_eval, 1)

        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp / safetensors leave 0700 / 0600; ship readable files
            p.chmod(0o755 if p.is_dir() else 0o644)
        weights = sorted(tmp.rglob("*.safetensors"))
        size_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        report = {
            "judge_accuracy": by_steps[DEFAULT_STEPS]["accuracy"],
            "fd": by_steps[DEFAULT_STEPS]["fd"],
            "eval_n": len(labels),
            "eval_seed": args.seed,
            "by_steps": {str(k): v for k, v in by_steps.items()},
            "guidance_sweep_25_steps": {str(k): v for k, v in sweep.items()},
            "scheduler_variants": variants,
            "baselines": baselines,
            "judge": judge_info,
            "vae": vae_info,
            "dit": dit_info,
            "params": {"transformer": dit_info["params"], "vae": vae_info["params"], "judge": judge_info["params"]},
            "size_bytes": size_bytes,
            "weights": [str(p.relative_to(tmp)) for p in weights],
            "eval_seconds": eval_seconds,
            "total_seconds": round(time.time() - t_start, 1),
        }
        config = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "data": {"source": "sklearn.datasets.load_digits", "split": "stratified 70/30 (train_test_split)",
                     "n_gen_train": data["n_train"], "n_held_out": data["n_held"],
                     "preprocess": "x/16, bicubic 8->32, clamp, 3 channels, white on black, [-1,1] for the VAE"},
            "vae": {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIG.items()},
                    **VAE_TRAIN, "optimizer": "AdamW wd 0, warmup 50 + cosine to 0.05",
                    "loss": "mse(recon, x) + kl_weight * KL per latent element",
                    "augment": "affine rot 8deg scale 0.95-1.05 shift 1px",
                    "scaling_factor": "1 / std of posterior samples of the gen-train latents"},
            "dit": {"config": DIT_CONFIG, "noise_schedule": NOISE_SCHEDULE, **DIT_TRAIN,
                    "optimizer": "AdamW betas (0.9, 0.99) wd 0, warmup 200 + cosine to 0.1, grad clip 1",
                    "objective": "epsilon mse, min-SNR-gamma weighted; latents sampled from the VAE posterior",
                    "label_dropout": 0.1},
            "scheduler": DDIM_CONFIG,
            "judge": {"arch": JUDGE_ARCH, **JUDGE_TRAIN, "optimizer": "AdamW wd 1e-4, warmup 50 + cosine",
                      "loss": "cross entropy, label smoothing 0.05",
                      "augment": "affine rot 10deg scale 0.9-1.1 shift 2px, blur every other step, noise 0.03"},
            "guidance_grid": list(GUIDANCE_GRID),
            "threads": args.threads,
        }
        defaults = {"sampler": "ddim", "steps": DEFAULT_STEPS, "guidance": guidance, "labels": list(range(10))}
        write_manifest(tmp, new_manifest(family="dit", op="build-default", config=config, report=report,
                                         parent=None, defaults=defaults))
    log(f"wrote {out} ({size_bytes / 1e6:.2f} MB) in {time.time() - t_start:.0f}s")
    print(json.dumps({"out": str(out), "defaults": defaults, "report": report}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
