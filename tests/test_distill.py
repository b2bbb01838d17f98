"""ditkit distill: every mode on every family (tiny models, a few steps), the steps grid against the real sampler,
block mapping, outlier masking, exact resume through the CLI, and 2 processes against 1."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditkit.formats.layouts import load_bundle
from ditkit.formats.embeddings import load_embeddings
from ditkit.formats.errors import ConfigError
from ditkit.ops.distill import DISTILL_MODES, DistillConfig, distill, recover, steps
from ditkit.ops.prune.depth import remove_blocks
from ditkit.ops.sample import denoise
from conftest import FAMILY_NAMES, sigterm_during_distill

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = dict(steps=3, batch_size=4, pool_size=4, val_images=2, lr=1e-3, ema_decay=0.0, warmup_steps=0)


def _inputs(family, tiny_dir, tiny_embeddings):
    bundle = load_bundle(tiny_dir(family))
    emb = load_embeddings(tiny_embeddings(family)) if family != "dit" else None
    return bundle, emb


def _pruned(bundle):
    """A depth-pruned student in memory (first removable block gone), with the manifest prune writes."""
    fam, tr = bundle.family, bundle.transformer
    stack = fam.stacks[0].attr
    n = len(getattr(tr, stack))
    if fam.name == "flux":  # one block per stack: a perturbed copy instead (mapped evenly, one to one)
        import copy

        student = copy.deepcopy(tr)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return dataclasses.replace(bundle, transformer=student, manifest={"op": "import"})
    student = remove_blocks(fam, tr, [f"{stack}.0"])
    kept = [f"{stack}.{i}" for i in range(1, n)]
    return dataclasses.replace(bundle, transformer=student,
                               manifest={"op": "prune", "report": {"plan": {"kept_blocks": kept}}})


def _losses(report_log):
    return [r["loss"] for r in report_log]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_recover_every_family(family, tiny_dir, tiny_embeddings):
    teacher, emb = _inputs(family, tiny_dir, tiny_embeddings)
    student = _pruned(teacher)
    cfg = DistillConfig(mode="recover", **FAST)
    out, report = distill(student, cfg, teacher, embeddings=emb)
    assert report.steps == 3 and report.params_trained == report.params
    assert torch.isfinite(torch.tensor(report.final_loss))
    assert report.details["pool"]["points"] == 4 * teacher.defaults()["steps"]
    assert report.details["mapping"], report.details  # block features matched
    if family != "flux":
        assert report.details["mapping_source"].startswith("prune plan")
        stack = teacher.family.stacks[0].attr
        assert report.details["mapping"][0] == f"{stack}.0 <- {stack}.1"
    assert out.transformer is student.transformer and out.defaults() == teacher.defaults()
    assert not any(p.requires_grad for p in out.transformer.parameters())
    assert report.validation["images"] == 2 and "psnr_vs_teacher" in report.validation


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_steps_every_family(family, tiny_dir, tiny_embeddings):
    base, emb = _inputs(family, tiny_dir, tiny_embeddings)
    before = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    cfg = DistillConfig(mode="steps", student_steps=2, **FAST)
    out, report = distill(base, cfg, embeddings=emb)
    # the base is the teacher and stays untouched; the student is a trained copy
    assert all(torch.equal(before[k], v) for k, v in base.transformer.state_dict().items())
    assert out.transformer is not base.transformer
    assert any(not torch.equal(before[k], v) for k, v in out.transformer.state_dict().items())
    d = out.defaults()
    assert d["steps"] == 2 and report.validation["steps"] == 2
    fam = base.family
    if fam.prediction == "epsilon":  # dit, pixart
        assert d["sampler"] == "ddim" and d["guidance"] == 1.0  # guidance folded in: no CFG doubling
        assert type(out.scheduler).__name__ == "DDIMScheduler"
        assert out.scheduler.config.timestep_spacing == "trailing"
    elif fam.uses_cfg(base.transformer, base.defaults()["guidance"]):  # sd3, lumina, lumina2, sana
        assert d["sampler"] == "flow-euler" and d["guidance"] == 1.0
    else:  # flux embeds guidance: the student keeps the teacher's value
        assert d["sampler"] == "flow-euler" and d["guidance"] == base.defaults()["guidance"]
    assert torch.isfinite(torch.tensor(report.final_loss))


def test_steps_teaches_a_depth_pruned_student_from_its_base(tiny_dir):
    # prune then distill steps with --teacher BASE: the student keeps its pruned depth (fewer blocks per call as well
    # as fewer calls), the pool is the base's guided trajectories, the base is untouched; --as-lora is refused
    base = load_bundle(tiny_dir("dit"))
    before = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    student = _pruned(base)
    n_blocks = len(student.transformer.transformer_blocks)
    assert n_blocks == len(base.transformer.transformer_blocks) - 1
    out, report = distill(student, DistillConfig(mode="steps", student_steps=2, **FAST), base)
    assert len(out.transformer.transformer_blocks) == n_blocks
    assert report.teacher["sha256"] == base.parent_record()["sha256"]
    assert report.details["pool"]["guidance"] == base.defaults()["guidance"] and report.details["pool"]["cfg"]
    assert out.defaults()["steps"] == 2 and out.defaults()["guidance"] == 1.0
    assert "taught by" in report.plan["trains"]
    assert all(torch.equal(before[k], v) for k, v in base.transformer.state_dict().items())
    with pytest.raises(ConfigError, match="--as-lora writes a LoRA over SRC"):
        distill(student, DistillConfig(mode="steps", student_steps=2, as_lora=True, **FAST), base)


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_steps_grid_is_the_students_sampler(family, tiny_dir, tiny_embeddings):
    """Feeding the sampler the output the loss asks for lands exactly on the teacher's states."""
    base, emb = _inputs(family, tiny_dir, tiny_embeddings)
    fam, k = base.family, 3
    sched = steps.student_scheduler(fam, base.scheduler)
    shape = (fam.latent_channels(base.transformer), 8, 8)
    grid = steps.make_grid(fam, sched, k, 5, shape)
    assert len(grid.student) == k and all(len(sub) >= 1 for sub in grid.teacher)
    if family == "dit":  # trailing spacing: the first call is at pure noise, the last lands on alpha = 1
        assert [s.t for s in grid.student] == [999.0, 666.0, 332.0]
    pool = steps.teacher_pool(base, grid, 2, seed=0, guidance=float(base.defaults()["guidance"]), device="cpu",
                              embeddings=emb)
    assert pool.states.shape == (2, k + 1, *shape)
    calls = []

    def ideal(x, t, c):
        i = len(calls)
        calls.append(float(t[0]))
        s = grid.student[i]
        return (pool.states[:, i + 1] - s.a * x) / s.b

    cond = {kk: v[:2] for kk, v in pool.conds.cond.items()}
    final = denoise(fam, base.transformer, steps.student_scheduler(fam, base.scheduler), pool.states[:, 0], cond,
                    None, 1.0, k, predict=ideal)
    assert calls == pytest.approx([s.t for s in grid.student])
    torch.testing.assert_close(final, pool.states[:, -1], atol=1e-4, rtol=1e-4)


