"""One point of the teacher-recipe sweep (issue 19.2): a teacher trained with overrides of a params
file, scored by DDIM at 64 and 8 steps on seeds 0..n-1 with a fixed evaluator (FD [95% basic
bootstrap], n = 500), one JSON line appended to the results file.

    python benchmarks/teacher_sweep.py NAME '{"teacher": {"steps": 1500, "lr": 0.004}}' [THREADS]

Paths (environment): FEWSTEP_SWEEP_PARAMS (params.yaml), FEWSTEP_SWEEP_DATA (data/prepared),
FEWSTEP_SWEEP_EVALUATOR (models/evaluator), FEWSTEP_SWEEP_OUT (a scratch dir for the runs),
FEWSTEP_SWEEP_RESULTS (benchmarks/results/teacher_sweep.jsonl). Two sweeps at one thread each share
2 cores; the seconds a point reports are then under that load (compare steps, not seconds).
"""
import json, os, sys, time, yaml, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
if len(sys.argv) < 3:
    raise SystemExit(__doc__)
name, over = sys.argv[1], json.loads(sys.argv[2]); threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
torch.set_num_threads(threads)
env = os.environ.get
from fewstep.config import validate, deep_merge
from fewstep import models, samplers
from fewstep.train.teacher import train_teacher
from fewstep.train.evaluator import features, load_evaluator
from fewstep.evaluation import feature_scores
raw = yaml.safe_load(open(env("FEWSTEP_SWEEP_PARAMS", str(ROOT / "params.yaml"))))
raw = deep_merge(raw, over)
p = validate(raw)
out = Path(env("FEWSTEP_SWEEP_OUT", "/tmp/fewstep-sweep")) / name; out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
_, card = train_teacher(p, env("FEWSTEP_SWEEP_DATA", str(ROOT / "data" / "prepared")), out / "model", out / "ckpt", torch.device("cpu"), progress=False)
tt = time.time() - t0
den = models.load_denoiser(out / "model")
ev, stats = load_evaluator(Path(env("FEWSTEP_SWEEP_EVALUATOR", str(ROOT / "models" / "evaluator"))), torch.device("cpu"))
r = {"name": name, "over": over, "train_s": tt, "threads": threads, "teacher": p.teacher.model_dump(mode="json")}
for steps in (64, 8):
    imgs = samplers.generate("ddim", den, list(range(500)), card.image_shape, steps=steps, batch_size=250)
    f = features(ev, imgs)
    s = feature_scores(f, stats, 20, 0, resamples=200)
    r[f"fd{steps}"] = [round(s["fd"], 3), round(s["fd_lo"], 3), round(s["fd_hi"], 3)]
    if steps == 64:
        from fewstep.images import save_grid
        save_grid(imgs[:64], out / "grid64.png")
print(json.dumps(r), flush=True)
results = Path(env("FEWSTEP_SWEEP_RESULTS", str(ROOT / "benchmarks" / "results" / "teacher_sweep.jsonl")))
results.parent.mkdir(parents=True, exist_ok=True)
with open(results, "a") as fh:
    fh.write(json.dumps(r) + "\n")
