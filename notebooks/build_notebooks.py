"""Generates the three notebooks from the cell sources below (run after editing them):

    python notebooks/build_notebooks.py          # writes notebooks/0?_*.ipynb (outputs empty)

Each notebook imports the library only (no training or evaluation logic in its cells), reads its
budget from ``RLHF_NOTEBOOK_BUDGET`` (``tiny``: seconds-scale settings the test suite runs;
``full``: the recipes' own settings, minutes on a laptop CPU) in its first cell, and saves its plots
as PNG under ``notebooks/outputs/<name>/``. ``tests/test_notebooks.py`` executes them with nbclient.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''import os, shutil
from pathlib import Path

BUDGET = os.environ.get("RLHF_NOTEBOOK_BUDGET", "full")   # "tiny" (CI) or "full"
assert BUDGET in ("tiny", "full"), f"RLHF_NOTEBOOK_BUDGET must be tiny or full, got {BUDGET!r}"
ROOT = Path(os.environ.get("RLHF_REPO_ROOT", Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()))
OUT = ROOT / "notebooks" / "outputs" / NAME
shutil.rmtree(OUT, ignore_errors=True)     # every run starts from a clean output directory
OUT.mkdir(parents=True)
print(f"budget={BUDGET}  outputs -> {OUT}")'''


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
            "PPO against a **learned** reward model (a proxy), for several KL coefficients β. All "
            "β × seed runs are ONE compiled program: `jax.vmap` over the traced hyper-parameters "
            "(`rlhf-jax sweep --vmap`). Small β lets the policy drift far from the SFT policy (large "
            "KL) and exploit the proxy: proxy reward keeps rising while the gold reward stalls or "
            "falls — Gao et al. (2022)'s over-optimisation."),
        new_code_cell(f'NAME = "{name}"\n' + SETUP + '''
P = {
    "tiny": dict(sft=["steps=40", "eval_every=0"], reward=["steps=30", "eval_every=0"], betas="0.003,0.1,1.0",
                 seeds=1, ppo=["iterations=6", "ppo.batch_size=16", "ppo.ppo_epochs=2", "ppo.minibatches=1",
                               "ppo.lr=3e-3"], eval_prompts=32),
    "full": dict(sft=[], reward=[], betas="0.001,0.01,0.03,0.1,0.3,1.0", seeds=3,
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
print("SFT", sft.train_metrics.get("loss"), "| reward model eval", rm.eval_metrics)'''),
        new_markdown_cell("## 2 · One program: β × seeds PPO runs through `jax.vmap`"),
        new_code_cell('''from rlhf_jax.sweeps import parse_grid, run_vmapped_sweep

ppo_cfg = apply_overrides(load_config_file(EXP / "ppo_sentiment_tiny.py"),
                          P["ppo"] + [f"policy.path={sft.export_dir}", f"reward.path={rm.export_dir}"])
result = run_vmapped_sweep(ppo_cfg, parse_grid([f"ppo.kl_coef={P['betas']}"]), seeds=P["seeds"],
                           out_dir=OUT / "sweep")
print(f"{result.num_runs} runs: compile {result.compile_seconds:.1f} s, run {result.run_seconds:.1f} s")'''),
        new_markdown_cell("## 3 · Gold vs proxy on held-out prompts"),
        new_code_cell('''from rlhf_jax.sweeps import evaluate_runs, evaluate_start

evals = evaluate_runs(result, ppo_cfg, num_prompts=P["eval_prompts"])
start = evaluate_start(result, ppo_cfg, num_prompts=P["eval_prompts"])
print(f"{'beta':>7} {'seed':>4} {'KL':>7} {'gold':>7} {'proxy':>7}")
print(f"{'SFT':>7} {'':>4} {start['kl']:7.2f} {start['gold_reward']:7.3f} {start['proxy_reward']:7.3f}")
for e in evals:
    print(f"{e['ppo.kl_coef']:7.3f} {e['seed']:4d} {e['kl']:7.2f} {e['gold_reward']:7.3f} {e['proxy_reward']:7.3f}")'''),
        new_code_cell('''from IPython.display import Image, display
from rlhf_jax.evaluation import plot_curves, plot_series

frontier = plot_series(evals, x="kl", y="gold_reward", start=start, annotate="ppo.kl_coef",
                       path=OUT / "gold_vs_kl_frontier.png", xlabel="KL(π ‖ π_SFT), nats / sequence",
                       ylabel="gold reward (held-out)", title="gold reward vs KL (labels: β)")
overopt = plot_series(evals, x="kl", y=["proxy_reward", "gold_reward"], start=start,
                      path=OUT / "proxy_vs_gold_overoptimisation.png", xlabel="KL(π ‖ π_SFT), nats / sequence",
                      title="proxy (reward model) vs gold reward")
curves = plot_curves(result, "score", OUT / "proxy_score_per_iteration.png")
for png in (frontier, overopt, curves):
    display(Image(filename=png))'''),
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


if __name__ == "__main__":
    quickstart()
    kl_ablation()
    reward_model()
    print("wrote", ", ".join(sorted(p.name for p in HERE.glob("0*.ipynb"))))