def test_block_map_follows_the_kept_blocks(tiny_dir):
    teacher = load_bundle(tiny_dir("dit"))
    import copy

    big = copy.deepcopy(teacher.transformer)
    big.transformer_blocks = torch.nn.ModuleList([copy.deepcopy(big.transformer_blocks[0]) for _ in range(6)])
    small = copy.deepcopy(teacher.transformer)
    small.transformer_blocks = torch.nn.ModuleList([copy.deepcopy(small.transformer_blocks[0]) for _ in range(3)])

    def ends(kept):
        manifest = {"op": "prune", "report": {"plan": {"kept_blocks": kept}}} if kept is not None else {}
        pairs, _ = recover.block_map(dataclasses.replace(teacher, transformer=small, manifest=manifest), big)
        return [int(t.rsplit(".", 1)[1]) for _, t in pairs]

    assert ends([f"transformer_blocks.{i}" for i in (0, 2, 4)]) == [1, 3, 5]
    assert ends([f"transformer_blocks.{i}" for i in (1, 2, 5)]) == [1, 4, 5]
    assert ends(None) == [1, 3, 5]  # evenly


def test_outlier_masking_drops_the_worst_tokens():
    t = torch.ones(2, 4, 8)
    s = t.clone()
    s[:, 3] += 10.0  # one token per row far off
    s[:, 0] += 1.0
    full = recover.feature_error(s, t, 0.0)
    masked = recover.feature_error(s, t, 0.25)  # 1 of 4 tokens dropped: the outlier
    assert full == pytest.approx(torch.full((2,), (100 + 1) / 4))
    assert masked == pytest.approx(torch.full((2,), 1 / 3))


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown distill mode .fast., choose one of: feedback, recover, steps"):
        DistillConfig(mode="fast")
    with pytest.raises(ConfigError, match="--student-steps does not apply to --mode recover"):
        DistillConfig(mode="recover", student_steps=4)
    with pytest.raises(ConfigError, match="--mask-outliers must be a fraction"):
        DistillConfig(mode="recover", mask_outliers=1.0)
    with pytest.raises(ConfigError, match="--target-speedup does not apply to --mode steps"):
        DistillConfig(mode="steps", target_speedup=1.5)
    with pytest.raises(ConfigError, match="--target-speedup must be a number > 1"):
        DistillConfig(mode="feedback", target_speedup=0.9)
    cfg = DistillConfig(mode="steps")
    assert cfg.student_steps == DISTILL_MODES["steps"].defaults["student_steps"] and cfg.feature_weight is None


