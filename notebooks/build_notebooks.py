"""Generates the four notebooks from the cell sources below (run after editing them):

    python notebooks/build_notebooks.py            # writes notebooks/0?_*.ipynb without outputs
    python notebooks/build_notebooks.py --execute  # ... then runs them (tiny budget) and stores the outputs

The committed notebooks are the ``--execute`` ones, so a reader on GitHub sees the tables and plots
of a tiny run. Each notebook imports the library only (no training or evaluation logic in its
cells), reads its budget from ``RLHF_NOTEBOOK_BUDGET`` in its first cell (``tiny``, the default:
seconds-to-minutes settings, what the test suite runs; ``full``: the recipes' own settings, minutes
to an hour on a laptop CPU) and writes its runs and PNG plots OUTSIDE the repository, under
``$RLHF_NOTEBOOK_OUT/<name>/`` (default ``~/.cache/rlhf_jax/notebooks/<name>/``).
``tests/test_notebooks.py`` executes them with nbclient.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
NAMES = ("01_quickstart", "02_kl_ablation", "03_reward_model", "04_overoptimisation")

SETUP = '''import os, shutil, warnings
from pathlib import Path

# progress bars are off in these runs; tqdm.auto only warns that ipywidgets is not installed
warnings.filterwarnings("ignore", message="IProgress not found")

BUDGET = os.environ.get("RLHF_NOTEBOOK_BUDGET", "tiny")   # "tiny" (default, minutes) or "full" (the recipes)
assert BUDGET in ("tiny", "full"), f"RLHF_NOTEBOOK_BUDGET must be tiny or full, got {BUDGET!r}"
ROOT = Path(os.environ.get("RLHF_REPO_ROOT", Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()))
# runs and plots go outside the repository
OUT = Path(os.environ.get("RLHF_NOTEBOOK_OUT", Path.home() / ".cache" / "rlhf_jax" / "notebooks")) / NAME
shutil.rmtree(OUT, ignore_errors=True)     # every run starts from a clean output directory
OUT.mkdir(parents=True)
print(f"budget={BUDGET}  outputs -> {str(OUT).replace(str(Path.home()), '~')}")'''


def notebook(name: str, cells: list) -> None:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    nbformat.validate(nb)
    nbformat.write(nb, HERE / f"{name}.ipynb")


def quickstart() -> None:
    name = "01_quickstart"
    notebook(name, [
        new_markdown_cell(
            "# 01 · Quickstart: SFT → reward model → PPO on an embedded task\n\n"
            "The whole RLHF recipe on the default **sentiment** task, offline, on a CPU: a tiny model is "
            "fine-tuned on noisy demonstrations (SFT), a Bradley–Terry reward model is trained on pairs "
            "labelled by a simulated labeller, and PPO optimises the policy against that *learned* reward "
            "with a KL penalty to the SFT policy. The task's **gold** reward (the labeller's hidden "
            "preference) measures what PPO really gained. Same as `rlhf-jax pipeline --config "
            "experiments/rlhf_sentiment_tiny.py`."),
        new_code_cell(f'NAME = "{name}"\n' + SETUP + '''
# overrides applied on top of experiments/rlhf_sentiment_tiny.py
OVERRIDES = {
    "tiny": ["sft.steps=40", "sft.eval_every=0", "reward.steps=30", "reward.eval_every=0", "ppo.iterations=4",
             "ppo.ppo.batch_size=16", "ppo.ppo.ppo_epochs=2", "eval.num_prompts=32", "eval.batch_size=32",
             "eval.num_pairs=64", "eval.curve_points=2", "sft.log.tensorboard=false",
             "reward.log.tensorboard=false", "ppo.log.tensorboard=false"],
    "full": [],
}[BUDGET]'''),
        new_code_cell('''from rlhf_jax.config import apply_overrides, load_config_file
from rlhf_jax.pipeline import run_pipeline

cfg = apply_overrides(load_config_file(ROOT / "experiments" / "rlhf_sentiment_tiny.py"),
                      OVERRIDES + [f"out_dir={OUT / 'run'}"])
summary = run_pipeline(cfg, command="notebooks/01_quickstart.ipynb")'''),
        new_markdown_cell("## Results on held-out prompts\n\nGold reward (the hidden truth), proxy reward "
                          "(the learned reward model) and KL to the SFT policy, before and after PPO."),
        new_code_cell('''print(f"{'policy':6} {'gold':>7} {'proxy':>7} {'KL':>7}")
for stage in ("sft", "ppo"):
    s = summary[stage]
    print(f"{stage:6} {s['gold_reward']:7.3f} {s['proxy_reward']:7.3f} {s['kl']:7.2f}")
rm = summary["reward_model"]
print(f"reward model: accuracy {rm['heldout_accuracy']:.3f} vs labels, {rm['gold_accuracy']:.3f} vs gold order")
print(f"wall time {summary['wall_seconds']:.0f} s")'''),
        new_code_cell('''from IPython.display import Image, display

pngs = sorted((OUT / "run").glob("*.png"))
assert pngs, f"the pipeline wrote no PNG under {OUT / 'run'}"
for png in pngs:
    print(png.name)
    display(Image(filename=str(png)))'''),
        new_code_cell('''print((OUT / "run" / "summary.md").read_text()[:1500])'''),
    ])


def kl_ablation() -> None:
    name = "02_kl_ablation"
    notebook(name, [
        new_markdown_cell(
            "# 02 · KL ablation: the gold-reward-vs-KL frontier and reward over-optimisation\n\n"
            "PPO against a **learned** reward model (a proxy), sweeping ONE key, the KL coefficient "
            "β = `ppo.kl_coef`, with several seeds per value. All β × seed runs are ONE compiled program: "
            "`jax.vmap` over the traced hyper-parameters (`rlhf-jax sweep --vmap`). Small β lets the policy "
            "drift far from the SFT policy (large KL) and exploit the proxy: proxy reward keeps rising while "
            "the gold reward stalls or falls — Gao et al. (2022)'s over-optimisation. Every point below is "
            "the mean over seeds ± its standard error."),
        new_code_cell(f'NAME = "{name}"\n' + SETUP + '''
SWEEP_KEY = "ppo.kl_coef"                  # the one key this notebook sweeps
P = {
    "tiny": dict(sft=["steps=40", "eval_every=0"], reward=["steps=30", "eval_every=0"], values="0.003,0.1,1.0",
                 seeds=2, ppo=["iterations=6", "ppo.batch_size=16", "ppo.ppo_epochs=2", "ppo.minibatches=1",
                               "ppo.lr=3e-3"], eval_prompts=32),
    "full": dict(sft=[], reward=[], values="0.001,0.01,0.03,0.1,0.3,1.0", seeds=4,
                 ppo=["iterations=60"], eval_prompts=256),
}[BUDGET]
QUIET = ["log.tensorboard=false", "export=true"]'''),
        new_markdown_cell("## 1 · SFT policy and reward model (the proxy)"),
        new_code_cell('''from rlhf_jax.config import apply_overrides, load_config_file
from rlhf_jax.training.reward import train_reward
from rlhf_jax.training.sft import train_sft

EXP = ROOT / "experiments"
sft = train_sft(apply_overrides(load_config_file(EXP / "sft_sentiment_tiny.py"),
                                P["sft"] + QUIET + [f"out_dir={OUT / 'sft'}"]))
rm = train_reward(apply_overrides(load_config_file(EXP / "reward_sentiment_tiny.py"),
                                  P["reward"] + QUIET + [f"model.path={sft.export_dir}", f"out_dir={OUT / 'reward'}"]))
print("SFT loss", round(sft.train_metrics["loss"], 4), "| reward model eval",
      {k: round(v, 3) for k, v in rm.eval_metrics.items()})'''),
        new_markdown_cell(f"## 2 · One program: every value of `ppo.kl_coef` × seeds through `jax.vmap`"),
        new_code_cell('''from rlhf_jax.sweeps import parse_grid, run_vmapped_sweep

ppo_cfg = apply_overrides(load_config_file(EXP / "ppo_sentiment_tiny.py"),
                          P["ppo"] + [f"policy.path={sft.export_dir}", f"reward.path={rm.export_dir}"])
result = run_vmapped_sweep(ppo_cfg, parse_grid([f"{SWEEP_KEY}={P['values']}"]), seeds=P["seeds"],
                           out_dir=OUT / "sweep")
print(f"{result.num_runs} runs: compile {result.compile_seconds:.1f} s, run {result.run_seconds:.1f} s")'''),
        new_markdown_cell("## 3 · Gold vs proxy on held-out prompts: mean ± standard error over seeds"),
        new_code_cell('''import numpy as np
from rlhf_jax.sweeps import evaluate_runs, evaluate_start

evals = evaluate_runs(result, ppo_cfg, num_prompts=P["eval_prompts"])
start = evaluate_start(result, ppo_cfg, num_prompts=P["eval_prompts"])
METRICS = ("kl", "gold_reward", "proxy_reward")
values = sorted({e[SWEEP_KEY] for e in evals})
per_seed = {v: {m: np.array([e[m] for e in evals if e[SWEEP_KEY] == v]) for m in METRICS} for v in values}
points = [{SWEEP_KEY: v, "seeds": len(per_seed[v]["kl"]),
           **{m: per_seed[v][m].mean() for m in METRICS},
           **{m + "_se": per_seed[v][m].std(ddof=1) / np.sqrt(len(per_seed[v][m])) for m in METRICS}}
          for v in values]
print(f"{SWEEP_KEY:>12} {'seeds':>5} {'KL':>14} {'gold':>14} {'proxy':>14}")
print(f"{'SFT':>12} {'':>5} {start['kl']:14.2f} {start['gold_reward']:14.3f} {start['proxy_reward']:14.3f}")
for p in points:
    print(f"{p[SWEEP_KEY]:12g} {p['seeds']:5d} {p['kl']:7.2f} ± {p['kl_se']:4.2f} "
          f"{p['gold_reward']:7.3f} ± {p['gold_reward_se']:4.3f} {p['proxy_reward']:7.3f} ± {p['proxy_reward_se']:4.3f}")'''),
        new_code_cell('''import matplotlib.pyplot as plt
from IPython.display import Image, display
from rlhf_jax.evaluation import plot_curves

x = [p[SWEEP_KEY] for p in points]
fig, ax = plt.subplots(figsize=(6.5, 4.5))
for m, style in (("gold_reward", "o-"), ("proxy_reward", "s--")):
    ax.errorbar(x, [p[m] for p in points], yerr=[p[m + "_se"] for p in points], fmt=style, capsize=4, label=m)
    ax.axhline(start[m], color="C0" if m == "gold_reward" else "C1", lw=0.8, ls=":", label=f"SFT {m}")
ax.set(xscale="log", xlabel=f"{SWEEP_KEY} (β)", ylabel="reward on held-out prompts",
       title=f"reward vs β: mean ± s.e. over {P['seeds']} seeds")
ax.grid(alpha=0.3); ax.legend(fontsize=8)
fig.savefig(OUT / "reward_vs_kl_coef.png", dpi=100, bbox_inches="tight"); plt.close(fig)

fig, ax = plt.subplots(figsize=(6.5, 4.5))
for m, style in (("gold_reward", "o-"), ("proxy_reward", "s--")):
    ax.errorbar([p["kl"] for p in points], [p[m] for p in points], xerr=[p["kl_se"] for p in points],
                yerr=[p[m + "_se"] for p in points], fmt=style, capsize=4, label=m)
    ax.plot([start["kl"]], [start[m]], "*", color="k", markersize=12)
for p in points:
    ax.annotate(f"β={p[SWEEP_KEY]:g}", (p["kl"], p["gold_reward"]), fontsize=7, textcoords="offset points",
                xytext=(4, -10))
ax.set(xlabel="KL(π ‖ π_SFT), nats / sequence", ylabel="reward on held-out prompts",
       title="gold vs proxy reward against KL (★ = SFT policy)")
ax.grid(alpha=0.3); ax.legend(fontsize=8)
fig.savefig(OUT / "gold_vs_kl_frontier.png", dpi=100, bbox_inches="tight"); plt.close(fig)

curves = plot_curves(result, "score", OUT / "proxy_score_per_iteration.png")
for png in (OUT / "reward_vs_kl_coef.png", OUT / "gold_vs_kl_frontier.png", curves):
    display(Image(filename=str(png)))'''),
    ])


def reward_model() -> None:
    name = "03_reward_model"
    notebook(name, [
        new_markdown_cell(
            "# 03 · Reward-model accuracy vs labeller noise and data size\n\n"
            "The simulated labeller orders each pair by Bradley–Terry sampling on the gold reward with "
            "temperature *noise*. We train reward models on `size` pairs labelled at each noise level "
            "(a sequential sweep over data files) and measure their accuracy against the **noiseless** "
            "gold order of held-out pairs."),
        new_code_cell(f'NAME = "{name}"\n' + SETUP + '''
P = {
    "tiny": dict(noises=[0.05, 1.0], sizes=[64, 256], test_pairs=128,
                 overrides=["steps=20", "eval_every=0", "eval_batches=4", "data.batch_size=32"]),
    "full": dict(noises=[0.0, 0.1, 0.3, 1.0], sizes=[128, 512, 2048], test_pairs=512,
                 overrides=["steps=200", "eval_every=0", "eval_batches=16", "data.batch_size=32"]),
}[BUDGET]
TASK = "sentiment"'''),
        new_code_cell('''from rlhf_jax.tasks import get_task
from rlhf_jax.evaluation import write_jsonl

task = get_task(TASK)
gold_test = write_jsonl(OUT / "data" / "test_gold_order.jsonl",
                        task.preference_records("test", 0.0, num=P["test_pairs"]))
grid = [(noise, size) for noise in P["noises"] for size in P["sizes"]]
files = [write_jsonl(OUT / "data" / f"train_noise{noise}_n{size}.jsonl",
                     task.preference_records("train", noise, num=size)) for noise, size in grid]
print(len(files), "training files;", gold_test)'''),
        new_code_cell('''from rlhf_jax.config import apply_overrides, load_config_file
from rlhf_jax.sweeps import SweepPoint, run_sequential

config_path = str(ROOT / "experiments" / "reward_sentiment_tiny.py")
base = apply_overrides(load_config_file(config_path),
                       P["overrides"] + ["model.path=", "model.name=task", f"task={TASK}", f"eval_path={gold_test}",
                                         "log.tensorboard=false", "export=false"])
points = [SweepPoint(i, (f"data.path={f}",)) for i, f in enumerate(files)]
rows = run_sequential(config_path, base, points, OUT / "sweep", stop_on_error=True)
table = [{"noise": noise, "size": size, "gold_accuracy": row["eval_metrics.accuracy"],
          "train_accuracy": row.get("train_metrics.accuracy")} for (noise, size), row in zip(grid, rows)]
for t in table:
    print(t)'''),
        new_code_cell('''from IPython.display import Image, display
from rlhf_jax.evaluation import plot_series

by_size = plot_series(table, x="size", y="gold_accuracy", group="noise", logx=True,
                      path=OUT / "accuracy_vs_data_size.png", xlabel="training pairs",
                      ylabel="accuracy vs noiseless gold order", title="reward model: data size")
by_noise = plot_series(table, x="noise", y="gold_accuracy", group="size",
                       path=OUT / "accuracy_vs_label_noise.png", xlabel="labeller BT temperature (noise)",
                       ylabel="accuracy vs noiseless gold order", title="reward model: labeller noise")
for png in (by_size, by_noise):
    display(Image(filename=png))'''),
    ])


def overoptimisation() -> None:
    name = "04_overoptimisation"
    notebook(name, [
        new_markdown_cell(
            "# 04 · Over-optimisation: best-of-N, RL and reward-model ensembles against the gold reward\n\n"
            "A policy optimising a *learned* proxy reward eventually exploits it: the proxy keeps rising "
            "while the true (gold) reward peaks and falls (Gao et al. 2022). The embedded task's gold reward "
            "lets us watch this on a CPU. `rlhf_jax.overopt.run_lab` (the library behind `rlhf-jax "
            "overopt`) trains an SFT policy, an ensemble of proxy reward models (one vmapped program), "
            "reward models on more or fewer labels and reward models of several sizes, then measures gold and "
            "proxy reward against `d = sqrt(KL)` for best-of-N (unbiased estimator from one set of samples) and "
            "for PPO at several fixed β (one vmapped program, whose policies are evaluated on held-out test "
            "prompts every few iterations inside the program), fits Gao's forms and compares PPO against the "
            "ensemble's mean, worst case (WCO) and uncertainty-weighted (UWO) rewards. The `tiny` budget here "
            "is a smoke run; `full` runs the command's `small` budget (≤ 5 min)."),
        new_code_cell(f'NAME = "{name}"\n' + SETUP + '''
LAB_BUDGET = {"tiny": "tiny", "full": "small"}[BUDGET]'''),
        new_code_cell('''from rlhf_jax.overopt import run_lab

results = run_lab("sentiment", OUT / "lab", budget=LAB_BUDGET, seed=0)
for name, fit in results["fits"].items():
    if name in ("bon", "rl"):
        print(f"{name}: alpha={fit['alpha']:.3f} beta={fit['beta']:.3f} R2={fit['r2']:.3f} peak d={fit['peak_d']}")
for agg, row in results["ensembles"].items():
    print(f"{agg:>6}: gold={row['gold']:.3f} proxy={row['proxy']:.3f} KL={row['kl']:.2f}")
for target, row in results["targets"].items():
    print(target, "met" if row["met"] else "NOT met")'''),
        new_code_cell('''from IPython.display import Image, display

for png in ("overopt_curves.png", "ensembles.png", "rm_scaling.png"):
    display(Image(filename=str(OUT / "lab" / png)))'''),
    ])


def execute(name: str, budget: str) -> float:
    """Run ``name``.ipynb in place with nbclient (the ``python3`` kernel, cwd notebooks/) and save it
    with its outputs; returns the seconds it took."""
    from nbclient import NotebookClient
    path = HERE / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    os.environ["RLHF_NOTEBOOK_BUDGET"] = budget        # the kernel inherits this process's environment
    os.environ.setdefault("RLHF_REPO_ROOT", str(HERE.parent))
    t0 = time.time()
    NotebookClient(nb, timeout=3600, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(nb, path)
    return time.time() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execute", action="store_true", help="run the notebooks and store their outputs")
    ap.add_argument("--budget", default="tiny", choices=("tiny", "full"), help="budget of --execute (tiny)")
    ap.add_argument("--only", nargs="*", choices=NAMES, help="execute only these notebooks")
    args = ap.parse_args(argv)
    quickstart()
    kl_ablation()
    reward_model()
    overoptimisation()
    print("wrote", ", ".join(f"{n}.ipynb" for n in NAMES))
    if args.execute:
        for name in args.only or NAMES:
            print(f"executed {name}.ipynb ({args.budget}) in {execute(name, args.budget):.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
