"""Build the embedded default `tiny-digits-text`: a text-conditioned PixArt pipeline that draws the digit a
caption names ("a handwritten seven"), reproducibly, with nothing downloaded.

    python tools/tiny_digits_text.py --out DIR [--seed 0] [--steps N] [--threads 1] [--tiny-digits DIR]

(`make tiny-digits-text` runs it into formats/assets/tiny-digits-text.)

Writes into DIR (atomically, replacing it):
    model_index.json, transformer/, vae/, scheduler/,   a diffusers PixArtAlphaPipeline (fp32 safetensors)
    text_encoder/, tokenizer/
    judge/                                             the tiny-digits judge (class accuracy + FD)
    ditkit.json                                        manifest: config, measured report, defaults with the
                                                       prompt words the judge scores ("seven" -> 7)

Parts:
  - VAE and judge: those of tiny-digits (32x32 RGB <-> 8x8x4 latents; the digit judge), copied from the
    tiny-digits asset (--tiny-digits, default the installed one); when that asset is absent they are rebuilt
    with tiny_digits' own functions and seeds, on the same data split.
  - tokenizer: a word-level `tokenizers` model over a fixed vocabulary (VOCAB), lower-cased, ending every
    text with </s> as T5 does, saved as a transformers fast tokenizer (tokenizer.json).
  - text encoder: a T5EncoderModel of toy size (TEXT_ENCODER_CONFIG), random but fixed by the seed and never
    trained: its outputs differ per word, and the transformer's cross-attention learns to read them.
  - transformer: PixArtTransformer2DModel (TRANSFORMER_CONFIG) trained on the 70% gen-train split of
    sklearn's digits with epsilon-prediction, each image captioned by a random template (TEMPLATES) naming
    its digit, and 10% of captions dropped to the empty prompt so classifier-free guidance works.
Progress goes to stderr; the final report (JSON) to stdout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import tiny_digits as td  # the sibling script (tools/ is the script's own folder on sys.path)

LABEL_NAMES = td.LABEL_NAMES
SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
WORDS = ["a", "an", "the", "of", "digit", "number", "numeral", "handwritten", "hand", "written", "drawn", "by",
         "typed", "printed", "font", "style", "in", "bold", "thin", "image", "picture", "photo", "white", "black",
         "on", "and", "with", "sks", ",", ".", "-"]
VOCAB = SPECIALS + WORDS + LABEL_NAMES + [str(i) for i in range(10)]
MAX_TOKENS = 16  # longest caption in tokens, </s> included (the pipeline pads to it)

# {w}: the digit's name, {d}: the numeral. The canonical prompt is the first.
TEMPLATES = ["a handwritten {w}", "a handwritten digit {w}", "handwritten {w}", "the number {w}", "a {w}", "{w}",
             "the digit {d}", "a handwritten {d}"]
CAPTION_DROPOUT = 0.1

TEXT_ENCODER_CONFIG = dict(vocab_size=len(VOCAB), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                           relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                           feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

# 4 blocks of width 128 (4 heads x 32): with LoRA rank 4 on every attention projection (self and cross) an
# adapter is 2.66% of the transformer (32,768 of 1,232,016 params), under the 3% the personalization benchmark
# allows; the ratio is about rank / width, so the width stays 128. 4 blocks rather than 6: at batch 128 a step
# costs 0.27 s instead of 0.41 s on 2 idle cores, so the build fits in about 20 minutes on a shared machine.
TRANSFORMER_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                          num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
                          caption_channels=TEXT_ENCODER_CONFIG["d_model"], norm_type="ada_norm_single",
                          num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6,
                          use_additional_conditions=False)

# batch 64 and 3000 steps (153 epochs of the 1257 digits): half the samples of tiny-digits' recipe (3000 x 128),
# whose batch-128 steps took 2-4 s on 2 shared cores (with 2 threads; see --threads). 1500 steps were not
# enough (judge accuracy 0.54 at guidance 4); see docs/tiny-digits-text.md.
TRAIN = dict(batch=64, lr=1e-3, ema_decay=0.999, snr_gamma=5.0, warmup=100)
GUIDANCE_GRID = (1.5, 2.0, 3.0, 4.0)
TEMPLATE_EVAL_PER_CLASS = 3  # images per class for each caption template's row (cheap: 8 templates)
DEFAULT_STEPS = td.DEFAULT_STEPS


def log(msg: str) -> None:
    print(f"[tiny-digits-text {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_out() -> Path:
    return td.default_out().parent / "tiny-digits-text"


def prompt(label: int, template: int = 0) -> str:
    return TEMPLATES[template].format(w=LABEL_NAMES[label], d=label)


# ------------------------------------------------------------------------------------------- text side
def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=MAX_TOKENS)


def build_text_encoder(seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**TEXT_ENCODER_CONFIG)).eval()


# ------------------------------------------------------------------------------------------ vae + judge
def vae_and_judge(src: Path | None, data: dict, seed: int, vae_steps: int, judge_steps: int):
    """tiny-digits' VAE and judge: copied from its asset, or rebuilt with its functions and seeds."""
    import torch
    from diffusers import AutoencoderKL

    from ditkit.formats.judge import load_judge

    if src is not None and (src / "vae" / "config.json").is_file() and (src / "judge" / "config.json").is_file():
        log(f"VAE and judge from {src}")
        vae = AutoencoderKL.from_pretrained(src / "vae").eval()
        judge = load_judge(src / "judge").judge
        extra = json.loads((src / "judge" / "config.json").read_text())
        return vae, judge, {"source": str(src), "judge_held_out_accuracy": extra.get("held_out_accuracy")}, src
    log("tiny-digits asset not found: rebuilding its VAE and judge with tiny_digits' functions and seeds")
    torch.manual_seed(seed + 1)
    judge, judge_info = td.train_judge(data, judge_steps, **td.JUDGE_TRAIN)
    torch.manual_seed(seed + 2)
    vae, _, _, _, vae_info = td.train_vae(data, vae_steps, **td.VAE_TRAIN)
    return vae, judge, {"source": "rebuilt", "judge": judge_info, "vae": vae_info}, None