# -- CLI -------------------------------------------------------------------------------------------------------

CLI_FAST = ["--steps", "5", "--batch-size", "4", "--pool-size", "4", "--val-images", "2", "--checkpoint-every", "2",
            "--student-steps", "2", "--lr", "1e-3"]


def _weights(root: Path) -> dict:
    return load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_cli_resume_after_sigterm_equals_uninterrupted(tiny_dir, tmp_path, cli, monkeypatch):
    src = tiny_dir("dit")
    a = cli("distill", src, "-o", tmp_path / "a", "--mode", "steps", *CLI_FAST, "--json")
    assert a.code == 0, a.err
    doc = a.json()
    assert doc["steps"] == 5 and doc["resumed_from"] is None and doc["defaults"]["steps"] == 2
    reloaded = load_bundle(tmp_path / "a")
    assert reloaded.defaults()["steps"] == 2 and reloaded.defaults()["guidance"] == 1.0
    assert reloaded.manifest["op"] == "distill" and reloaded.manifest["parent"]["path"] == str(src)
    assert type(reloaded.scheduler).__name__ == "DDIMScheduler"

    restore = sigterm_during_distill(monkeypatch, 3)  # SIGTERM arrives after step 3
    b = cli("distill", src, "-o", tmp_path / "b", "--mode", "steps", *CLI_FAST)
    assert b.code == 130 and "--resume" in b.error_line
    assert not (tmp_path / "b").exists() and (tmp_path / "b.ckpt" / "checkpoint").is_dir()
    restore()
    again = cli("distill", src, "-o", tmp_path / "b", "--mode", "steps", *CLI_FAST)
    assert again.code == 2 and "pass --resume to continue it or --force" in again.error_line
    r = cli("distill", src, "-o", tmp_path / "b", "--mode", "steps", *CLI_FAST, "--resume", "--json")
    assert r.code == 0, r.err
    assert r.json()["resumed_from"] == 3
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = lambda p: [json.loads(l) for l in (p / "log.jsonl").read_text().splitlines()]  # noqa: E731
    la, lb = rows(tmp_path / "a.ckpt"), rows(tmp_path / "b.ckpt")
    assert [r["step"] for r in lb] == [0, 1, 2, 3, 4, 5]
    assert [r.get("loss") for r in la] == [r.get("loss") for r in lb]
    assert (tmp_path / "b.ckpt" / "samples" / "step-000005.png").is_file()
    changed = cli("distill", src, "-o", tmp_path / "c", "--mode", "steps", *CLI_FAST, "--checkpoint-dir",
                  tmp_path / "b.ckpt", "--resume", "--lr", "2e-3")
    assert changed.code == 2 and "the checkpoint was made with lr=0.001" in changed.error_line


def test_cli_recover_uses_the_recorded_parent(tiny_dir, tmp_path, cli):
    from ditkit.formats.layouts import save_bundle
    from ditkit.formats.manifest import new_manifest
    from ditkit.ops.prune import PruneConfig, prune

    pruned = tmp_path / "pruned"  # what `ditkit prune SRC -o pruned --method depth --ratio 0.5` writes
    base = load_bundle(tiny_dir("dit"))
    pcfg = PruneConfig(method="depth", ratio=0.5, timing=False, calib_samples=1, calib_steps=2, calib_points=1)
    small, rep = prune(base, pcfg)
    save_bundle(small, pruned, new_manifest(family="dit", op="prune", config=pcfg.to_dict(), report=rep.to_dict(),
                                            parent=base.parent_record(), defaults=base.defaults()))
    r = cli("distill", pruned, "-o", tmp_path / "rec", "--mode", "recover", "--steps", "2", "--batch-size", "4",
            "--pool-size", "2", "--val-images", "2", "--mask-outliers", "0.1", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["teacher"]["path"] == str(tiny_dir("dit")) and len(doc["details"]["mapping"]) == 1
    assert doc["plan"]["params_trained"] == doc["params"] and "peak_memory_estimate" in doc["plan"]
    assert "plan (recover):" in r.err and "data-free" in r.err
    rec = load_bundle(tmp_path / "rec")
    assert [e["op"] for e in rec.manifest["lineage"]] == ["import", "prune"]
    assert rec.transformer.config.num_layers == 1
    bad = cli("distill", tiny_dir("dit"), "-o", tmp_path / "x", "--mode", "recover")
    assert bad.code == 2 and "records no parent" in bad.error_line and not (tmp_path / "x").exists()
    wrong = cli("distill", pruned, "-o", tmp_path / "y", "--mode", "recover", "--student-steps", "4")
    assert wrong.code == 2 and "--student-steps does not apply to --mode recover" in wrong.error_line


def test_cli_recover_with_ground_truth_images(tiny_dir, tmp_path, cli):
    from PIL import Image

    for label in (1, 2):
        (tmp_path / "imgs" / str(label)).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (40 * i, 100, 200)).save(tmp_path / "imgs" / str(label) / f"{i}.png")
    r = cli("distill", tiny_dir("dit"), "-o", tmp_path / "gt", "--mode", "recover", "--teacher", tiny_dir("dit"),
            "--images", tmp_path / "imgs", "--steps", "2", "--batch-size", "4", "--pool-size", "2",
            "--val-images", "2", "--json")
    assert r.code == 0, r.err
    d = r.json()["details"]
    assert d["ground_truth_images"] == 4 and d["losses"]["gt_weight"] == 1.0


