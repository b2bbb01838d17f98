"""Few-step students at 1 and 2 steps (the output parameterization of the one-step grid, flow-matching families)
and the student as a LoRA (distill --as-lora): base + LoRA against the full student, a user LoRA stacked on it,
generate --lora taking the student's sampler from the file, and diffusers' load_lora_weights for sd3 and flux."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.formats.embeddings import load_embeddings
from ditkit.formats.errors import ConfigError
from ditkit.formats.layouts import load_bundle
from ditkit.formats.lora import load_adapter, save_adapter
from ditkit.ops.distill import DistillConfig, distill, steps
from ditkit.ops.distill.as_lora import delta_adapter
from ditkit.ops.generate import GenerateConfig, generate
from ditkit.ops.lora import apply_lora
from ditkit.ops.metrics import psnr
from ditkit.ops.sample import denoise
from test_distill import FAST, _inputs
from test_lora import diffusers_pipe, outputs, random_adapter

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("k", [1, 2])
def test_one_and_two_step_grids_land_where_the_sampler_does(prediction, k, tiny_dir):
    """For every output parameterization, the output the loss asks for, fed to the real DDIM sampler, lands on
    the targets; at one step epsilon amplifies the output's error ~157x (the reason for v_prediction there)."""
    base = load_bundle(tiny_dir("dit"))
    fam, shape = base.family, (base.family.latent_channels(base.transformer), 8, 8)
    sched = steps.student_scheduler(fam, base.scheduler, prediction)
    assert sched.config.prediction_type == prediction and sched.config.timestep_spacing == "trailing"
    grid = steps.make_grid(fam, sched, k, 3, shape)
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, *shape, generator=g) for _ in range(k + 1)]

    calls = []

    def ideal(x, t, c):
        i = len(calls)
        calls.append(float(t[0]))
        s = grid.student[i]
        return (states[i + 1] - s.a * x) / s.b

    final = denoise(fam, base.transformer, steps.student_scheduler(fam, base.scheduler, prediction), states[0],
                    {"class_labels": torch.tensor([0, 1])}, None, 1.0, k, predict=ideal)
    torch.testing.assert_close(final, states[-1], atol=1e-3, rtol=1e-4)
    if k == 1:
        gain = abs(grid.student[0].b)
        assert gain > 100 if prediction == "epsilon" else gain == pytest.approx(1.0, abs=1e-3)


def test_prediction_resolution():
    dit = load_family("dit")
    assert steps.resolve_prediction(dit, "auto", 1) == "v_prediction"
    assert steps.resolve_prediction(dit, None, 2) == "epsilon"
    assert steps.resolve_prediction(dit, "sample", 4) == "sample"
    with pytest.raises(ConfigError, match="predicts the flow velocity"):
        steps.resolve_prediction(load_family("sd3"), "v_prediction", 1)
    with pytest.raises(ConfigError, match="prediction"):
        DistillConfig(mode="steps", prediction="x0")
    with pytest.raises(ConfigError, match="does not apply to --mode recover"):
        DistillConfig(mode="recover", prediction="sample")


def load_family(name):
    from ditkit.formats.families import get_family

    return get_family(name)