# ------------------------------------------------------------------------------------------ transformer
def train_transformer(lat_mu, lat_std, labels, table, uncond, steps: int, batch: int = TRAIN["batch"],
                      lr: float = TRAIN["lr"], ema_decay: float = TRAIN["ema_decay"],
                      snr_gamma: float | None = TRAIN["snr_gamma"]):
    """table: (len(TEMPLATES), 10, L, D) caption embeddings and (.., L) masks; uncond: the empty prompt's.
    The recipe of tiny-digits' DiT (lr 1e-3, Min-SNR-5 weighting, EMA), which its short trials favoured."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    emb_table, mask_table = table
    u_emb, u_mask = uncond
    model = PixArtTransformer2DModel(**TRANSFORMER_CONFIG)
    acp = DDPMScheduler(**td.NOISE_SCHEDULE).alphas_cumprod
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    y = torch.from_numpy(labels)
    model.train()
    t0, run, hist = time.time(), [], []
    for step in range(steps):
        td.set_lr(opt, td.cosine_lr(step, steps, lr, warmup=TRAIN["warmup"], floor=0.1))
        idx = torch.randint(0, len(y), (batch,))
        tpl = torch.randint(0, len(TEMPLATES), (batch,))
        drop = torch.rand(batch) < CAPTION_DROPOUT
        enc = torch.where(drop[:, None, None], u_emb, emb_table[tpl, y[idx]])  # (B, L, D)
        mask = torch.where(drop[:, None], u_mask, mask_table[tpl, y[idx]])  # (B, L)
        z0 = lat_mu[idx] + lat_std[idx] * torch.randn_like(lat_mu[idx])
        noise = torch.randn_like(z0)
        t = torch.randint(0, td.NOISE_SCHEDULE["num_train_timesteps"], (batch,))
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = model(zt, encoder_hidden_states=enc, encoder_attention_mask=mask, timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        per = td.min_snr((pred - noise).pow(2).mean(dim=(1, 2, 3)), a, snr_gamma)
        td.denoiser_step_(model, opt, ema, ema_decay, per.mean(), step, steps, run, hist, t0, "transformer", log)
    return td.finish_denoiser(model, ema, run, hist, t0, steps)


# ------------------------------------------------------------------------------------------------ eval
def evaluate(root: Path, prompts: list[str], labels: list[int], guidance: float, steps: int, seed: int) -> dict:
    """Judge scores of what ditkit's own loader and sampler make from `root` for these prompts."""
    from ditkit.formats.layouts import load_bundle
    from ditkit.ops.generate import GenerateConfig, generate
    from ditkit.ops.judge import score

    bundle = load_bundle(root)
    t0 = time.time()
    images, rep = generate(bundle, GenerateConfig(prompts=prompts, steps=steps, guidance=guidance, seed=seed,
                                                  batch_size=100))
    s = score(bundle.judge, images, labels).to_dict()
    s["seconds"] = round(time.time() - t0, 2)
    return s