BIN = Path(sys.executable).parent


def test_torchrun_two_processes_match_one(tiny_dir, tmp_path, cli):
    """Same global batch on 1 and 2 gloo processes: the same student up to float summation order."""
    args = [tiny_dir("dit"), "--mode", "steps", "--steps", "3", "--batch-size", "6", "--pool-size", "4",
            "--val-images", "2", "--student-steps", "2", "--lr", "1e-3", "--warmup-steps", "0", "--ema-decay", "0"]
    one = cli("distill", *args, "-o", tmp_path / "one", "--json")
    assert one.code == 0, one.err
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
                          str(BIN / "ditkit"), "distill", *map(str, args), "-o", str(tmp_path / "two"), "--json"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "terminate called" not in two.stderr
    d1, d2 = one.json(), json.loads(two.stdout)  # only rank 0 prints
    assert d1["steps"] == d2["steps"] == 3
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    w0 = load_file(str(Path(tiny_dir("dit")) / "transformer" / "diffusion_pytorch_model.safetensors"))
    norm = lambda a, b: sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5  # noqa: E731
    # measured: the two updates differ by 2.7e-4 of their size (Adam's first steps amplify summation-order noise
    # in near-zero gradients); a different global batch or a rank training on its own data differs by O(1)
    assert norm(w1, w0) > 1e-2 and norm(w1, w2) / norm(w1, w0) < 5e-3, (norm(w1, w0), norm(w1, w2))


def test_guidance_direction_loss(tiny_dir):
    """--cfg-weight adds the relative error of (cond - uncond) to output matching: zero for a perfect student,
    and a larger loss with the weight for an imperfect one (same batch)."""
    import copy

    from ditkit.ops.distill import Context
    from ditkit.ops.training import batch_generator

    teacher = load_bundle(tiny_dir("dit"))
    assert teacher.family.uses_cfg(teacher.transformer, float(teacher.defaults()["guidance"]))
    teacher.transformer.requires_grad_(False)

    def loss(student_tr, weight):
        cfg = DistillConfig(mode="recover", cfg_weight=weight, feature_weight=0.0, **FAST)
        student = dataclasses.replace(teacher, transformer=student_tr, manifest={"op": "import"})
        job = recover.prepare(Context(cfg=cfg, student=student, teacher=teacher, trainable=student_tr, device="cpu",
                                      log=lambda m: None))
        try:
            assert job.report["losses"]["cfg_weight"] == weight
            with torch.no_grad():
                return float(job.loss_fn(student_tr, batch_generator(0, 0, 0), 0, 1))
        finally:
            job.close()

    assert loss(copy.deepcopy(teacher.transformer), 1.0) == pytest.approx(0.0, abs=1e-10)
    off = copy.deepcopy(teacher.transformer)
    with torch.no_grad():
        for p in off.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    plain, weighted = loss(off, 0.0), loss(off, 1.0)
    assert weighted > plain > 0


def test_a_text_bundle_distills_on_its_own_prompts_with_their_guidance_branch(tiny_dir):
    """Without --embeddings, a text bundle that has prompts and a text encoder (tiny-digits-text) gives the
    teacher's trajectories on its own prompts with their unconditional branch (guidance folded into the
    student); a bundle with neither falls back to random embeddings without one."""
    from ditkit.ops.distill.common import conditions

    b = load_bundle("tiny-digits-text")
    prompts = b.defaults()["prompts"]
    c = conditions(b, 12, seed=0)
    assert c.kind == "prompts" and c.values == [prompts[i % len(prompts)] for i in range(12)]
    assert c.uncond is not None and c.cond["prompt_embeds"].shape[0] == 12
    assert not torch.equal(c.cond["prompt_embeds"][0], c.cond["prompt_embeds"][1])  # two prompts, two rows
    bare = conditions(load_bundle(tiny_dir("pixart")), 4, seed=0)  # no text encoder in the tiny pipeline
    assert bare.kind == "random" and bare.uncond is None
