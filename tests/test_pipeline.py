"""The main job end to end on the CPU: `python train.py --stage all --preset tiny` runs data ->
autoencoder -> encode -> three video models -> evaluation and writes every report output; a rerun
resumes every stage instead of starting over."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # no wall-clock limit: CI may be busy
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_tiny_pipeline_end_to_end(tmp_path):
    root = str(tmp_path / "tiny")
    log = run("--stage", "all", "--preset", "tiny", f"--root={root}")
    assert f"report: {root}/eval/results.md" in log
    out = os.path.join(root, "eval")
    for name in ("results.md", "results.json", "per_frame.csv", "consistency.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert len(os.listdir(os.path.join(out, "videos"))) == 2      # side-by-side videos (num_samples)
    assert len(os.listdir(os.path.join(out, "plans"))) == 2       # MilliVid's per-level plans
    summary = json.load(open(os.path.join(out, "results.json")))
    rows = {r["name"]: r for r in summary["rows"]}
    assert {"millivid", "framepack", "fullres", "ground-truth latents", "random latents"} <= set(rows)
    assert rows["millivid"]["rollout_steps"] == 84 and rows["framepack"]["rollout_steps"] == 64  # 21/16 x
    assert re.fullmatch(r"400 steps in \d+:\d\d:\d\d on 1 x cpu", rows["millivid"]["trained"])
    for metric in ("psnr", "ssim"):  # the references bracket the task: decoding the truth beats random frames
        truth, random = rows["ground-truth latents"]["metrics"][metric], rows["random latents"]["metrics"][metric]
        assert all(truth[b] > random[b] for b in truth), (metric, truth, random)
    assert set(summary["unavailable"]) >= {"dino", "lightglue", "fid", "fvd"}  # said, never skipped silently
    # the memory probe runs on every maze test split: MilliVid's swap control, a row per model, and its verdict
    assert "millivid swap" in rows and "## Memory probe" in open(os.path.join(out, "results.md")).read()
    assert set(rows["framepack"]["probe"]) == {f"{m}_{c}" for m in ("colour", "psnr") for c in ("all", "only", "none")}
    # a rerun resumes: every training stage finds its final checkpoint and does not train again
    log = run("--stage", "all", "--preset", "tiny", f"--root={root}", "--eval.num_videos=2",
              "--eval.models=millivid", f"--eval.out={root}/eval-rerun")
    assert log.count("resumed from") == 4 and "step      10 |" not in log
    assert os.path.exists(os.path.join(root, "eval-rerun", "results.md"))