def diffusers_check(root: Path, guidance: float, seed: int, per_class: int = 10) -> dict:
    """The same pipeline through diffusers' own PixArtAlphaPipeline.__call__ (resolution binning off: its
    aspect-ratio tables exist only for 256-1024 px models)."""
    import torch
    from diffusers import PixArtAlphaPipeline

    from ditkit.formats.judge import load_judge
    from ditkit.ops.judge import score

    pipe = PixArtAlphaPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    labels = td.eval_labels(per_class)
    out = pipe([prompt(l) for l in labels], height=32, width=32, use_resolution_binning=False,
               num_inference_steps=DEFAULT_STEPS, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
               output_type="np", clean_caption=False, max_sequence_length=MAX_TOKENS).images
    images = (np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8)
    return score(load_judge(root / "judge").judge, images, labels).to_dict()


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python tools/tiny_digits_text.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the installed asset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000, help=f"transformer training steps (batch {TRAIN['batch']})")
    p.add_argument("--tiny-digits", type=Path, default=None,
                   help="tiny-digits asset to take the VAE and judge from (default: the installed one)")
    p.add_argument("--vae-steps", type=int, default=800, help="only when the VAE is rebuilt")
    p.add_argument("--judge-steps", type=int, default=600, help="only when the judge is rebuilt")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"default guidance; default: picked from {list(GUIDANCE_GRID)} at {DEFAULT_STEPS} steps")
    p.add_argument("--eval-per-class", type=int, default=10, help="generated images per class for the report")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (fixed, for reproducibility; 1 is fastest on a shared machine)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out is not None else default_out()
    t_start = time.time()
    td.seed_everything(args.seed, args.threads)

    import torch
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from diffusers.utils import logging as dlogging

    from ditkit.formats.atomic import atomic_dir
    from ditkit.formats.families import get_family
    from ditkit.formats.judge import save_judge
    from ditkit.formats.manifest import new_manifest, write_manifest

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()

    data = td.load_split(args.seed)
    log(f"data: {data['n_train']} gen-train / {data['n_held']} held-out digits (seed {args.seed})")
    src = args.tiny_digits if args.tiny_digits is not None else td.default_out()
    vae, judge, parts_info, copied_from = vae_and_judge(src, data, args.seed, args.vae_steps, args.judge_steps)
    sf = float(vae.config.scaling_factor)
    with torch.no_grad():
        post = vae.encode(data["x_train"] * 2 - 1).latent_dist
        lat_mu, lat_std = post.mean * sf, post.std * sf

    # 1. text side: tokenizer + fixed random T5, and every caption's embedding through the pipeline's own
    #    encode_prompt (what sampling will use)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(args.seed + 4)
    scheduler = DDIMScheduler(**td.DDIM_CONFIG)
    pixart = get_family("pixart")
    probe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                transformer=PixArtTransformer2DModel(**TRANSFORMER_CONFIG), scheduler=scheduler)
    captions = [prompt(l, t) for t in range(len(TEMPLATES)) for l in range(10)]
    with torch.no_grad():
        cond, uncond = pixart.encode_prompts(probe, captions, "cpu")
    L, D = cond["prompt_embeds"].shape[1:]
    table = (cond["prompt_embeds"].view(len(TEMPLATES), 10, L, D),
             cond["prompt_attention_mask"].view(len(TEMPLATES), 10, L))
    unc = (uncond["prompt_embeds"][0], uncond["prompt_attention_mask"][0])
    unknown = [w for c in captions for w in c.split() if w not in VOCAB]
    if unknown:
        raise SystemExit(f"templates use words outside the vocabulary: {sorted(set(unknown))}")

    # 2. the transformer
    torch.manual_seed(args.seed + 3)
    model, tr_info = train_transformer(lat_mu, lat_std, data["y_train"], table, unc, args.steps)

    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=model,
                               scheduler=scheduler)
    with atomic_dir(out, force=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # the tokenizer class under the name both transformers 4 and 5 export
        mi_path = tmp / "model_index.json"
        mi = json.loads(mi_path.read_text())
        mi["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        mi_path.write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
        if copied_from is not None:
            shutil.copytree(copied_from / "judge", tmp / "judge")
        else:
            save_judge(judge, judge.ref_mu, judge.ref_sigma, tmp / "judge",
                       extra={"training": "rebuilt by tiny_digits_text with tiny_digits.train_judge"})
        prompt_labels = {**{w: i for i, w in enumerate(LABEL_NAMES)}, **{str(i): i for i in range(10)}}
        defaults = {"sampler": "ddim", "steps": DEFAULT_STEPS, "prompts": [prompt(l) for l in range(10)],
                    "prompt_labels": prompt_labels}

        # 3. measure what was written, through ditkit's loader and sampler
        t_eval = time.time()
        labels = td.eval_labels(args.eval_per_class)
        canon = [prompt(l) for l in labels]
        sweep = {}
        for g in GUIDANCE_GRID:
            sweep[g] = evaluate(tmp, canon, labels, g, DEFAULT_STEPS, args.seed)
            log(f"guidance {g} @ {DEFAULT_STEPS} steps: {sweep[g]}")
        guidance = float(args.guidance) if args.guidance is not None else td.pick_guidance(sweep)
        log(f"default guidance: {guidance}")
        by_template = {}
        for t in range(len(TEMPLATES)):
            tl = td.eval_labels(TEMPLATE_EVAL_PER_CLASS)
            by_template[TEMPLATES[t]] = evaluate(tmp, [prompt(l, t) for l in tl], tl, guidance,
                                                 DEFAULT_STEPS, args.seed + 1)
            log(f"template {TEMPLATES[t]!r}: {by_template[TEMPLATES[t]]}")
        # prompts must drive it: with a wrong word the judge must see that word's digit, not the image's
        shifted = [(l + 3) % 10 for l in labels]
        swapped = evaluate(tmp, [prompt(l) for l in shifted], shifted, guidance, DEFAULT_STEPS, args.seed + 2)
        native = diffusers_check(tmp, guidance, args.seed)
        log(f"diffusers PixArtAlphaPipeline.__call__: {native}")
        eval_seconds = round(time.time() - t_eval, 1)

        size_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        report = {
            "judge_accuracy": sweep[guidance]["accuracy"] if guidance in sweep else None,
            "fd": sweep[guidance]["fd"] if guidance in sweep else None,
            "eval_n": len(labels), "eval_seed": args.seed,
            "guidance_sweep_25_steps": {str(k): v for k, v in sweep.items()},
            "by_template": by_template,
            "shifted_prompts": swapped,
            "diffusers_pipeline_call": native,
            "transformer": tr_info,
            "parts": parts_info,
            "params": {"transformer": tr_info["params"], "text_encoder": td.n_params(text_encoder),
                       "vae": td.n_params(vae), "judge": td.n_params(judge)},
            "size_bytes": size_bytes,
            "eval_seconds": eval_seconds,
            "total_seconds": round(time.time() - t_start, 1),
        }
        config = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "data": {"source": "sklearn.datasets.load_digits", "split": "tiny_digits.load_split (stratified 70/30)",
                     "n_gen_train": data["n_train"]},
            "transformer": {"config": TRANSFORMER_CONFIG, "noise_schedule": td.NOISE_SCHEDULE, **TRAIN,
                            "optimizer": "AdamW betas (0.9, 0.99), linear warmup + cosine to 0.1, clip 1",
                            "objective": "epsilon mse, Min-SNR-5 weighted", "caption_dropout": CAPTION_DROPOUT},
            "text_encoder": {"config": TEXT_ENCODER_CONFIG, "trained": False, "seed": args.seed + 4},
            "tokenizer": {"model": "WordLevel", "vocab": VOCAB, "max_tokens": MAX_TOKENS},
            "templates": TEMPLATES,
            "scheduler": td.DDIM_CONFIG,
            "threads": args.threads,
        }
        defaults["guidance"] = guidance
        write_manifest(tmp, new_manifest(family="pixart", op="build-default", config=config, report=report,
                                         parent=None, defaults=defaults))
    log(f"wrote {out} ({size_bytes / 1e6:.2f} MB) in {time.time() - t_start:.0f}s")
    print(json.dumps({"out": str(out), "defaults": defaults, "report": report}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