@pytest.mark.parametrize("family", ["dit", "sd3", "flux"])
@pytest.mark.parametrize("k", [1, 2])
def test_students_at_one_and_two_steps(family, k, tiny_dir, tiny_embeddings):
    base, emb = _inputs(family, tiny_dir, tiny_embeddings)
    out, report = distill(base, DistillConfig(mode="steps", student_steps=k, **FAST), embeddings=emb)
    d = out.defaults()
    assert d["steps"] == k and report.validation["steps"] == k
    assert torch.isfinite(torch.tensor(report.final_loss))
    if family == "dit":
        assert d["sampler"] == "ddim" and d["guidance"] == 1.0
        want = "v_prediction" if k == 1 else "epsilon"
        assert report.details["prediction"] == want and out.scheduler.config.prediction_type == want
    else:
        assert d["sampler"] == "flow-euler" and report.details["prediction"] == "flow"
        assert type(out.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        if family == "flux":  # guidance is embedded: the student keeps the teacher's value
            assert d["guidance"] == base.defaults()["guidance"]
        else:
            assert d["guidance"] == 1.0
    images, rep = generate(out, GenerateConfig(num_images=2, seed=0), emb)
    assert rep.steps == k and images.shape[0] == 2 and images.std() > 0


# -- the student as a LoRA -----------------------------------------------------------------------------

def _student(tiny_dir, rank, family="dit", tiny_embeddings=None, k=2):
    base = load_bundle(tiny_dir(family))
    emb = load_embeddings(tiny_embeddings(family)) if family != "dit" else None
    cfg = DistillConfig(mode="steps", student_steps=k, as_lora=True, rank=rank,
                        **{**FAST, "steps": 8, "lr": 3e-3})
    adapter, report = distill(base, cfg, embeddings=emb)
    return base, adapter, report, emb


def test_as_lora_at_full_rank_is_the_student(tiny_dir, tmp_path):
    """Only the Linears' weights train, so at full rank base + LoRA is the student: its images on the same
    seeds within 40 dB PSNR, and the file carries the sampler (2 DDIM steps, guidance 1)."""
    base, adapter, report, _ = _student(tiny_dir, rank=512)
    lora = report.details["lora"]
    assert lora["relative_error"] < 1e-5 and lora["outside_linears_changed"] == 0
    assert lora["validation"]["steps"] == 2 and lora["validation"]["psnr_vs_student"] >= 40
    path = save_adapter(tmp_path / "s2.safetensors", adapter)
    back = load_adapter(path)
    assert back.info["sampler_defaults"] == {"sampler": "ddim", "steps": 2, "guidance": 1.0}
    assert back.info["scheduler"]["class"] == "DDIMScheduler"
    fresh = load_bundle(tiny_dir("dit"))
    apply_lora(fresh, back)
    assert fresh.defaults()["steps"] == 2 and fresh.scheduler.config.timestep_spacing == "trailing"


def test_as_lora_rank_cut_reports_its_error(tiny_dir):
    _, adapter, report, _ = _student(tiny_dir, rank=2)
    lora = report.details["lora"]
    assert adapter.rank == 2 and all(a.shape[0] == 2 for a in adapter.A.values())
    assert 0 < lora["relative_error"] < 1 and lora["worst_relative_error"] >= lora["relative_error"]
    assert 0 < lora["validation"]["psnr_vs_student"] < 200


def test_delta_adapter_is_the_best_rank_r_cut():
    """Eckart-Young: the error left is the tail of the singular values."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10))
    student = copy.deepcopy(base)
    with torch.no_grad():
        student[0].weight.add_(torch.randn(10, 12))
    d = (student[0].weight - base[0].weight).detach().double()
    s = torch.linalg.svdvals(d)
    ad, rep = delta_adapter(base, student, 3)
    assert rep["relative_error"] == pytest.approx(float((s[3:] ** 2).sum().sqrt() / s.norm()), rel=1e-5)
    approx = ad.B["0"].double() @ ad.A["0"].double()
    assert float((d - approx).norm() / d.norm()) == pytest.approx(rep["relative_error"], rel=1e-4)


def test_generate_takes_the_students_sampler_from_the_lora_and_stacks_a_user_lora(tiny_dir, tmp_path, cli):
    src = tiny_dir("dit")
    r = cli("distill", src, "-o", tmp_path / "s2.safetensors", "--mode", "steps", "--student-steps", "2", "--as-lora",
            "--rank", "512", "--steps", "8", "--batch-size", "4", "--pool-size", "4", "--val-images", "2",
            "--lr", "3e-3", "--json")
    assert r.code == 0, r.err
    assert r.json()["details"]["lora"]["validation"]["psnr_vs_student"] >= 40
    student_lora = tmp_path / "s2.safetensors"
    user = random_adapter(load_bundle(src), rank=4, alpha=4.0)
    user_path = save_adapter(tmp_path / "user.safetensors", user)
    common = ["--labels", "0,1", "--num-images", "4", "--seed", "0", "--json"]
    docs, imgs = {}, {}
    for name, loras in (("student", [student_lora]), ("user", [user_path]),
                        ("both", [student_lora, user_path])):
        args = [x for p in loras for x in ("--lora", p)]
        g = cli("generate", src, "-o", tmp_path / name, *args, *common)
        assert g.code == 0, g.err
        docs[name] = g.json()
        imgs[name] = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("[0-9]*.png"))])
    assert docs["student"]["steps"] == 2 and docs["student"]["guidance"] == 1.0
    assert docs["both"]["steps"] == 2 and docs["user"]["steps"] == load_bundle(src).defaults()["steps"]
    assert not np.array_equal(imgs["both"], imgs["student"]) and not np.array_equal(imgs["both"], imgs["user"])
    # fused into a bundle, the adapter's sampler comes along, and the images are base + LoRA's
    f = cli("lora-train", src, "--lora", student_lora, "--fuse-into", tmp_path / "fused", "--json")
    assert f.code == 0, f.err
    fused = load_bundle(tmp_path / "fused")
    assert fused.defaults()["steps"] == 2 and fused.scheduler.config.timestep_spacing == "trailing"
    g = cli("generate", tmp_path / "fused", "-o", tmp_path / "fused-imgs", *common)
    assert g.code == 0 and g.json()["steps"] == 2
    fused_imgs = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "fused-imgs").glob("[0-9]*.png"))])
    assert psnr(fused_imgs, imgs["student"]) >= 40
    # explicit flags still win over the LoRA's settings
    g = cli("generate", src, "-o", tmp_path / "four", "--lora", student_lora, "--steps", "4", *common)
    assert g.code == 0 and g.json()["steps"] == 4
    bad = cli("distill", src, "-o", tmp_path / "dir", "--mode", "steps", "--as-lora")
    assert bad.code == 2 and "must end in .safetensors" in bad.error_line and not (tmp_path / "dir").exists()


def test_as_lora_config_errors():
    with pytest.raises(ConfigError, match="applies to --mode steps"):
        DistillConfig(mode="recover", as_lora=True)
    with pytest.raises(ConfigError, match="pass --as-lora too"):
        DistillConfig(mode="steps", rank=8)
    assert DistillConfig(mode="steps", as_lora=True).rank == 32


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_student_lora_loads_in_diffusers(family, tiny_dir, tiny_embeddings, tmp_path):
    """The student LoRA of a flow family loads with diffusers' load_lora_weights and gives ditkit's outputs."""
    base, adapter, report, _ = _student(tiny_dir, rank=512, family=family, tiny_embeddings=tiny_embeddings, k=1)
    assert report.details["lora"]["relative_error"] < 1e-5
    path = save_adapter(tmp_path / "s1.safetensors", adapter)
    ours_bundle = load_bundle(tiny_dir(family))
    before = outputs(ours_bundle)
    apply_lora(ours_bundle, load_adapter(path))
    assert ours_bundle.defaults()["steps"] == 1
    ours = outputs(ours_bundle)
    pipe = diffusers_pipe(family, tiny_dir(family))
    pipe.load_lora_weights(str(path))
    theirs = outputs(dataclasses.replace(ours_bundle, transformer=pipe.transformer))
    assert not torch.equal(theirs, before)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
